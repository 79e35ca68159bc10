"""Readers of the machine: procfs or psutil for CPU time, NVML for GPU processes (moved from interference.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Protocol

import psutil

from ssprop_energy.energy.interference.readings import (
    _BUSY_FIELDS,
    _INIT_PID_NS_INODE,
    _STEAL_FIELD,
    decode_throttle_reasons,
    logger,
)


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


class CpuReader(Protocol):
    """What the monitor needs from a CPU-time source (procfs or psutil); times in seconds."""

    source: str
    cpu_count: int

    def machine(self) -> tuple[float, float, int]:
        """(busy seconds, steal seconds, CPUs counted) over the counted CPUs."""
        ...

    def tree(self) -> dict[tuple[int, float], float]:
        """CPU seconds per live member of this process tree, keyed by (pid, start time)."""
        ...

    def alive(self, key: tuple[int, float]) -> bool:
        """Whether the process ``key`` still exists."""
        ...

    def load_avg_1m(self) -> float | None:
        """The 1-minute load average; None where unavailable."""
        ...


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
        # Looked up on the package so a test can patch it there (as before the split).
        from ssprop_energy.energy import interference as _pkg

        self._ns_init = _pkg._in_init_pid_namespace(proc_root)
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


