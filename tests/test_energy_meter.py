"""EnergyMeter on the fake source: integration, counters, windows, snapshots, idle baseline, errors."""

from __future__ import annotations

import math
import sys
import time

import pytest
from energy_fakes import FakeClock

from ssprop_energy.energy import Constant, FakeChannel, Ramp, Sine, Step, open_meter
from ssprop_energy.energy.fake import FunctionTrace
from ssprop_energy.errors import MeterError
from ssprop_energy.records import EnergyComponent


def run_for(meter, clock: FakeClock, duration_s: float, period_s: float = 0.1) -> None:
    """Advance the clock by ``duration_s``, sampling every ``period_s`` as the background thread would."""
    n = int(round(duration_s / period_s))
    for _ in range(n):
        clock.advance(period_s)
        meter.sample()


def manual_meter(channels, clock, **kw):
    return open_meter("fake", clock=clock, background=False, fake_channels=channels, sync=None, **kw)


def test_sampled_ramp_and_sine_integrate_to_analytic_within_1_percent():
    clock = FakeClock()
    ramp = Ramp(start_w=20.0, slope_w_per_s=3.0)
    sine = Sine(mean_w=150.0, amplitude_w=100.0, period_s=2.0)
    meter = manual_meter([FakeChannel("cpu", ramp), FakeChannel("gpu:0", sine)], clock)
    meter.start()
    run_for(meter, clock, 7.3)
    rep = meter.stop()
    t = 7.3
    ramp_j = 20.0 * t + 1.5 * t * t
    sine_j = 150.0 * t + 100.0 * (1 - math.cos(2 * math.pi * t / 2.0)) / (2 * math.pi / 2.0)
    assert rep.component("cpu").energy_j == pytest.approx(ramp_j, rel=1e-9)  # trapezoid is exact on a line
    assert rep.component("gpu:0").energy_j == pytest.approx(sine_j, rel=0.01)
    assert rep.component("gpu:0").energy_j != pytest.approx(150.0 * t, rel=1e-4)  # the sine part is really there
    assert rep.source == "fake"  # synthetic energy is never labelled as a measurement
    assert rep.energy_j == pytest.approx(rep.component("cpu").energy_j + rep.component("gpu:0").energy_j)
    assert rep.wall_s == pytest.approx(t)


def test_user_callable_trace_and_counter_is_its_integral():
    clock = FakeClock()
    fn = FunctionTrace(lambda t: 50.0 + 10.0 * t * t)  # integral 50 t + 10 t^3 / 3
    meter = manual_meter([FakeChannel("gpu:0", fn, counter=True)], clock)
    meter.start()
    run_for(meter, clock, 3.0)
    rep = meter.stop()
    comp = rep.component("gpu:0")
    assert comp.source == "fake"  # read like a counter, labelled as what it is
    assert comp.energy_j == pytest.approx(150.0 + 90.0, rel=1e-6)
    # trapezoid over-estimates a convex trace by sum(h^3 f''/12) = 30 * 0.001 * 20 / 12 = 0.05 J
    assert comp.sampled_energy_j == pytest.approx(240.05, rel=1e-6)


def test_counter_and_sampled_disagree_visibly_on_a_step_between_samples():
    clock = FakeClock()
    step = Step(before_w=100.0, after_w=300.0, at_s=0.95)
    meter = manual_meter([FakeChannel("gpu:0", step, counter=True)], clock)
    meter.start()
    run_for(meter, clock, 2.0)
    comp = meter.stop().component("gpu:0")
    assert comp.energy_j == pytest.approx(100 * 0.95 + 300 * 1.05)
    # the sampled trace sees the step only at 1.0 s and ramps over [0.9, 1.0]: 0.1 * (100+300)/2 = 20 J there
    assert comp.sampled_energy_j == pytest.approx(100 * 0.9 + 20 + 300 * 1.0)


