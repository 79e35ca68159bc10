"""The energy convention of `compare`'s estimate, checked against CodeCarbon itself.

`compare --meter estimate` charges the process tree's CPU time x TDP / logical CPUs plus a constant RAM
power: CodeCarbon's ``tracking_mode="process"``. Given the same TDP over the same busy interval, CodeCarbon's process-mode CPU model and ours report the same
joules, and our RAM power is its process-mode RAM model.
"""

from __future__ import annotations

import time

import psutil
import pytest

codecarbon = pytest.importorskip("codecarbon")

TDP_W = 80.0
RAM_W = 7.0


def test_compare_estimate_matches_codecarbon_process_mode(tmp_path) -> None:
    """CodeCarbon's own process-mode CPU model (``CPU`` in load mode, ``tracking_mode="process"``: its own
    reading of this process tree's CPU time over the interval) and our meter, over the same busy interval and
    with the same TDP, give the same joules; our RAM power is CodeCarbon's process-mode RAM model.

    (A whole ``OfflineEmissionsTracker`` over a few seconds is no reference: its first interval reads zero
    load and a forced CPU power is charged as a constant, so short runs land anywhere from 0.7x to 3x.)"""
    from codecarbon.external.hardware import CPU, MODE_CPU_LOAD
    from codecarbon.external.ram import RAM

    from ssprop_energy.energy.estimate import EstimateSource
    from ssprop_energy.energy.meter import EnergyMeter

    cpus = psutil.cpu_count(logical=True) or 1
    theirs = CPU.from_utils(str(tmp_path), MODE_CPU_LOAD, "test CPU", TDP_W, tracking_mode="process")
    source = EstimateSource(cpu_model="test CPU", cpu_tdp_w=TDP_W, logical_cpus=cpus)
    meter = EnergyMeter([source], kind="estimate", sample_period_s=0.1)
    theirs._get_power_from_cpu_load()  # its first reading starts the interval
    t0 = time.time()
    meter.start()
    spins = 0
    while time.time() - t0 < 2.0:  # one busy thread
        spins += 1
    report = meter.stop()
    power = theirs._get_power_from_cpu_load()
    theirs_cpu_j = power.W * (time.time() - t0)
    ours = {c.component: c.energy_j for c in report.components}
    assert ours["cpu"] == pytest.approx(theirs_cpu_j, rel=0.05)
    assert ours["cpu"] > 0.3 * TDP_W * 2.0 / cpus  # the loop ran on a core for a good part of its 2 s
    # RAM: CodeCarbon's process-mode RAM model, integrated over our window
    assert source.ram_power_w == pytest.approx(float(RAM(tracking_mode="process").total_power().W))
    assert ours["ram"] == pytest.approx(source.ram_power_w * report.wall_s, rel=0.05)


def test_audit_run_charges_the_estimate_by_the_same_convention(tmp_path) -> None:
    """`audit run --meter estimate`: the estimate already covers the process tree (CodeCarbon process mode);
    a busy machine (the tree's CPU share 25% here) must not scale it down a second time."""
    import sys
    from types import SimpleNamespace

    from ssprop_energy.energy.estimate import EstimateSource
    from ssprop_energy.energy.meter import EnergyMeter
    from ssprop_energy.ledger.wrap import run_wrapped

    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    meter = EnergyMeter([EstimateSource(cpu_model="test CPU", cpu_tdp_w=TDP_W, ram_power_w=RAM_W, logical_cpus=2)],
                        kind="estimate", sample_period_s=0.05)
    clock = iter([0.0, 100.0])  # the machine was busy for 100 CPU seconds: the tree's share is well below 1
    res = run_wrapped([sys.executable, "-c", burn], meter=meter, ledger_path=tmp_path / "ledger.sqlite",
                      intensity=SimpleNamespace(g_per_kwh=100.0, source="override", region=None),
                      cpu_clock=clock.__next__, heartbeat_s=None)
    assert res.status == "complete"
    assert res.attribution is None  # nothing machine-wide to attribute
    # the charge is the process-tree estimate itself (nothing scaled away): at least the child's
    # 0.5 s x TDP / 2 CPUs plus the RAM power over its 0.5 s or more
    assert res.energy_j == pytest.approx(res.machine_energy_j)
    assert res.energy_j >= TDP_W * 0.5 / 2 + RAM_W * 0.5
