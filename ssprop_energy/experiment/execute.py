"""Execute: build each arm-run's model, count its FLOPs, warm it up, and train a group of arm-runs.

A group's arm-runs (see ``plan.py``) share one energy meter, opened from the run's meter choice, and the
run's interference monitor. Each arm-run keeps its own model, optimizer, schedule, data order, RNG stream
(re-seeded per epoch by the trainer) and checkpoint, so an interleaved group computes bit for bit what the
same arm-runs compute one after the other. Its energy is the sum of its own meter windows; the energy the
meter saw in total (windows of every arm, and the gaps between them) is kept for the ledger.

Generation (the DDPM UNet): each arm-run gets its own :class:`~ssprop_energy.generation.GenerationTask` (its
training draws are reseeded from (seed, epoch), so both arms see the same timesteps and noise), the FLOP
count runs the diffusion step (``step_fn``), and after the last epoch every arm-run samples its fixed-seed
images in its own ``sample`` window (``<arm-run>/sample``: time and energy apart from training), is scored in a
``score`` window, and writes its sample grid next to the records.

In a distributed run (``dist.distributed``) every rank runs this same code in the same arm order: each
arm-run's model is wrapped in DDP, each rank trains on its part of every global batch, meters its own
devices, and counts its own FLOPs; rank 0 gathers the ranks' records and merges them into one
(``distributed/merge.py``). Only rank 0 writes checkpoints and records; on resume it sends the checkpoint
to the other ranks, so the run directory need only exist on rank 0's node.
"""

from __future__ import annotations

import bisect
import copy
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ssprop_energy.data import BatchLoader, DatasetSplits
from ssprop_energy.distributed.context import SINGLE, DistContext
from ssprop_energy.distributed.sharding import local_batch_sizes
from ssprop_energy.energy import open_meter
from ssprop_energy.energy.select import MeterChoice
from ssprop_energy.errors import ConfigError
from ssprop_energy.experiment.config import ArmSpec, ExperimentConfig
from ssprop_energy.experiment.plan import ArmRunKey, Group, epoch_order
from ssprop_energy.flops import FlopMeter
from ssprop_energy.errors import RecordError
from ssprop_energy.layer_coverage import LayerCoverage, layer_coverage
from ssprop_energy.models import get_model, resolve_layers
from ssprop_energy.records import (
    SAMPLES_FILE, ArmRun, EnergyComponent, EpochRecord, diverged_epoch, read_json, write_bytes_atomic,
    write_json_atomic,
)
from ssprop_energy.sparse import set_drop_rate, sparsify
from ssprop_energy.sparse.schedules import DropSchedule
from ssprop_energy.train import Callback, TrainConfig, Trainer
from ssprop_energy.train.loop import TrainResult
from ssprop_energy.train.optim import make_optimizer

if TYPE_CHECKING:
    from ssprop_energy.energy.base import EnergyReport
    from ssprop_energy.energy.meter import EnergyMeter
    from ssprop_energy.generation import GenerationConfig, GenerationTask
    from ssprop_energy.generation.features import FeatureExtractor

log = logging.getLogger(__name__)


def out_of_memory_error(exc: BaseException, cfg: ExperimentConfig, image_size: int | None = None) -> ConfigError | None:
    """A one-line error naming the settings to lower when ``exc`` is an out-of-memory error (CUDA, MPS or
    host allocator), else None."""
    text = str(exc).lower()
    oom = isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))
    if not oom:
        return None
    size = image_size or cfg.image_size
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"out of memory with {cfg.model} at batch size {cfg.batch_size} and image size "
        f"{size if size is not None else 'the dataset default'}: lower --batch-size or --image-size ({first})")


# the trainer state that differs between ranks (the rest is the same model, optimizer and reduced metrics)
_RANK_STATE = ("epochs", "energy_by_component_j", "component_info", "phases", "eval_wall_s", "flops_backward_conv")


class _Dense:
    """The dense arm's "schedule" for FLOP integration: drop rate 0 for every batch."""

    def rate(self, epoch: int, iteration: int) -> float:
        return 0.0


