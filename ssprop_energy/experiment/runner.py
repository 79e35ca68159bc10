"""Paired dense-vs-ssProp experiments: one engine for ``compare`` (one ssProp arm) and ``sweep`` (a grid).

The data flows one way through three rooms:

- **plan** (``plan.py``): the arm-runs (arm x seed x repeat) and their order in time (interleaved epoch by
  epoch in ABBA order by default, or one after the other);
- **execute** (``execute.py``): build, FLOP pre-count, warm up, then train each group of arm-runs with one
  energy meter and the run's interference monitor, into typed :class:`~ssprop_energy.records.ArmRun`
  records;
- **summarize** (``summarize.py``): per-arm means, paired statistics, single-run intervals, interference,
  the CSV tables.

This module ties them to a run directory and to the hooks: the caller's (progress callbacks, stop flag) and
the run's resources, each opened and closed by one :class:`contextlib.ExitStack` in :meth:`Experiment.run`:
the process group, the experiment loggers (:class:`TrackingHook`), ``report.html`` (:class:`ReportHook`), the
removal of a run directory a refused run left bare, the run lock, the audit-ledger row (:class:`LedgerHook`)
and the interference monitor. ``Experiment(cfg, run_dir).run()`` from Python therefore writes what the CLI
writes; the CLI only parses, prints and maps errors.

A generation model (``models.model_info(name).task == "generation"``, the DDPM UNet; external models are
classifiers) makes a generation run: the data default to 32x32 (the paper's size; the dataset record states
the resize), and the quality figure's feature extractor is built once before any arm starts (a classifier
trained on first use and cached), in a meter window of its own that the ledger charges and no arm pays.

Under ``torchrun`` (or ``--nproc-per-node``) every rank constructs and runs the same experiment; only global
rank 0 touches the run directory, the ledger, the loggers and the report (:mod:`.ranks`), and every rank
returns rank 0's summary.

Run directory (see ``records.py``): ``config.json``, ``summary.json`` (status ``running`` until the end),
``runs/<arm>__s<seed>__r<repeat>.json`` (one finished arm-run each, so ``--resume`` skips them),
``checkpoints/`` (arm-runs in progress), and at the end ``epochs.csv``, ``power_trace.csv``, ``layers.csv``.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Protocol, Sequence

import torch

from ssprop_energy import __version__
from ssprop_energy.data import load_dataset
from ssprop_energy.distributed import context as distributed
from ssprop_energy.distributed.sharding import validate_sharding
from ssprop_energy.energy import open_meter, resolve_meter
from ssprop_energy.energy.carbon import resolve_intensity
from ssprop_energy.errors import ConfigError, RecordError, RunInterrupted
from ssprop_energy.experiment.config import GENERATION_DEFAULTS, ArmSpec, ExperimentConfig
from ssprop_energy.experiment.execute import Executor, out_of_memory_error
from ssprop_energy.experiment.plan import ArmRunKey, Group, all_runs, plan_groups
from ssprop_energy.experiment.ranks import ranks_for
from ssprop_energy.experiment.summarize import summarize_arms, write_tables
from ssprop_energy.records import (
    CONFIG_FILE,
    SUMMARY_FILE,
    ArmRecord,
    ArmRun,
    CarbonBlock,
    EnergyComponent,
    RunSummary,
    add_components,
    read_json,
    write_json_atomic,
    write_summary,
)
from ssprop_energy.runlock import LOCK_FILE, RunLock
from ssprop_energy.tracking import TrackingConfig
from ssprop_energy.train import Callback, resolve_device

log = logging.getLogger(__name__)


def task_of(model: str) -> str:
    """``classification`` or ``generation``: the registry's word for a registered model; external models
    (``torchvision:``, ``timm:``, factories) are classifiers.

    Raises:
        ConfigError: an unknown registered name.
    """
    from ssprop_energy.models import model_info
    from ssprop_energy.models.external import is_external

    return "classification" if is_external(model) else model_info(model).task


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _default_monitor(device: torch.device) -> Any:
    from ssprop_energy.energy.interference import InterferenceMonitor

    gpu_index = (device.index or 0) if device.type == "cuda" else None
    # under a launcher, "this run" is the launcher's whole process tree (every local rank), not rank 0 alone
    root_pid = os.getppid() if distributed.current().distributed else None
    return InterferenceMonitor(sample_period_s=0.25, gpu_index=gpu_index, root_pid=root_pid)


@dataclass
class ExperimentHooks:
    """What a caller plugs into a run.

    Attributes:
        callbacks: progress callbacks per arm-run, ``callbacks(arm, seed, repeat)``.
        stop_requested: polled after each batch (signals); true stops the run with :class:`RunInterrupted`.
        ledger: record the run in the audit ledger (a ``running`` row at the start, closed at the end).
        command: the command line stored in the ledger row (default ``sys.argv``).
        monitor: ``monitor(device)`` -> an interference monitor (``start/begin/end/stop``), or None for none.
        tracking: the experiment loggers to open (TensorBoard, MLflow); none by default.
        report: write ``RUN_DIR/report.html`` when the run completes or is interrupted (a report failure is a
            warning: it never costs the run its records).
    """

    callbacks: Callable[[ArmSpec, int, int], Sequence[Callback]] = lambda arm, seed, repeat: ()
    stop_requested: Callable[[], bool] = lambda: False
    ledger: bool = True
    command: Sequence[str] | None = None
    monitor: Callable[[torch.device], Any] | None = field(default=_default_monitor)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: bool = True


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """A new run's folder: ``runs/<timestamp>-<model>-<dataset>``."""
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


