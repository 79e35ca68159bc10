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

A generation model (``models.model_info(name).task == "generation"``, the DDPM UNet; external models are
classifiers) makes a generation run: the data default to 32x32 (the paper's size; the dataset record states
the resize), and the quality figure's feature extractor is built once before any arm starts (a classifier
trained on first use and cached), in a meter window of its own that the ledger charges and no arm pays.

Under ``torchrun`` (or ``--nproc-per-node``) every rank constructs and runs the same experiment; only global
rank 0 touches the run directory and the ledger, and every rank returns rank 0's summary.

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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

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
from ssprop_energy.runlock import RunLock
from ssprop_energy.experiment.plan import ArmRunKey, Group, all_runs, plan_groups
from ssprop_energy.experiment.summarize import summarize_arms, write_tables
from ssprop_energy.records import (
    CONFIG_FILE, SUMMARY_FILE, ArmRecord, ArmRun, CarbonBlock, EnergyComponent, RunSummary, add_components,
    read_json, write_json_atomic, write_summary,
)
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
        self.dist = distributed.init()
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
        if self.task == "generation" and self.dist.world_size > 1:
            # each rank would sample and score its own copy: not wired yet, refused rather than half right
            raise ConfigError(f"the generation model {cfg.model!r} runs on one process only (no DDP yet)")
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
        probe = self.executor.build_model(next(a for a in cfg.arms() if a.sparse), cfg.seeds[0])
        self.layer_kinds: tuple[str, ...] = self.executor.layer_kinds(probe)
        # What ssProp can reach, known before training: the run header shows it, a low share is warned about.
        self.layer_coverage = self.executor.coverage(probe)
        if self.layer_coverage.warning:
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

        The run directory is locked (:class:`~ssprop_energy.runlock.RunLock`, by rank 0) while this runs.

        Raises:
            RunInterrupted: the stop flag was raised (on any rank), KeyboardInterrupt arrived (a signal, in any
                phase), or another rank of a distributed run failed; the summary is saved as ``interrupted``.
            ConfigError: another process holds the run directory, or the run is already complete.
        """
        lock = RunLock(self.run_dir).acquire() if self.dist.is_main else None
        try:
            summary_path = self.run_dir / SUMMARY_FILE
            if lock is not None and summary_path.exists() and read_json(summary_path).get("status") == "complete":
                raise ConfigError(f"--resume {self.run_dir}: the run is already complete")
            return self._run_threads()
        finally:
            if lock is not None:
                lock.release()

    def _run_threads(self) -> RunSummary:
        threads = torch.get_num_threads()
        if self.cfg.threads is not None:
            # a process-wide setting: restored when the run ends (on a CPU shared with other work, 1 thread
            # avoids the pathological slowdown of spinning OpenMP threads; BENCHMARKS.md)
            torch.set_num_threads(self.cfg.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> RunSummary:
        main = self.dist.is_main
        self.rank_infos = self.dist.all_gather(self.executor.rank_info())
        ledger: LedgerHook | None = None
        monitor = None
        self._recorded = False  # a summary exists: from here on, a stop or failure is saved in it
        try:
            if self.hooks.ledger and main:
                ledger = LedgerHook(self, self.hooks.command or sys.argv)
            if main:
                (self.run_dir / "runs").mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.run_dir / CONFIG_FILE, self.cfg.to_dict())
            self.environment = self._environment()
            if main:
                self._write_summary("running")
                self._recorded = True
            monitor = self.hooks.monitor(self.device) if self.hooks.monitor is not None and main else None
            self.executor.monitor = monitor
            if monitor is not None:
                monitor.start()
            if self.cfg.idle_s > 0 and main:
                meter = open_meter(choice=self.meter_choice, sample_period_s=self.cfg.sample_period_s)
                try:
                    self.idle_power_w = dict(meter.measure_idle(self.cfg.idle_s))
                finally:
                    meter.close()
            if self.generation is not None:
                self._build_extractor()
                if main:
                    self._write_summary("running")
            for group in self.groups:
                pending = [key for key in group.runs if not self._result_path(key).exists()] if main else []
                names = set(self.dist.broadcast([key.name for key in pending]))  # rank 0 has the run directory
                pending = [key for key in group.runs if key.name in names]
                if pending:
                    self.executor.run_group(group, pending, self._save_run)
            self.executor.gather_metered()
            if main:
                # Say "not finished" on disk before finalising: if the tables or the summary cannot be written
                # (a full disk), the record is never left "running" with every arm-run done; resume finalises.
                self._write_summary("failed", self._arms(complete=False), failure_reason=(
                    f"finalisation did not finish; run --resume {self.run_dir} to finish it"))
            summary = self._finalise() if main else None
        except (RunInterrupted, KeyboardInterrupt) as exc:
            # a signal in any phase (setup, counting, warm-up, idle, training, evaluation, finalisation): what
            # finished is on disk; the record says interrupted and --resume continues from there
            if isinstance(exc, RunInterrupted):
                self.executor.gather_metered()  # every rank stopped at the same batch (the flag is agreed)
            if main:
                self._close_unfinished("interrupted", ledger)
            if isinstance(exc, RunInterrupted):
                raise
            raise RunInterrupted("interrupted") from None
        except BaseException as exc:
            if self.dist.distributed and isinstance(exc, Exception) and distributed.is_peer_failure(exc):
                # another rank died: what is saved stays resumable, and this rank stops like the others
                reason = f"another process of the distributed run failed ({type(exc).__name__}: {exc})"
                if main:
                    self._write_summary("interrupted", self._arms(complete=False), failure_reason=reason)
                    if ledger is not None:
                        ledger.close("interrupted", note=reason)
                raise RunInterrupted(reason) from None
            oom = out_of_memory_error(exc, self.cfg, self.data.image_size)
            reason = str(oom) if oom is not None else f"{type(exc).__name__}: {exc}"
            if main:
                self._close_unfinished("failed", ledger, reason)
            if oom is not None:
                raise oom from None
            raise
        finally:
            if monitor is not None:
                monitor.stop()
        if ledger is not None:
            ledger.close("complete")
        if main:
            try:
                (self.run_dir / "checkpoints").rmdir()  # empty once every arm-run finished
            except OSError:
                pass
        return self.dist.broadcast(summary) if self.dist.distributed else summary

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
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or platform.machine(),
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
            finished_at=None if status == "running" else now_iso(), layer_kinds=list(self.layer_kinds),
            world_size=self.dist.world_size, nodes=self.dist.nodes, task=self.task,
            generation=self.generation_info,
        )
        write_summary(self.run_dir, summary)
        return summary
