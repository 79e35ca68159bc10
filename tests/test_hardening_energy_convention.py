"""The energy convention of `compare`'s estimate, checked against CodeCarbon itself.

`compare --meter estimate` charges the process tree's CPU time x TDP / logical CPUs plus a constant RAM
power: CodeCarbon's ``tracking_mode="process"``. Given the same TDP and RAM power (``force_cpu_power``,
``force_ram_power``) over the same busy workload, both must report the same CPU and RAM energy, up to the
CPU time spent outside the shared part of their windows (tracker start/stop, a few percent of a 3 s loop).
"""

from __future__ import annotations

import time

import psutil
import pytest

codecarbon = pytest.importorskip("codecarbon")

TDP_W = 80.0
RAM_W = 7.0
J_PER_KWH = 3.6e6


def test_compare_estimate_matches_codecarbon_process_mode() -> None:
    from codecarbon import OfflineEmissionsTracker

    from ssprop_energy.energy.estimate import EstimateSource
    from ssprop_energy.energy.meter import EnergyMeter

    cpus = psutil.cpu_count(logical=True) or 1
    source = EstimateSource(cpu_model="test CPU", cpu_tdp_w=TDP_W, ram_power_w=RAM_W, logical_cpus=cpus)
    meter = EnergyMeter([source], kind="estimate", sample_period_s=0.1)
    tracker = OfflineEmissionsTracker(
        tracking_mode="process", force_cpu_power=TDP_W, force_ram_power=RAM_W, measure_power_secs=1,
        country_iso_code="USA", save_to_file=False, log_level="error",  # no file, no network
    )
    tracker.start()
    meter.start()
    cpu0 = time.process_time()
    t0 = time.monotonic()
    spins = 0
    while time.monotonic() - t0 < 3.0:  # one busy thread: the process tree's CPU time is this loop's
        spins += 1
    busy_cpu_s = time.process_time() - cpu0
    report = meter.stop()
    tracker.stop()
    data = tracker.final_emissions_data

    ours = {c.component: c.energy_j for c in report.components}
    theirs_cpu_j = data.cpu_energy * J_PER_KWH
    theirs_ram_j = data.ram_energy * J_PER_KWH
    # the convention itself: TDP x CPU seconds / logical CPUs (the loop's CPU time, whatever the machine's load)
    assert ours["cpu"] == pytest.approx(TDP_W * busy_cpu_s / cpus, rel=0.15)
    # and CodeCarbon's process mode reports the same figure from the same inputs
    assert ours["cpu"] == pytest.approx(theirs_cpu_j, rel=0.25)
    assert ours["ram"] == pytest.approx(theirs_ram_j, rel=0.15)
    assert ours["ram"] == pytest.approx(RAM_W * report.wall_s, rel=0.05)


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