class Executor:
    """Builds and trains arm-runs into typed :class:`ArmRun` records.

    Args:
        cfg: the experiment configuration.
        data: the dataset splits (shared by every arm-run).
        device: where to train.
        meter_choice: the sources every meter of this run opens (resolved once by the experiment).
        monitor: the run's interference monitor (started), or None to record no interference.
        checkpoint_dir: where arm-runs in progress keep their checkpoints (its parent, the run directory,
            receives the sample grids of a generation run).
        callbacks: progress callbacks per arm-run.
        stop_requested: polled after each batch.
        dist: this process's place in a distributed run (``SINGLE`` for one process).
        generation: the generation task's settings for a generation model, else None (classification).
    """

    def __init__(
        self, cfg: ExperimentConfig, data: DatasetSplits, device: torch.device, meter_choice: MeterChoice,
        monitor: Any, checkpoint_dir: Path, callbacks: Callable[[ArmSpec, int, int], Sequence[Callback]],
        stop_requested: Callable[[], bool], dist: DistContext = SINGLE, generation: GenerationConfig | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.device = device
        self.meter_choice = meter_choice
        self.monitor = monitor
        self.checkpoint_dir = checkpoint_dir
        self.callbacks = callbacks
        self.stop_requested = stop_requested
        self.dist = dist
        # every meter report's components, finished or interrupted: what this process metered in total
        self.metered: list[list[EnergyComponent]] = []
        self._layer_kinds: tuple[str, ...] | None = None
        self._coverage: LayerCoverage | None = None
        self.generation = generation
        # the feature extractor of the quality figure, built once by the experiment before any arm starts
        self.extractor: FeatureExtractor | None = None

    def make_task(self, seed: int) -> GenerationTask | None:
        """A fresh generation task for one arm-run (None for classification: the trainer's default task)."""
        if self.generation is None:
            return None
        from ssprop_energy.generation import GenerationTask

        task = GenerationTask(self.data, self.generation, seed=seed)
        if self.extractor is not None:
            task.use_extractor(self.extractor)
        return task

    # ------------------------------------------------------------------------------------------ building

    def build_model(self, arm: ArmSpec, seed: int) -> torch.nn.Module:
        """The arm's model: identical initial weights for every arm of a seed; ssProp layers built at drop 0
        (the schedule sets the rate each epoch/iteration)."""
        torch.manual_seed(seed)
        model = get_model(
            self.cfg.model, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
            image_size=self.data.image_size, dropout=arm.dropout,
        )
        if arm.sparse:
            model = sparsify(model, drop_rate=0.0, layers=self.layer_kinds(model), selection=self.cfg.selection)
        return model

    def layer_kinds(self, model: torch.nn.Module) -> tuple[str, ...]:
        """The layer kinds ssProp replaces: ``--layers``, else the model's default (``models.resolve_layers``).
        Resolved once per run from the first model built: every arm builds the same architecture."""
        if self._layer_kinds is None:
            self._layer_kinds = resolve_layers(self.cfg.model, model, self.cfg.layers)
        return self._layer_kinds

    def _flop_meter(self, model: torch.nn.Module) -> FlopMeter:
        input_shape = (self.data.in_channels, self.data.image_size, self.data.image_size)
        task = self.make_task(0)  # generation: count the diffusion step (its draws come from the counter's generator)
        return FlopMeter(copy.deepcopy(model), input_shape, self.data.num_classes,
                         step_fn=task.step_fn if task is not None else None)

    def coverage(self, model: torch.nn.Module) -> LayerCoverage:
        """Sparsified layers per kind and their share of the backward FLOPs of ``model`` (an ssProp arm's),
        counted on a dense step (drop rate 0): a drop rate would shrink the very share it is judged by.
        Counted once per run: every ssProp arm sparsifies the same layers of the same architecture."""
        if self._coverage is None:
            self._coverage = layer_coverage(self._flop_meter(model).per_sample(0.0).layers)
        return self._coverage

    def schedule(self, arm: ArmSpec) -> DropSchedule | None:
        if not arm.sparse:
            return None
        return self.cfg.drop_schedule(arm.schedule, arm.drop_rate)

    def _warm_up(self, model: torch.nn.Module, sparse_rates: Sequence[float],
                 task: GenerationTask | None = None) -> None:
        """One forward+backward per configuration on a copy of the model (the model itself is untouched), so
        that one-off costs (thread pools, allocator growth, kernel selection) fall outside the measurement."""
        twin = copy.deepcopy(model).to(self.device).train()
        loader = BatchLoader(self.data.train, self.cfg.batch_size, shuffle=False, mean=self.data.mean,
                             std=self.data.std, device=self.device)
        optimizer = make_optimizer(self.cfg.optimizer, twin.parameters(), self.cfg.lr, self.cfg.weight_decay)
        x, y = next(iter(loader))
        for rate in sparse_rates or [None]:
            if rate is not None:
                set_drop_rate(twin, rate)
            optimizer.zero_grad(set_to_none=True)
            if task is not None:  # its own generator: the task's training draws are left untouched
                task.batch_loss(twin, x, y, generator=torch.Generator().manual_seed(0))[0].backward()
            else:
                F.cross_entropy(twin(x), y).backward()
            optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def checkpoint_path(self, key: ArmRunKey) -> Path:
        return self.checkpoint_dir / f"{key.name}.pt"

    def _interference_path(self, key: ArmRunKey) -> Path:
        return self.checkpoint_dir / f"{key.name}.interference.json"

    def _prepare(self, key: ArmRunKey) -> dict[str, Any]:
        """Build, FLOP-count and warm up one arm-run, before any meter starts (neither is charged to it)."""
        cfg = self.cfg
        model = self.build_model(key.arm, key.seed)
        schedule = self.schedule(key.arm)
        task = self.make_task(key.seed)
        flop_meter = self._flop_meter(model)
        d = self.dist
        # a rank counts the FLOPs of its own parts of the batches; rank 0 sums them over ranks
        sizes = (local_batch_sizes(len(self.data.train), cfg.batch_size, d.world_size, d.rank)
                 if d.distributed else None)
        run_flops = flop_meter.for_schedule(schedule or _Dense(), cfg.epochs, len(self.data.train), cfg.batch_size,
                                            batch_sizes=sizes)
        n_batches = math.ceil(len(self.data.train) / cfg.batch_size)
        rates = sorted({schedule.rate(e, i) for e in range(cfg.epochs) for i in range(n_batches)}) if schedule else []
        self._warm_up(model, rates, task)
        layer_step = flop_meter.per_sample(key.arm.drop_rate if key.arm.sparse else 0.0)
        coverage = self.coverage(model) if key.arm.sparse else None
        train_cfg = TrainConfig(
            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay, lr_schedule=cfg.lr_schedule, seed=key.seed, amp=cfg.amp,
            eval_noise=tuple(cfg.eval_noise),
        )
        interference = []
        if self._interference_path(key).exists() and self.checkpoint_path(key).exists():
            interference = list(read_json(self._interference_path(key)))
        return {
            "model": model, "schedule": schedule, "train_cfg": train_cfg, "run_flops": run_flops,
            "layers": [{"layer": layer.name, "type": layer.type, "flops_forward": layer.forward,
                        "flops_backward": layer.backward} for layer in layer_step.layers],
            "interference": interference, "coverage": coverage, "task": task,
        }

    # ------------------------------------------------------------------------------------------ running

    def run_group(self, group: Group, pending: Sequence[ArmRunKey],
                  on_finished: Callable[[ArmRun], None]) -> None:
        """Train the group's ``pending`` arm-runs, interleaved epoch by epoch in ABBA order; ``on_finished``
        receives each arm-run's record (on rank 0 only, in a distributed run) as soon as all of the group's
        epochs are done."""
        cfg = self.cfg
        d = self.dist
        if d.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        prepared = {key.name: self._prepare(key) for key in pending}
        meter = self._open_meter()
        trainers: dict[str, Trainer] = {}
        ddp: dict[str, Any] = {}
        comm_s = {key.name: 0.0 for key in pending}
        stop = (lambda: d.any(self.stop_requested())) if d.distributed else self.stop_requested
        report: EnergyReport | None = None
        meter.start()
        try:
            for key in pending:
                p = prepared[key.name]
                model = p["model"]
                if d.distributed:
                    from ssprop_energy.distributed.ddp import wrap

                    model, ddp[key.name] = wrap(model.to(self.device), self.device, d)
                checkpoint, local_copy = self._checkpoint_for(key)
                trainers[key.name] = trainer = Trainer(
                    model, self.data, p["train_cfg"], self.device, schedule=p["schedule"], meter=meter,
                    epoch_flops=p["run_flops"].epochs, callbacks=self.callbacks(key.arm, key.seed, key.repeat),
                    checkpoint_path=checkpoint, stop_requested=stop, scope=key.name,
                    reduce_sums=d.all_sum if d.distributed else None, shard=(d.rank, d.world_size),
                    task=p["task"],
                )
                if d.distributed:
                    from ssprop_energy.distributed.ddp import ShardedTask

                    loader = trainer.train_loader
                    ddp[key.name].fraction = lambda loader=loader: loader.last_batch_samples
                    trainer.task = ShardedTask(trainer.task, d)
                trainer.begin()
                if d.distributed:
                    comm_s[key.name] = self._restore_rank_state(key, trainer)
                if local_copy is not None:  # another rank's copy of rank 0's checkpoint: read once, never written
                    trainer.checkpoint_path = None
                    local_copy.unlink(missing_ok=True)
                elif not d.is_main:
                    trainer.checkpoint_path = None
            pending_set = {key.name for key in pending}
            for epoch in range(cfg.epochs):
                for key in epoch_order(group, epoch):
                    if key.name not in pending_set:
                        continue
                    trainer = trainers[key.name]
                    if trainer.next_epoch > epoch:
                        continue  # resumed past this epoch
                    token = self.monitor.begin() if self.monitor is not None else None
                    trainer.run_epoch()
                    if key.name in ddp:
                        comm_s[key.name] += ddp[key.name].take()
                        self._save_rank_states(key, trainer, comm_s[key.name])
                    if self.monitor is not None:
                        reading = self.monitor.end(token)
                        prepared[key.name]["interference"].append(
                            {"seed": key.seed, "repeat": key.repeat, "epoch": epoch, **reading.to_dict()})
                        write_json_atomic(self._interference_path(key), prepared[key.name]["interference"])
            results = {key.name: trainers[key.name].finish() for key in pending}
            if self.generation is not None:
                # after every arm's training, in the group's next ABBA order; finish() left the best epoch's weights
                for key in epoch_order(group, cfg.epochs):
                    if key.name in pending_set:
                        prepared[key.name]["generated"] = self._generate(key, trainers[key.name], prepared[key.name],
                                                                         meter)
        finally:
            if meter.running:
                report = meter.stop()
                self.metered.append(self._label(list(report.components)))
        assert report is not None
        traces = self._split_trace(report, meter.intervals(), pending, results)
        for key in pending:
            run = self._arm_run(key, trainers[key.name], results[key.name], prepared[key.name], traces[key.name])
            if d.distributed:
                merged = self._merge(run, comm_s[key.name])
                if merged is None:
                    continue  # not rank 0
                run = merged
            on_finished(run)
            self.checkpoint_path(key).unlink(missing_ok=True)  # the record is saved; the checkpoint served resume
            self._interference_path(key).unlink(missing_ok=True)
            self._ranks_path(key).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ distributed

    def _open_meter(self) -> Any:
        """This rank's meter: its own GPU and process; node-wide counters on local rank 0 only."""
        d = self.dist
        if not d.distributed:
            return open_meter(choice=self.meter_choice, sample_period_s=self.cfg.sample_period_s)
        from ssprop_energy.distributed.ddp import nvml_index, rank_meter_choice

        gpus = [nvml_index(d.local_rank)] if self.device.type == "cuda" else None
        return open_meter(choice=rank_meter_choice(self.meter_choice, d), sample_period_s=self.cfg.sample_period_s,
                          gpus=gpus)

    def _ranks_path(self, key: ArmRunKey) -> Path:
        return self.checkpoint_dir / f"{key.name}.ranks.json"

    def _save_rank_states(self, key: ArmRunKey, trainer: Trainer, comm_s: float) -> None:
        """Keep every rank's own accounting (its FLOPs, energy, phases, all-reduce time) beside rank 0's
        checkpoint: the checkpoint holds rank 0's, and a resumed rank must continue from its own."""
        state = trainer.state
        assert state is not None
        mine = {k: state[k] for k in _RANK_STATE if k != "epochs"}
        mine.update(epochs=[vars(e).copy() for e in state["epochs"]], next_epoch=state["next_epoch"], comm_s=comm_s)
        gathered = self.dist.gather(mine)
        if gathered is not None:
            write_json_atomic(self._ranks_path(key), gathered)

    def _restore_rank_state(self, key: ArmRunKey, trainer: Trainer) -> float:
        """After ``begin()``: replace the accounting loaded from rank 0's checkpoint by this rank's own;
        returns the all-reduce seconds so far.

        Raises:
            RecordError: the saved accounting does not match the checkpoint (a process was killed between
                writing the two): continuing would mix ranks' figures.
        """
        d = self.dist
        path = self._ranks_path(key)
        saved = d.broadcast(read_json(path) if d.is_main and path.exists() else None)
        state = trainer.state
        assert state is not None
        if state["next_epoch"] == 0:
            return 0.0
        if saved is None or len(saved) != d.world_size or saved[d.rank]["next_epoch"] != state["next_epoch"]:
            raise RecordError(f"{path}: the ranks' saved accounting does not match checkpoint epoch "
                              f"{state['next_epoch']}; this arm-run cannot resume exactly (delete its checkpoint "
                              "to run it again from the start)")
        mine = saved[d.rank]
        for k in _RANK_STATE:
            state[k] = mine[k]
        state["epochs"] = [EpochRecord(**e) for e in mine["epochs"]]
        return float(mine["comm_s"])

    def _checkpoint_for(self, key: ArmRunKey) -> tuple[Path | None, Path | None]:
        """The checkpoint this rank resumes from: rank 0's own file; on the other ranks a private copy of
        rank 0's bytes (sent over the process group, so no shared filesystem is needed), or None."""
        d = self.dist
        if not d.distributed:
            return self.checkpoint_path(key), None
        path = self.checkpoint_path(key)
        payload = d.broadcast(path.read_bytes() if d.is_main and path.exists() else None)
        if d.is_main:
            return path, None
        if payload is None:
            return None, None
        fd, name = tempfile.mkstemp(prefix=f"ssprop-{key.name}-r{d.rank}-", suffix=".pt")
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        return Path(name), Path(name)

    def rank_info(self) -> dict[str, Any]:
        """What the record says about this rank: where it ran and what it metered with."""
        d = self.dist
        choice = self.meter_choice
        if d.distributed:
            from ssprop_energy.distributed.ddp import rank_meter_choice

            choice = rank_meter_choice(choice, d)
        device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu")
        return {**d.describe(), "device": str(self.device), "device_name": device_name,
                "meter_sources": list(choice.sources), "meter_unavailable": dict(choice.unavailable)}

    def _label(self, components: list[EnergyComponent]) -> list[EnergyComponent]:
        if not self.dist.distributed:
            return components
        from ssprop_energy.distributed.merge import label_components

        return label_components(components, self.rank_info())

    def _merge(self, run: ArmRun, comm_wall_s: float) -> ArmRun | None:
        """Gather every rank's record of this arm-run to rank 0 and merge them there (None elsewhere)."""
        from ssprop_energy.distributed.merge import merge_runs

        info = {**self.rank_info(), "comm_wall_s": comm_wall_s, "train_wall_s": run.wall_s}
        gathered = self.dist.gather((run.to_dict(), info))
        if gathered is None:
            return None
        runs = [ArmRun.from_dict(r, f"rank {i}") for i, (r, _) in enumerate(gathered)]
        return merge_runs(runs, [i for _, i in gathered], self.dist.nodes)

    def gather_metered(self) -> None:
        """Bring every rank's metered components to rank 0 (a collective: every rank calls it)."""
        if not self.dist.distributed:
            return
        gathered = self.dist.gather([[c.__dict__ for c in group] for group in self.metered])
        if gathered is not None:
            self.metered = [[EnergyComponent(**c) for c in group] for rank in gathered for group in rank]

    def _generate(self, key: ArmRunKey, trainer: Trainer, prepared: dict[str, Any], meter: EnergyMeter
                  ) -> dict[str, Any]:
        """Sample (own meter window), score (own window) and write the grid of one generation arm-run.

        Returns the arm-run record's generation fields.
        """
        task: GenerationTask = prepared["task"]
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        scope = f"{key.name}/sample"
        token = self.monitor.begin() if self.monitor is not None else None
        started = time.perf_counter()
        with meter.window("sample", scope=scope):
            samples = task.sample(trainer.model, self.device)
            sync()
        sample_wall_s = time.perf_counter() - started
        # what else loaded the machine while this arm sampled (its time and energy are read beside it)
        interference = self.monitor.end(token).to_dict() if self.monitor is not None else None
        window = meter.scope_energy(scope)["sample"]
        specs = meter.component_info()
        components = [EnergyComponent(component=c, energy_j=e, source=specs[c].source, device=specs[c].device,
                                      below_resolution=c in window.short_components)
                      for c, e in sorted(window.components_j.items())]
        with meter.window("score", scope=f"{key.name}/score"):
            quality = task.score(samples)
        grid_file = SAMPLES_FILE.format(name=key.name)
        write_bytes_atomic(self.checkpoint_dir.parent / grid_file, task.grid(samples))
        log.info("%s: %d samples in %.1f s, %s %.4g (%s)", key.name, samples.shape[0], sample_wall_s,
                 quality.metric, quality.value, quality.extractor)
        return {
            "task": "generation", quality.metric: quality.value, "quality": quality.to_dict(),
            "sample_wall_s": sample_wall_s, "sample_energy_components": components,
            "sampling": {**task.sampling_info(), "grid_file": grid_file, "grid_columns": task.config.grid_columns,
                         "grid_scale": task.config.grid_scale,
                         "weights": "the best validation epoch's (lowest fixed-noise validation MSE)",
                         "interference": interference},
        }

    def _arm_run(self, key: ArmRunKey, trainer: Trainer, result: TrainResult, prepared: dict[str, Any],
                 trace: list[list[Any]]) -> ArmRun:
        schedule = prepared["schedule"]
        return ArmRun(
            arm=key.arm.name, seed=key.seed, repeat=key.repeat, test_accuracy=result.test_accuracy,
            test_loss=result.test_loss, best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
            wall_s=result.train_wall_s, eval_wall_s=result.eval_wall_s, flops_forward=result.flops_forward,
            flops_backward=result.flops_backward, flops_backward_conv=result.flops_backward_conv,
            average_drop_rate=(schedule.average_drop_rate(self.cfg.epochs, len(trainer.train_loader))
                               if schedule is not None else 0.0),
            energy_components=result.energy_components, epochs=result.epochs, phases=result.phases,
            noise_accuracy=result.noise_accuracy, interference=prepared["interference"], trace=trace,
            layers=prepared["layers"], layer_coverage=prepared["coverage"], **prepared.get("generated", {}),
            diverged_epoch=diverged_epoch(result.epochs, result.test_loss),
        )

    @staticmethod
    def _split_trace(report: EnergyReport, intervals: dict[tuple[str, str], list[tuple[float, float]]],
                     pending: Sequence[ArmRunKey], results: dict[str, TrainResult]) -> dict[str, list[list[Any]]]:
        """Give each arm-run the power samples taken inside its own top-level windows, labelled with the
        phase (``train dense``, ``train drop D``, ``eval``); a lone arm-run also keeps the rest as ``other``."""
        spans: list[tuple[float, float, str, str]] = []
        for key in pending:
            drops = {e.epoch: e.drop_rate for e in results[key.name].epochs}
            for (scope, name), ivs in intervals.items():
                run, _, part = scope.partition("/")
                if run != key.name or name not in ("train", "eval", "sample"):
                    continue
                label = "sample" if name == "sample" else "eval"
                if name == "train":
                    drop = drops.get(int(part[1:]), 0.0) if part.startswith("e") else 0.0
                    label = f"train drop {drop:.2g}" if drop > 0 else "train dense"
                spans += [(a, b, key.name, label) for a, b in ivs]
        spans.sort()
        starts = [s[0] for s in spans]
        out: dict[str, list[list[Any]]] = {key.name: [] for key in pending}
        lone = pending[0].name if len(pending) == 1 else None
        for s in report.trace:
            k = bisect.bisect_right(starts, s.t_s) - 1
            if k >= 0 and s.t_s <= spans[k][1]:
                out[spans[k][2]].append([s.t_s, s.component, s.power_w, s.source, spans[k][3]])
            elif lone is not None:
                out[lone].append([s.t_s, s.component, s.power_w, s.source, "other"])
        return out
