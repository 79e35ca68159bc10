"""Shared test fixtures. No test touches the network, the real home directory or real hardware."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every per-user location (ledger, data cache) at a temporary folder."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("SSPROP_ENERGY_LEDGER", str(home / "ledger.sqlite"))
    monkeypatch.setenv("SSPROP_ENERGY_DATA", str(home / "data"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    return home


def pytest_configure(config: pytest.Config) -> None:
    # Tests use tiny tensors: waking an OpenMP pool costs far more than the work (25-50 ms per tiny conv
    # with 2 threads on a loaded 2-core VM, measured), so the suite runs torch single-threaded.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
