"""The energy convention of ``audit run`` (issue 18): what is scaled by the CPU share, and what is not.

A machine-wide counter (RAPL) is charged by the command's share of the machine's busy CPU time. The CPU/RAM
estimate is already the command's own (TDP x the command tree's CPU seconds / logical CPUs, plus a constant
RAM power): it is charged as is, which is CodeCarbon's ``tracking_mode="process"`` figure for the same TDP
and RAM power. Scaling it by the share again was the double-scaling bug (53 J charged for 116 J measured).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from ssprop_energy.energy.base import SCOPE_MACHINE, SCOPE_PROCESS_TREE, ComponentSpec, PowerSource
from ssprop_energy.energy.estimate import EstimateSource, ProcessTreeCpu
from ssprop_energy.energy.meter import EnergyMeter
from ssprop_energy.ledger.attribution import (
    CpuAttribution,
    attribute,
    codecarbon_process_j,
    process_scoped_components,
)
from ssprop_energy.ledger.wrap import run_wrapped
from ssprop_energy.records import EnergyComponent

INTENSITY = SimpleNamespace(g_per_kwh=360.0, source="override", region=None)
TDP_W = 80.0
RAM_W = 7.0
CPUS = 4
J_PER_KWH = 3.6e6


class Controlled:
    """The fake world: a clock (s), the command tree's CPU seconds and a RAPL package counter (J)."""

    def __init__(self) -> None:
        self.t_s = 100.0
        self.cpu_s = 10.0
        self.package_j = 5000.0


class FakePackage(PowerSource):
    """A RAPL-like machine-wide package counter read from :class:`Controlled`."""

    kind = "rapl"

    def __init__(self, world: Controlled) -> None:
        self.world = world

    def components(self) -> list[ComponentSpec]:
        return [ComponentSpec("cpu:package-0", "counter", "Fake CPU", True, False)]

    def read_energy_j(self) -> dict[str, float]:
        return {"cpu:package-0": self.world.package_j}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


class AdvancingMeter:
    """An :class:`EnergyMeter` whose world moves on between ``start`` and ``stop`` (as the command runs)."""

    def __init__(self, meter: EnergyMeter, world: Controlled, *, wall_s: float, cpu_s: float,
                 package_j: float) -> None:
        self.meter, self.world = meter, world
        self.step = (wall_s, cpu_s, package_j)
        self.specs = meter.specs

    def start(self) -> None:
        self.meter.start()
        wall_s, cpu_s, package_j = self.step
        self.world.t_s += wall_s
        self.world.cpu_s += cpu_s
        self.world.package_j += package_j

    def stop(self) -> Any:
        return self.meter.stop()


def _meter(world: Controlled, *, with_package: bool) -> EnergyMeter:
    est = EstimateSource(cpu_model="test CPU", cpu_tdp_w=TDP_W, ram_power_w=RAM_W, logical_cpus=CPUS,
                         cpu_seconds=lambda: world.cpu_s)
    sources: list[PowerSource] = [est] + ([FakePackage(world)] if with_package else [])
    return EnergyMeter(sources, kind="test", clock=lambda: world.t_s, background=False, sync=None)


def _components(db: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["component"]: dict(r) for r in conn.execute("SELECT * FROM components WHERE entry_id = 1")}
    finally:
        conn.close()


def test_estimate_declares_process_tree_scope_and_rapl_stays_machine_wide():
    world = Controlled()
    meter = _meter(world, with_package=True)
    assert meter.specs["cpu"].scope == SCOPE_PROCESS_TREE and meter.specs["ram"].scope == SCOPE_PROCESS_TREE
    assert meter.specs["cpu:package-0"].scope == SCOPE_MACHINE
    assert process_scoped_components(meter) == {"cpu", "ram"}
    assert process_scoped_components(SimpleNamespace()) == frozenset()  # a meter without specs: none


