"""Paired dense-vs-ssProp experiments: one engine for ``compare`` (one ssProp arm) and ``sweep`` (a grid).

The data flows one way through three rooms:

- **plan** (``plan.py``): the arm-runs (arm x seed x repeat) and their order in time (interleaved epoch by
  epoch in ABBA order by default, or one after the other);
- **execute** (``execute.py``): build, FLOP pre-count, warm up, then train each group of arm-runs with one
  energy meter and the run's interference monitor, into typed :class:`~ssprop_energy.records.ArmRun`
  records;
- **summarize** (``summarize.py``): per-arm means, paired statistics, single-run intervals, interference,
  the CSV tables.

This module ties them to a run directory and to the hooks (progress, stop flag, the audit ledger).

Run directory (see ``records.py``): ``config.json``, ``summary.json`` (status ``running`` until the end),
``runs/<arm>__s<seed>__r<repeat>.json`` (one finished arm-run each, so ``--resume`` skips them),
``checkpoints/`` (arm-runs in progress), and at the end ``epochs.csv``, ``power_trace.csv``, ``layers.csv``.
"""

from __future__ import annotations

import logging
import math
import platform
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ssprop_energy import __version__
from ssprop_energy.data import load_dataset
from ssprop_energy.energy import open_meter, resolve_meter
from ssprop_energy.energy.carbon import resolve_intensity
from ssprop_energy.errors import ConfigError, RecordError, RunInterrupted
from ssprop_energy.experiment.config import ArmSpec, ExperimentConfig
from ssprop_energy.experiment.execute import Executor, out_of_memory_error
from ssprop_energy.experiment.lock import RunLock
from ssprop_energy.experiment.plan import ArmRunKey, Group, all_runs, plan_groups
from ssprop_energy.experiment.summarize import summarize_arms, write_tables
from ssprop_energy.records import (
    CONFIG_FILE, SUMMARY_FILE, ArmRecord, ArmRun, CarbonBlock, EnergyComponent, RunSummary, add_components,
    read_json, write_json_atomic, write_summary,
)
from ssprop_energy.train import Callback, resolve_device

log = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _default_monitor(device: torch.device) -> Any:
    from ssprop_energy.energy.interference import InterferenceMonitor

    gpu_index = (device.index or 0) if device.type == "cuda" else None
    return InterferenceMonitor(sample_period_s=0.25, gpu_index=gpu_index)


@dataclass
class ExperimentHooks:
    """What a caller plugs into a run.

    Attributes:
        callbacks: progress callbacks per arm-run, ``callbacks(arm, seed, repeat)``.
        stop_requested: polled after each batch (signals); true stops the run with :class:`RunInterrupted`.
        ledger: record the run in the audit ledger (a ``running`` row at the start, closed at the end).
        command: the command line stored in the ledger row (default ``sys.argv``).
        monitor: ``monitor(device)`` -> an interference monitor (``start/begin/end/stop``), or None for none.
    """

    callbacks: Callable[[ArmSpec, int, int], Sequence[Callback]] = lambda arm, seed, repeat: ()
    stop_requested: Callable[[], bool] = lambda: False
    ledger: bool = True
    command: Sequence[str] | None = None
    monitor: Callable[[torch.device], Any] | None = field(default=_default_monitor)


def default_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model}-{cfg.dataset.replace(':', '_').replace('/', '_')}"


def prepare_run_dir(path: Path) -> None:
    """Create the run directory and prove it is writable, before any work starts.

    Raises:
        ConfigError: the directory exists and is not empty, or cannot be created or written.
    """
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"--out {path} already exists and is not an empty directory (use --resume to continue)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {path} is not writable ({exc.strerror or exc})") from None


# An accuracy over fewer images than this is no measurement (0 images read as 0.00%; 1 image as 0 or 100%).
MIN_SPLIT_IMAGES = 4


