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

import itertools
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import psutil

from ssprop_energy.energy.sampler import Sampler
from ssprop_energy.errors import MeterError, RecordError

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class _Snapshot:
    t_s: float  # monotonic
    busy_s: float  # machine busy CPU seconds since boot, summed over CPUs
    steal_s: float
    tree: dict[tuple[int, float], float]  # (pid, start time) -> cumulative CPU seconds of that member
    freq_mhz: float | None
    gpu: _GpuSample | None = None


@dataclass(frozen=True)
class _GpuSample:
    pids: frozenset[int] | None  # None: the processes could not be listed at this read
    foreign: frozenset[int] | None  # None: not listed, or NVML's PIDs not comparable with ours
    reasons: frozenset[str]
    temperature_c: float | None


class _ProcfsReader:
    """Machine and process-tree CPU times from a procfs tree (``/proc`` or a fake one in tests).

    ``cpus``: the CPUs whose busy time counts (per-CPU lines of ``stat``); None for all (the aggregate line).
    """

    source = "procfs"

    def __init__(self, proc_root: Path, root_pid: int, cpus: frozenset[int] | None) -> None:
        self.proc = proc_root
        self.root_pid = root_pid
        self.tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self.cpus = cpus
        self.cpu_count = self.machine()[2]  # raises OSError/ValueError when unusable
        self._tree_reader: _PsutilReader | None = None
        if not (proc_root / str(root_pid) / "task" / str(root_pid) / "children").exists():
            # A kernel without CONFIG_PROC_CHILDREN: find descendants through psutil instead.
            logger.info("interference monitor: no /proc/<pid>/task/<tid>/children; listing descendants with psutil")
            self._tree_reader = _PsutilReader(root_pid, None)

    def machine(self) -> tuple[float, float, int]:
        """(busy seconds, steal seconds, CPUs counted) from ``stat``."""
        text = (self.proc / "stat").read_text()
        busy = steal = 0
        count = 0
        found = False
        for line in text.splitlines():
            if not line.startswith("cpu"):
                continue
            name, *values = line.split()
            if self.cpus is None and name != "cpu":
                continue
            if self.cpus is not None and (name == "cpu" or int(name[3:]) not in self.cpus):
                continue
            ticks = [int(v) for v in values] + [0] * (10 - len(values))
            busy += sum(ticks[i] for i in _BUSY_FIELDS)
            steal += ticks[_STEAL_FIELD]
            count += 1
            found = True
        if not found:
            raise ValueError(f"no usable cpu line in {self.proc / 'stat'}")
        if self.cpus is None:
            count = sum(1 for line in text.splitlines() if line.startswith("cpu") and not line.startswith("cpu "))
        return busy * self.tick_s, steal * self.tick_s, max(count, 1)

    def _stat(self, pid: int) -> tuple[float, float] | None:
        """(start time in ticks since boot, utime + stime + cutime + cstime in seconds) of one process."""
        try:
            text = (self.proc / str(pid) / "stat").read_text()
        except OSError:
            return None
        # The command name is in parentheses and may itself contain spaces and parentheses.
        rest = text[text.rfind(")") + 2:].split()
        try:
            return float(rest[19]), sum(int(rest[i]) for i in (11, 12, 13, 14)) * self.tick_s
        except (IndexError, ValueError):
            return None

    def _children(self, pid: int) -> list[int]:
        out: list[int] = []
        try:
            tids = os.listdir(self.proc / str(pid) / "task")
        except OSError:
            return out
        for tid in tids:
            try:
                out += [int(c) for c in (self.proc / str(pid) / "task" / tid / "children").read_text().split()]
            except (OSError, ValueError):
                continue
        return out

    def tree(self) -> dict[tuple[int, float], float]:
        """CPU seconds per member of the tree rooted at ``root_pid`` (keyed by PID and start time, so a
        reused PID is a different process)."""
        if self._tree_reader is not None:
            return self._tree_reader.tree()
        out: dict[tuple[int, float], float] = {}
        stack = [self.root_pid]
        seen: set[int] = set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            st = self._stat(pid)
            if st is None:
                continue
            out[(pid, st[0])] = st[1]
            stack += self._children(pid)
        return out

    def alive(self, key: tuple[int, float]) -> bool:
        if self._tree_reader is not None:
            return self._tree_reader.alive(key)
        st = self._stat(key[0])
        return st is not None and st[0] == key[1]

    def load_avg_1m(self) -> float | None:
        try:
            return float((self.proc / "loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


class _PsutilReader:
    """The same figures through psutil, where there is no procfs."""

    source = "psutil"

    def __init__(self, root_pid: int, cpus: frozenset[int] | None) -> None:
        self.root_pid = root_pid
        self.cpus = cpus
        self.cpu_count = len(cpus) if cpus is not None else psutil.cpu_count() or 1

    def machine(self) -> tuple[float, float, int]:
        names = ("user", "nice", "system", "irq", "softirq", "steal")
        if self.cpus is None:
            per = [psutil.cpu_times()]
        else:
            per = [t for i, t in enumerate(psutil.cpu_times(percpu=True)) if i in self.cpus]
        busy = sum(getattr(t, n, 0.0) for t in per for n in names)
        return float(busy), float(sum(getattr(t, "steal", 0.0) for t in per)), self.cpu_count

    def tree(self) -> dict[tuple[int, float], float]:
        out: dict[tuple[int, float], float] = {}
        try:
            root = psutil.Process(self.root_pid)
            members = [root] + root.children(recursive=True)
        except psutil.Error:
            return out
        for p in members:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    key = (p.pid, p.create_time())
            except psutil.Error:
                continue
            out[key] = t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
        return out

    def alive(self, key: tuple[int, float]) -> bool:
        try:
            return psutil.Process(key[0]).create_time() == key[1]
        except psutil.Error:
            return False

    def load_avg_1m(self) -> float | None:
        try:
            return float(psutil.getloadavg()[0])
        except (OSError, AttributeError):
            return None


def _cpu_set(cpus: Collection[int] | None | str, pid: int) -> frozenset[int] | None:
    """The CPUs to count, or None for all of them (then the aggregate ``cpu`` line is read)."""
    if cpus == "affinity":
        try:
            allowed = frozenset(os.sched_getaffinity(pid))
        except (AttributeError, OSError):  # not Linux
            return None
        total = os.cpu_count()
        return None if total is None or len(allowed) >= total else allowed
    if isinstance(cpus, str):
        raise ValueError(f"cpus must be 'affinity', None or a collection of CPU numbers, got {cpus!r}")
    return None if cpus is None else frozenset(int(c) for c in cpus)


def _cpu_freq_files(sys_root: Path, cpus: frozenset[int] | None) -> list[Path]:
    base = sys_root / "devices" / "system" / "cpu"
    try:
        files = sorted(base.glob("cpu[0-9]*/cpufreq/scaling_cur_freq"))
    except OSError:
        return []
    return [f for f in files if cpus is None or int(f.parent.parent.name[3:]) in cpus]


def _read_freq_mhz(files: list[Path]) -> float | None:
    """Mean of ``scaling_cur_freq`` (kHz) over the CPUs that expose it, in MHz."""
    khz = []
    for f in files:
        try:
            khz.append(int(f.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return sum(khz) / len(khz) / 1000.0 if khz else None


def own_delta_s(reader: Any, old: Mapping[tuple[int, float], float], new: Mapping[tuple[int, float], float]) -> float:
    """CPU seconds the tree used between two reads.

    A member present at both reads contributes its increase; one born since contributes all its time; one
    gone since and no longer alive was reaped inside the tree, its time moved into its parent's ``cutime``
    (counted there), so its earlier time is subtracted once. One gone but still alive left the tree (its
    parent died): it contributes nothing, rather than having its whole history subtracted.
    """
    total = 0.0
    for key, secs in new.items():
        total += secs - old.get(key, 0.0)
    for key, secs in old.items():
        if key not in new and not reader.alive(key):
            total -= secs
    return max(0.0, total)


# ------------------------------------------------------------------------------------------------ GPU


class _Gpu:
    """One NVML device: processes, throttle reasons, temperature. Never raises; errors are kept."""

    def __init__(self, index: int, proc_root: Path) -> None:
        self.error: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._ns_init = _in_init_pid_namespace(proc_root)
        try:
            import pynvml
        except ImportError:
            self.error = "the pynvml module is not installed (pip install nvidia-ml-py)"
            logger.warning("interference monitor: no GPU figures: %s", self.error)
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.error = f"nvmlInit failed ({_text(exc)})"
            logger.warning("interference monitor: no GPU figures: %s", self.error)
            return
        self._nvml = pynvml
        self._reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        self._proc_fns = [getattr(pynvml, n) for n in (
            "nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses",
            "nvmlDeviceGetMPSComputeRunningProcesses") if hasattr(pynvml, n)]
        self._unsupported: set[str] = set()
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as exc:
            self.error = f"GPU {index}: nvmlDeviceGetHandleByIndex failed ({_text(exc)})"
            logger.warning("interference monitor: no GPU figures: %s", self.error)
            self.close()

    @property
    def open(self) -> bool:
        return self._handle is not None

    def _call(self, fn: Any, *args: Any) -> Any:
        """fn(handle, *args); None when unsupported or failing (the failure kept in ``error``)."""
        name = getattr(fn, "__name__", str(fn))
        if name in self._unsupported:
            return None
        try:
            return fn(self._handle, *args)
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) == getattr(self._nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
                self._unsupported.add(name)
                logger.debug("interference monitor: %s not supported on this GPU", name)
            else:
                msg = f"{name} failed ({_text(exc)})"
                if self.error != msg:
                    logger.warning("interference monitor: %s", msg)
                self.error = msg
            return None

    def sample(self, tree_pids: set[int]) -> _GpuSample | None:
        if not self.open:
            return None
        pids: set[int] = set()
        listed = False
        for fn in self._proc_fns:
            procs = self._call(fn)
            if procs is not None:
                listed = True
                pids.update(int(p.pid) for p in procs)
        temp = self._call(self._nvml.nvmlDeviceGetTemperature, getattr(self._nvml, "NVML_TEMPERATURE_GPU", 0))
        mask = self._call(self._reasons_fn) if self._reasons_fn is not None else None
        foreign: frozenset[int] | None = None
        if listed:
            # Outside the initial PID namespace the driver may report host PIDs: trust the match only when
            # at least one of ours appears.
            if self._ns_init is not False or pids & tree_pids:
                foreign = frozenset(pids - tree_pids)
        return _GpuSample(
            pids=frozenset(pids) if listed else None,
            foreign=foreign,
            reasons=frozenset(decode_throttle_reasons(int(mask))) if mask is not None else frozenset(),
            temperature_c=float(temp) if temp is not None else None,
        )

    def close(self) -> None:
        if self._nvml is not None:
            self._handle = None
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                logger.debug("nvmlShutdown failed: %s", _text(exc))
            self._nvml = None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _in_init_pid_namespace(proc_root: Path) -> bool | None:
    """Whether this process is in the machine's initial PID namespace; None when it cannot be told."""
    try:
        return os.stat(proc_root / "self" / "ns" / "pid").st_ino == _INIT_PID_NS_INODE
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class WindowToken:
    """Handle of one open window (returned by :meth:`InterferenceMonitor.begin`)."""

    id: int
    name: str | None = None


class _Window:
    """Aggregates of one window, updated at every read. Intervals for the maximum run from ``anchor`` to
    the newest read; one shorter than ``min_interval_s`` stays open until it is long enough."""

    def __init__(self, reader: Any, first: _Snapshot, min_interval_s: float) -> None:
        self.reader = reader
        self.first = first
        self.min_interval_s = min_interval_s
        self.anchor = first
        self.prev_anchor: _Snapshot | None = None  # start of the last closed interval
        self.closed_max: float | None = None  # max over closed intervals before the last one
        self.last_closed: float | None = None
        self.n = 1
        self.freq_sum_mhz, self.freq_n = 0.0, 0
        # GPU aggregates (kept as running values: a window may stay open for hours)
        self.gpu_listed_n = self.gpu_comparable_n = 0
        self.gpu_processes_max: int | None = None
        self.gpu_foreign_max: int | None = None
        self.gpu_foreign_pids: set[int] = set()
        self.gpu_reasons: set[str] = set()
        self.gpu_temp_max_c: float | None = None
        self._add_extras(first)

    def _foreign_cores(self, a: _Snapshot, b: _Snapshot) -> float:
        """Foreign busy cores between two reads, clamped to [0, CPUs] (tick truncation can step outside)."""
        dt = b.t_s - a.t_s
        if dt <= 0:
            return 0.0
        cores = ((b.busy_s - a.busy_s) - own_delta_s(self.reader, a.tree, b.tree)) / dt
        return min(float(self.reader.cpu_count), max(0.0, cores))

    def _add_extras(self, snap: _Snapshot) -> None:
        if snap.freq_mhz is not None:
            self.freq_sum_mhz += snap.freq_mhz
            self.freq_n += 1
        g = snap.gpu
        if g is None:
            return
        self.gpu_reasons |= g.reasons
        if g.temperature_c is not None:
            self.gpu_temp_max_c = max(self.gpu_temp_max_c or g.temperature_c, g.temperature_c)
        if g.pids is not None:
            self.gpu_listed_n += 1
            self.gpu_processes_max = max(self.gpu_processes_max or 0, len(g.pids))
        if g.foreign is not None:
            self.gpu_comparable_n += 1
            self.gpu_foreign_max = max(self.gpu_foreign_max or 0, len(g.foreign))
            self.gpu_foreign_pids |= g.foreign

    def add(self, snap: _Snapshot) -> None:
        self.n += 1
        self._add_extras(snap)
        if snap.t_s - self.anchor.t_s >= self.min_interval_s:
            value = self._foreign_cores(self.anchor, snap)
            if self.last_closed is not None:
                self.closed_max = max(self.closed_max or 0.0, self.last_closed)
            self.prev_anchor, self.last_closed, self.anchor = self.anchor, value, snap

    def finish(self, last: _Snapshot, source: str, cpu_count: int, load_avg_1m: float | None,
               gpu_error: str | None, gpu_requested: bool) -> InterferenceReading:
        self.add(last)
        if self.anchor is not last:
            # The tail is shorter than min_interval_s: merge it into the last closed interval (or, when
            # there is none, it is the whole window).
            start = self.prev_anchor if self.prev_anchor is not None else self.first
            self.last_closed = self._foreign_cores(start, last)
        peaks = [v for v in (self.closed_max, self.last_closed) if v is not None]
        a, b = self.first, last
        wall_s = max(0.0, b.t_s - a.t_s)
        own_s = own_delta_s(self.reader, a.tree, b.tree)
        mean = self._foreign_cores(a, b)
        gpu = self._gpu_fields(gpu_requested, gpu_error)
        return InterferenceReading(
            wall_s=wall_s,
            foreign_cpu_cores_mean=mean,
            foreign_cpu_cores_max=max(peaks) if peaks else mean,
            own_cpu_cores_mean=own_s / wall_s if wall_s > 0 else 0.0,
            cpu_freq_mhz_mean=self.freq_sum_mhz / self.freq_n if self.freq_n else None,
            load_avg_1m=load_avg_1m,
            n_samples=self.n,
            source=source,
            steal_cpu_cores_mean=(b.steal_s - a.steal_s) / wall_s if wall_s > 0 else 0.0,
            cpu_count=cpu_count,
            **gpu,
        )

    def _gpu_fields(self, requested: bool, error: str | None) -> dict[str, Any]:
        if not requested:
            return {}
        return {
            "gpu_foreign_processes_max": self.gpu_foreign_max,
            "gpu_foreign_pids": sorted(self.gpu_foreign_pids),
            "gpu_throttle_reasons": sorted(self.gpu_reasons),
            "gpu_temperature_c_max": self.gpu_temp_max_c,
            "gpu_processes_max": self.gpu_processes_max,
            "gpu_pids_comparable": self.gpu_comparable_n == self.gpu_listed_n if self.gpu_listed_n else None,
            "gpu_error": error,
        }


# --------------------------------------------------------------------------------------------- monitor


class InterferenceMonitor:
    """Samples the machine on a background thread and reports foreign load per window.

    Args:
        sample_period_s: seconds between background reads (> 0).
        gpu_index: NVML index of the GPU this run uses; None on CPU.
        proc_root: the procfs to read (tests give a fake tree); psutil is used when it has no ``stat``.
        sys_root: the sysfs to read CPU frequencies from.
        root_pid: the root of "this process tree"; this process by default.
        cpus: the CPUs whose busy time counts: ``"affinity"`` (default) for the CPUs this process may run on
            (a job pinned to 8 cores of a 64-core node by a cgroup cpuset is not slowed by work on the other
            56), None for all, or an explicit collection.
        clock: monotonic clock, seconds.

    Usage::

        with InterferenceMonitor(sample_period_s=0.25) as mon:
            tok = mon.begin("epoch 1")
            ...
            reading = mon.end(tok)

    Windows may overlap and nest. One background read (one ``/proc/stat``, a few files per member of the
    tree) cost about 0.1 ms of CPU on the development VM: 0.04% of a core at the default period. No read is
    taken while no window is open.
    """

    def __init__(
        self,
        sample_period_s: float = 0.25,
        gpu_index: int | None = None,
        *,
        proc_root: str | os.PathLike[str] = "/proc",
        sys_root: str | os.PathLike[str] = "/sys",
        root_pid: int | None = None,
        cpus: Collection[int] | None | str = "affinity",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (isinstance(sample_period_s, (int, float)) and math.isfinite(sample_period_s) and sample_period_s > 0):
            raise ValueError(f"sample period must be a positive number of seconds, got {sample_period_s!r}")
        self.sample_period_s = float(sample_period_s)
        self._clock = clock
        pid = os.getpid() if root_pid is None else root_pid
        proc = Path(proc_root)
        self._reader: _ProcfsReader | _PsutilReader
        cpu_set = _cpu_set(cpus, pid)
        try:
            self._reader = _ProcfsReader(proc, pid, cpu_set)
        except (OSError, ValueError) as exc:
            logger.info("interference monitor: %s unreadable (%s); using psutil", proc / "stat", exc)
            self._reader = _PsutilReader(pid, cpu_set)
        self._freq_files = _cpu_freq_files(Path(sys_root), cpu_set)
        self._gpu_requested = gpu_index is not None
        self._gpu = _Gpu(gpu_index, proc) if gpu_index is not None else None
        self._lock = threading.Lock()
        self._windows: dict[int, _Window] = {}
        self._ids = itertools.count(1)
        self._sampler: Sampler | None = None
        self._stopped = False
        self.read_errors = 0

    @property
    def source(self) -> str:
        """``procfs`` or ``psutil``."""
        return self._reader.source

    # ---- reads (always under the lock, so every window sees its reads in time order)

    def _read(self) -> _Snapshot:
        try:
            tree = self._reader.tree()
            busy_s, steal_s, _ = self._reader.machine()
        except (OSError, ValueError, psutil.Error) as exc:
            raise MeterError(f"interference monitor: cannot read CPU times ({exc})") from None
        t_s = self._clock()  # right after the CPU reads; the GPU's may take milliseconds
        gpu = self._gpu.sample({pid for pid, _ in tree}) if self._gpu is not None else None
        return _Snapshot(t_s, busy_s, steal_s, tree, _read_freq_mhz(self._freq_files), gpu)

    def sample(self) -> None:
        """One read, applied to every open window (the background thread calls this)."""
        with self._lock:
            if not self._windows:
                return  # nothing to measure: no read, no cost
            try:
                snap = self._read()
            except MeterError as exc:
                self.read_errors += 1
                logger.debug("%s", exc)
                return
            self._add_to_open(snap)

    def _add_to_open(self, snap: _Snapshot) -> None:
        for w in self._windows.values():
            w.add(snap)

    def _tick(self) -> None:
        try:
            self.sample()
        except Exception as exc:  # noqa: BLE001 - a monitor must never stop the run it watches
            self.read_errors += 1
            logger.debug("interference monitor tick failed: %r", exc)

    # ---- public API

    def start(self) -> InterferenceMonitor:
        """Start the background sampling thread (once; a daemon)."""
        if self._sampler is None and not self._stopped:
            self._sampler = Sampler(self._tick, self.sample_period_s, clock=self._clock)
            self._sampler.start()
        return self

    def stop(self) -> None:
        """Stop sampling and release NVML; idempotent. Open windows can still be ended (edge reads only)."""
        self._stopped = True
        if self._sampler is not None:
            self._sampler.stop()
        if self._gpu is not None:
            with self._lock:
                self._gpu.close()

    def __enter__(self) -> InterferenceMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def begin(self, name: str | None = None) -> WindowToken:
        """Open a window now (its first read is taken here).

        Raises:
            MeterError: the CPU times cannot be read.
        """
        with self._lock:
            snap = self._read()
            self._add_to_open(snap)  # an edge read of one window is a sample of the others
            token = WindowToken(next(self._ids), name)
            self._windows[token.id] = _Window(self._reader, snap, min_interval_s=self.sample_period_s / 2)
        return token

    def end(self, token: WindowToken) -> InterferenceReading:
        """Close a window now and return what it saw.

        Raises:
            KeyError: the token is unknown or already ended.
            MeterError: the CPU times cannot be read.
        """
        with self._lock:
            if token.id not in self._windows:
                raise KeyError(f"interference window {token} is not open")
            snap = self._read()
            window = self._windows.pop(token.id)
            self._add_to_open(snap)
            gpu_error = self._gpu.error if self._gpu is not None else None
            return window.finish(snap, self._reader.source, self._reader.cpu_count, self._reader.load_avg_1m(),
                                 gpu_error, self._gpu_requested)


def measure_foreign_load(
    duration_s: float = 2.0,
    *,
    sample_period_s: float = 0.25,
    gpu_index: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **monitor_options: Any,
) -> InterferenceReading:
    """What the machine does while this process sleeps for ``duration_s`` seconds (a quiet-machine probe).

    With this process idle, ``foreign_cpu_cores_mean`` is everything else's load. Used by the benchmarks
    before and after they measure, and usable from the CLI.
    """
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration must be a positive number of seconds, got {duration_s!r}")
    with InterferenceMonitor(sample_period_s, gpu_index, **monitor_options) as mon:
        token = mon.begin("probe")
        sleep(duration_s)
        return mon.end(token)