def resume_config(run_dir: Path) -> ExperimentConfig:
    """The stored configuration of a run to resume, read by rank 0 and given to every rank (under a launcher
    this joins the process group).

    Raises:
        ConfigError: not a resumable run directory, or a different number of processes than the run started
            with (a run's batches are split over its processes: another split would not continue the same
            computation).
    """
    dist = distributed.init()

    def stored() -> dict[str, Any]:
        cfg = load_run_config(run_dir)
        started = int(read_json(run_dir / SUMMARY_FILE).get("world_size", 1))
        if started != dist.world_size:
            raise ConfigError(f"--resume {run_dir}: the run was started with {started} process(es), this launch "
                              f"has {dist.world_size}; relaunch with the same number of processes")
        return cfg.to_dict()

    try:
        return ExperimentConfig.from_dict(distributed.decide_on_main(dist, stored))
    except BaseException:
        distributed.shutdown()
        raise


def remove_run_dir_if_bare(run_dir: Path) -> None:
    """Remove a run directory when it holds nothing but the lock file, ``config.json`` and an empty ``runs/``:
    a run stopped or refused before its first record leaves nothing behind."""
    try:
        if {p.name for p in run_dir.iterdir()} <= {LOCK_FILE, "runs", CONFIG_FILE}:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            (run_dir / CONFIG_FILE).unlink(missing_ok=True)  # no summary beside it: not a resumable run
            if (run_dir / "runs").is_dir():
                (run_dir / "runs").rmdir()
            run_dir.rmdir()
    except OSError:
        pass


class RunHook(Protocol):
    """A resource of one run, closed with the run's outcome when :meth:`Experiment.run` ends."""

    def close(self, status: str, note: str | None = None) -> None:
        """Close with ``status`` (``complete``, ``interrupted`` or ``failed``) and the reason, if any."""


class LedgerHook:
    """Opens the audit-ledger row when a run starts and closes it with what the meters measured."""

    def __init__(self, experiment: Experiment, command: Sequence[str]) -> None:
        from ssprop_energy import ledger

        cfg = experiment.cfg
        self.experiment = experiment
        self.entry = ledger.start_entry(kind=cfg.kind, project=cfg.project, command=list(command),
                                        run_dir=experiment.run_dir)

    def close(self, status: str, note: str | None = None) -> None:
        """Close the row with ``status`` and the energy every meter of this process measured."""
        c = self.experiment.carbon
        self.entry.finish(status, self.experiment.spent_components(), co2_g=None,
                          intensity_g_per_kwh=c.intensity_g_per_kwh, pue=c.pue, intensity_source=c.source, note=note)


