"""EnergyMeter: reads one or more power sources over a run, with named windows and an idle baseline.

How energy is obtained, per component:

- a component with a counter (RAPL, NVML total energy, the CPU estimate) gets ``counter(stop) -
  counter(start)``; windows read the counter at their edges, so a window shorter than the counter's update
  interval still sums correctly over many steps (the quantisation error of each edge read averages out);
- a component with only a power reading (NVML on GPUs without the energy counter, fake sampled traces) gets
  the trapezoid integral of its power trace; a window gets the integral of the linearly interpolated trace
  over its interval, summed over every time it was open;
- a component with both (NVML on Volta and later) gets the counter figure as its energy and the sampled
  integral beside it in ``sampled_energy_j``, so the two can be compared.

A figure below the meter's resolution is labelled, not silently taken: a counter component over a window
whose total wall time is shorter than that counter's update period (:data:`COUNTER_UPDATE_S`) may read 0 or
a whole update, and a sampled component over a window holding fewer than two samples is an interpolation
between samples taken outside it. Such components are listed in ``WindowEnergy.short_components`` and marked
``below_resolution`` in the records.

The idle baseline (``measure_idle``) is reported beside the energy and never subtracted from it.
Windows must be opened from one thread (the training loop); the sampler thread only takes samples.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ssprop_energy.energy.base import ComponentSpec, EnergyReport, PowerSample, PowerSource
from ssprop_energy.energy.sampler import Sampler
from ssprop_energy.errors import MeterError, SSPropEnergyError
from ssprop_energy.records import EnergyComponent, total_energy

logger = logging.getLogger(__name__)

SyncArg = Callable[[], None] | str | None

# How often each source's energy counter advances (s); a source may override it with a
# ``counter_update_s`` attribute. RAPL: every ~1 ms (Intel SDM, 976 us). NVML total energy: NVIDIA does not
# document it; 0.1 s is the conservative bound (benchmarks/gpu_check.py measures it on the card). The
# estimate: CPU times advance in clock ticks (USER_HZ = 100, 10 ms). Fake counters are exact integrals.
COUNTER_UPDATE_S: dict[str, float | None] = {"rapl": 1e-3, "nvml": 0.1, "estimate": 0.01, "fake": None}


@dataclass
class _PowerTrace:
    """Sampled power of one component, with its running trapezoid integral (absolute clock times)."""

    times: list[float] = field(default_factory=list)
    powers_w: list[float] = field(default_factory=list)
    cum_j: list[float] = field(default_factory=list)

    def add(self, t: float, power_w: float) -> None:
        if self.times:
            dt = t - self.times[-1]
            self.cum_j.append(self.cum_j[-1] + 0.5 * (power_w + self.powers_w[-1]) * dt)
        else:
            self.cum_j.append(0.0)
        self.times.append(t)
        self.powers_w.append(power_w)

    def energy_to(self, t: float) -> float:
        """Integral (J) of the linearly interpolated trace from its first sample to ``t``."""
        times = self.times
        if not times or t <= times[0]:
            return 0.0
        if t >= times[-1]:
            return self.cum_j[-1]
        k = bisect.bisect_right(times, t) - 1
        t_k, p_k = times[k], self.powers_w[k]
        span = times[k + 1] - t_k
        p_t = p_k + (self.powers_w[k + 1] - p_k) * (t - t_k) / span if span > 0 else p_k
        return self.cum_j[k] + 0.5 * (p_k + p_t) * (t - t_k)


@dataclass(frozen=True)
class WindowEnergy:
    """What the closed windows of one (scope, name) held: energy per component (J), wall time (s), count."""

    components_j: dict[str, float]
    wall_s: float
    count: int
    short_components: tuple[str, ...] = ()  # components whose figure here is below the meter's resolution

    @property
    def energy_j(self) -> float:
        return float(sum(self.components_j.values()))


@dataclass
class _WindowTotals:
    count: int = 0
    wall_s: float = 0.0
    counter_j: dict[str, float] = field(default_factory=dict)
    intervals: list[tuple[float, float]] = field(default_factory=list)


class EnergyMeter:
    """Measure energy over an interval from one or more :class:`PowerSource` objects.

    Use :func:`ssprop_energy.energy.open_meter` rather than building one by hand.

    Args:
        sources: the power sources; their component names must be distinct.
        kind: what was asked for (``auto``, ``nvml``, ...), for the record.
        sample_period_s: power sampling period of the background thread (s).
        clock: monotonic clock in seconds; injectable for deterministic tests.
        sleep: ``sleep(seconds)`` used by :meth:`measure_idle`; injectable with the clock.
        background: run the sampling thread. Without it, samples are taken only at start, snapshot,
            stop and :meth:`sample` (tests drive the clock by hand).
        sync: called at window edges before the clock is read: a callable, None, or ``"auto"`` (torch's
            ``cuda.synchronize`` when an NVML source is present and CUDA is available; torch is imported
            only then).
        unavailable: ``{kind: reason}`` of the sources that were tried and not used, for the record.
    """

    def __init__(
        self,
        sources: Sequence[PowerSource],
        *,
        kind: str = "",
        sample_period_s: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        background: bool = True,
        sync: SyncArg = "auto",
        unavailable: dict[str, str] | None = None,
    ) -> None:
        if not sources:
            raise MeterError("an energy meter needs at least one power source")
        if not sample_period_s > 0:
            raise MeterError(f"sample period must be positive, got {sample_period_s} s")
        if not (sync is None or callable(sync) or sync == "auto"):
            raise MeterError(f"sync must be a callable, None or 'auto', got {sync!r}")
        self.kind = kind
        self.sample_period_s = float(sample_period_s)
        self._sources = list(sources)
        self._clock = clock
        self._sleep = sleep
        self._background = background
        self._sync_arg = sync
        # resolved at the first window, so that code without windows (the audit wrapper) never imports torch
        self._sync: Callable[[], None] | None | str = "unresolved"
        self.unavailable = dict(unavailable or {})

        self.specs: dict[str, ComponentSpec] = {}
        for src in self._sources:
            for spec in src.components():
                if spec.component in self.specs:
                    raise MeterError(f"two power sources both measure component {spec.component!r}")
                self.specs[spec.component] = spec
        self._counter_sources = [s for s in self._sources if any(c.counter for c in s.components())]
        self._update_s: dict[str, float | None] = {
            spec.component: getattr(src, "counter_update_s", COUNTER_UPDATE_S.get(src.kind))
            for src in self._sources for spec in src.components() if spec.counter
        }
        self._description = self._describe()

        self._lock = threading.Lock()
        self._state = "new"
        self._sampler: Sampler | None = None
        self._t0 = 0.0
        self._counter0: dict[str, float] = {}
        self._last_counter: dict[str, float] = {}
        self._last_counter_t = 0.0
        self._traces: dict[str, _PowerTrace] = {c: _PowerTrace() for c, s in self.specs.items() if s.power}
        # a power reading is "sampled" unless it comes from a model (the RAM estimate) or is synthetic
        self._power_label = {c: s.source if s.source in ("estimated", "fake") else "sampled"
                             for c, s in self.specs.items()}
        self._samples: list[PowerSample] = []
        self._stack: list[tuple[str, float, dict[str, float]]] = []
        self._windows: dict[str, _WindowTotals] = {}
        self._scoped: dict[tuple[str, str], _WindowTotals] = {}
        self._top = _WindowTotals()
        self._idle_w: dict[str, float] = {}

    # ------------------------------------------------------------------------------------- reading

    def _read_counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for src in self._counter_sources:
            out.update(src.read_energy_j())
        return out

    def _read_powers(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for src in self._sources:
            out.update(src.read_power_w())
        return out

    def _take_sample(self) -> None:
        """Read every source now and append to the trace. Call with the lock held."""
        t = self._clock()
        counters = self._read_counters()
        powers = self._read_powers()
        t_rel = t - self._t0
        for comp, power_w in powers.items():
            self._traces[comp].add(t, power_w)
            self._samples.append(PowerSample(t_rel, comp, power_w, self._power_label[comp]))
        dt = t - self._last_counter_t
        for comp, energy_j in counters.items():
            delta_j = energy_j - self._last_counter[comp]
            if delta_j < 0:
                raise MeterError(f"energy counter of {comp} went backwards by {-delta_j:.3f} J")
            if dt > 0 and not self.specs[comp].power:
                self._samples.append(PowerSample(t_rel, comp, delta_j / dt, self.specs[comp].source))
        self._last_counter = counters
        self._last_counter_t = t

    def _resolve_sync(self) -> Callable[[], None] | None:
        if self._sync_arg is None or callable(self._sync_arg):
            return self._sync_arg
        if not any(src.kind == "nvml" for src in self._sources):
            return None
        try:
            import torch  # the only torch import of this package's energy code: GPU windows need it
        except ImportError:
            return None
        return torch.cuda.synchronize if torch.cuda.is_available() else None

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start measuring: read the counters, take the first sample, start the sampling thread."""
        if self._state != "new":
            raise MeterError(f"energy meter already {self._state}; open a new one for a new interval")
        for src in self._sources:
            src.start()
            src.refresh()
        with self._lock:
            self._t0 = self._clock()
            self._counter0 = self._read_counters()
            self._last_counter = dict(self._counter0)
            self._last_counter_t = self._t0
            for comp, power_w in self._read_powers().items():
                self._traces[comp].add(self._t0, power_w)
                self._samples.append(PowerSample(0.0, comp, power_w, self._power_label[comp]))
        self._state = "running"
        if self._background:
            self._sampler = Sampler(self._tick, self.sample_period_s)
            self._sampler.start()

    def _tick(self) -> None:
        for src in self._sources:
            src.refresh()
        with self._lock:
            self._take_sample()

    def _check_running(self) -> None:
        if self._state != "running":
            raise MeterError(f"energy meter is {self._state}, not running (call start() first)")
        if self._sampler is not None and self._sampler.error is not None:
            self._raise_sampler_error()

    def _raise_sampler_error(self) -> None:
        assert self._sampler is not None and self._sampler.error is not None
        err = self._sampler.error
        if isinstance(err, SSPropEnergyError):
            raise err
        raise MeterError(f"power sampling failed: {type(err).__name__}: {err}") from err

    def sample(self) -> None:
        """Take one sample now (the background thread does this every period)."""
        self._check_running()
        self._tick()

    def snapshot(self) -> dict[str, float]:
        """Energy (J) per component since start, up to now. Takes a sample; costs one read of each source."""
        self._check_running()
        with self._lock:
            self._take_sample()
            out = {comp: self._last_counter[comp] - self._counter0[comp] for comp in self._counter0}
            for comp, trace in self._traces.items():
                if comp not in out:
                    out[comp] = trace.cum_j[-1]
        return out

    @contextlib.contextmanager
    def window(self, name: str, scope: str = "") -> Iterator[None]:
        """Attribute the energy spent inside the block to ``name`` (and to ``(scope, name)``).

        Windows nest; a name's totals are summed over every time it is opened, and separately per scope
        (e.g. ``dense/e3``: one arm's epoch), which :meth:`scope_energy` reads while the meter runs. The
        sync function (e.g. ``torch.cuda.synchronize``) runs before each edge is timed, so queued GPU work is
        charged to the window that launched it.
        """
        self._check_running()
        if self._sync == "unresolved":
            self._sync = self._resolve_sync()
        sync = self._sync
        if sync is not None:
            sync()
        with self._lock:
            t_a = self._clock()
            c_a = self._read_counters()
        top_level = not self._stack
        self._stack.append((name, t_a, c_a))
        try:
            yield
        finally:
            if sync is not None:
                sync()
            with self._lock:
                t_b = self._clock()
                c_b = self._read_counters()
            self._stack.pop()
            totals = self._windows.setdefault(name, _WindowTotals())
            scoped = self._scoped.setdefault((scope, name), _WindowTotals())
            for tot in (totals, scoped, self._top) if top_level else (totals, scoped):
                tot.count += 1
                tot.wall_s += t_b - t_a
                tot.intervals.append((t_a, t_b))
                for comp, value in c_b.items():
                    tot.counter_j[comp] = tot.counter_j.get(comp, 0.0) + max(0.0, value - c_a[comp])

    def measure_idle(self, duration_s: float) -> dict[str, float]:
        """Measure the mean power (W per component) over ``duration_s`` before the run starts.

        The result is kept for the report's ``idle_power_w`` and never subtracted from the energy.
        """
        if self._state != "new":
            raise MeterError("measure the idle baseline before start()")
        if not duration_s > 0:
            raise MeterError(f"idle duration must be positive, got {duration_s} s")
        traces = {comp: _PowerTrace() for comp in self._traces}
        for src in self._sources:
            src.refresh()
        with self._lock:
            t_a = self._clock()
            c_a = self._read_counters()
            for comp, power_w in self._read_powers().items():
                traces[comp].add(t_a, power_w)
        while (remaining := t_a + duration_s - self._clock()) > 0:
            self._sleep(min(self.sample_period_s, remaining))
            with self._lock:
                t = self._clock()
                for comp, power_w in self._read_powers().items():
                    traces[comp].add(t, power_w)
        with self._lock:
            t_b = self._clock()
            c_b = self._read_counters()
        span = t_b - t_a
        idle = {comp: max(0.0, c_b[comp] - c_a[comp]) / span for comp in c_b}
        for comp, trace in traces.items():
            if comp not in idle:
                idle[comp] = trace.cum_j[-1] / (trace.times[-1] - trace.times[0])
        self._idle_w = idle
        return dict(idle)

    def stop(self) -> EnergyReport:
        """Stop measuring and return the :class:`EnergyReport`; closes the sources."""
        if self._state != "running":
            raise MeterError(f"energy meter is {self._state}, not running (call start() first)")
        if self._sampler is not None:
            self._sampler.stop()
        try:
            if self._sampler is not None and self._sampler.error is not None:
                self._raise_sampler_error()
            with self._lock:
                self._take_sample()
                t_end = self._last_counter_t
            if self._stack:
                logger.warning(
                    "energy meter stopped with window(s) still open (%s); their energy is unattributed",
                    ", ".join(name for name, _, _ in self._stack),
                )
            return self._report(t_end)
        finally:
            self._state = "stopped"
            for src in self._sources:
                src.close()

    # ------------------------------------------------------------------------------------- results

    def _window_energy(self, tot: _WindowTotals) -> dict[str, float]:
        out = dict(tot.counter_j)
        for comp, trace in self._traces.items():
            if comp in out:
                continue
            out[comp] = max(0.0, sum(trace.energy_to(b) - trace.energy_to(a) for a, b in tot.intervals))
        return out

    def _short(self, tot: _WindowTotals) -> tuple[str, ...]:
        """Components whose figure over ``tot`` is below resolution (see the module docstring)."""
        out = []
        for comp, spec in self.specs.items():
            if spec.counter:
                period = self._update_s.get(comp)
                if period is not None and tot.wall_s < period:
                    out.append(comp)
            else:
                times = self._traces[comp].times
                inside = sum(bisect.bisect_right(times, b) - bisect.bisect_left(times, a) for a, b in tot.intervals)
                if inside < 2:
                    out.append(comp)
        return tuple(out)

    def scope_energy(self, scope: str) -> dict[str, WindowEnergy]:
        """The closed windows of ``scope`` so far: ``{name: WindowEnergy}`` (J per component, s, count).

        Sampled components are integrated up to a sample taken now when the trace does not yet reach the
        windows' end, so a window can be read as soon as it closes.
        """
        self._check_running()
        with self._lock:
            ends = [b for (sc, _), tot in self._scoped.items() if sc == scope for _, b in tot.intervals]
            if self._traces and ends and self._last_counter_t < max(ends):
                self._take_sample()
            out = {}
            for (sc, name), tot in self._scoped.items():
                if sc == scope:
                    comps = self._window_energy(tot)
                    out[name] = WindowEnergy(components_j=comps, wall_s=tot.wall_s, count=tot.count,
                                             short_components=self._short(tot))
            return out

    def component_info(self) -> dict[str, ComponentSpec]:
        """Every component's spec (source, device), for turning window energies into records."""
        return dict(self.specs)

    def counter_update_s(self) -> dict[str, float | None]:
        """Each counter component's update period (s; None where unknown): a window shorter than it may
        read 0 or a whole update."""
        return dict(self._update_s)

    def intervals(self) -> dict[tuple[str, str], list[tuple[float, float]]]:
        """``{(scope, name): [(start_s, end_s), ...]}`` of every closed window, in seconds since start."""
        return {key: [(a - self._t0, b - self._t0) for a, b in tot.intervals] for key, tot in self._scoped.items()}

    def _report(self, t_end: float) -> EnergyReport:
        components = []
        whole = _WindowTotals(count=1, wall_s=t_end - self._t0, intervals=[(self._t0, t_end)])
        short = set(self._short(whole))
        for comp, spec in self.specs.items():
            trace = self._traces.get(comp)
            sampled_j = max(0.0, trace.cum_j[-1]) if trace is not None else None
            if spec.counter:
                energy_j = self._last_counter[comp] - self._counter0[comp]
                components.append(EnergyComponent(comp, energy_j, spec.source, spec.device, sampled_j,
                                                  below_resolution=comp in short))
            else:
                assert sampled_j is not None, "a component without a counter always has a power trace"
                components.append(EnergyComponent(comp, sampled_j, spec.source, spec.device, None,
                                                  below_resolution=comp in short))
        energy_j, source = total_energy(components)
        windows: dict[str, dict[str, float]] = {}
        window_components: dict[str, dict[str, float]] = {}
        for name, tot in self._windows.items():
            per_comp = self._window_energy(tot)
            window_components[name] = per_comp
            windows[name] = {"energy_j": sum(per_comp.values()), "wall_s": tot.wall_s, "count": tot.count}
        top_j = sum(self._window_energy(self._top).values())
        samples = sorted(self._samples, key=lambda s: s.t_s)
        return EnergyReport(
            components=components,
            energy_j=energy_j,
            source=source,
            wall_s=t_end - self._t0,
            windows=windows,
            window_components=window_components,
            unattributed_energy_j=max(0.0, energy_j - top_j),
            trace=samples,
            idle_power_w=dict(self._idle_w),
        )

    def _describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sample_period_s": self.sample_period_s,
            "components": [
                {"component": s.component, "source": s.source, "device": s.device} for s in self.specs.values()
            ],
            "sources": [src.describe() for src in self._sources],
            "unavailable": dict(self.unavailable),
        }

    def describe(self) -> dict[str, Any]:
        """Provenance for the run record: sources, components, hardware names, why others were not used."""
        return dict(self._description)

    def close(self) -> None:
        """Release the sources of a meter that will not be started (e.g. one used only for
        :meth:`measure_idle`); :meth:`stop` does this itself. Idempotent."""
        if self._state == "running":
            raise MeterError("close() on a running meter; call stop() to get its report")
        if self._state != "stopped":
            self._state = "stopped"
            for src in self._sources:
                src.close()

    @property
    def source_kinds(self) -> tuple[str, ...]:
        """The kinds of the sources read (``nvml``, ``rapl``, ``estimate``, ``fake``), in order."""
        return tuple(src.kind for src in self._sources)

    @property
    def running(self) -> bool:
        return self._state == "running"
