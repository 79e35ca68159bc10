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
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ssprop_energy.data import BatchLoader, DatasetSplits
from ssprop_energy.distributed.context import SINGLE, DistContext
from ssprop_energy.distributed.sharding import local_batch_sizes
from ssprop_energy.energy import open_meter
from ssprop_energy.energy.interference import InterferenceReading
from ssprop_energy.energy.select import MeterChoice
from ssprop_energy.errors import ConfigError, RecordError
from ssprop_energy.experiment.config import ArmSpec, ExperimentConfig
from ssprop_energy.experiment.plan import ArmRunKey, Group, epoch_order
from ssprop_energy.flops import FlopMeter
from ssprop_energy.flops.integrate import RunFlops
from ssprop_energy.layer_coverage import LayerCoverage, layer_coverage
from ssprop_energy.models import get_model, resolve_layers
from ssprop_energy.records import (
    SAMPLES_FILE,
    ArmRun,
    EnergyComponent,
    EpochRecord,
    Measurement,
    SliceRecord,
    diverged_epoch,
    read_json,
    total_energy,
    write_bytes_atomic,
    write_json_atomic,
)
from ssprop_energy.sparse import set_drop_rate, sparsify
from ssprop_energy.sparse.schedules import DropSchedule
from ssprop_energy.train import Callback, TrainConfig, Trainer
from ssprop_energy.train.loop import RngState, TrainResult
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


@dataclass
class PreparedRun:
    """One arm-run of a group: built, FLOP-counted and warmed up before the meter starts, then trained.

    Attributes:
        key: the arm-run.
        model: its model (ssProp layers at drop 0 for an ssProp arm; the schedule sets the rate).
        schedule: its drop-rate schedule (None for a dense arm).
        train_cfg: its trainer settings.
        run_flops: counted FLOPs of every epoch.
        layers: per-layer FLOPs per sample at the arm's nominal drop rate (``layers.csv``).
        coverage: sparsified layers and their backward share (ssProp arms), else None.
        task: its generation task (None: classification).
        interference: one reading per finished epoch (kept beside the checkpoint for a resume).
        slices: one :class:`~ssprop_energy.records.SliceRecord` per finished slice, likewise.
        trainer: its trainer, once the group starts.
        ddp: its DDP gradient hook (distributed runs), else None.
        comm_s: all-reduce seconds so far (distributed runs).
        generated: the record's generation fields, after sampling.
    """

    key: ArmRunKey
    model: torch.nn.Module
    schedule: DropSchedule | None
    train_cfg: TrainConfig
    run_flops: RunFlops
    layers: list[dict[str, Any]]
    coverage: LayerCoverage | None
    task: GenerationTask | None
    interference: list[dict[str, Any]] = field(default_factory=list)
    slices: list[SliceRecord] = field(default_factory=list)
    trainer: Trainer | None = None
    ddp: Any = None
    comm_s: float = 0.0
    generated: dict[str, Any] = field(default_factory=dict)
    # this epoch's slice readings, combined into the epoch's interference reading at its end
    epoch_readings: list[InterferenceReading] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The arm's name."""
        return self.key.name

    @property
    def active(self) -> Trainer:
        """The arm-run's trainer (once the group has started)."""
        assert self.trainer is not None, "the group has not started"
        return self.trainer