class TrackingHook:
    """The experiment loggers (TensorBoard, MLflow) of one run: opened before the run directory is made (a
    missing package or a bad MLflow URI then writes nothing), given each arm-run's callbacks, and handed the
    finished run directory's artifacts at the end.

    Raises:
        ConfigError: a logger cannot be opened (see :func:`ssprop_energy.tracking.open_loggers`).
    """

    def __init__(self, experiment: Experiment, tracking: TrackingConfig) -> None:
        self.run_dir = experiment.run_dir
        self.loggers = tracking.open(experiment.run_dir, carbon_g_per_kwh=experiment.carbon.intensity_g_per_kwh,
                                     pue=experiment.carbon.pue)

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the run's configuration in every logger."""
        for logger in self.loggers:
            logger.log_config(config)

    def callbacks(self, arm: ArmSpec, seed: int, repeat: int) -> list[Callback]:
        """One trainer callback per logger for this arm-run."""
        return [logger.callback(arm.name, seed, repeat) for logger in self.loggers]

    def close(self, status: str, note: str | None = None) -> None:
        """Attach ``summary.json`` and ``report.html`` (a complete or interrupted run), then close every logger."""
        try:
            if status in ("complete", "interrupted"):
                for logger in self.loggers:
                    logger.on_run_end(self.run_dir)
        finally:
            for logger in self.loggers:
                logger.close(status)


