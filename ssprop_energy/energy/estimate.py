"""Estimated CPU and RAM energy when no counter can be read (source ``estimated``, always).

CPU: ``TDP x (CPU seconds used by this process and its descendants) / logical CPUs``, which is codecarbon's
``process`` tracking mode (``codecarbon.external.hardware.CPU._get_power_from_cpu_load``) written as an
energy rather than a power: the CPU time is cumulative, so the estimate can be read like a counter at window
edges. It charges this process tree only: idle power and other processes on the machine are excluded,
which is what a dense-versus-sparse comparison on a shared machine needs.

Both components are therefore declared :data:`~.base.SCOPE_PROCESS_TREE`: the figure is already this
process tree's, and ``audit run`` charges it as is rather than scaling it again by the command's share of
the machine's CPU time (the double scaling of issue 18). The RAM model is per process in codecarbon's
``process`` mode too (a constant power for the tree, not the machine's RAM split by use), so it is charged
whole for the run's wall time. ``audit run`` counts the descendants only (``ProcessTreeCpu(include_self=
False)``): the wrapper's own sampling is measurement overhead, not the command's work.

TDP comes from codecarbon's CPU table (``data/hardware/cpu_power.csv``) through its own fuzzy matcher
(``codecarbon.core.cpu.TDP``). When the model is not in the table we use codecarbon's fallback,
``DEFAULT_POWER_PER_CORE`` (4 W) per logical CPU; when no model can be read, its ``POWER_CONSTANT`` (85 W).

RAM: codecarbon's RAM model applied to this process tree (``codecarbon.external.ram.RAM(tracking_mode=
"process").total_power()``; in codecarbon 3 that is 5 W per estimated DIMM, at least two DIMMs on x86, so
10 W for any process under 16 GB), evaluated once when the source opens and held constant; the meter
integrates it over its own timestamps like any power reading.

Convention (issue 18): this is ``compare``'s estimate, and it is CodeCarbon's ``process`` tracking mode with
the same inputs: a lab running ``OfflineEmissionsTracker(tracking_mode="process", force_cpu_power=TDP,
force_mode_cpu_load=True)`` around the same (long) work gets the same CPU and RAM joules, up to its first
sampling interval, which it reads as zero load (``tests/test_hardening_energy_convention.py`` checks the
formula against CodeCarbon's own CPU and RAM models). CodeCarbon's
``machine`` mode (machine-wide load with a 10%-of-TDP floor) is a different, larger figure. ``audit run
--meter estimate`` charges this same figure (``ledger.attribution`` scales only machine-wide counters such
as RAPL by the command's CPU-time share; this estimate is already the process tree's).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from ssprop_energy.energy.base import SCOPE_PROCESS_TREE, ComponentSpec, PowerSource
from ssprop_energy.errors import ConfigError, MeterUnavailableError

logger = logging.getLogger(__name__)

_CHILD_REFRESH_S = 1.0


def cpu_model_name() -> str | None:
    """The CPU model string (``/proc/cpuinfo`` on Linux, else the platform's), or None when unknown.

    Reading ``/proc/cpuinfo`` directly avoids codecarbon's ``detect_cpu_model``, which runs py-cpuinfo and
    takes about a second.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def codecarbon_version() -> str:
    """The installed codecarbon's version; its absence is a :class:`MeterUnavailableError` naming the fix."""
    try:
        import codecarbon
    except ImportError:
        raise MeterUnavailableError(
            "estimate: codecarbon (the CPU table and RAM model) is not installed; `pip install codecarbon`, "
            "or give the CPU TDP and RAM power yourself"
        ) from None
    return str(getattr(codecarbon, "__version__", "unknown"))


def lookup_tdp(model: str | None, logical_cpus: int) -> tuple[float, str]:
    """CPU TDP (W) for ``model`` from codecarbon's table, and a sentence saying where it came from."""
    version = codecarbon_version()
    from codecarbon.core.cpu import DEFAULT_POWER_PER_CORE, TDP
    from codecarbon.external.hardware import POWER_CONSTANT

    if not model:
        logger.warning("CPU model unknown; using codecarbon's constant of %s W", POWER_CONSTANT)
        return float(POWER_CONSTANT), f"codecarbon {version} POWER_CONSTANT (CPU model unknown)"
    try:
        # codecarbon has no public name-to-TDP function; TDP() itself would re-detect the CPU (slowly), so
        # its matcher is called on an uninitialised instance. Both methods ignore instance state.
        matcher = TDP.__new__(TDP)
        from codecarbon.input import DataSource

        table = DataSource().get_cpu_power_data()
        match = matcher._get_matching_cpu(model, table)
        tdp = TDP._get_cpu_constant_power(match, table) if match else None
    except (AttributeError, TypeError, KeyError) as exc:  # a codecarbon release that moved these
        logger.warning("codecarbon's CPU table could not be used (%s)", exc)
        match, tdp = None, None
    if tdp:
        return float(tdp), f"codecarbon {version} cpu_power.csv entry {match!r}"
    estimated = float(DEFAULT_POWER_PER_CORE * logical_cpus)
    logger.warning(
        "CPU %r is not in codecarbon's table; assuming %s W per logical CPU x %d = %.0f W",
        model, DEFAULT_POWER_PER_CORE, logical_cpus, estimated,
    )
    return estimated, f"codecarbon {version} DEFAULT_POWER_PER_CORE x {logical_cpus} logical CPUs (model not in table)"


def ram_power_codecarbon() -> tuple[float, str]:
    """RAM power (W) of this process tree by codecarbon's RAM model, and where it came from."""
    version = codecarbon_version()
    from codecarbon.external.ram import RAM

    power_w = float(RAM(tracking_mode="process").total_power().W)
    return power_w, f"codecarbon {version} RAM(tracking_mode='process').total_power()"


class ProcessTreeCpu:
    """Cumulative CPU seconds (user + system) of this process and its descendants, non-decreasing.

    This process: ``time.process_time`` (nanosecond resolution) plus the reaped children's times from
    ``os.times``. Live descendants: ``psutil`` per process, from a list that :meth:`refresh` rebuilds (at
    most once a second, on the sampler thread) because listing them scans every process on the machine.
    A descendant that ends and is reaped moves its time into its parent's children's times, so it is
    counted once either way; one re-parented away (orphaned) is lost, and the value is then held rather
    than allowed to fall.

    Args:
        clock: monotonic clock for the refresh period (s).
        include_self: count this process's own CPU time; False counts its descendants only (``audit run``,
            where this process is the wrapper and its own sampling thread is measurement overhead).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, include_self: bool = True) -> None:
        self._proc = psutil.Process()
        self._clock = clock
        self._include_self = include_self
        self._children: list[psutil.Process] = []
        self._refreshed = float("-inf")
        self._last = 0.0

    def refresh(self) -> None:
        """Re-list the live descendants if the list is more than a second old."""
        now = self._clock()
        if now - self._refreshed < _CHILD_REFRESH_S:
            return
        self._refreshed = now
        try:
            children = self._proc.children(recursive=True)
        except psutil.Error:
            children = []
        self._children = children  # one assignment: a reader on another thread sees the old or new list

    def __call__(self) -> float:
        own = os.times()
        total = own.children_user + own.children_system
        if self._include_self:
            total += time.process_time()
        for child in self._children:
            try:
                t = child.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        self._last = max(self._last, total)
        return self._last


class EstimateSource(PowerSource):
    """CPU and RAM energy from codecarbon's models (source ``estimated``).

    Args:
        cpu_model: the CPU model name; detected when None.
        cpu_tdp_w: the TDP to use instead of codecarbon's table (W).
        ram_power_w: the RAM power to use instead of codecarbon's model (W).
        cpu_seconds: cumulative CPU seconds of the measured processes; :class:`ProcessTreeCpu` by default.
        logical_cpus: the machine's logical CPU count; detected when None.
    """

    kind = "estimate"

    def __init__(
        self,
        *,
        cpu_model: str | None = None,
        cpu_tdp_w: float | None = None,
        ram_power_w: float | None = None,
        cpu_seconds: Callable[[], float] | None = None,
        logical_cpus: int | None = None,
        resolved: dict[str, Any] | None = None,
    ) -> None:
        self.cpu_model = cpu_model if cpu_model is not None else cpu_model_name()
        self.logical_cpus = int(logical_cpus or psutil.cpu_count(logical=True) or 1)
        if resolved is not None:
            # A decision taken earlier in this run (``describe()`` of the first source): same figures, same
            # provenance, and the table lookup's warnings are not repeated for every meter of the run.
            self.cpu_model = resolved["cpu_model"]
            self.cpu_tdp_w, self.tdp_from = float(resolved["cpu_tdp_w"]), str(resolved["cpu_tdp_from"])
            self.ram_power_w, self.ram_from = float(resolved["ram_power_w"]), str(resolved["ram_power_from"])
        elif cpu_tdp_w is not None:
            if not cpu_tdp_w > 0:
                raise ConfigError(f"CPU TDP must be positive, got {cpu_tdp_w} W")
            self.cpu_tdp_w, self.tdp_from = float(cpu_tdp_w), "given by the user"
        else:
            self.cpu_tdp_w, self.tdp_from = lookup_tdp(self.cpu_model, self.logical_cpus)
        if resolved is not None:
            pass
        elif ram_power_w is not None:
            if not ram_power_w >= 0:
                raise ConfigError(f"RAM power must be non-negative, got {ram_power_w} W")
            self.ram_power_w, self.ram_from = float(ram_power_w), "given by the user"
        else:
            self.ram_power_w, self.ram_from = ram_power_codecarbon()
        self._cpu_seconds = cpu_seconds if cpu_seconds is not None else ProcessTreeCpu()

    def components(self) -> list[ComponentSpec]:
        # RAM is a constant power, integrated on the meter's own timestamps (exact for a constant); the CPU
        # is cumulative CPU time, read like a counter at window edges.
        return [
            ComponentSpec("cpu", "estimated", self.cpu_model or "unknown CPU", True, False, SCOPE_PROCESS_TREE),
            ComponentSpec("ram", "estimated", "RAM", False, True, SCOPE_PROCESS_TREE),
        ]

    def refresh(self) -> None:
        refresh = getattr(self._cpu_seconds, "refresh", None)
        if refresh is not None:
            refresh()

    def read_energy_j(self) -> dict[str, float]:
        return {"cpu": self.cpu_tdp_w * self._cpu_seconds() / self.logical_cpus}

    def read_power_w(self) -> dict[str, float]:
        return {"ram": self.ram_power_w}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cpu_model": self.cpu_model,
            "cpu_tdp_w": self.cpu_tdp_w,
            "cpu_tdp_from": self.tdp_from,
            "logical_cpus": self.logical_cpus,
            "cpu_formula": "TDP x CPU seconds of this process tree / logical CPUs (codecarbon process mode)",
            "ram_power_w": self.ram_power_w,
            "ram_power_from": self.ram_from,
        }