def test_windows_nested_aggregated_short_and_unattributed():
    clock = FakeClock()
    gpu = FakeChannel("gpu:0", Constant(200.0), counter=True)
    cpu = FakeChannel("cpu", Ramp(10.0, 2.0))
    meter = manual_meter([gpu, cpu], clock)
    meter.start()
    last = clock()
    fwd_s, bwd_s, gap_s = 0.013, 0.027, 0.005  # all far shorter than the 0.1 s sampling period
    steps = 200
    for _ in range(steps):
        with meter.window("step"):
            with meter.window("forward"):
                clock.advance(fwd_s)
            with meter.window("backward"):
                clock.advance(bwd_s)
        clock.advance(gap_s)
        if clock() - last >= 0.1:
            meter.sample()
            last = clock()
    rep = meter.stop()
    total_s = steps * (fwd_s + bwd_s + gap_s)
    assert rep.wall_s == pytest.approx(total_s)
    assert rep.windows["forward"]["count"] == steps and rep.windows["step"]["count"] == steps
    assert rep.windows["forward"]["wall_s"] == pytest.approx(steps * fwd_s)
    # exact references: GPU constant (counter), CPU a ramp (sampled, linear interpolation is exact on a line)
    t0 = 0.0
    fwd_cpu = bwd_cpu = 0.0
    for i in range(steps):
        a = t0 + i * (fwd_s + bwd_s + gap_s)
        ramp = Ramp(10.0, 2.0)
        fwd_cpu += ramp.energy_j(a + fwd_s) - ramp.energy_j(a)
        bwd_cpu += ramp.energy_j(a + fwd_s + bwd_s) - ramp.energy_j(a + fwd_s)
    wc = rep.window_components
    assert wc["forward"]["gpu:0"] == pytest.approx(200.0 * steps * fwd_s, rel=1e-6)
    assert wc["forward"]["cpu"] == pytest.approx(fwd_cpu, rel=1e-9)
    assert wc["backward"]["cpu"] == pytest.approx(bwd_cpu, rel=1e-9)
    assert rep.windows["step"]["energy_j"] == pytest.approx(
        rep.windows["forward"]["energy_j"] + rep.windows["backward"]["energy_j"], rel=1e-9
    )
    # nested windows are not subtracted twice: unattributed = total - top-level ("step") only
    gap_j = rep.energy_j - rep.windows["step"]["energy_j"]
    assert rep.unattributed_energy_j == pytest.approx(gap_j, rel=1e-9)
    expected_gap = 200.0 * steps * gap_s + (Ramp(10.0, 2.0).energy_j(total_s) - fwd_cpu - bwd_cpu)
    assert rep.unattributed_energy_j == pytest.approx(expected_gap, rel=1e-6)
    # a counter-read and a sampled fake component: both fake, and the total is fake, never "mixed"
    assert {c.source for c in rep.components} == {"fake"} and rep.source == "fake"


def test_window_with_exception_still_counts_and_reraises():
    clock = FakeClock()
    meter = manual_meter([FakeChannel("cpu", Constant(10.0), counter=True)], clock)
    meter.start()
    with pytest.raises(ZeroDivisionError):
        with meter.window("eval"):
            clock.advance(1.0)
            1 / 0
    rep = meter.stop()
    assert rep.windows["eval"]["energy_j"] == pytest.approx(10.0)
    assert rep.unattributed_energy_j == pytest.approx(0.0, abs=1e-12)


def test_snapshots_are_consistent_with_the_report():
    clock = FakeClock()
    channels = [FakeChannel("gpu:0", Sine(100.0, 30.0, 1.7), counter=True), FakeChannel("cpu", Ramp(5.0, 1.0))]
    meter = manual_meter(channels, clock)
    meter.start()
    snaps = []
    for _ in range(3):  # three "epochs"
        run_for(meter, clock, 1.25, period_s=0.05)
        snaps.append(meter.snapshot())
    clock.advance(0.0)
    rep = meter.stop()
    assert snaps[-1]["gpu:0"] == pytest.approx(Sine(100.0, 30.0, 1.7).energy_j(3.75), rel=1e-6)
    assert snaps[-1]["cpu"] == pytest.approx(Ramp(5.0, 1.0).energy_j(3.75), rel=1e-9)
    for comp in ("gpu:0", "cpu"):
        assert rep.component(comp).energy_j == pytest.approx(snaps[-1][comp], rel=1e-9)
        assert snaps[0][comp] < snaps[1][comp] < snaps[2][comp]


def test_trace_has_sampled_and_counter_derived_points():
    clock = FakeClock()
    channels = [FakeChannel("gpu:0", Constant(80.0), counter=True), FakeChannel("cpu", Constant(20.0))]
    meter = manual_meter(channels, clock)
    meter.start()
    run_for(meter, clock, 0.5)
    rep = meter.stop()
    times = [s.t_s for s in rep.trace]
    assert times == sorted(times) and times[0] == 0.0 and times[-1] == pytest.approx(0.5)
    assert {s.power_w for s in rep.trace if s.component == "cpu"} == {20.0}
    assert all(s.source == "fake" for s in rep.trace)  # a counter component with a power channel
    assert len([s for s in rep.trace if s.component == "gpu:0"]) == 7  # start + 5 samples + stop