def check_split_sizes(dataset: str, data: Any) -> None:
    """Refuse a dataset whose train, validation or test split is below :data:`MIN_SPLIT_IMAGES` images."""
    sizes = {"train": len(data.train), "validation": len(data.val), "test": len(data.test)}
    small = [f"{name} {n}" for name, n in sizes.items() if n < MIN_SPLIT_IMAGES]
    if small:
        raise ConfigError(
            f"--dataset {dataset}: split(s) too small to measure ({', '.join(small)} images; at least "
            f"{MIN_SPLIT_IMAGES} each are needed): add images (a folder dataset without a val/test folder gives "
            "each about 20% of its images)", field="dataset")


def check_schedule_drops(arm: ArmSpec, schedule: Any, epochs: int, iters_per_epoch: int) -> None:
    """Refuse an ssProp arm whose schedule never drops anything in this run (it would be a dense arm shown
    as ssProp), as a warm-up covering every epoch is refused. A drop rate of 0 is an explicit A/A control."""
    if schedule is None or (arm.drop_rate <= 0 and schedule.start_drop_rate <= 0):
        return
    if schedule.average_drop_rate(epochs, iters_per_epoch) <= 0:
        hint = (" (bar alternates dense and sparse epochs, dense first: it needs at least 2 epochs)"
                if arm.schedule == "bar" and schedule.by == "epoch" else "")
        raise ConfigError(
            f"the {arm.schedule} schedule at drop rate {arm.drop_rate:g} never drops a gradient in {epochs} "
            f"epoch(s) of {iters_per_epoch} batch(es){hint}: the ssProp arm would be dense; use more epochs or "
            "another schedule", field="epochs")


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """Read the configuration of an existing run directory for ``--resume``."""
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: not a directory")
    if not (run_dir / CONFIG_FILE).exists() or not (run_dir / SUMMARY_FILE).exists():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no {CONFIG_FILE} / {SUMMARY_FILE})")
    data = read_json(run_dir / CONFIG_FILE)
    if not isinstance(data, dict):
        raise RecordError(f"{run_dir / CONFIG_FILE}: expected a JSON object")
    status = read_json(run_dir / SUMMARY_FILE).get("status")
    if status == "complete":
        raise ConfigError(f"--resume {run_dir}: the run is already complete")
    cfg = ExperimentConfig.from_dict(data)
    cfg.validate()
    return cfg


class LedgerHook:
    """Opens the audit-ledger row when a run starts and closes it with what the meters measured."""

    def __init__(self, experiment: Experiment, command: Sequence[str]) -> None:
        from ssprop_energy import ledger

        cfg = experiment.cfg
        self.experiment = experiment
        self.entry = ledger.start_entry(kind=cfg.kind, project=cfg.project, command=list(command),
                                        run_dir=experiment.run_dir)

    def close(self, status: str, note: str | None = None) -> None:
        c = self.experiment.carbon
        self.entry.finish(status, self.experiment.spent_components(), co2_g=None,
                          intensity_g_per_kwh=c.intensity_g_per_kwh, pue=c.pue, intensity_source=c.source, note=note)


