"""The sampling thread: drift-free deadlines, skipped (not bursted) missed deadlines, errors kept."""

from __future__ import annotations

import threading
import time

import pytest
from energy_fakes import FakeClock

from ssprop_energy.energy.sampler import Sampler


def scripted(clock: FakeClock, stop_after: int, tick_cost_s: list[float]):
    """A tick that records the fake time and costs ``tick_cost_s[i]`` of it; a wait that jumps the clock."""
    times: list[float] = []
    waits = {"n": 0}

    def tick() -> None:
        times.append(clock())
        clock.advance(tick_cost_s[len(times) - 1] if len(times) <= len(tick_cost_s) else 0.0)

    def wait(timeout: float) -> bool:
        waits["n"] += 1
        clock.advance(timeout)
        return waits["n"] > stop_after

    return times, tick, wait


def run_to_end(sampler: Sampler) -> None:
    sampler.start()
    sampler._thread.join(5)  # the scripted wait ends the loop by itself


def test_deadlines_do_not_drift_with_tick_cost():
    clock = FakeClock(0.0)
    times, tick, wait = scripted(clock, stop_after=5, tick_cost_s=[0.03] * 5)
    run_to_end(Sampler(tick, 0.1, clock=clock, wait=wait))
    assert times == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_missed_deadlines_are_skipped_not_bursted():
    clock = FakeClock(0.0)
    # the second tick stalls for 0.25 s: deadlines 0.3 and 0.4 pass during it; next tick at 0.5
    times, tick, wait = scripted(clock, stop_after=4, tick_cost_s=[0.0, 0.25, 0.0, 0.0])
    run_to_end(Sampler(tick, 0.1, clock=clock, wait=wait))
    assert times == pytest.approx([0.1, 0.2, 0.5, 0.6])


def test_error_stops_the_thread_and_is_kept():
    def tick() -> None:
        raise OSError("device gone")

    s = Sampler(tick, 0.001)
    s.start()
    s._thread.join(5)
    assert isinstance(s.error, OSError) and not s.running and s.ticks == 0


def test_real_thread_ticks_and_stops_promptly():
    n = {"ticks": 0}
    lock = threading.Lock()

    def tick() -> None:
        with lock:
            n["ticks"] += 1

    s = Sampler(tick, 0.01)
    s.start()
    time.sleep(0.15)
    t = time.perf_counter()
    s.stop()
    assert time.perf_counter() - t < 0.5
    assert not s.running and 3 <= n["ticks"] <= 20


def test_bad_period():
    with pytest.raises(ValueError):
        Sampler(lambda: None, 0.0)