def test_idle_baseline_is_reported_not_subtracted():
    clock = FakeClock()
    channels = [FakeChannel("gpu:0", Step(40.0, 250.0, 2.0), counter=True), FakeChannel("cpu", Step(5.0, 50.0, 2.05))]
    meter = open_meter("fake", clock=clock, sleep=clock.sleep, background=False, fake_channels=channels, sync=None)
    idle = meter.measure_idle(2.0)
    assert idle == pytest.approx({"gpu:0": 40.0, "cpu": 5.0})
    meter.start()
    run_for(meter, clock, 1.0)
    rep = meter.stop()
    assert rep.idle_power_w == pytest.approx({"gpu:0": 40.0, "cpu": 5.0})
    assert rep.component("gpu:0").energy_j == pytest.approx(250.0)
    # sampled at 2.0 (5 W), 2.1 (50 W), ..., 3.0: one trapezoid of (5 + 50) / 2 then 0.9 s at 50 W
    assert rep.component("cpu").energy_j == pytest.approx(0.1 * 27.5 + 0.9 * 50.0)


def test_lifecycle_errors():
    clock = FakeClock()
    meter = manual_meter(None, clock)
    with pytest.raises(MeterError, match="not running"):
        meter.snapshot()
    with pytest.raises(MeterError, match="not running"):
        with meter.window("x"):
            pass
    meter.start()
    with pytest.raises(MeterError, match="already running"):
        meter.start()
    with pytest.raises(MeterError, match="before start"):
        meter.measure_idle(1.0)
    meter.stop()
    with pytest.raises(MeterError):
        meter.stop()


def test_counter_going_backwards_is_an_error_not_negative_energy():
    class Backwards(FunctionTrace):
        def energy_j(self, t: float) -> float:
            return 100.0 - t

    clock = FakeClock()
    meter = manual_meter([FakeChannel("gpu:0", Backwards(lambda t: 1.0), counter=True)], clock)
    meter.start()
    clock.advance(0.1)
    with pytest.raises(MeterError, match="backwards"):
        meter.sample()


def test_energy_component_rejects_negative_energy():
    with pytest.raises(Exception, match="negative"):
        EnergyComponent("cpu", -1.0, "counter")


def test_background_thread_on_the_real_clock():
    channels = [FakeChannel("cpu", Constant(50.0)), FakeChannel("gpu:0", Ramp(10.0, 100.0), counter=True)]
    meter = open_meter("fake", sample_period_s=0.01, fake_channels=channels, sync=None)
    meter.start()
    time.sleep(0.25)
    rep = meter.stop()
    n = len([s for s in rep.trace if s.component == "cpu"])
    assert 5 <= n <= 30  # ~25 on a quiet machine; loose because the test machine is shared
    assert rep.component("cpu").energy_j == pytest.approx(50.0 * rep.wall_s, rel=1e-9)
    assert rep.component("gpu:0").sampled_energy_j == pytest.approx(rep.component("gpu:0").energy_j, rel=1e-3)


def test_background_errors_surface_on_the_next_call():
    class Flaky(FunctionTrace):
        def power_w(self, t: float) -> float:
            if t > 0.02:
                raise MeterError("sensor fell off")
            return 1.0

    meter = open_meter("fake", sample_period_s=0.005, fake_channels=[FakeChannel("cpu", Flaky(lambda t: 1.0))],
                       sync=None)
    meter.start()
    time.sleep(0.1)
    with pytest.raises(MeterError, match="sensor fell off"):
        meter.snapshot()
    with pytest.raises(MeterError, match="sensor fell off"):
        meter.stop()


def test_sync_called_at_each_window_edge_and_torch_not_imported():
    calls = []
    clock = FakeClock()
    meter = open_meter("fake", clock=clock, background=False, sync=lambda: calls.append(clock()))
    meter.start()
    with meter.window("a"):
        clock.advance(1.0)
    meter.stop()
    assert calls == [1000.0, 1001.0]
    if "torch" not in sys.modules:
        # a fake meter with sync="auto" must not pull torch in (only GPU meters need cuda.synchronize)
        m2 = open_meter("fake", clock=clock, background=False)
        m2.start()
        m2.stop()
        assert "torch" not in sys.modules


def test_default_fake_channels_look_like_real_hardware_but_say_fake():
    clock = FakeClock()
    meter = open_meter("fake", clock=clock, background=False, sync=None)
    assert [(c["component"], c["source"]) for c in meter.describe()["components"]] == [
        ("gpu:0", "fake"), ("cpu", "fake")]
    meter.start()
    run_for(meter, clock, 2.0)  # one whole period of the default 150 +/- 50 W, 2 s sine
    rep = meter.stop()
    assert rep.component("gpu:0").energy_j == pytest.approx(300.0, rel=1e-9)
    assert rep.component("cpu").energy_j == pytest.approx(60.0, rel=1e-9)


def test_energy_package_does_not_import_torch():
    import subprocess

    code = ("import sys, ssprop_energy.energy as e; m = e.open_meter('fake', background=False); m.start(); "
            "m.stop(); sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