def test_attribute_scales_machine_wide_components_only():
    comps = [EnergyComponent("cpu", 60.0, "estimated", "CPU"), EnergyComponent("ram", 14.0, "estimated", "RAM"),
             EnergyComponent("cpu:package-0", 40.0, "counter", "CPU"), EnergyComponent("gpu:0", 9.0, "counter", "G")]
    att = CpuAttribution(tree_cpu_s=3.0, machine_cpu_s=12.0, share=0.25)
    out = {a.component.component: a for a in attribute(comps, att, process_scoped={"cpu", "ram"})}
    assert out["cpu"].component.energy_j == 60.0 and out["cpu"].share is None
    assert out["ram"].component.energy_j == 14.0 and out["ram"].share is None
    assert out["cpu:package-0"].component.energy_j == 10.0 and out["cpu:package-0"].machine_energy_j == 40.0
    assert out["gpu:0"].component.energy_j == 9.0 and out["gpu:0"].share is None
    # without the scope (the old rule) the estimate would have been scaled: the bug this guards against
    old = {a.component.component: a for a in attribute(comps, att)}
    assert old["cpu"].component.energy_j == 15.0
    # the CodeCarbon process-mode figure exists only where the CPU side is the process-tree estimate
    assert codecarbon_process_j(comps[:2] + comps[3:], {"cpu", "ram"}) == 74.0
    assert codecarbon_process_j(comps, {"cpu", "ram"}) is None
    assert codecarbon_process_j(comps[2:], {"cpu", "ram"}) is None


@pytest.mark.parametrize("whole_machine", [False, True])
def test_estimate_is_charged_as_measured_not_scaled_again(tmp_path, whole_machine):
    """Regression (issue 18): the machine looks busy (1000 CPU s), so the command's share is tiny; the
    process-tree estimate must still be charged in full: 80 W x 3 CPU s / 4 CPUs = 60 J, 7 W x 2 s = 14 J."""
    world = Controlled()
    meter = AdvancingMeter(_meter(world, with_package=False), world, wall_s=2.0, cpu_s=3.0, package_j=0.0)
    clock = iter([0.0, 1000.0])
    db = tmp_path / "ledger.sqlite"
    res = run_wrapped(["true"], meter=meter, intensity=INTENSITY, ledger_path=db, cpu_clock=lambda: next(clock),
                      whole_machine=whole_machine, heartbeat_s=None, gpu_sampler=None)
    assert res.status == "complete"
    comps = _components(db)
    assert comps["cpu"]["energy_j"] == pytest.approx(60.0, rel=1e-12)
    assert comps["ram"]["energy_j"] == pytest.approx(14.0, rel=1e-12)
    assert comps["cpu"]["share"] is None and comps["ram"]["share"] is None
    assert res.energy_j == pytest.approx(74.0, rel=1e-12)
    assert res.codecarbon_process_j == pytest.approx(74.0, rel=1e-12)
    assert res.attribution is None  # nothing machine-wide was measured, so nothing was attributed
    assert "CodeCarbon tracking_mode='process'" in res.entry.row["note"] and "74 J" in res.entry.row["note"]
    assert res.co2_g == pytest.approx(74.0 / J_PER_KWH * 360.0)


def test_rapl_beside_the_estimate_is_attributed_and_the_estimate_is_not(tmp_path):
    world = Controlled()
    meter = AdvancingMeter(_meter(world, with_package=True), world, wall_s=2.0, cpu_s=3.0, package_j=40.0)
    clock = iter([0.0, 1000.0])
    db = tmp_path / "ledger.sqlite"
    res = run_wrapped([sys.executable, "-c", "pass"], meter=meter, intensity=INTENSITY, ledger_path=db,
                      cpu_clock=lambda: next(clock), heartbeat_s=None, gpu_sampler=None)
    comps = _components(db)
    share = res.attribution.share
    assert 0.0 < share < 0.01  # a python start-up against 1000 busy CPU seconds
    assert comps["cpu:package-0"]["machine_energy_j"] == pytest.approx(40.0, rel=1e-12)
    assert comps["cpu:package-0"]["energy_j"] == pytest.approx(40.0 * share, rel=1e-12)
    assert comps["cpu"]["energy_j"] == pytest.approx(60.0, rel=1e-12)
    assert comps["ram"]["energy_j"] == pytest.approx(14.0, rel=1e-12)
    assert res.codecarbon_process_j is None  # CodeCarbon reads RAPL whole: no process-mode figure for this row


