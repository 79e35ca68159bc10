"""A fake power source: deterministic power traces of a clock, for tests and demos.

Each channel is a trace ``power_w(t)`` (t in seconds since the source's clock origin) and, optionally, an
energy counter that is its exact integral (analytic for the built-in shapes, composite Simpson for a user
function). Components are named like real ones so that the code downstream runs unchanged, but every
figure they give carries the source ``fake``, so no record or report can mistake it for a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ssprop_energy.energy.base import ComponentSpec, PowerSource
from ssprop_energy.errors import ConfigError


class Trace:
    """A power trace: ``power_w(t)`` and its integral ``energy_j(t)`` from 0 to t (t >= 0, seconds)."""

    name = "trace"

    def power_w(self, t: float) -> float:
        raise NotImplementedError

    def energy_j(self, t: float) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Constant(Trace):
    """``power_w`` watts at all times."""

    level_w: float
    name = "constant"

    def power_w(self, t: float) -> float:
        return self.level_w

    def energy_j(self, t: float) -> float:
        return self.level_w * t

    def describe(self) -> str:
        return f"constant {self.level_w} W"


@dataclass(frozen=True)
class Step(Trace):
    """``before_w`` until ``at_s``, ``after_w`` from then on."""

    before_w: float
    after_w: float
    at_s: float
    name = "step"

    def power_w(self, t: float) -> float:
        return self.before_w if t < self.at_s else self.after_w

    def energy_j(self, t: float) -> float:
        if t <= self.at_s:
            return self.before_w * t
        return self.before_w * self.at_s + self.after_w * (t - self.at_s)

    def describe(self) -> str:
        return f"step {self.before_w} W -> {self.after_w} W at {self.at_s} s"


@dataclass(frozen=True)
class Ramp(Trace):
    """``start_w + slope_w_per_s x t``."""

    start_w: float
    slope_w_per_s: float
    name = "ramp"

    def power_w(self, t: float) -> float:
        return self.start_w + self.slope_w_per_s * t

    def energy_j(self, t: float) -> float:
        return self.start_w * t + 0.5 * self.slope_w_per_s * t * t

    def describe(self) -> str:
        return f"ramp {self.start_w} W + {self.slope_w_per_s} W/s"


@dataclass(frozen=True)
class Sine(Trace):
    """``mean_w + amplitude_w x sin(2 pi t / period_s)``."""

    mean_w: float
    amplitude_w: float
    period_s: float
    name = "sine"

    def power_w(self, t: float) -> float:
        return self.mean_w + self.amplitude_w * math.sin(2 * math.pi * t / self.period_s)

    def energy_j(self, t: float) -> float:
        omega = 2 * math.pi / self.period_s
        return self.mean_w * t + self.amplitude_w * (1.0 - math.cos(omega * t)) / omega

    def describe(self) -> str:
        return f"sine {self.mean_w} W +/- {self.amplitude_w} W, period {self.period_s} s"


class FunctionTrace(Trace):
    """A user function of time; its integral is computed by composite Simpson on a fine grid."""

    name = "function"

    def __init__(self, fn: Callable[[float], float], step_s: float = 1e-3) -> None:
        self._fn = fn
        self._step_s = step_s
        self._done_t = 0.0
        self._done_j = 0.0

    def power_w(self, t: float) -> float:
        return float(self._fn(t))

    def energy_j(self, t: float) -> float:
        if t < self._done_t:
            return self._done_j - self._simpson(t, self._done_t)
        self._done_j += self._simpson(self._done_t, t)
        self._done_t = t
        return self._done_j

    def _simpson(self, a: float, b: float) -> float:
        if b <= a:
            return 0.0
        n = max(2, 2 * math.ceil((b - a) / (2 * self._step_s)))
        h = (b - a) / n
        inner = sum((4 if i % 2 else 2) * self._fn(a + i * h) for i in range(1, n))
        return h / 3 * (self._fn(a) + inner + self._fn(b))

    def describe(self) -> str:
        return f"function {getattr(self._fn, '__name__', 'callable')}"


@dataclass(frozen=True)
class FakeChannel:
    """One fake component: a trace, with or without an energy counter."""

    component: str
    trace: Trace
    counter: bool = False
    device: str = "fake"


def default_channels() -> list[FakeChannel]:
    """The demo set: a GPU with a counter and a sine-shaped load, and a CPU sampled at constant power."""
    return [
        FakeChannel("gpu:0", Sine(mean_w=150.0, amplitude_w=50.0, period_s=2.0), counter=True, device="Fake GPU"),
        FakeChannel("cpu", Constant(30.0), counter=False, device="Fake CPU"),
    ]


class FakeSource(PowerSource):
    """Deterministic power traces read through the same interface as real hardware.

    Args:
        channels: the components; defaults to :func:`default_channels`.
        clock: the clock the traces are functions of (seconds); its value at construction is t = 0.
    """

    kind = "fake"

    def __init__(self, channels: list[FakeChannel] | None, clock: Callable[[], float]) -> None:
        self._channels = list(channels) if channels is not None else default_channels()
        if not self._channels:
            raise ConfigError("a fake power source needs at least one channel")
        self._clock = clock
        self._origin = clock()

    def components(self) -> list[ComponentSpec]:
        return [
            # Synthetic energy is labelled ``fake`` whether it is read like a counter or a power trace: no
            # downstream total may present it as a measurement.
            ComponentSpec(ch.component, "fake", ch.device, ch.counter, True)
            for ch in self._channels
        ]

    def read_energy_j(self) -> dict[str, float]:
        t = self._clock() - self._origin
        return {ch.component: ch.trace.energy_j(t) for ch in self._channels if ch.counter}

    def read_power_w(self) -> dict[str, float]:
        t = self._clock() - self._origin
        return {ch.component: ch.trace.power_w(t) for ch in self._channels}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "channels": [
                {"component": ch.component, "trace": ch.trace.describe(), "counter": ch.counter}
                for ch in self._channels
            ],
        }