# Warm-up to steady state: rounds of steps on copies of the models until every arm-run's round time is steady.
WARMUP_STABLE_ROUNDS = 3  # the last this many round times ...
WARMUP_TOLERANCE = 0.10  # ... within 10% of each other (max / min - 1)
WARMUP_MAX_ROUNDS = 25
WARMUP_MAX_S = 30.0
# A slice is long enough to hold many energy updates and to make its switch cost negligible (BENCHMARKS.md:
# the switch, RNG streams saved and restored plus the readings, costs well under 1% of a slice), and short
# enough that a load edge inside it touches one pair of slices, not a whole epoch of one arm.
SLICE_TARGET_S = 0.75
SLICE_MIN_UPDATES = 10
# foreign busy cores below this are background noise (daemons, the monitor's own reads), not a competitor
OVERSUBSCRIBED_MIN_CORES = 0.25


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up did: rounds run, whether step times were steady at its end, the steady full-batch
    step time (s, mean over the group's arm-runs and drop rates) and its wall time (s)."""

    rounds: int
    stable: bool
    step_s: float
    wall_s: float


def _steady(times: Sequence[float]) -> bool:
    return min(times) > 0 and max(times) / min(times) - 1.0 <= WARMUP_TOLERANCE


def meter_update_period_s(meter: EnergyMeter) -> float:
    """The slowest update period (s) among the meter's energy readings: the sampling period for a
    component read as power only, a source's declared counter update period for a counter, else 0."""
    periods = [0.0]
    if any(not spec.counter for spec in meter.component_info().values()):
        periods.append(meter.sample_period_s)
    periods += [p for p in meter.counter_update_s().values() if p is not None]
    return max(periods)


def _train_components(meter: Any, scope: str) -> dict[str, float]:
    """Energy (J per component) of the ``train`` windows closed so far in ``scope``."""
    window = meter.scope_energy(scope).get("train")
    return dict(window.components_j) if window is not None else {}


def _order(group: Group, turn: int, runs: Sequence[PreparedRun]) -> list[PreparedRun]:
    """``runs`` in the group's order, reversed every other turn and every other group (ABBA)."""
    keys = epoch_order(group, turn)
    rank = {key.name: i for i, key in enumerate(keys)}
    return sorted(runs, key=lambda run: rank[run.name])


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
        # how the last group was measured (warm-up, slice length): the same for every group of a run
        self.measurement: Measurement | None = None
        self._round = 0  # slices (or whole epochs) run so far: the ABBA order's counter
        self._t0 = 0.0  # perf_counter when the group's meter started: slices' start times count from it

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
        """The arm's drop-rate schedule; None for a dense arm."""
        if not arm.sparse:
            return None
        return self.cfg.drop_schedule(arm.schedule, arm.drop_rate)

    def _warm_up(self, runs: Sequence[PreparedRun]) -> WarmUp:
        """Train copies of the group's models (the models themselves are untouched) until their step times
        are steady, so that one-off costs (thread pools, allocator growth, kernel selection, a cold cache
        after install) fall on no measured batch, and on neither arm more than the other.

        Each round runs, for every arm-run in turn, one step at each drop rate its schedule uses, one step on
        the epoch's short last batch (when the split leaves one) and one evaluation batch; the warm-up stops
        when the last :data:`WARMUP_STABLE_ROUNDS` round times of every arm-run are within
        :data:`WARMUP_TOLERANCE` of each other, after at most :data:`WARMUP_MAX_ROUNDS` rounds or
        :data:`WARMUP_MAX_S` seconds. Returns the count and the steady full-batch step time (s), from which
        the slice length is chosen.
        """
        cfg = self.cfg
        twins = []
        for run in runs:
            twin = copy.deepcopy(run.model).to(self.device).train()
            optimizer = make_optimizer(cfg.optimizer, twin.parameters(), cfg.lr, cfg.weight_decay)
            twins.append((run, twin, optimizer))
        loader = BatchLoader(self.data.train, cfg.batch_size, shuffle=False, mean=self.data.mean,
                             std=self.data.std, device=self.device)
        x, y = next(iter(loader))
        tail = len(self.data.train) % cfg.batch_size
        shapes = [(x, y)] + ([(x[:tail], y[:tail])] if tail and tail < len(y) else [])
        n_batches = math.ceil(len(self.data.train) / cfg.batch_size)
        rates = {run.name: (sorted({run.schedule.rate(e, i) for e in range(cfg.epochs) for i in range(n_batches)})
                            if run.schedule is not None else [None]) for run in runs}
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        generator = torch.Generator().manual_seed(0)  # the task's own training draws are left untouched

        def step(run: PreparedRun, twin: torch.nn.Module, optimizer: Any, rate: float | None, xb: Any, yb: Any
                 ) -> None:
            if rate is not None:
                set_drop_rate(twin, rate)
            optimizer.zero_grad(set_to_none=True)
            if run.task is not None:
                run.task.batch_loss(twin, xb, yb, generator=generator)[0].backward()
            else:
                F.cross_entropy(twin(xb), yb).backward()
            optimizer.step()

        round_s: dict[str, list[float]] = {run.name: [] for run in runs}
        full_step_s: dict[str, list[float]] = {run.name: [] for run in runs}
        started = time.perf_counter()
        rounds = 0
        rng = RngState.capture(self.device)  # warm-up draws (dropout) must not move the run's streams
        while True:
            order = twins if rounds % 2 == 0 else twins[::-1]
            for run, twin, optimizer in order:
                t0 = time.perf_counter()
                full = 0.0
                for rate in rates[run.name]:
                    for i, (xb, yb) in enumerate(shapes):
                        t_step = time.perf_counter()
                        step(run, twin, optimizer, rate, xb, yb)
                        sync()
                        if i == 0:
                            full += time.perf_counter() - t_step
                twin.eval()
                with torch.no_grad():
                    if run.task is None:
                        twin(x)
                twin.train()
                sync()
                round_s[run.name].append(time.perf_counter() - t0)
                full_step_s[run.name].append(full / len(rates[run.name]))
            rounds += 1
            if rounds >= WARMUP_MAX_ROUNDS or time.perf_counter() - started > WARMUP_MAX_S:
                stable = False
                break
            if rounds >= WARMUP_STABLE_ROUNDS and all(_steady(t[-WARMUP_STABLE_ROUNDS:]) for t in round_s.values()):
                stable = True
                break
        rng.restore(self.device)
        step_s = statistics.mean(statistics.median(v[-WARMUP_STABLE_ROUNDS:]) for v in full_step_s.values())
        return WarmUp(rounds=rounds, stable=stable, step_s=step_s, wall_s=time.perf_counter() - started)

    def slice_batches(self, warm: WarmUp, meter: Any) -> int:
        """Batches per slice: about :data:`SLICE_TARGET_S` of training and at least
        :data:`SLICE_MIN_UPDATES` updates of the slowest energy reading (a counter's update period, or the
        sampling period of a power-only source), capped at one epoch. The same on every rank (rank 0's)."""
        n_batches = math.ceil(len(self.data.train) / self.cfg.batch_size)
        target_s = max(SLICE_TARGET_S, SLICE_MIN_UPDATES * meter_update_period_s(meter))
        batches = max(1, min(n_batches, math.ceil(target_s / max(warm.step_s, 1e-6))))
        if self.cfg.slice_batches is not None:  # the user's choice (--slice-batches) wins
            batches = min(n_batches, self.cfg.slice_batches)
        return int(self.dist.broadcast(batches)) if self.dist.distributed else batches

    def checkpoint_path(self, key: ArmRunKey) -> Path:
        """Where the arm-run's resume checkpoint is written."""
        return self.checkpoint_dir / f"{key.name}.pt"

    def _interference_path(self, key: ArmRunKey) -> Path:
        return self.checkpoint_dir / f"{key.name}.interference.json"

    def _slices_path(self, key: ArmRunKey) -> Path:
        return self.checkpoint_dir / f"{key.name}.slices.json"

    def _prepare(self, key: ArmRunKey) -> PreparedRun:
        """Build and FLOP-count one arm-run, before any meter starts (neither is charged to it)."""
        cfg = self.cfg
        model = self.build_model(key.arm, key.seed)
        schedule = self.schedule(key.arm)
        flop_meter = self._flop_meter(model)
        d = self.dist
        # a rank counts the FLOPs of its own parts of the batches; rank 0 sums them over ranks
        sizes = (local_batch_sizes(len(self.data.train), cfg.batch_size, d.world_size, d.rank)
                 if d.distributed else None)
        run_flops = flop_meter.for_schedule(schedule or _Dense(), cfg.epochs, len(self.data.train), cfg.batch_size,
                                            batch_sizes=sizes)
        layer_step = flop_meter.per_sample(key.arm.drop_rate if key.arm.sparse else 0.0)
        train_cfg = TrainConfig(
            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay, lr_schedule=cfg.lr_schedule, seed=key.seed, amp=cfg.amp,
            eval_noise=tuple(cfg.eval_noise),
        )
        run = PreparedRun(
            key=key, model=model, schedule=schedule, train_cfg=train_cfg, run_flops=run_flops,
            layers=[{"layer": layer.name, "type": layer.type, "flops_forward": layer.forward,
                     "flops_backward": layer.backward} for layer in layer_step.layers],
            coverage=self.coverage(model) if key.arm.sparse else None, task=self.make_task(key.seed),
        )
        if self.checkpoint_path(key).exists():  # a resume: the finished epochs' readings were kept beside it
            if self._interference_path(key).exists():
                run.interference = list(read_json(self._interference_path(key)))
            if self._slices_path(key).exists():
                run.slices = [SliceRecord.from_dict(s) for s in read_json(self._slices_path(key))]
        return run

    # ------------------------------------------------------------------------------------------ running

    def run_group(self, group: Group, pending: Sequence[ArmRunKey],
                  on_finished: Callable[[ArmRun], None]) -> None:
        """Train the group's ``pending`` arm-runs, interleaved as ``cfg.interleave`` says (slices of batches
        or whole epochs in ABBA order); ``on_finished`` receives each arm-run's record (on rank 0 only, in a
        distributed run) as soon as all of the group's epochs are done."""
        d = self.dist
        if d.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        runs = [self._prepare(key) for key in pending]
        warm = self._warm_up(runs)
        meter = self._open_meter()
        sliced = self.cfg.interleave == "slice"
        self.measurement = Measurement(
            interleave=self.cfg.interleave, warmup_rounds=warm.rounds, warmup_stable=warm.stable,
            warmup_wall_s=warm.wall_s, step_s=warm.step_s,
            slice_batches=self.slice_batches(warm, meter) if sliced else None,
            slice_target_s=SLICE_TARGET_S if sliced else None)
        report: EnergyReport | None = None
        meter.start()
        self._t0 = time.perf_counter()
        try:
            for run in runs:
                self._start_trainer(run, meter)
            for epoch in range(self.cfg.epochs):
                due = [run for run in runs if run.active.next_epoch <= epoch]  # a resumed run may be ahead
                if sliced:
                    self._epoch_in_slices(group, epoch, due, meter)
                else:
                    for run in _order(group, epoch, due):
                        self._epoch_whole(run, meter)
            results = {run.name: run.active.finish() for run in runs}
            if self.generation is not None:
                # after every arm's training, in the group's next ABBA order; finish() left the best epoch's weights
                for run in _order(group, self.cfg.epochs, runs):
                    run.generated = self._generate(run.key, run.active, run.task, meter)
        finally:
            if meter.running:
                report = meter.stop()
                self.metered.append(self._label(list(report.components)))
        assert report is not None
        traces = self._split_trace(report, meter.intervals(), pending, results)
        for run in runs:
            record = self._arm_run(run, results[run.name], traces[run.name])
            if d.distributed:
                merged = self._merge(record, run.comm_s)
                if merged is None:
                    continue  # not rank 0
                record = merged
            on_finished(record)
            key = run.key
            for path in (self.checkpoint_path(key), self._interference_path(key), self._slices_path(key),
                         self._ranks_path(key)):
                path.unlink(missing_ok=True)  # the record is saved; these served a resume

    def _start_trainer(self, run: PreparedRun, meter: EnergyMeter) -> None:
        """Build the arm-run's trainer (wrapped in DDP when distributed) and load its checkpoint."""
        d = self.dist
        key = run.key
        model = run.model
        if d.distributed:
            from ssprop_energy.distributed.ddp import wrap

            model, run.ddp = wrap(model.to(self.device), self.device, d)
        stop = (lambda: d.any(self.stop_requested())) if d.distributed else self.stop_requested
        checkpoint, local_copy = self._checkpoint_for(key)
        run.trainer = trainer = Trainer(
            model, self.data, run.train_cfg, self.device, schedule=run.schedule, meter=meter,
            epoch_flops=run.run_flops.epochs, callbacks=self.callbacks(key.arm, key.seed, key.repeat),
            checkpoint_path=checkpoint, stop_requested=stop, scope=key.name,
            reduce_sums=d.all_sum if d.distributed else None, shard=(d.rank, d.world_size), task=run.task,
        )
        if d.distributed:
            from ssprop_energy.distributed.ddp import ShardedTask

            loader = trainer.train_loader
            run.ddp.fraction = lambda loader=loader: loader.last_batch_samples
            if run.task is not None:  # generation: the diffusion draws and fixed noise split like the batch
                from ssprop_energy.generation.sharded import ShardedGenerationTask

                trainer.task = ShardedGenerationTask(run.task, d, run.ddp.fraction)
            else:
                trainer.task = ShardedTask(trainer.task, d)
        trainer.begin()
        if d.distributed:
            run.comm_s = self._restore_rank_state(key, trainer)
        if local_copy is not None:  # another rank's copy of rank 0's checkpoint: read once, never written
            trainer.checkpoint_path = None
            local_copy.unlink(missing_ok=True)
        elif not d.is_main:
            trainer.checkpoint_path = None
        done = trainer.next_epoch
        run.interference = [r for r in run.interference if int(r["epoch"]) < done]
        run.slices = [s for s in run.slices if s.epoch < done]

    def _epoch_whole(self, run: PreparedRun, meter: EnergyMeter) -> None:
        """One epoch of one arm-run in one go (``--interleave epoch`` / ``none``): one slice, one reading."""
        epoch = run.active.start_epoch()
        self._slice(run, meter, epoch, 0, None)
        self._round += 1
        self._end_epoch(run)

    def _epoch_in_slices(self, group: Group, epoch: int, due: Sequence[PreparedRun], meter: EnergyMeter) -> None:
        """Epoch ``epoch`` of every due arm-run in slices of ``slice_batches`` batches, the arms taking turns
        in ABBA order slice by slice; each arm-run validates at its own epoch end, in its own window."""
        for run in due:
            run.active.start_epoch()
        index = 0
        while any(run.active.in_epoch for run in due):
            for run in _order(group, self._round, due):
                if not run.active.in_epoch:
                    continue
                self._slice(run, meter, epoch, index, self.measurement.slice_batches)
                if run.active.epoch_exhausted:
                    self._end_epoch(run)
            self._round += 1
            index += 1

    def _slice(self, run: PreparedRun, meter: EnergyMeter, epoch: int, index: int, batches: int | None) -> None:
        """Train one slice and record its readings: wall and CPU time, energy (the ``train`` window's growth
        over the slice: counters read at its edges, a sampled trace integrated over it), foreign load."""
        scope = f"{run.name}/e{epoch}"
        before = _train_components(meter, scope)
        monitor = self.monitor
        token = monitor.begin() if monitor is not None else None
        t_start_s = time.perf_counter() - self._t0
        result = run.active.train_slice(batches)
        reading = monitor.end(token) if monitor is not None else None
        after = _train_components(meter, scope)
        specs = meter.component_info()
        components = [EnergyComponent(component=c, energy_j=max(0.0, e - before.get(c, 0.0)), source=specs[c].source,
                                      device=specs[c].device) for c, e in sorted(after.items())]
        energy_j, source = total_energy(components) if components else (math.nan, "")
        if reading is not None:
            run.epoch_readings.append(reading)
            self._check_oversubscription(reading)
        run.slices.append(SliceRecord.from_reading(
            seed=run.key.seed, repeat=run.key.repeat, epoch=epoch, index=index, order=self._round,
            first_batch=result.first_batch, batches=result.batches, samples=result.samples,
            drop_rate=result.drop_rate, t_start_s=t_start_s, wall_s=result.wall_s, energy_j=energy_j,
            energy_source=source, reading=reading))

    def _check_oversubscription(self, reading: InterferenceReading) -> None:
        """Warn once when foreign busy cores plus this run's torch threads exceed the CPUs: OpenMP threads
        then spin against the other work and a step can take 2-3 times as long (BENCHMARKS.md)."""
        m = self.measurement
        if m is None or m.oversubscribed is not None or self.device.type != "cpu" or not reading.cpu_count:
            return
        threads = torch.get_num_threads()
        foreign = reading.foreign_cpu_cores_mean
        if foreign < OVERSUBSCRIBED_MIN_CORES or foreign + threads <= reading.cpu_count + OVERSUBSCRIBED_MIN_CORES:
            return
        advice = max(1, reading.cpu_count - math.ceil(foreign - OVERSUBSCRIBED_MIN_CORES))
        text = (f"other work kept {foreign:.1f} of {reading.cpu_count} CPUs busy while this run used {threads} torch "
                f"threads: the threads oversubscribe the CPUs and steps slow down out of proportion; rerun with "
                f"--threads {advice}")
        log.warning("%s", text)
        self.measurement = replace(m, oversubscribed=text)

    def _end_epoch(self, run: PreparedRun) -> None:
        """Validate and checkpoint the arm-run's epoch; keep its readings beside the checkpoint."""
        trainer = run.active
        epoch = trainer.finish_epoch().epoch
        if run.ddp is not None:
            run.comm_s += run.ddp.take()
            self._save_rank_states(run.key, trainer, run.comm_s)
        if run.epoch_readings:
            reading = InterferenceReading.combine(run.epoch_readings)
            run.interference.append({"seed": run.key.seed, "repeat": run.key.repeat, "epoch": epoch,
                                     **reading.to_dict()})
        run.epoch_readings = []
        if self.dist.is_main:
            write_json_atomic(self._interference_path(run.key), run.interference)
            write_json_atomic(self._slices_path(run.key), [s.to_dict() for s in run.slices])

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

    def _generate(self, key: ArmRunKey, trainer: Trainer, task: GenerationTask | None, meter: EnergyMeter
                  ) -> dict[str, Any]:
        """Sample (own meter window), score (own window) and write the grid of one generation arm-run.

        In a distributed run every rank samples its shard of the fixed noise and receives all samples, rank 0
        scores them and writes the grid (``generation/sharded.py``); each rank meters its own windows.

        Returns the arm-run record's generation fields.
        """
        assert task is not None, "a generation arm-run has a generation task"
        d = self.dist
        if d.distributed:
            from ssprop_energy.generation.sharded import sample_sharded, score_on_main, sharding_info

            def sample() -> torch.Tensor:
                return sample_sharded(task, trainer.model, self.device, d)

            def score(samples: torch.Tensor) -> Any:
                return score_on_main(task, samples, d)

            sharding = sharding_info(d, task.config.n_samples)
        else:
            def sample() -> torch.Tensor:
                return task.sample(trainer.model, self.device)

            score, sharding = task.score, {}
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        scope = f"{key.name}/sample"
        token = self.monitor.begin() if self.monitor is not None else None
        started = time.perf_counter()
        with meter.window("sample", scope=scope):
            samples = sample()
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
            quality = score(samples)
        grid_file = SAMPLES_FILE.format(name=key.name)
        if d.is_main:  # the run directory is rank 0's
            write_bytes_atomic(self.checkpoint_dir.parent / grid_file, task.grid(samples))
        log.info("%s: %d samples in %.1f s, %s %.4g (%s)", key.name, samples.shape[0], sample_wall_s,
                 quality.metric, quality.value, quality.extractor)
        return {
            "task": "generation", quality.metric: quality.value, "quality": quality.to_dict(),
            "sample_wall_s": sample_wall_s, "sample_energy_components": components,
            "sampling": {**task.sampling_info(), **sharding, "grid_file": grid_file,
                         "grid_columns": task.config.grid_columns, "grid_scale": task.config.grid_scale,
                         "weights": "the best validation epoch's (lowest fixed-noise validation MSE)",
                         "interference": interference},
        }

    def _arm_run(self, run: PreparedRun, result: TrainResult, trace: list[list[Any]]) -> ArmRun:
        key, trainer, schedule = run.key, run.active, run.schedule
        return ArmRun(
            arm=key.arm.name, seed=key.seed, repeat=key.repeat, test_accuracy=result.test_accuracy,
            test_loss=result.test_loss, best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
            wall_s=result.train_wall_s, eval_wall_s=result.eval_wall_s, flops_forward=result.flops_forward,
            flops_backward=result.flops_backward, flops_backward_conv=result.flops_backward_conv,
            average_drop_rate=(schedule.average_drop_rate(self.cfg.epochs, len(trainer.train_loader))
                               if schedule is not None else 0.0),
            energy_components=result.energy_components, epochs=result.epochs, phases=result.phases,
            noise_accuracy=result.noise_accuracy, interference=run.interference, trace=trace,
            layers=run.layers, layer_coverage=run.coverage, slices=list(run.slices), **run.generated,
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