def test_process_tree_cpu_without_self_counts_the_children_only():
    tree = ProcessTreeCpu(include_self=False)
    with_self = ProcessTreeCpu()
    before, before_self = tree(), with_self()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:  # this process's own work: not the children's
        pass
    assert tree() == pytest.approx(before, abs=1e-9)
    assert with_self() - before_self >= 0.2
    child = psutil.Popen([sys.executable, "-c",
                          "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass"])
    _, _, usage = os.wait4(child.pid, 0)
    # reaped children's time comes from os.times, in clock ticks (user and system each truncated)
    assert tree() - before == pytest.approx(usage.ru_utime + usage.ru_stime, abs=2.5 / os.sysconf("SC_CLK_TCK"))


# The workload for CodeCarbon: idle first (CodeCarbon's process mode counts a process's CPU time only from
# the first sample that sees it), then busy, then idle again (it loses the time after the last sample).
_CHILD = """
import sys, time
time.sleep(float(sys.argv[1]))
t = time.process_time()
while time.process_time() - t < float(sys.argv[2]):
    pass
time.sleep(float(sys.argv[1]))
"""


def test_audit_run_estimate_matches_codecarbon_process_mode(tmp_path):
    """The same wrapped command, measured by ``audit run --meter estimate`` and by CodeCarbon's
    OfflineEmissionsTracker(tracking_mode="process") around it, with the same TDP and RAM power."""
    pytest.importorskip("codecarbon")
    from codecarbon import OfflineEmissionsTracker

    cpus = psutil.cpu_count(logical=True) or 1
    period_s = 0.5
    tracker = OfflineEmissionsTracker(
        tracking_mode="process", force_cpu_power=TDP_W, force_ram_power=RAM_W, measure_power_secs=period_s,
        country_iso_code="USA", save_to_file=False, log_level="error", output_dir=str(tmp_path),
    )
    tracker.start()  # (after: its hardware detection may run child processes of its own)
    children0 = os.times()
    res = run_wrapped([sys.executable, "-c", _CHILD, str(3 * period_s), "2.0"], meter_kind="estimate",
                      sample_period_s=0.2, estimate_options={"cpu_tdp_w": TDP_W, "ram_power_w": RAM_W},
                      intensity=INTENSITY, ledger_path=tmp_path / "ledger.sqlite", heartbeat_s=None)
    tracker.stop()
    children1 = os.times()
    data = tracker.final_emissions_data
    assert res.status == "complete"
    comps = _components(tmp_path / "ledger.sqlite")
    command_cpu_s = (children1.children_user + children1.children_system
                     - children0.children_user - children0.children_system)
    assert command_cpu_s >= 2.0
    # the convention: the command's CPU seconds x TDP / logical CPUs, charged as is whatever the machine's load
    assert comps["cpu"]["energy_j"] == pytest.approx(TDP_W * command_cpu_s / cpus, rel=1e-3)
    assert comps["cpu"]["share"] is None and comps["ram"]["share"] is None
    assert res.codecarbon_process_j == pytest.approx(comps["cpu"]["energy_j"] + comps["ram"]["energy_j"])
    # CodeCarbon from the same inputs. Its figure also holds this test process's own threads (the meter's
    # sampler, its own monitor) and samples live processes every period, so on a loaded 2-core CI machine it
    # wanders by tens of percent (3-10% here when quiet; a 10% bound failed once under load). The bound below
    # still catches a wrong convention: the double scaling of issue 18 charged 0.25-0.5x, CodeCarbon's machine
    # mode 2x and more. The exact arithmetic is asserted above and in the double-scaling regression test.
    theirs_cpu_j = data.cpu_energy * J_PER_KWH
    theirs_ram_j = data.ram_energy * J_PER_KWH
    assert comps["cpu"]["energy_j"] == pytest.approx(theirs_cpu_j, rel=0.3)
    assert comps["ram"]["energy_j"] == pytest.approx(theirs_ram_j, rel=0.1)
    assert res.energy_j == pytest.approx(theirs_cpu_j + theirs_ram_j, rel=0.2)


def test_cli_audit_run_estimate_says_codecarbon_process_mode(capsys):
    from ssprop_energy.cli import main

    code = main(["audit", "run", "--meter", "estimate", "--sample-period", "0.05", "--carbon-intensity", "300",
                 "--", sys.executable, "-c", "pass"])
    assert code == 0
    err = capsys.readouterr().err
    assert "as CodeCarbon's process mode" in err and "machine-wide" not in err
