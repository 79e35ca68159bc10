"""NVML source against a fake pynvml module (monkeypatched into sys.modules)."""

from __future__ import annotations

import sys

import pytest
from energy_fakes import FakeClock, FakeGpu, make_pynvml, sine

from ssprop_energy.energy import open_meter
from ssprop_energy.energy.nvml import visible_gpu_indices
from ssprop_energy.errors import MeterError, MeterUnavailableError


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def install(monkeypatch, clock, gpus, init_error=None):
    mod = make_pynvml(clock, gpus, init_error)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return mod


def test_counter_gpu_and_sampling_only_gpu(monkeypatch, clock):
    p0, e0 = sine(250.0, 80.0, 3.0)
    p1, e1 = sine(120.0, 40.0, 1.3)
    mod = install(monkeypatch, clock, [FakeGpu("NVIDIA H100 80GB HBM3", p0, e0), FakeGpu("Tesla P100", p1, None)])
    meter = open_meter("nvml", clock=clock, background=False, sync=None)
    desc = meter.describe()
    assert [g["name"] for g in desc["sources"][0]["gpus"]] == ["NVIDIA H100 80GB HBM3", "Tesla P100"]
    assert [g["energy_counter"] for g in desc["sources"][0]["gpus"]] == [True, False]
    meter.start()
    for _ in range(100):
        clock.advance(0.1)
        meter.sample()
    rep = meter.stop()
    g0, g1 = rep.component("gpu:0"), rep.component("gpu:1")
    assert (g0.source, g1.source, rep.source) == ("counter", "sampled", "mixed")
    assert g0.device == "NVIDIA H100 80GB HBM3"
    assert g0.energy_j == pytest.approx(e0(10.0), abs=2e-3)  # counter has 1 mJ resolution; offset removed
    assert g0.sampled_energy_j == pytest.approx(e0(10.0), rel=0.01)
    assert g1.energy_j == pytest.approx(e1(10.0), rel=0.01) and g1.sampled_energy_j is None
    assert mod.calls["shutdown"] == 1


def test_windows_read_the_gpu_counter_at_edges(monkeypatch, clock):
    p, e = sine(300.0, 100.0, 0.7)
    install(monkeypatch, clock, [FakeGpu("A100", p, e)])
    meter = open_meter("nvml", clock=clock, background=False, sync=None)
    meter.start()
    expected = 0.0
    for i in range(50):
        a = clock() - 1000.0
        with meter.window("forward"):
            clock.advance(0.011)
        expected += e(a + 0.011) - e(a)
        clock.advance(0.02)
    rep = meter.stop()
    # each edge read is rounded to 1 mJ by NVML: at most 1 mJ of error per window
    assert rep.windows["forward"]["energy_j"] == pytest.approx(expected, abs=50 * 1e-3)


def test_init_failure_names_the_fix(monkeypatch, clock):
    install(monkeypatch, clock, [], init_error=12)
    with pytest.raises(MeterUnavailableError, match="nvidia-ml-py"):
        open_meter("nvml", clock=clock, background=False)


def test_missing_module_is_unavailable(monkeypatch, clock):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(MeterUnavailableError, match="not installed"):
        open_meter("nvml", clock=clock)


def test_no_gpu_is_unavailable(monkeypatch, clock):
    install(monkeypatch, clock, [])
    with pytest.raises(MeterUnavailableError, match="no GPU"):
        open_meter("nvml", clock=clock)


def test_gpu_lost_mid_run_is_a_meter_error(monkeypatch, clock):
    p, e = sine(100.0, 10.0, 1.0)
    gpu = FakeGpu("A100", p, e)
    install(monkeypatch, clock, [gpu])
    meter = open_meter("nvml", clock=clock, background=False, sync=None)
    meter.start()
    gpu.lost = True
    clock.advance(0.1)
    with pytest.raises(MeterError, match="GPU is lost") as info:
        meter.snapshot()
    assert not isinstance(info.value, MeterUnavailableError)


def test_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0,7,1")
    assert visible_gpu_indices(4) == [2, 0]  # CUDA stops at the first invalid index
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f6f7a1e")
    assert visible_gpu_indices(3) == [0, 1, 2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpu_indices(2) == [0, 1]


def test_gpu_selection(monkeypatch, clock):
    p, e = sine(100.0, 10.0, 1.0)
    install(monkeypatch, clock, [FakeGpu("A", p, e), FakeGpu("B", p, e)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    meter = open_meter("nvml", clock=clock, background=False)
    assert [c["component"] for c in meter.describe()["components"]] == ["gpu:1"]
    meter.close()
    with pytest.raises(MeterUnavailableError, match="does not exist"):
        open_meter("nvml", clock=clock, gpus=[5])


def test_auto_sync_is_cuda_synchronize_and_torch_is_imported_only_by_windows(monkeypatch, clock):
    import builtins
    import types

    p, e = sine(100.0, 10.0, 1.0)
    install(monkeypatch, clock, [FakeGpu("A100", p, e)])
    synced = []
    fake_torch = types.ModuleType("torch")
    fake_torch.cuda = types.SimpleNamespace(is_available=lambda: True, synchronize=lambda: synced.append(clock()))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    imported = []
    real_import = builtins.__import__

    def spy(name, *args, **kwargs):
        if name == "torch":
            imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    meter = open_meter("nvml", clock=clock, background=False)  # sync="auto"
    meter.start()
    clock.advance(0.5)
    meter.snapshot()
    assert imported == []  # the audit wrapper (no windows) never imports torch
    with meter.window("forward"):
        clock.advance(0.1)
    meter.stop()
    assert imported == ["torch"] and synced == [1000.5, 1000.6]


def test_bad_sync_argument(monkeypatch, clock):
    with pytest.raises(MeterError, match="sync must be"):
        open_meter("fake", sync="always")
