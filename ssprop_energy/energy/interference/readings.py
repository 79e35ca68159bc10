"""Interference monitor: how much of the machine was busy with work that is not this run's.

A paired dense-vs-sparse comparison assumes both arms saw the same machine. This module measures, over any
number of (possibly overlapping) windows, what else the machine was doing:

- **Foreign CPU load**, in busy cores: ``(machine busy CPU seconds - this process tree's CPU seconds) / wall``,
  clamped at 0. Machine busy time is read from ``/proc/stat`` for the CPUs this process may run on (its
  affinity, e.g. a cgroup cpuset; the aggregate ``cpu`` line when that is all of them): user + nice +
  system + irq + softirq + steal (guest time is already inside user/nice; idle and iowait are not work).
  Steal is kept in: it is time another virtual machine took from ours, i.e. interference; it is also
  reported on its own (``steal_cpu_cores_mean``). The tree is this process and all its descendants; each member's
  ``utime + stime + cutime + cstime`` from ``/proc/<pid>/stat``, so children reaped inside the tree (this
  process's included, the ``RUSAGE_CHILDREN`` figure of ``os.times``) stay counted. Descendants are found
  through ``/proc/<pid>/task/<tid>/children`` (a few reads per tree member, instead of psutil's scan of
  every process on the machine). A process that leaves the tree alive (a daemon whose parent exits) counts
  as foreign from then on; a member that ends and is reaped inside the tree moves its time into its
  parent's ``cutime``, so it is counted exactly once.
- **CPU frequency** (mean of ``scaling_cur_freq`` over CPUs and samples), where sysfs exposes it.
- On an NVIDIA GPU (NVML, ``pynvml`` imported only then): processes on the device outside this tree,
  clock throttle (event) reasons, the maximum temperature.

Resolution. Both CPU figures are counted in kernel clock ticks (``USER_HZ``, 100 per second on Linux):
the machine's busy time truncates up to a few ticks per read and each tree member's up to a few more, so a
window's mean is good to roughly ``0.01 s x (a few) / wall_s`` cores: about +-0.05 core for a 1 s window,
+-0.005 core for 10 s. The first read is taken at :meth:`InterferenceMonitor.begin`, so a window shorter
than the sample period is still measured between its own edges. The maximum is taken over the sampled
intervals, where an interval shorter than half the sample period is merged into its neighbour (a 5 ms
interval would make one tick look like two busy cores).

Where ``/proc/stat`` cannot be read (not Linux) the same figures come from psutil (``source`` ``psutil``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

from ssprop_energy.errors import RecordError

logger = logging.getLogger("ssprop_energy.energy.interference")  # the name it had before the split

DEFAULT_THRESHOLD_CORES = 0.25

# /proc/stat cpu-line fields (man 5 proc): user nice system idle iowait irq softirq steal guest guest_nice.
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
_STEAL_FIELD = 7

# The inode of the initial PID namespace (PROC_PID_INIT_INO in linux/proc_ns.h). Outside it, NVML may
# report host PIDs that cannot be matched with ours.
_INIT_PID_NS_INODE = 0xEFFFFFFC

# NVML clock event ("throttle") reason bits (nvml.h, nvmlClocksEventReason* / nvmlClocksThrottleReason*).
THROTTLE_REASON_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}


def decode_throttle_reasons(mask: int) -> list[str]:
    """Names of the bits set in an NVML clock event reason mask; unknown bits as ``unknown_0x...``."""
    names = [name for bit, name in THROTTLE_REASON_BITS.items() if mask & bit]
    rest = mask & ~sum(THROTTLE_REASON_BITS)
    bit = 1
    while rest >= bit:
        if rest & bit:
            names.append(f"unknown_{bit:#x}")
        bit <<= 1
    return names


# ------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class InterferenceReading:
    """What else the machine did during one window.

    Attributes:
        wall_s: window length, seconds.
        foreign_cpu_cores_mean: busy cores outside this process tree, mean over the window (>= 0).
        foreign_cpu_cores_max: the same, maximum over the sampled intervals (>= the mean up to resolution).
        own_cpu_cores_mean: cores busy with this process tree, mean over the window.
        cpu_freq_mhz_mean: mean current CPU frequency over CPUs and samples, MHz; None when unreadable.
        load_avg_1m: the 1-minute load average at the end of the window; None when unreadable.
        n_samples: machine reads in the window, both edges included (>= 2).
        source: ``procfs`` or ``psutil``: where the CPU times were read.
        gpu_foreign_processes_max: most processes seen at once on the GPU outside this tree; None on CPU
            (or when NVML PIDs could not be matched with ours, see ``gpu_pids_comparable``).
        gpu_foreign_pids: every PID seen on the GPU outside this tree, sorted.
        gpu_throttle_reasons: every clock event reason seen, sorted (``sw_power_cap``, ``hw_slowdown``, ...).
        gpu_temperature_c_max: hottest GPU reading, degrees C; None on CPU.
        steal_cpu_cores_mean: the part of the foreign load that the hypervisor stole, mean cores.
        cpu_count: logical CPUs counted: those this process may run on (its affinity) by default.
        gpu_processes_max: most processes seen at once on the GPU, this tree's included; None on CPU.
        gpu_pids_comparable: whether NVML's PIDs could be matched with this tree's (False in a container
            whose driver reports host PIDs); None on CPU.
        gpu_error: why GPU figures are missing or partial (an NVML error), else None.
    """

    wall_s: float
    foreign_cpu_cores_mean: float
    foreign_cpu_cores_max: float
    own_cpu_cores_mean: float
    cpu_freq_mhz_mean: float | None
    load_avg_1m: float | None
    n_samples: int
    source: str
    gpu_foreign_processes_max: int | None = None
    gpu_foreign_pids: list[int] = field(default_factory=list)
    gpu_throttle_reasons: list[str] = field(default_factory=list)
    gpu_temperature_c_max: float | None = None
    steal_cpu_cores_mean: float | None = None
    cpu_count: int | None = None
    gpu_processes_max: int | None = None
    gpu_pids_comparable: bool | None = None
    gpu_error: str | None = None

    def is_material(self, threshold_cores: float = DEFAULT_THRESHOLD_CORES) -> bool:
        """True when the window's foreign CPU load averaged at least ``threshold_cores`` busy cores, or
        another process used the GPU. Throttle reasons and temperature are recorded but not judged here:
        a power cap under full load is normal and hits both arms alike."""
        return self.foreign_cpu_cores_mean >= threshold_cores or (self.gpu_foreign_processes_max or 0) > 0

    def differs_from(self, other: InterferenceReading, threshold_cores: float = DEFAULT_THRESHOLD_CORES) -> bool:
        """True when two windows (e.g. the two arms) saw materially different machines: their mean foreign
        CPU loads differ by at least ``threshold_cores``, or only one of them had another process on the GPU."""
        gpu_a, gpu_b = (self.gpu_foreign_processes_max or 0) > 0, (other.gpu_foreign_processes_max or 0) > 0
        return abs(self.foreign_cpu_cores_mean - other.foreign_cpu_cores_mean) >= threshold_cores or gpu_a != gpu_b

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the unit-named fields above."""
        d = asdict(self)
        d["gpu_foreign_pids"] = list(self.gpu_foreign_pids)
        d["gpu_throttle_reasons"] = list(self.gpu_throttle_reasons)
        return d

    @classmethod
    def combine(cls, readings: Sequence[InterferenceReading]) -> InterferenceReading:
        """One reading for several windows (e.g. one arm's epochs, interleaved with the other arm's).

        Means are weighted by wall time, maxima are maxima, PIDs and reasons are unions, counts add up;
        ``load_avg_1m`` is the last window's (it is read at the end). Readings without a figure (None)
        are left out of that figure.

        Raises:
            ValueError: no readings, or readings from different sources.
        """
        if not readings:
            raise ValueError("no interference readings to combine")
        sources = {r.source for r in readings}
        if len(sources) > 1:
            raise ValueError(f"cannot combine interference readings from different sources {sorted(sources)}")
        wall_s = sum(r.wall_s for r in readings)

        def mean(values: list[tuple[float | None, float]]) -> float | None:
            known = [(v, w) for v, w in values if v is not None]
            weight = sum(w for _, w in known)
            if not known:
                return None
            return sum(v * w for v, w in known) / weight if weight > 0 else sum(v for v, _ in known) / len(known)

        def most(values: list[Any]) -> Any:
            known = [v for v in values if v is not None]
            return max(known) if known else None

        comparable = [r.gpu_pids_comparable for r in readings if r.gpu_pids_comparable is not None]
        errors = list(dict.fromkeys(r.gpu_error for r in readings if r.gpu_error))
        return cls(
            wall_s=wall_s,
            foreign_cpu_cores_mean=mean([(r.foreign_cpu_cores_mean, r.wall_s) for r in readings]) or 0.0,
            foreign_cpu_cores_max=max(r.foreign_cpu_cores_max for r in readings),
            own_cpu_cores_mean=mean([(r.own_cpu_cores_mean, r.wall_s) for r in readings]) or 0.0,
            cpu_freq_mhz_mean=mean([(r.cpu_freq_mhz_mean, r.wall_s) for r in readings]),
            load_avg_1m=readings[-1].load_avg_1m,
            n_samples=sum(r.n_samples for r in readings),
            source=readings[0].source,
            gpu_foreign_processes_max=most([r.gpu_foreign_processes_max for r in readings]),
            gpu_foreign_pids=sorted(set().union(*(r.gpu_foreign_pids for r in readings))),
            gpu_throttle_reasons=sorted(set().union(*(r.gpu_throttle_reasons for r in readings))),
            gpu_temperature_c_max=most([r.gpu_temperature_c_max for r in readings]),
            steal_cpu_cores_mean=mean([(r.steal_cpu_cores_mean, r.wall_s) for r in readings]),
            cpu_count=most([r.cpu_count for r in readings]),
            gpu_processes_max=most([r.gpu_processes_max for r in readings]),
            gpu_pids_comparable=all(comparable) if comparable else None,
            gpu_error="; ".join(errors) if errors else None,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InterferenceReading:
        """The inverse of :meth:`to_dict`; unknown keys are ignored (records from a later version).

        Raises:
            RecordError: a required field is missing or has the wrong type.
        """
        if not isinstance(d, Mapping):
            raise RecordError(f"interference: expected an object, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                if f.name in _REQUIRED:
                    raise RecordError(f"interference: missing field {f.name!r}")
                continue
            kwargs[f.name] = _checked(f.name, d[f.name])
        return cls(**kwargs)


_REQUIRED = (
    "wall_s", "foreign_cpu_cores_mean", "foreign_cpu_cores_max", "own_cpu_cores_mean", "cpu_freq_mhz_mean",
    "load_avg_1m", "n_samples", "source",
)
_FLOATS = ("wall_s", "foreign_cpu_cores_mean", "foreign_cpu_cores_max", "own_cpu_cores_mean")
_OPT_FLOATS = ("cpu_freq_mhz_mean", "load_avg_1m", "gpu_temperature_c_max", "steal_cpu_cores_mean")
_OPT_INTS = ("gpu_foreign_processes_max", "cpu_count", "gpu_processes_max")


def _checked(name: str, value: Any) -> Any:
    def bad() -> RecordError:
        return RecordError(f"interference: field {name!r} has an invalid value {value!r}")

    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in _FLOATS or (name in _OPT_FLOATS and value is not None):
        if not is_num:
            raise bad()
        return float(value)
    if name == "n_samples" or (name in _OPT_INTS and value is not None):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
        return value
    if name == "source":
        if not isinstance(value, str):
            raise bad()
        return value
    if name in ("gpu_foreign_pids", "gpu_throttle_reasons"):
        kind = int if name == "gpu_foreign_pids" else str
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise bad()
        return list(value)
    if name == "gpu_pids_comparable":
        if value is not None and not isinstance(value, bool):
            raise bad()
        return value
    if name == "gpu_error":
        if value is not None and not isinstance(value, str):
            raise bad()
        return value
    return value


# --------------------------------------------------------------------------------------- machine reads


