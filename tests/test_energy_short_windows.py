"""Windows too short for the counter, or holding fewer than two power samples, are labelled (issue 26 item 4)."""

from __future__ import annotations

import sys

from energy_fakes import FakeClock, FakeGpu, make_pynvml, sine

from ssprop_energy.energy import Constant, FakeChannel
from ssprop_energy.energy.fake import FakeSource
from ssprop_energy.energy.meter import COUNTER_UPDATE_S, EnergyMeter
from ssprop_energy.energy.nvml import NvmlSource
from ssprop_energy.records import EnergyComponent, add_components


def _meter(monkeypatch, clock: FakeClock) -> EnergyMeter:
    p, e = sine(200.0, 20.0, 3.0)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(clock, [FakeGpu("NVIDIA H100 80GB HBM3", p, e)]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sources = [NvmlSource(), FakeSource([FakeChannel("cpu", Constant(30.0))], clock)]  # gpu: counter; cpu: sampled
    return EnergyMeter(sources, clock=clock, background=False, sync=None)


def test_window_shorter_than_the_nvml_counter_period_is_labelled(monkeypatch):
    assert COUNTER_UPDATE_S["nvml"] == 0.1
    clock = FakeClock()
    meter = _meter(monkeypatch, clock)
    meter.start()
    clock.advance(0.01)  # the start sample is not at the window's edge
    with meter.window("step", scope="a"):  # 50 ms, no sample taken inside
        clock.advance(0.05)
    clock.advance(0.01)
    for _ in range(10):  # 1 s with a sample every 0.1 s
        meter.sample()
        with meter.window("long", scope="a"):
            clock.advance(0.1)
    meter.sample()
    w = meter.scope_energy("a")
    # 0.05 s < 0.1 s update period, and not one cpu sample inside it: both figures are below resolution
    assert w["step"].short_components == ("gpu:0", "cpu")
    assert w["long"].short_components == ()
    report = meter.stop()
    assert not any(c.below_resolution for c in report.components)


def test_many_short_windows_sum_past_the_counter_period_but_an_unsampled_trace_stays_labelled(monkeypatch):
    clock = FakeClock()
    meter = _meter(monkeypatch, clock)
    meter.start()
    clock.advance(0.01)
    for _ in range(4):
        with meter.window("step", scope="b"):
            clock.advance(0.03)  # 4 x 30 ms = 0.12 s of counter window in all
        clock.advance(0.1)
        meter.sample()  # samples fall between the windows, never inside nor on an edge
        clock.advance(0.1)
    (w,) = meter.scope_energy("b").values()
    assert abs(w.wall_s - 0.12) < 1e-9
    assert w.short_components == ("cpu",)
    meter.stop()


def test_a_whole_run_shorter_than_the_counter_period_is_labelled_in_the_report(monkeypatch):
    clock = FakeClock()
    meter = _meter(monkeypatch, clock)
    meter.start()
    clock.advance(0.04)
    report = meter.stop()
    flags = {c.component: c.below_resolution for c in report.components}
    assert flags == {"gpu:0": True, "cpu": False}  # cpu: the start and stop samples (2) span the run


def test_summed_components_are_below_resolution_only_when_every_part_is():
    short = EnergyComponent("gpu:0", 1.0, "counter", "H100", below_resolution=True)
    fine = EnergyComponent("gpu:0", 2.0, "counter", "H100")
    assert add_components([short], [short])[0].below_resolution
    (merged,) = add_components([short], [fine])
    assert not merged.below_resolution and merged.energy_j == 3.0


def test_slice_length_floor_follows_the_slowest_reading(monkeypatch):
    # NVML counter updates every 0.1 s, the sampled cpu component every sample period: the slower one rules
    from ssprop_energy.experiment.execute import SLICE_MIN_UPDATES, meter_update_period_s

    clock = FakeClock()
    p, e = sine(200.0, 20.0, 3.0)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(clock, [FakeGpu("NVIDIA H100 80GB HBM3", p, e)]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu_only = EnergyMeter([NvmlSource()], clock=clock, background=False, sync=None, sample_period_s=0.02)
    assert meter_update_period_s(gpu_only) == 0.1
    both = _meter(monkeypatch, clock)
    assert meter_update_period_s(both) == max(0.1, both.sample_period_s)
    assert SLICE_MIN_UPDATES * 0.1 >= 1.0  # ten counter updates per slice at least
