"""RAPL source against a fake powercap tree in tmp_path."""

from __future__ import annotations

import os

import pytest
from energy_fakes import FakeClock, RaplTree

from ssprop_energy.energy import open_meter
from ssprop_energy.energy import rapl as rapl_mod
from ssprop_energy.energy.rapl import RaplSource, find_domains
from ssprop_energy.errors import MeterUnavailableError


@pytest.fixture
def tree(tmp_path) -> RaplTree:
    t = RaplTree(tmp_path)
    t.domain("intel-rapl:0", "package-0", 5_000_000, max_uj=10_000_000)
    t.domain("intel-rapl:0:0", "core", 1_000_000)
    t.domain("intel-rapl:0:1", "dram", 2_000_000)
    t.domain("intel-rapl:1", "package-1", 0)
    t.domain("intel-rapl:2", "psys", 0)
    t.domain("intel-rapl-mmio:0", "package-0", 5_000_000)
    return t


def test_domains_packages_and_dram_only(tree):
    comps = [c for c, _ in find_domains(tree.root)]
    assert comps == ["cpu:package-0", "cpu:package-1", "dram:package-0"]


def test_counter_deltas_and_wraparound(tree):
    clock = FakeClock()
    meter = open_meter("rapl", sysfs_root=tree.root, clock=clock, background=False, sync=None)
    meter.start()
    clock.advance(1.0)
    tree.set_uj("intel-rapl:0", 9_500_000)       # +4.5 J
    tree.set_uj("intel-rapl:0:1", 2_300_000)     # +0.3 J
    tree.set_uj("intel-rapl:1", 700_000)         # +0.7 J
    meter.sample()
    clock.advance(1.0)
    tree.set_uj("intel-rapl:0", 1_500_000)       # wraps at 10 J: +0.5 + 1.5 = +2.0 J
    meter.sample()
    rep = meter.stop()
    assert rep.component("cpu:package-0").energy_j == pytest.approx(6.5)
    assert rep.component("dram:package-0").energy_j == pytest.approx(0.3)
    assert rep.component("cpu:package-1").energy_j == pytest.approx(0.7)
    assert rep.source == "counter" and rep.energy_j == pytest.approx(7.5)
    # counter-only components get a power trace from counter deltas
    pkg = [s.power_w for s in rep.trace if s.component == "cpu:package-0"]
    assert pkg[:2] == pytest.approx([4.5, 2.0]) and all(s.source == "counter" for s in rep.trace)


def test_window_reads_counter_at_edges(tree):
    clock = FakeClock()
    meter = open_meter("rapl", sysfs_root=tree.root, clock=clock, background=False, sync=None)
    meter.start()
    with meter.window("backward"):
        tree.set_uj("intel-rapl:0", 5_012_345)
        clock.advance(0.004)
    rep = meter.stop()
    assert rep.window_components["backward"]["cpu:package-0"] == pytest.approx(0.012345)


def test_missing_powercap_is_unavailable(tmp_path):
    with pytest.raises(MeterUnavailableError, match="--meter estimate"):
        open_meter("rapl", sysfs_root=tmp_path)


def test_permission_denied_names_the_fix(tree, monkeypatch):
    """As root every file is readable, so the kernel's refusal is faked at os.open, the boundary."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if str(path).endswith("intel-rapl:1/energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(rapl_mod.os, "open", refusing_open)
    with pytest.raises(MeterUnavailableError, match=r"sudo chmod o\+r /sys/class/powercap/intel-rapl"):
        RaplSource(tree.root)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 0 file")
def test_chmod_0_energy_file_is_unavailable(tree):
    os.chmod(tree.base / "intel-rapl:0" / "energy_uj", 0)
    with pytest.raises(MeterUnavailableError, match="chmod"):
        RaplSource(tree.root)
