"""InterferenceMonitor: windows over background samples (moved from interference.py)."""
from __future__ import annotations

import itertools
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import psutil

from ssprop_energy.energy.interference.readers import (
    CpuReader,
    _cpu_freq_files,
    _cpu_set,
    _Gpu,
    _ProcfsReader,
    _PsutilReader,
    _read_freq_mhz,
    _Snapshot,
    own_delta_s,
)
from ssprop_energy.energy.interference.readings import InterferenceReading, logger
from ssprop_energy.energy.sampler import Sampler
from ssprop_energy.errors import MeterError


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
        self._reader: CpuReader
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
