"""``ssprop-energy audit run -- CMD ARGS``: run any command, measure its energy, record it in the ledger.

Order of events: the meter is opened (an unusable meter is an error before anything runs), a ``running``
row is written, the meter starts, the command starts (same terminal, same process group, stdin/stdout/
stderr inherited), the wrapper waits for it, the meter stops, and the row is completed as

- ``complete``    exit code 0;
- ``failed``      any other exit code, or death by a signal nobody asked for (SIGSEGV, SIGKILL by the OOM
                  killer...); the wrapper exits with the same code (128 + signal for a signal death);
- ``interrupted`` the wrapper got SIGINT or SIGTERM, forwarded it to the command, and exits 128 + signal;
                  a command that handles the signal and still exits 0 is ``complete`` (exit 0), with a note.

On Linux the command gets ``PR_SET_PDEATHSIG`` = SIGTERM: if the wrapper itself is killed (``kill -9``), the
command is told to stop instead of running on unrecorded.

A terminal's Ctrl-C already reaches the whole foreground process group, command included; forwarding it
again would interrupt the command's own clean-up, so SIGINT is forwarded only when the wrapper is not in
the terminal's foreground group (``kill -INT`` from elsewhere). SIGTERM is always forwarded.

Machine-wide energy (RAPL packages and DRAM) is charged by the command's share of the machine's busy CPU
time (see :mod:`.attribution`) unless ``whole_machine``. The CPU/RAM estimate is already the command's own
(TDP x the command tree's CPU seconds / logical CPUs, plus codecarbon's per-process RAM model): it is
charged as is, and equals CodeCarbon's ``tracking_mode="process"`` figure for the same TDP and RAM power,
which the row's note and :attr:`WrapResult.codecarbon_process_j` give. The wrapper's own sampling thread is
measurement overhead and is not charged to the command (the estimate counts the wrapper's descendants only). A GPU that other processes use at the same time is charged by
the command's share of it, from NVML's per-process samples (see :mod:`.gpushare`), also unless
``whole_machine``; the whole device's energy stays in the row beside the charged part.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import psutil

from ssprop_energy.errors import ConfigError, SSPropEnergyError
from ssprop_energy.ledger.attribution import (
    CpuAttribution,
    attribute,
    codecarbon_process_j,
    cpu_share,
    is_machine_wide,
    machine_busy_cpu_s,
    machine_cpu_resolution_s,
    process_scoped_components,
)
from ssprop_energy.ledger.entries import LedgerEntry, start_entry
from ssprop_energy.ledger.gpushare import GpuAttribution, GpuShareSampler, attribute_gpus
from ssprop_energy.records import EnergyComponent

logger = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How often the running row gets the energy measured so far: a wrapper killed with kill -9 (or by the OOM
# killer, or a closed ssh session) leaves a row that readers charge as `partial` with that figure.
HEARTBEAT_S = 60.0
# a command killed by one of these was stopped on purpose, not broken
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@dataclass(frozen=True)
class WrapResult:
    """What ``audit run`` recorded.

    Attributes:
        exit_code: the code the wrapper should exit with: the command's (128 + N for a death by signal
            N), or 128 + N when the wrapper itself got signal N. The ledger row keeps the command's own.
        status: ``complete``, ``failed`` or ``interrupted``.
        entry: the ledger handle (``entry_id`` or ``fallback_path`` says where the row went).
        energy_j: energy charged to the command, joules; None when the meter failed.
        co2_g: grams CO2e charged; None when energy is unknown.
        energy_source: provenance of ``energy_j`` (``counter``/``sampled``/``estimated``/``mixed``).
        attribution: the CPU-time share used, None when nothing was attributed.
        machine_energy_j: the machine-wide energy before attribution (all components), joules.
        gpu_attribution: the shares of shared GPUs, None when every GPU was charged whole.
        start_error: why the command could not be started (``exit 127``/``126``), else None.
        codecarbon_process_j: CodeCarbon's ``tracking_mode="process"`` CPU + RAM energy for the command,
            joules (estimated; see :func:`.attribution.codecarbon_process_j`); None where RAPL measured the
            CPU side or nothing was measured.
    """

    exit_code: int
    status: str
    entry: LedgerEntry
    energy_j: float | None
    co2_g: float | None
    energy_source: str | None
    attribution: CpuAttribution | None
    machine_energy_j: float | None
    gpu_attribution: GpuAttribution | None = None
    start_error: str | None = None
    codecarbon_process_j: float | None = None


def _in_foreground_group() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Any:
    """A ``preexec_fn`` that makes the child receive SIGTERM when the wrapper dies (Linux), or None.

    libc and its ``prctl`` are looked up here, before the fork: the function run in the child between
    fork and exec only calls it (no imports, no allocation worth naming), which keeps ``preexec_fn`` safe
    enough beside the meter's sampling thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the wrapper died before the call: nobody would send the signal
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def tree_cpu_s_so_far(root_pid: int) -> float:
    """CPU seconds of a live process tree: the root's own and reaped children's, plus every live descendant's."""
    try:
        root = psutil.Process(root_pid)
        t = root.cpu_times()
        total = t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
        for child in root.children(recursive=True):
            try:
                ct = child.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                continue
        return total
    except psutil.Error:
        return 0.0


