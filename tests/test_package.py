"""The package surface: lazy public names, and torch-free modules staying torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ssprop_energy


@pytest.mark.parametrize("name", [n for n in ssprop_energy.__all__ if n != "__version__"])
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(ssprop_energy, name) is not None


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        ssprop_energy.no_such_thing  # noqa: B018


@pytest.mark.parametrize("module", ["ssprop_energy.records", "ssprop_energy.ledger", "ssprop_energy.energy"])
def test_torch_free_modules_do_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