class ReportHook:
    """Writes ``RUN_DIR/report.html`` when the run completes or is interrupted (a partial report)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path: Path | None = None

    def close(self, status: str, note: str | None = None) -> None:
        """Render the report; a report failure is a warning, never a lost run."""
        if status not in ("complete", "interrupted"):
            return
        from ssprop_energy.errors import SSPropEnergyError
        from ssprop_energy.report import render_report

        try:
            self.path = render_report([self.run_dir], self.run_dir / "report.html")
        except (SSPropEnergyError, OSError) as exc:
            log.warning("report not written: %s (the run's records are in %s)", exc, self.run_dir)


class Experiment:
    """Runs all arm-runs of a configuration into a run directory and writes the summary.

    Everything that can reject user input (device, carbon intensity, dataset, model, schedule, meter) is
    checked in the constructor, before the run directory is touched.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path | None = None, hooks: ExperimentHooks | None = None,
                 resume: bool | None = None) -> None:
        """Check everything and prepare the run (nothing is written yet).

        Args:
            cfg: the validated configuration.
            run_dir: the run directory (None: ``cfg.out``, else a new timestamped folder under ``runs/``; in a
                distributed run rank 0's choice).
            hooks: what the caller plugs in (progress callbacks, stop flag, ledger, monitor, loggers, report).
            resume: True continues the run in ``run_dir``; False starts a new one (the directory must be absent
                or empty); None resumes when ``run_dir`` holds a ``summary.json``.
        """
        try:
            self._construct(cfg, run_dir, hooks, resume)
        except BaseException:
            distributed.shutdown()  # a refused run leaves the process group it joined
            raise

    def _construct(self, cfg: ExperimentConfig, run_dir: Path | None, hooks: ExperimentHooks | None,
                   resume: bool | None) -> None:
        self.cfg = cfg
        self.dist = distributed.init()
        self.ranks = ranks_for(self.dist)
        self.run_dir = Path(self.ranks.share(str(run_dir or cfg.out or default_run_dir(cfg))))
        if cfg.out is None:
            cfg.out = str(self.run_dir)
        run_dir = self.run_dir
        self.resume = resume
        user = hooks or ExperimentHooks()
        self.tracking: TrackingHook | None = None
        self.report: ReportHook | None = None
        # the loggers' callbacks join the caller's; the loggers themselves open when the run starts
        self.hooks = replace(user, callbacks=lambda arm, seed, repeat: [
            *user.callbacks(arm, seed, repeat), *(self.tracking.callbacks(arm, seed, repeat) if self.tracking else ())])
        self.device = resolve_device(cfg.device)
        if self.dist.distributed and self.device.type == "cuda":
            distributed.check_cuda(self.dist)
            self.device = torch.device("cuda", self.dist.local_rank)
        intensity = resolve_intensity(country=cfg.country, override_g_per_kwh=cfg.carbon_intensity)
        self.carbon = CarbonBlock(
            intensity_g_per_kwh=intensity.g_per_kwh, source=intensity.source, region=intensity.region, pue=cfg.pue,
            pue_source="--pue" if cfg.pue != 1.0 else "default 1.0 (no data-centre overhead)",
        )
        self.task = task_of(cfg.model)
        self.generation = self._generation_config() if self.task == "generation" else None
        # The split is fixed (seed 0) whatever the training seeds: every seed is tested on the same images.
        image_size = cfg.image_size
        if image_size is None and self.task == "generation":
            image_size = GENERATION_DEFAULTS["image_size"]
        self.data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=image_size, seed=0)
        validate_sharding(len(self.data.train), cfg.batch_size, self.dist.world_size)
        # The meter's fallback chain runs once, here (an unavailable --meter is a user error found now);
        # every meter of the run opens exactly these sources.
        self.meter_choice = resolve_meter(cfg.meter, sample_period_s=cfg.sample_period_s)
        self.executor = Executor(
            cfg, self.data, self.device, self.meter_choice, None, run_dir / "checkpoints",
            self.hooks.callbacks, self.hooks.stop_requested, dist=self.dist, generation=self.generation,
        )
        self.generation_info: dict[str, Any] | None = None
        if self.generation is not None and self.generation.inception_weights:
            # A named weights file that is missing or unusable is the user's mistake: found now, not mid-run.
            from ssprop_energy.generation import inception_extractor

            self.executor.extractor = inception_extractor(self.generation.inception_weights)
        check_split_sizes(cfg.dataset, self.data)
        # Unknown model names, or a model with no layer of the kinds to sparsify, fail now, not mid-run.
        n_batches = math.ceil(len(self.data.train) / cfg.batch_size)
        for arm in cfg.arms():
            if arm.sparse:
                check_schedule_drops(arm, self.executor.schedule(arm), cfg.epochs, n_batches)
        sparse_arm = next((a for a in cfg.arms() if a.sparse), None)  # None: an A/A run (two dense arms)
        probe = self.executor.build_model(sparse_arm or cfg.arms()[0], cfg.seeds[0])
        self.layer_kinds: tuple[str, ...] = self.executor.layer_kinds(probe)
        # What ssProp can reach, known before training: the run header shows it, a low share is warned about.
        self.layer_coverage = self.executor.coverage(probe) if sparse_arm is not None else None
        if self.layer_coverage is not None and self.layer_coverage.warning:
            log.warning("%s: %s", cfg.model, self.layer_coverage.warning)
        self.groups: list[Group] = plan_groups(cfg)
        self.created_at = now_iso()
        self.environment: dict[str, Any] = {}
        self.rank_infos: list[dict[str, Any]] = []
        self.idle_power_w: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ running

    def _generation_config(self) -> Any:
        """The generation task's settings from the config (unset values: the task's defaults)."""
        from ssprop_energy.generation import ENV_INCEPTION_WEIGHTS, GenerationConfig

        cfg = self.cfg
        if cfg.eval_noise:
            raise ConfigError("--eval-noise (input-noise accuracy) applies to classification, not to the "
                              f"generation model {cfg.model!r}", field="eval_noise")
        options: dict[str, Any] = {}
        if cfg.samples is not None:
            options["n_samples"] = cfg.samples
        if cfg.timesteps is not None:
            options["timesteps"] = cfg.timesteps
        weights = cfg.inception_weights or os.environ.get(ENV_INCEPTION_WEIGHTS) or None
        return GenerationConfig(inception_weights=weights, **options)

    def _build_extractor(self) -> None:
        """Build the quality figure's feature extractor once, before any arm, metered apart from every arm.

        The classifier's one-off training (on first use; cached afterwards) is charged to this invocation in
        the ledger (it is in ``executor.metered``) but to neither arm.
        """
        from ssprop_energy.generation import GenerationTask
        from ssprop_energy.records import total_energy

        task = GenerationTask(self.data, self.generation)
        meter = open_meter(choice=self.meter_choice, sample_period_s=self.cfg.sample_period_s)
        started = time.perf_counter()
        meter.start()
        try:
            with meter.window("extractor", scope="setup"):
                extractor = self.executor.extractor or task.extractor()
        finally:
            report = meter.stop()
            self.executor.metered.append(list(report.components))
        self.executor.extractor = extractor
        energy_j, source = total_energy(report.components)
        self.generation_info = {
            **task.describe(),
            "extractor": extractor.describe(),
            "extractor_setup": {"wall_s": time.perf_counter() - started, "energy_j": energy_j, "energy_source": source,
                                "note": "building the extractor (training the classifier when not cached) is "
                                        "charged to the ledger row, not to any arm"},
        }

    def plan(self) -> list[ArmRunKey]:
        """All arm-runs in execution order (within a group, epochs interleave)."""
        return all_runs(self.groups)

    def run(self) -> RunSummary:
        """Run (or resume) every arm-run; returns the final summary, also written to the run directory.

        The run's resources are opened in order and closed in reverse, whatever happens: the process group
        (left at the end), the loggers, ``report.html``, the run directory (made for a new run; removed again if
        a refused or stopped run left it bare), the lock (:class:`~ssprop_energy.runlock.RunLock`), the torch
        thread count, the audit-ledger row and the interference monitor. Rank 0 alone holds those that touch
        files.

        Raises:
            RunInterrupted: the stop flag was raised (on any rank), KeyboardInterrupt arrived (a signal, in any
                phase), or another rank of a distributed run failed; the summary is saved as ``interrupted``.
            ConfigError: another process holds the run directory, the run is already complete, a new run's
                directory is not empty, or a logger cannot be opened.
        """
        self._outcome: tuple[str, str | None] | None = None  # (status, reason) of a run that did not complete
        self._recorded = False  # a summary exists: from here on, a stop or failure is saved in it
        with ExitStack() as stack:
            stack.callback(self.ranks.leave)
            self.tracking = self.ranks.on_main(lambda: TrackingHook(self, self.hooks.tracking))
            self._close_with_outcome(stack, self.tracking, "the experiment loggers")
            if self.hooks.report and self.ranks.is_main:
                self.report = ReportHook(self.run_dir)
                self._close_with_outcome(stack, self.report, "report.html")
            if self.ranks.decide(self._prepare_new_run_dir):
                stack.push(self._remove_if_bare)
            lock = self.ranks.on_main(lambda: RunLock(self.run_dir).acquire())
            if lock is not None:
                stack.callback(lock.release)
                summary_path = self.run_dir / SUMMARY_FILE
                if summary_path.exists() and read_json(summary_path).get("status") == "complete":
                    raise ConfigError(f"--resume {self.run_dir}: the run is already complete")
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            if self.cfg.threads is not None:
                # a process-wide setting, restored when the run ends (on a CPU shared with other work, 1 thread
                # avoids the pathological slowdown of spinning OpenMP threads; BENCHMARKS.md)
                torch.set_num_threads(self.cfg.threads)
            return self._run(stack)

    def _prepare_new_run_dir(self) -> bool:
        """Make a new run's directory (rank 0); True when this run created it (it is removed again if bare)."""
        resuming = self.resume if self.resume is not None else (self.run_dir / SUMMARY_FILE).exists()
        if resuming:
            return False
        existed = self.run_dir.exists()
        prepare_run_dir(self.run_dir)
        return not existed

    def _remove_if_bare(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if exc_type is not None and not (self.run_dir / SUMMARY_FILE).exists():
            remove_run_dir_if_bare(self.run_dir)
        return False

    def _close_with_outcome(self, stack: ExitStack, hook: RunHook | None, what: str) -> None:
        """Close ``hook`` when the stack unwinds: ``complete``, or the outcome the run recorded. Closing after
        a failure never raises over the original error (a warning)."""
        if hook is None:
            return

        def close(exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
            if exc_type is None:
                hook.close("complete")
                return False
            status, note = self._outcome or (
                ("interrupted", None) if isinstance(exc, (RunInterrupted, KeyboardInterrupt)) else ("failed", None))
            try:
                hook.close(status, note)
            except Exception as err:  # noqa: BLE001 - the original error is what the user must see
                log.warning("could not close %s: %s", what, err)
            return False

        stack.push(close)

    def _run(self, stack: ExitStack) -> RunSummary:
        ranks = self.ranks
        self.rank_infos = ranks.gather(self.executor.rank_info())
        try:
            if self.hooks.ledger and ranks.is_main:
                ledger = LedgerHook(self, self.hooks.command or sys.argv)
                self._close_with_outcome(stack, ledger, "the audit-ledger row")
            ranks.on_main(self._write_config)
            self.environment = self._environment()
            if ranks.is_main:
                self._write_summary("running")
                self._recorded = True
            if self.tracking is not None:
                self.tracking.log_config({**self.cfg.to_dict(), "layer_kinds": list(self.layer_kinds)})
            monitor = ranks.on_main(lambda: self.hooks.monitor(self.device) if self.hooks.monitor else None)
            self.executor.monitor = monitor
            if monitor is not None:
                monitor.start()
                stack.callback(monitor.stop)
            if self.cfg.idle_s > 0:
                ranks.on_main(self._measure_idle)
            if self.generation is not None:
                # rank 0 alone scores the samples (generation/sharded.py), so it alone builds the extractor
                ranks.on_main(self._build_extractor)
                ranks.on_main(lambda: self._write_summary("running"))
            for group in self.groups:
                pending = ranks.on_main(lambda: [k.name for k in group.runs if not self._result_path(k).exists()])
                names = set(ranks.share(pending))  # rank 0 has the run directory
                pending_keys = [key for key in group.runs if key.name in names]
                if pending_keys:
                    self.executor.run_group(group, pending_keys, self._save_run)
            self.executor.gather_metered()
            summary = ranks.on_main(self._finalise_on_disk)
        except (RunInterrupted, KeyboardInterrupt) as exc:
            # a signal in any phase (setup, counting, warm-up, idle, training, evaluation, finalisation): what
            # finished is on disk; the record says interrupted and --resume continues from there
            if isinstance(exc, RunInterrupted):
                self.executor.gather_metered()  # every rank stopped at the same batch (the flag is agreed)
            self._outcome = ("interrupted", None)
            ranks.on_main(lambda: self._save_unfinished("interrupted"))
            if isinstance(exc, RunInterrupted):
                raise
            raise RunInterrupted("interrupted") from None
        except BaseException as exc:
            if ranks.is_peer_failure(exc):
                # another rank died: what is saved stays resumable, and this rank stops like the others
                reason = f"another process of the distributed run failed ({type(exc).__name__}: {exc})"
                self._outcome = ("interrupted", reason)
                ranks.on_main(lambda: self._write_summary("interrupted", self._arms(complete=False),
                                                          failure_reason=reason))
                raise RunInterrupted(reason) from None
            oom = out_of_memory_error(exc, self.cfg, self.data.image_size)
            reason = str(oom) if oom is not None else f"{type(exc).__name__}: {exc}"
            self._outcome = ("failed", reason)
            ranks.on_main(lambda: self._save_unfinished("failed", reason))
            if oom is not None:
                raise oom from None
            raise
        return ranks.share(summary)

    def _write_config(self) -> None:
        (self.run_dir / "runs").mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / CONFIG_FILE, self.cfg.to_dict())

    def _measure_idle(self) -> None:
        meter = open_meter(choice=self.meter_choice, sample_period_s=self.cfg.sample_period_s)
        try:
            self.idle_power_w = dict(meter.measure_idle(self.cfg.idle_s))
        finally:
            meter.close()

    def _finalise_on_disk(self) -> RunSummary:
        # Say "not finished" on disk before finalising: if the tables or the summary cannot be written (a full
        # disk), the record is never left "running" with every arm-run done; resume finalises.
        self._write_summary("failed", self._arms(complete=False), failure_reason=(
            f"finalisation did not finish; run --resume {self.run_dir} to finish it"))
        summary = self._finalise()
        try:
            (self.run_dir / "checkpoints").rmdir()  # empty once every arm-run finished
        except OSError:
            pass
        return summary

    def _save_unfinished(self, status: str, reason: str | None = None) -> None:
        """Save the summary of the finished arm-runs (and their tables, for a partial report) with ``status``.
        A failure here (a full disk) is logged, never raised over the original error: the summary then stays
        ``running``, which readers treat as stopped once no process holds the run's lock."""
        if not self._recorded:  # stopped before the run wrote anything: nothing to save
            return
        try:
            arms = self._arms(complete=False)
            self._write_summary(status, arms, failure_reason=reason)
            write_tables(self.run_dir, self._runs_by_arm())
        except Exception as exc:  # noqa: BLE001 - the original error is what the user must see
            log.warning("could not save the %s run record in %s: %s", status, self.run_dir, exc)

    def spent_components(self) -> list[EnergyComponent]:
        """Energy every meter of this process measured (training, evaluation and the gaps between windows,
        interrupted groups included): what the audit ledger charges to this invocation. In a distributed run
        every rank's and node's components, named ``<component>@rank<r>`` / ``<component>@node<n>`` (the
        ledger keys a row's components by name)."""
        spent = add_components(*self.executor.metered)
        if not self.dist.distributed:
            return spent
        return [replace(c, component=f"{c.component}@" + (f"rank{c.rank}" if c.rank is not None else f"node{c.node}"),
                        rank=None, node=None) for c in spent]

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
            "device_name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "torch_threads": torch.get_num_threads(),
            "meter": {"kind": self.meter_choice.kind, "sources": list(self.meter_choice.sources),
                      "unavailable": dict(self.meter_choice.unavailable)},
            "dataset": getattr(self.data, "info", {}),
            **({"distributed": {"world_size": self.dist.world_size, "nodes": self.dist.nodes,
                                "backend": self.dist.backend, "ranks": self.rank_infos}}
               if self.dist.distributed else {}),
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
        return summarize_arms(specs, self._runs_by_arm(), self.carbon, self.idle_power_w, complete,
                              sliced=self.cfg.interleave == "slice")

    def _finalise(self) -> RunSummary:
        by_arm = self._runs_by_arm()
        specs = {a.name: a for a in self.cfg.arms()}
        arms = summarize_arms(specs, by_arm, self.carbon, self.idle_power_w, complete=True,
                              sliced=self.cfg.interleave == "slice")
        write_tables(self.run_dir, by_arm)
        second = self.cfg.arms()[1].name if self.cfg.kind == "compare" else None  # ssprop, or dense-aa (A/A)
        paired = arms[second].paired if second is not None and second in arms else {}
        return self._write_summary("complete", arms, paired=paired)

    def _write_summary(
        self, status: str, arms: dict[str, ArmRecord] | None = None, paired: dict[str, Any] | None = None,
        failure_reason: str | None = None,
    ) -> RunSummary:
        summary = RunSummary(
            kind=self.cfg.kind, status=status, created_at=self.created_at, config=self.cfg.to_dict(),
            environment=self.environment, carbon=self.carbon, arms=arms or {}, paired=paired or {},
            interleave=self.cfg.interleave, failure_reason=failure_reason,
            finished_at=None if status == "running" else now_iso(), layer_kinds=list(self.layer_kinds),
            world_size=self.dist.world_size, nodes=self.dist.nodes, task=self.task,
            generation=self.generation_info, measurement=self.executor.measurement,
        )
        write_summary(self.run_dir, summary)
        return summary
