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