class Experiment:
    """Runs all arm-runs of a configuration into a run directory and writes the summary.

    Everything that can reject user input (device, carbon intensity, dataset, model, schedule, meter) is
    checked in the constructor, before the run directory is touched.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, hooks: ExperimentHooks | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.hooks = hooks or ExperimentHooks()
        self.device = resolve_device(cfg.device)
        intensity = resolve_intensity(country=cfg.country, override_g_per_kwh=cfg.carbon_intensity)
        self.carbon = CarbonBlock(
            intensity_g_per_kwh=intensity.g_per_kwh, source=intensity.source, region=intensity.region, pue=cfg.pue,
            pue_source="--pue" if cfg.pue != 1.0 else "default 1.0 (no data-centre overhead)",
        )
        # The split is fixed (seed 0) whatever the training seeds: every seed is tested on the same images.
        self.data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, seed=0)
        # The meter's fallback chain runs once, here (an unavailable --meter is a user error found now);
        # every meter of the run opens exactly these sources.
        self.meter_choice = resolve_meter(cfg.meter, sample_period_s=cfg.sample_period_s)
        self.executor = Executor(
            cfg, self.data, self.device, self.meter_choice, None, run_dir / "checkpoints",
            self.hooks.callbacks, self.hooks.stop_requested,
        )
        check_split_sizes(cfg.dataset, self.data)
        # Unknown model names, or a model with no layer of the kinds to sparsify, fail now, not mid-run.
        n_batches = math.ceil(len(self.data.train) / cfg.batch_size)
        for arm in cfg.arms():
            if arm.sparse:
                check_schedule_drops(arm, self.executor.schedule(arm), cfg.epochs, n_batches)
        self.executor.build_model(next(a for a in cfg.arms() if a.sparse), cfg.seeds[0])
        self.groups: list[Group] = plan_groups(cfg)
        self.created_at = now_iso()
        self.environment: dict[str, Any] = {}
        self.idle_power_w: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ running

    def plan(self) -> list[ArmRunKey]:
        """All arm-runs in execution order (within a group, epochs interleave)."""
        return all_runs(self.groups)

    def run(self) -> RunSummary:
        """Run (or resume) every arm-run; returns the final summary, also written to the run directory.

        The run directory is locked (:class:`~ssprop_energy.experiment.lock.RunLock`) while this runs.

        Raises:
            RunInterrupted: the stop flag was raised, or KeyboardInterrupt arrived (a signal, in any phase);
                the summary is saved with status ``interrupted``.
            ConfigError: another process holds the run directory, or the run is already complete.
        """
        lock = RunLock(self.run_dir).acquire()
        try:
            summary_path = self.run_dir / SUMMARY_FILE
            if summary_path.exists() and read_json(summary_path).get("status") == "complete":
                raise ConfigError(f"--resume {self.run_dir}: the run is already complete")
            return self._run()
        finally:
            lock.release()

    def _run(self) -> RunSummary:
        ledger: LedgerHook | None = None
        monitor = None
        self._recorded = False  # a summary exists: from here on, a stop or failure is saved in it
        try:
            if self.hooks.ledger:
                ledger = LedgerHook(self, self.hooks.command or sys.argv)
            (self.run_dir / "runs").mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / CONFIG_FILE, self.cfg.to_dict())
            self.environment = self._environment()
            self._write_summary("running")
            self._recorded = True
            monitor = self.hooks.monitor(self.device) if self.hooks.monitor is not None else None
            self.executor.monitor = monitor
            if monitor is not None:
                monitor.start()
            if self.cfg.idle_s > 0:
                meter = open_meter(choice=self.meter_choice, sample_period_s=self.cfg.sample_period_s)
                try:
                    self.idle_power_w = dict(meter.measure_idle(self.cfg.idle_s))
                finally:
                    meter.close()
            for group in self.groups:
                pending = [key for key in group.runs if not self._result_path(key).exists()]
                if pending:
                    self.executor.run_group(group, pending, self._save_run)
            # Say "not finished" on disk before finalising: if the tables or the summary cannot be written
            # (a full disk), the record is never left "running" with every arm-run done; resume finalises.
            self._write_summary("failed", self._arms(complete=False),
                                failure_reason=f"finalisation did not finish; run --resume {self.run_dir} to finish it")
            summary = self._finalise()
        except (RunInterrupted, KeyboardInterrupt) as exc:
            # a signal in any phase (setup, counting, warm-up, idle, training, evaluation, finalisation):
            # what finished is on disk; the record says interrupted and --resume continues from there
            self._close_unfinished("interrupted", ledger)
            if isinstance(exc, RunInterrupted):
                raise
            raise RunInterrupted("interrupted") from None
        except BaseException as exc:
            oom = out_of_memory_error(exc, self.cfg, self.data.image_size)
            reason = str(oom) if oom is not None else f"{type(exc).__name__}: {exc}"
            self._close_unfinished("failed", ledger, reason)
            if oom is not None:
                raise oom from None
            raise
        finally:
            if monitor is not None:
                monitor.stop()
        if ledger is not None:
            ledger.close("complete")
        try:
            (self.run_dir / "checkpoints").rmdir()  # empty once every arm-run finished
        except OSError:
            pass
        return summary

    def _close_unfinished(self, status: str, ledger: LedgerHook | None, reason: str | None = None) -> None:
        """Save the summary of the finished arm-runs (and their tables, for a partial report) with ``status``
        and close the ledger row. A failure here (a full disk) is logged, never raised over the original
        error: the summary then stays ``running``, which readers treat as stopped once no process holds the
        run's lock."""
        if not self._recorded:  # stopped before the run wrote anything: nothing to save
            if ledger is not None:
                try:
                    ledger.close(status, note=reason)
                except Exception as exc:  # noqa: BLE001
                    log.warning("could not close the audit-ledger row: %s", exc)
            return
        try:
            arms = self._arms(complete=False)
            self._write_summary(status, arms, failure_reason=reason)
            write_tables(self.run_dir, self._runs_by_arm())
        except Exception as exc:  # noqa: BLE001 - the original error is what the user must see
            log.warning("could not save the %s run record in %s: %s", status, self.run_dir, exc)
        if ledger is not None:
            try:
                ledger.close(status, note=reason)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not close the audit-ledger row: %s", exc)

    def spent_components(self) -> list[EnergyComponent]:
        """Energy every meter of this process measured (training, evaluation and the gaps between windows,
        interrupted groups included): what the audit ledger charges to this invocation."""
        return add_components(*self.executor.metered)

    def _result_path(self, key: ArmRunKey) -> Path:
        return self.run_dir / "runs" / f"{key.name}.json"

    def _save_run(self, run: ArmRun) -> None:
        write_json_atomic(self.run_dir / "runs" / f"{run.arm}__s{run.seed}__r{run.repeat}.json", run.to_dict())

    def _environment(self) -> dict[str, Any]:
        return {
            "ssprop_energy": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "hostname": socket.gethostname(),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "meter": {"kind": self.meter_choice.kind, "sources": list(self.meter_choice.sources),
                      "unavailable": dict(self.meter_choice.unavailable)},
            "dataset": getattr(self.data, "info", {}),
        }

    # ------------------------------------------------------------------------------------------ summary

    def _runs_by_arm(self) -> dict[str, list[ArmRun]]:
        by_arm: dict[str, list[ArmRun]] = {}
        keys = sorted(self.plan(), key=lambda k: (k.seed, k.repeat))
        for arm in self.cfg.arms():
            for key in keys:
                path = self._result_path(key)
                if key.arm.name == arm.name and path.exists():
                    by_arm.setdefault(arm.name, []).append(ArmRun.from_dict(read_json(path), str(path)))
        return by_arm

    def _arms(self, complete: bool) -> dict[str, ArmRecord]:
        specs = {a.name: a for a in self.cfg.arms()}
        return summarize_arms(specs, self._runs_by_arm(), self.carbon, self.idle_power_w, complete)

    def _finalise(self) -> RunSummary:
        by_arm = self._runs_by_arm()
        specs = {a.name: a for a in self.cfg.arms()}
        arms = summarize_arms(specs, by_arm, self.carbon, self.idle_power_w, complete=True)
        write_tables(self.run_dir, by_arm)
        paired = arms["ssprop"].paired if self.cfg.kind == "compare" and "ssprop" in arms else {}
        return self._write_summary("complete", arms, paired=paired)

    def _write_summary(
        self, status: str, arms: dict[str, ArmRecord] | None = None, paired: dict[str, Any] | None = None,
        failure_reason: str | None = None,
    ) -> RunSummary:
        summary = RunSummary(
            kind=self.cfg.kind, status=status, created_at=self.created_at, config=self.cfg.to_dict(),
            environment=self.environment, carbon=self.carbon, arms=arms or {}, paired=paired or {},
            interleave=self.cfg.interleave, failure_reason=failure_reason,
            finished_at=None if status == "running" else now_iso(),
        )
        write_summary(self.run_dir, summary)
        return summary
