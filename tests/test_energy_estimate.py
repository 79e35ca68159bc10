"""The CPU/RAM estimate: codecarbon's TDP table and RAM model, the process-tree CPU-time counter."""

from __future__ import annotations

import csv
import importlib.resources
import logging
import subprocess
import sys
import time

import pytest
from energy_fakes import FakeClock

from ssprop_energy.energy import open_meter
from ssprop_energy.energy.estimate import EstimateSource, ProcessTreeCpu, lookup_tdp
from ssprop_energy.errors import ConfigError


def table_tdp(name: str) -> float:
    """Independent reference: the row of codecarbon's shipped CSV, read with the csv module."""
    ref = importlib.resources.files("codecarbon").joinpath("data/hardware/cpu_power.csv")
    with ref.open(encoding="utf-8") as fh:
        return next(float(r["TDP"]) for r in csv.DictReader(fh) if r["Name"] == name)


@pytest.mark.parametrize(
    "raw, row",
    [("Intel(R) Xeon(R) Platinum 8480+", "Intel Xeon Platinum 8480+"),
     ("AMD EPYC 7763 64-Core Processor", "AMD EPYC 7763")],
)
def test_tdp_from_codecarbon_table(raw, row):
    tdp_w, origin = lookup_tdp(raw, logical_cpus=8)
    assert tdp_w == table_tdp(row)
    assert row in origin and "codecarbon" in origin


def test_unknown_model_and_no_model_fall_back_to_codecarbon_constants(caplog):
    with caplog.at_level(logging.WARNING):
        tdp_w, origin = lookup_tdp("Acme Frobnicator 9000", logical_cpus=3)
    assert tdp_w == 12.0  # codecarbon's DEFAULT_POWER_PER_CORE, 4 W per logical CPU
    assert "not in table" in origin and "not in codecarbon's table" in caplog.text
    tdp_w, origin = lookup_tdp(None, logical_cpus=3)
    assert tdp_w == 85.0 and "POWER_CONSTANT" in origin


def test_energy_is_tdp_times_cpu_seconds_over_cpus_plus_ram():
    clock = FakeClock()
    cpu_s = {"v": 50.0}
    src = EstimateSource(cpu_model="x", cpu_tdp_w=120.0, ram_power_w=6.0,
                         cpu_seconds=lambda: cpu_s["v"], logical_cpus=4)
    meter = open_meter("estimate", clock=clock, background=False, sync=None,
                       estimate_options=dict(cpu_model="x", cpu_tdp_w=120.0, ram_power_w=6.0,
                                             cpu_seconds=lambda: cpu_s["v"], logical_cpus=4))
    assert src.describe()["cpu_tdp_from"] == "given by the user"
    meter.start()
    with meter.window("forward"):
        cpu_s["v"] += 3.0     # 3 CPU-seconds in 2 wall seconds: 1.5 of 4 CPUs busy
        clock.advance(2.0)
    cpu_s["v"] += 1.0
    clock.advance(1.0)
    rep = meter.stop()
    assert rep.component("cpu").energy_j == pytest.approx(120.0 * 4.0 / 4)
    assert rep.component("ram").energy_j == pytest.approx(6.0 * 3.0)
    assert rep.window_components["forward"] == pytest.approx({"cpu": 90.0, "ram": 12.0})
    assert rep.source == "estimated" and all(c.source == "estimated" for c in rep.components)
    assert rep.unattributed_energy_j == pytest.approx(30.0 + 6.0)
    ram = [s for s in rep.trace if s.component == "ram"]
    assert ram and all(s.source == "estimated" and s.power_w == 6.0 for s in ram)
    cpu = [s for s in rep.trace if s.component == "cpu"]
    assert [s.power_w for s in cpu] == pytest.approx([120.0 * 4.0 / 4 / 3.0])  # one stop sample, 3 s after start


def test_codecarbon_ram_model_used_by_default():
    from codecarbon.external.ram import RAM

    src = EstimateSource(cpu_model="x", cpu_tdp_w=10.0, logical_cpus=1)
    assert src.ram_power_w == RAM(tracking_mode="process").total_power().W
    assert "codecarbon" in src.describe()["ram_power_from"]


def test_bad_overrides():
    with pytest.raises(ConfigError):
        EstimateSource(cpu_model="x", cpu_tdp_w=0.0, ram_power_w=1.0)
    with pytest.raises(ConfigError):
        EstimateSource(cpu_model="x", cpu_tdp_w=10.0, ram_power_w=-1.0)


def test_process_tree_cpu_counts_a_finished_child():
    tree = ProcessTreeCpu()
    before = tree()
    code = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.15: pass\nprint(time.process_time())"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True)
    child_cpu_s = float(out.stdout)
    after = tree()
    # the child's own CPU time is included (its interpreter start-up too, hence >=)
    assert after - before >= child_cpu_s - 0.02
    assert after - before < child_cpu_s + 1.0
    assert tree() >= after  # never decreases


def test_estimate_meter_charges_this_process_cpu_time():
    meter = open_meter("estimate", sample_period_s=0.02, sync=None,
                       estimate_options=dict(cpu_model="x", cpu_tdp_w=100.0, ram_power_w=0.0, logical_cpus=2))
    meter.start()
    c0 = time.process_time()
    with meter.window("busy"):
        while time.process_time() - c0 < 0.2:
            pass
    busy_cpu_s = time.process_time() - c0
    rep = meter.stop()
    # 100 W over 2 CPUs: 50 J per CPU-second; the sampler thread's own time adds a little
    assert rep.windows["busy"]["energy_j"] == pytest.approx(50.0 * busy_cpu_s, rel=0.05)
    assert rep.component("cpu").energy_j >= rep.windows["busy"]["energy_j"]


def test_missing_codecarbon_is_unavailable_unless_overridden(monkeypatch):
    from ssprop_energy.errors import MeterUnavailableError

    monkeypatch.setitem(sys.modules, "codecarbon", None)
    with pytest.raises(MeterUnavailableError, match="pip install codecarbon"):
        open_meter("estimate", background=False, estimate_options=dict(cpu_model="x", logical_cpus=1))
    meter = open_meter("estimate", background=False,
                       estimate_options=dict(cpu_model="x", cpu_tdp_w=10.0, ram_power_w=1.0, logical_cpus=1))
    meter.close()


def test_process_tree_cpu_counts_a_live_child_after_refresh():
    clock = FakeClock()
    tree = ProcessTreeCpu(clock)
    tree.refresh()  # lists no child
    before = tree()
    code = ("import sys, time\nt=time.process_time()\nwhile time.process_time()-t<0.15: pass\n"
            "print(time.process_time(), flush=True)\ntime.sleep(30)")
    child = subprocess.Popen([sys.executable, "-S", "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child_cpu_s = float(child.stdout.readline())
        tree.refresh()  # less than a second since the last listing: not re-listed
        assert tree() - before < child_cpu_s / 2
        clock.advance(1.0)
        tree.refresh()
        assert tree() - before >= child_cpu_s - 0.02
    finally:
        child.kill()
        child.wait()
    assert tree() - before >= child_cpu_s - 0.02  # reaped: its time moved to this process's children's times
