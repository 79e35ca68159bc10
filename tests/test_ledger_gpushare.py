"""Shared GPUs: `audit run` charges its process tree by NVML per-process utilisation, else by its share of
the compute processes; the whole device's energy stays beside the charged part. NVML is a fake module."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import psutil
import pytest
from energy_fakes import FakeClock, FakeGpu, make_pynvml

from ssprop_energy import ledger
from ssprop_energy.ledger.gpushare import (
    COMPUTE_PROCESSES,
    NVML_UTILISATION,
    DeviceTally,
    GpuShareSampler,
)
from ssprop_energy.ledger.wrap import run_wrapped
from ssprop_energy.records import EnergyComponent

INTENSITY = SimpleNamespace(g_per_kwh=360.0, source="override", region=None)
OTHER_PID = 2 ** 22 + 17  # another user's job on the same GPU (above any real pid_max default)


class GpuMeter:
    """Whole-device GPU energy 400 J on gpu:0 and 100 J on gpu:1, and a machine-wide CPU 60 J."""

    def start(self) -> None:
        pass

    def stop(self) -> SimpleNamespace:
        return SimpleNamespace(components=[EnergyComponent("gpu:0", 400.0, "counter", "Fake A100"),
                                           EnergyComponent("gpu:1", 100.0, "counter", "Fake A100"),
                                           EnergyComponent("cpu", 60.0, "counter")])


def _tree_pids(seen: set[int]) -> set[int]:
    """Our children (the wrapped command) as NVML would list them; once seen, kept (samples lag)."""
    seen.update(p.pid for p in psutil.Process().children(recursive=True))
    return seen


def test_tally_arithmetic():
    assert DeviceTally(tree_sm=30, all_sm=120, tree_procs=1, all_procs=3).share() == (0.25, NVML_UTILISATION)
    assert DeviceTally(tree_sm=0, all_sm=0, tree_procs=1, all_procs=3).share() == (pytest.approx(1 / 3),
                                                                                   COMPUTE_PROCESSES)
    assert DeviceTally(utilisation_supported=False, tree_sm=5, all_sm=5, tree_procs=2, all_procs=8).share() == (
        0.25, COMPUTE_PROCESSES)
    assert DeviceTally().share() is None  # nobody on the device: nothing to divide


def test_shared_gpu_charged_by_nvml_utilisation_and_by_process_count(tmp_path):
    clock = FakeClock()
    seen: set[int] = set()
    g0 = FakeGpu("Fake A100", lambda t: 100.0, None)
    g1 = FakeGpu("Fake A100", lambda t: 100.0, None)
    # gpu:0 reports per-process utilisation: our tree 30% SM against another job's 90%
    g0.process_utilisation = lambda: [(pid, 30) for pid in _tree_pids(seen)] + [(OTHER_PID, 90)]
    g0.compute_pids = lambda: [*_tree_pids(seen), OTHER_PID]
    # gpu:1 has no per-process utilisation: our tree is 1 of 4 compute processes
    g1.compute_pids = lambda: [*_tree_pids(seen), OTHER_PID, OTHER_PID + 1, OTHER_PID + 2]

    def tick() -> float:
        clock.advance(0.01)  # every NVML read sees new samples
        return clock()

    nvml = make_pynvml(tick, [g0, g1])
    sampler = GpuShareSampler(nvml, period_s=0.02, indices=[0, 1])
    path = tmp_path / "ledger.sqlite"
    res = run_wrapped([sys.executable, "-c", "import time; time.sleep(0.3)"], meter=GpuMeter(), intensity=INTENSITY,
                      ledger_path=path, cpu_clock=iter([0.0, 10.0]).__next__, gpu_sampler=sampler)
    assert nvml.calls["init"] == 1 and nvml.calls["shutdown"] == 1
    row = ledger.load_entries(path).iloc[0]
    comps = {c["component"]: c for c in row["components"]}
    assert comps["gpu:0"]["share"] == pytest.approx(0.25) and comps["gpu:0"]["share_method"] == NVML_UTILISATION
    assert comps["gpu:0"]["energy_j"] == pytest.approx(100.0) and comps["gpu:0"]["machine_energy_j"] == 400.0
    assert comps["gpu:1"]["share"] == pytest.approx(0.25) and comps["gpu:1"]["share_method"] == COMPUTE_PROCESSES
    assert comps["gpu:1"]["energy_j"] == pytest.approx(25.0) and comps["gpu:1"]["machine_energy_j"] == 100.0
    assert comps["cpu"]["share_method"] == "cpu-time share"
    assert row["gpu_share"] == pytest.approx(125.0 / 500.0)
    assert row["gpu_share_method"] == f"{NVML_UTILISATION}, {COMPUTE_PROCESSES}"
    assert row["energy_j"] == pytest.approx(125.0 + comps["cpu"]["energy_j"])
    assert "shared GPU energy attributed" in row["note"]
    assert res.gpu_attribution is not None and res.energy_j == pytest.approx(row["energy_j"])


def test_gpu_alone_or_without_nvml_is_charged_whole(tmp_path):
    clock = FakeClock()
    g0 = FakeGpu("Fake A100", lambda t: 100.0, None)  # neither call supported: nothing to divide by
    g0.errors = {"nvmlDeviceGetComputeRunningProcesses": 3}
    g1 = FakeGpu("Fake A100", lambda t: 100.0, None)
    g1.compute_pids = []  # supported, but nobody on it
    nvml = make_pynvml(clock, [g0, g1])
    path = tmp_path / "ledger.sqlite"
    run_wrapped([sys.executable, "-c", "pass"], meter=GpuMeter(), intensity=INTENSITY, ledger_path=path,
                cpu_clock=iter([0.0, 10.0]).__next__, gpu_sampler=GpuShareSampler(nvml, period_s=0.02))
    row = ledger.load_entries(path).iloc[0]
    comps = {c["component"]: c for c in row["components"]}
    assert comps["gpu:0"]["energy_j"] == 400.0 and comps["gpu:0"]["share"] is None
    assert comps["gpu:1"]["energy_j"] == 100.0 and row["gpu_share_method"] is None
    broken = make_pynvml(clock, [g0], init_error=12)  # NVML library missing: inert sampler
    assert not GpuShareSampler(broken).active


def test_nvml_not_found_means_no_new_samples_not_unsupported():
    clock = FakeClock()
    g = FakeGpu("Fake", lambda t: 1.0, None)
    g.process_utilisation = lambda: [(OTHER_PID, 50)]
    sampler = GpuShareSampler(make_pynvml(clock, [g]), period_s=10, indices=[0])
    sampler.sample()
    sampler.sample()  # same clock: NVML answers Not Found (no samples since last time)
    tally = sampler.tallies[0]
    assert tally.utilisation_supported and tally.all_sm == 50