class _Heartbeat:
    """Writes the energy measured so far into the running row every ``period_s`` (a daemon thread)."""

    def __init__(self, entry: LedgerEntry, meter: Any, period_s: float, beat: Callable[[], Any]) -> None:
        self._stop = threading.Event()
        self._beat = beat
        self._period_s = period_s
        self._thread = threading.Thread(target=self._loop, name="ssprop-ledger-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self._beat()
            except Exception as exc:  # noqa: BLE001 - a heartbeat is best effort; finish() carries the figures
                logger.info("ledger heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _exit_code_from_status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code  # shell convention: death by signal N is 128 + N


def run_wrapped(
    command: Sequence[str],
    *,
    meter: Any = None,
    meter_kind: str = "auto",
    sample_period_s: float = 0.5,
    estimate_options: dict[str, Any] | None = None,
    project: str | None = None,
    tags: Sequence[str] = (),
    redact: bool = False,
    whole_machine: bool = False,
    intensity: Any = None,
    country: str | None = None,
    intensity_g_per_kwh: float | None = None,
    pue: float = 1.0,
    ledger_path: str | os.PathLike[str] | None = None,
    fallback_dir: str | os.PathLike[str] | None = None,
    cpu_clock: Callable[[], float] = machine_busy_cpu_s,
    gpu_sampler: GpuShareSampler | None = None,
    heartbeat_s: float | None = HEARTBEAT_S,
) -> WrapResult:
    """Run ``command`` to completion under an energy meter and record it in the ledger.

    Args:
        command: the program and its arguments.
        meter: an opened meter (the ``energy`` package's interface: ``start()``, ``stop() -> EnergyReport``);
            default ``open_meter(meter_kind, sample_period_s)``.
        meter_kind: ``auto`` picks the best available source.
        sample_period_s: power sampling period of the default meter, seconds.
        estimate_options: keyword arguments of the default meter's CPU/RAM estimate (``cpu_tdp_w``,
            ``ram_power_w``, ...); its CPU time is the command's tree unless ``cpu_seconds`` is given.
        project, tags, redact: as for :func:`entries.start_entry`.
        whole_machine: charge machine-wide components whole instead of by CPU-time share.
        intensity: a resolved carbon intensity (``g_per_kwh``, ``source`` attributes); default
            ``energy.carbon.resolve_intensity(country, intensity_g_per_kwh)``.
        country, intensity_g_per_kwh: passed to ``resolve_intensity`` when ``intensity`` is None.
        pue: power usage effectiveness applied to the CO2 figure.
        ledger_path, fallback_dir: as for :func:`entries.start_entry`.
        cpu_clock: the machine's busy CPU seconds (tests fake it).
        gpu_sampler: samples the command's share of each GPU; default a :class:`GpuShareSampler` on NVML
            (inert where NVML is unusable), none with ``whole_machine``.
        heartbeat_s: period of the running row's energy-so-far updates, seconds; None for none (also none
            for a meter without ``snapshot``).

    Returns:
        A :class:`WrapResult`.

    Raises:
        ConfigError: an empty command or a bad PUE.
        MeterUnavailableError: the requested meter cannot run here (raised before the command starts).
    """
    command = [str(a) for a in command]
    if not command:
        raise ConfigError("no command to run (usage: ssprop-energy audit run [OPTIONS] -- CMD [ARGS...])")
    if not pue >= 1.0:
        raise ConfigError(f"PUE must be >= 1, got {pue}")
    if intensity is None:
        from ssprop_energy.energy.carbon import resolve_intensity

        intensity = resolve_intensity(country=country, override_g_per_kwh=intensity_g_per_kwh)
    if meter is None:
        from ssprop_energy.energy import open_meter
        from ssprop_energy.energy.estimate import ProcessTreeCpu

        # the estimate (if chosen) counts the command's tree, not this wrapper's own sampling
        meter = open_meter(meter_kind, sample_period_s=sample_period_s,
                           estimate_options={"cpu_seconds": ProcessTreeCpu(include_self=False),
                                             **(estimate_options or {})})
    process_scoped = process_scoped_components(meter)

    if gpu_sampler is None and not whole_machine:
        gpu_sampler = GpuShareSampler(period_s=sample_period_s)
    gpu_shares: GpuAttribution | None = None
    received: list[int] = []
    not_sent: list[int] = []  # signals that arrived while Popen was starting the command
    proc: subprocess.Popen[bytes] | None = None

    def send(signum: int) -> None:
        if proc is None:
            not_sent.append(signum)
            return
        if signum == signal.SIGINT and _in_foreground_group():
            return  # the terminal delivered it to the command already
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        send(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    notes: list[str] = []
    start_error: str | None = None
    wait_status: int | None = None
    tree_cpu_s = 0.0
    try:
        cpu0 = cpu_clock()
        meter.start()
        try:
            entry = start_entry("audit-run", project=project, tags=tags, command=command, redact=redact,
                                ledger_path=ledger_path, fallback_dir=fallback_dir)
        except BaseException:
            meter.stop()
            raise
        try:
            proc = subprocess.Popen(command, preexec_fn=_parent_death_signal())
        except OSError as exc:
            child_code = 127 if isinstance(exc, FileNotFoundError) else 126  # the shell's codes
            start_error = f"could not start {command[0]!r}: {exc.strerror or exc}"
            notes.append(start_error)
            if gpu_sampler is not None:
                gpu_sampler.stop()  # releases NVML; nothing was sampled
        else:
            while not_sent:
                send(not_sent.pop(0))
            if gpu_sampler is not None:
                gpu_sampler.start(proc.pid)
            heartbeat = None
            if heartbeat_s is not None and hasattr(meter, "snapshot"):
                root_pid = proc.pid

                def beat() -> None:
                    specs = getattr(meter, "specs", {})
                    comps = [EnergyComponent(c, j, specs[c].source, specs[c].device)
                             for c, j in meter.snapshot().items() if c in specs]
                    att = None
                    if not whole_machine and any(is_machine_wide(c, process_scoped) for c in comps):
                        tree, machine = tree_cpu_s_so_far(root_pid), max(0.0, cpu_clock() - cpu0)
                        att = CpuAttribution(tree, machine,
                                             cpu_share(tree, machine, resolution_s=machine_cpu_resolution_s()))
                    charged, _ = attribute_gpus(attribute(comps, att, process_scoped),
                                                gpu_sampler.current() if gpu_sampler is not None else None)
                    entry.heartbeat(charged, intensity.g_per_kwh, pue, intensity.source, attribution=att)

                heartbeat = _Heartbeat(entry, meter, heartbeat_s, beat)
            # wait4 (not Popen.wait) because its rusage is the command's CPU time including every
            # descendant it waited for: the tree's time, even after the processes are gone.
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            child_code = _exit_code_from_status(wait_status)
            tree_cpu_s = usage.ru_utime + usage.ru_stime
            if heartbeat is not None:
                heartbeat.stop()
            if gpu_sampler is not None:
                gpu_shares = gpu_sampler.stop()
        # A signal after the command ended did not interrupt it; it only waits for the row to be written.
        stopped_by = received[0] if received else None
        try:
            components = list(meter.stop().components)
        except SSPropEnergyError as exc:
            logger.warning("energy meter failed: %s; the run is recorded without energy", exc)
            notes.append(f"energy not measured: {exc}")
            components = []
        machine_cpu_s = max(0.0, cpu_clock() - cpu0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    exit_code = child_code
    if stopped_by is not None and wait_status is not None and os.WIFEXITED(wait_status) and child_code == 0:
        # The command handled the signal and finished its work: its own exit status says so.
        status = "complete"
        notes.append(f"{signal.Signals(stopped_by).name} was forwarded; the command handled it and exited 0")
    elif stopped_by is not None:
        status, exit_code = "interrupted", 128 + stopped_by
    elif wait_status is not None and os.WIFSIGNALED(wait_status):
        status = "interrupted" if os.WTERMSIG(wait_status) in _STOP_SIGNALS else "failed"
    else:
        status = "complete" if child_code == 0 else "failed"

    attribution = None
    if not whole_machine and any(is_machine_wide(c, process_scoped) for c in components):
        resolution_s = machine_cpu_resolution_s()
        attribution = CpuAttribution(tree_cpu_s, machine_cpu_s,
                                     cpu_share(tree_cpu_s, machine_cpu_s, resolution_s=resolution_s))
        if machine_cpu_s < resolution_s:
            notes.append(f"the machine's busy CPU time over the run ({machine_cpu_s:.3f} s) is below the "
                         f"resolution of /proc/stat ({resolution_s:.3f} s); the share is taken against that "
                         "resolution, an upper bound for a command this idle")
    charged, gpu_attribution = attribute_gpus(attribute(components, attribution, process_scoped), gpu_shares)
    cc_process_j = codecarbon_process_j(components, process_scoped)
    if cc_process_j is not None:
        # for a lab that also runs CodeCarbon: the figure its process mode gives for the same TDP and RAM power
        notes.append(f"CPU and RAM estimated for the command's process tree and charged as is (CodeCarbon "
                     f"tracking_mode='process' convention): {cc_process_j:.6g} J")
    entry.finish(
        status,
        charged,
        co2_g=None,
        intensity_g_per_kwh=intensity.g_per_kwh,
        pue=pue,
        intensity_source=intensity.source,
        exit_code=child_code,
        note="; ".join(notes) or None,
        attribution=attribution,
        gpu_attribution=gpu_attribution,
    )
    machine_energy_j = sum(c.energy_j for c in components) if components else None
    return WrapResult(
        exit_code=exit_code,
        status=status,
        entry=entry,
        energy_j=entry.row["energy_j"],
        co2_g=entry.row["co2_g"],
        energy_source=entry.row["energy_source"],
        attribution=attribution,
        machine_energy_j=machine_energy_j,
        gpu_attribution=gpu_attribution,
        start_error=start_error,
        codecarbon_process_j=cc_process_j,
    )
