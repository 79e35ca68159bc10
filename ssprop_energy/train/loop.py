"""The training loop of one arm: drop-rate stepping, energy windows, evaluation, checkpoints.

Determinism is what makes the dense-vs-sparse pairing, interleaving and resume exact: the data order depends
only on (seed, epoch) (``BatchLoader.set_epoch``) and the torch RNG (dropout, random channel selection) is
re-seeded from (seed, epoch) at the start of every epoch, so both arms, an interleaved run and a resumed run
all see the same randomness. Nothing else global is touched here.

Energy has one channel: the meter's windows. Each epoch opens ``train`` (with ``data``, ``forward``,
``backward`` and ``optimizer`` nested) and ``eval`` in the scope ``<scope>/e<epoch>``; the final test runs in
``<scope>/test``. An epoch's energy and the per-phase totals are what the meter returns for those windows.
The trainer can be driven one epoch at a time (:meth:`Trainer.begin`, :meth:`Trainer.run_epoch`,
:meth:`Trainer.finish`) or one slice of batches at a time (:meth:`Trainer.start_epoch`,
:meth:`Trainer.train_slice`, :meth:`Trainer.finish_epoch`), which is how the experiment interleaves arms:
between two slices of one arm-run another may train, and the global RNG streams are saved and restored at
every slice edge (:class:`RngState`) so that the result is bit for bit the one of the arm-run alone. An
epoch's ``train`` window is then opened once per slice; its energy and time are the sum.
:meth:`Trainer.fit` runs everything.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ssprop_energy.errors import RunInterrupted
from ssprop_energy.records import EnergyComponent, EpochRecord
from ssprop_energy.train.callbacks import Callback, CallbackList
from ssprop_energy.train.checkpoint import load_checkpoint, save_checkpoint
from ssprop_energy.train.optim import make_lr_schedule, make_optimizer
from ssprop_energy.train.tasks import ClassificationTask, Task

if TYPE_CHECKING:
    from ssprop_energy.data import DatasetSplits
    from ssprop_energy.energy.meter import EnergyMeter
    from ssprop_energy.flops.integrate import EpochFlops
    from ssprop_energy.sparse.schedules import DropSchedule

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one arm's training run."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    seed: int = 0
    amp: bool = False
    eval_noise: tuple[float, ...] = ()


@dataclass
class EpochResult:
    """One finished epoch: its record and its training energy per meter component (J)."""

    record: EpochRecord
    energy_by_component_j: dict[str, float]


@dataclass
class TrainResult:
    """What one arm's training produced. FLOPs and energy cover training windows only; evaluation energy is
    the ``eval`` entry of ``phases``."""

    epochs: list[EpochRecord]
    test_accuracy: float
    test_loss: float
    best_epoch: int
    best_val_accuracy: float
    noise_accuracy: dict[str, float]
    train_wall_s: float
    eval_wall_s: float
    flops_forward: float
    flops_backward: float
    flops_backward_conv: float
    energy_components: list[EnergyComponent]
    phases: dict[str, dict[str, float]]


@dataclass
class SliceResult:
    """What one :meth:`Trainer.train_slice` ran: its batches (from ``first_batch``), samples (this rank's),
    mean drop rate over its samples, wall time (s) of its ``train`` window, and whether the epoch is done."""

    epoch: int
    first_batch: int
    batches: int
    samples: int
    drop_rate: float
    wall_s: float
    exhausted: bool


@dataclass
class RngState:
    """Every global RNG stream a training step may draw from: torch CPU (and CUDA), numpy, Python ``random``.

    Saved and restored around each slice of a time-sliced run, so that an arm-run's draws (dropout, random
    channel selection) do not depend on which other arm ran in between.
    """

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


@dataclass
class _EpochProgress:
    """The epoch in progress: its batch iterator, accumulators and the RNG state its last batch left."""

    epoch: int
    batches: Any
    loss_sum: torch.Tensor
    metric_sum: torch.Tensor
    rng: RngState
    n: int = 0
    drop_sum: float = 0.0
    batch_idx: int = 0
    train_s: float = 0.0
    exhausted: bool = False
    slice_samples: int = 0
    slice_drop_sum: float = 0.0


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch RNG seed used for one epoch; a pure function so that arms and resumes agree."""
    return seed * 100_003 + epoch


class Trainer:
    """Trains one model on in-memory data, metering energy through windows.

    Args:
        model: the network (already sparsified for an ssProp arm).
        data: dataset splits (``ssprop_energy.data.DatasetSplits``).
        config: hyper-parameters.
        device: where to train.
        schedule: drop-rate schedule for ssProp arms; None for the dense arm.
        meter: an energy meter, already started (it may be shared with other arms: windows are scoped);
            None to skip energy.
        epoch_flops: the counted FLOPs of every epoch (``FlopMeter.for_schedule``); None to skip FLOPs.
        callbacks: progress bars and the like.
        checkpoint_path: where to save a checkpoint after every epoch (and resume from, if present).
        stop_requested: polled after each batch; when true, the run stops with :class:`RunInterrupted`.
        task: the loss and metrics (classification by default).
        scope: prefix of this run's meter windows (the arm-run's name), so several arms can share a meter.
        shard: ``(rank, world_size)``: serve this rank's part of every global batch of ``config.batch_size``.
        reduce_sums: in a distributed run, the sum over ranks of a float64 tensor (the epoch's training
            loss sum, metric sum and sample count), so every rank reports the whole batch's figures.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DatasetSplits,
        config: TrainConfig,
        device: torch.device,
        schedule: DropSchedule | None = None,
        meter: EnergyMeter | None = None,
        epoch_flops: Sequence[EpochFlops] | None = None,
        callbacks: Sequence[Callback] = (),
        checkpoint_path: Path | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
        task: Task | None = None,
        scope: str = "run",
        reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        from ssprop_energy.data import BatchLoader

        self.model = model.to(device)
        self.data = data
        self.config = config
        self.device = device
        self.schedule = schedule
        self.meter = meter
        self.epoch_flops = list(epoch_flops) if epoch_flops is not None else None
        self.callbacks = CallbackList(callbacks)
        self.checkpoint_path = checkpoint_path
        self.stop_requested = stop_requested
        self.task: Task = task or ClassificationTask(self._autocast)
        self.scope = scope
        self.reduce_sums = reduce_sums
        self.optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
        self.lr_schedule = make_lr_schedule(config.lr_schedule, self.optimizer, config.epochs)
        self.train_loader = BatchLoader(
            data.train, config.batch_size, shuffle=True, seed=config.seed, mean=data.mean, std=data.std, device=device,
            rank=shard[0], world_size=shard[1],
        )
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.drop_rate = 0.0
        self.state: dict[str, Any] | None = None
        self._window_scope = scope
        self._epoch: _EpochProgress | None = None
        self._batches_per_epoch = len(self.train_loader)

    # ------------------------------------------------------------------------------------------ helpers

    def _window(self, name: str) -> Any:
        if self.meter is None:
            return contextlib.nullcontext()
        return self.meter.window(name, scope=self._window_scope)

    def _set_drop_rate(self, epoch: int, iteration: int) -> float:
        if self.schedule is not None:
            self.drop_rate = float(self.schedule.step(self.model, epoch, iteration))
        return self.drop_rate

    def _autocast(self) -> Any:
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _as_accuracy(self, metric: float) -> float:
        """The task's metric for an ``*_accuracy`` field: itself for classification, NaN for a task whose
        metric is not an accuracy (generation: the noise MSE, already the loss) - never mislabelled."""
        return metric if self.task.metric == "accuracy" else math.nan

    def evaluate(self, split: Any, noise_std: float = 0.0) -> tuple[float, float]:
        """Mean loss and headline metric of the model on a split (see the task)."""
        return self.task.evaluate(self.model, split, self.data, self.config.batch_size, self.device, noise_std)

    def _collect_energy(self, scope: str) -> dict[str, float]:
        """Add the windows of ``scope`` to the run's phase totals; returns the ``train`` J per component."""
        if self.meter is None:
            return {}
        assert self.state is not None
        info = self.meter.component_info()
        phases = self.state["phases"]
        train: dict[str, float] = {}
        for name, w in self.meter.scope_energy(scope).items():
            p = phases.setdefault(name, {"energy_j": 0.0, "wall_s": 0.0, "count": 0})
            p["energy_j"] += w.energy_j
            p["wall_s"] += w.wall_s
            p["count"] += w.count
            if name == "train":
                train = dict(w.components_j)
        for comp, energy_j in train.items():
            self.state["energy_by_component_j"][comp] = self.state["energy_by_component_j"].get(comp, 0.0) + energy_j
            self.state["component_info"][comp] = [info[comp].source, info[comp].device]
        return train

    # ------------------------------------------------------------------------------------------ main loop

    def _start_epoch(self, epoch: int) -> None:
        """Reseed, position the loader at the epoch's start and open the epoch's accumulators."""
        self.model.train()
        torch.manual_seed(epoch_seed(self.config.seed, epoch))
        self.train_loader.set_epoch(epoch)
        set_epoch = getattr(self.task, "set_epoch", None)
        if set_epoch is not None:  # a task with its own draws (diffusion timesteps, noise) reseeds them per epoch
            set_epoch(epoch)
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        self._epoch = _EpochProgress(epoch=epoch, batches=iter(self.train_loader), loss_sum=zero.clone(),
                                     metric_sum=zero.clone(), rng=RngState.capture(self.device))

    def _train_batches(self, limit: int | None) -> int:
        """Run up to ``limit`` batches (None: to the epoch's end) of the epoch in progress; returns how many ran.

        The RNG streams this arm-run left at its last batch are restored first and saved after, so that the
        batches of another arm-run in between (time-sliced interleaving) change nothing here.
        """
        ep = self._epoch
        assert ep is not None, "no epoch in progress"
        model, opt = self.model, self.optimizer
        ep.rng.restore(self.device)
        ran = 0
        try:
            while (limit is None or ran < limit) and not ep.exhausted:
                with self._window("data"):
                    batch = next(ep.batches, None)
                if batch is None:
                    ep.exhausted = True
                    break
                x, y = batch
                drop = self._set_drop_rate(ep.epoch, ep.batch_idx)
                ep.drop_sum += drop * len(y)
                with self._window("forward"):
                    loss, metric = self.task.batch_loss(model, x, y)
                    self.sync()
                with self._window("backward"):
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    self.sync()
                with self._window("optimizer"):
                    opt.step()
                    self.sync()
                # accumulate on device: a .item() per step would force a GPU sync every step
                ep.loss_sum += loss.detach().double() * len(y)
                ep.metric_sum += metric.double()
                ep.n += len(y)
                ep.slice_samples += len(y)
                ep.slice_drop_sum += drop * len(y)
                self.callbacks.on_batch_end(self, ep.epoch, ep.batch_idx)
                ep.batch_idx += 1
                ran += 1
                if ep.batch_idx >= self._batches_per_epoch:
                    ep.exhausted = True  # known now: the next slice must not be an empty one
                if self.stop_requested():
                    raise RunInterrupted(f"stopped during epoch {ep.epoch + 1}")
                if ep.exhausted:
                    break
        finally:
            ep.rng = RngState.capture(self.device)
        return ran

    def _epoch_means(self) -> tuple[float, float, float]:
        """The epoch's (mean loss, metric, mean drop rate over samples), summed over ranks when distributed."""
        ep = self._epoch
        assert ep is not None
        loss_sum, metric_sum, n, drop_sum = ep.loss_sum, ep.metric_sum, ep.n, ep.drop_sum
        if self.reduce_sums is not None:
            sums = self.reduce_sums(torch.stack([loss_sum, metric_sum, loss_sum.new_tensor(float(n)),
                                                 loss_sum.new_tensor(drop_sum)]))
            loss_sum, metric_sum, n, drop_sum = sums[0], sums[1], int(round(float(sums[2]))), float(sums[3])
        return float(loss_sum) / max(n, 1), float(metric_sum) / max(n, 1), drop_sum / max(n, 1)

    def running_loss(self) -> float | None:
        """Mean training loss of the epoch in progress so far (this rank's batches), or None before its first
        batch. Reads a device value: call it rarely (a slice end), not every batch."""
        ep = self._epoch
        if ep is None or ep.n == 0:
            return None
        return float(ep.loss_sum) / ep.n

    @property
    def next_epoch(self) -> int:
        assert self.state is not None, "call begin() first"
        return int(self.state["next_epoch"])

    @property
    def done(self) -> bool:
        return self.next_epoch >= self.config.epochs

    def begin(self) -> None:
        """Load the checkpoint if there is one and tell the callbacks that training starts."""
        self.state = self._resume_state()
        self.callbacks.on_train_start(self)

    @property
    def in_epoch(self) -> bool:
        """True between :meth:`start_epoch` and :meth:`finish_epoch`."""
        return self._epoch is not None

    @property
    def epoch_exhausted(self) -> bool:
        """True once the epoch in progress has served its last batch (:meth:`finish_epoch` is next)."""
        return self._epoch is not None and self._epoch.exhausted

    def start_epoch(self) -> int:
        """Begin the next epoch (no batch runs yet); returns its index."""
        assert self.state is not None, "call begin() first"
        assert self._epoch is None, "an epoch is already in progress"
        epoch = int(self.state["next_epoch"])
        self._window_scope = f"{self.scope}/e{epoch}"
        drop = self._set_drop_rate(epoch, 0)
        self.callbacks.on_epoch_start(self, epoch, drop)
        self._start_epoch(epoch)
        return epoch

    def train_slice(self, max_batches: int | None = None) -> SliceResult:
        """Train up to ``max_batches`` batches of the epoch in progress inside one ``train`` window.

        The epoch's ``train`` energy and time are the sum of its slices' windows. Returns what the slice
        ran; its ``exhausted`` is true when the epoch has no batch left.
        """
        ep = self._epoch
        assert ep is not None, "call start_epoch() first"
        first = ep.batch_idx
        ep.slice_samples = 0
        ep.slice_drop_sum = 0.0
        self.callbacks.on_slice_start(self, ep.epoch)
        t0 = time.perf_counter()
        with self._window("train"):
            ran = self._train_batches(max_batches)
            self.sync()
        wall_s = time.perf_counter() - t0
        ep.train_s += wall_s
        self.callbacks.on_slice_end(self, ep.epoch)
        return SliceResult(epoch=ep.epoch, first_batch=first, batches=ran, samples=ep.slice_samples,
                           drop_rate=ep.slice_drop_sum / max(ep.slice_samples, 1), wall_s=wall_s,
                           exhausted=ep.exhausted)

    def finish_epoch(self) -> EpochRecord:
        """Validate, checkpoint and record the epoch in progress (every batch must have run)."""
        ep = self._epoch
        assert ep is not None and ep.exhausted, "the epoch still has batches to train"
        state = self.state
        assert state is not None
        epoch = ep.epoch
        ep.rng.restore(self.device)  # evaluation sees the RNG this arm-run's last batch left, as run alone
        loss, acc, mean_drop = self._epoch_means()
        train_s = ep.train_s
        self._epoch = None
        t1 = time.perf_counter()
        with self._window("eval"):
            val_loss, val_acc = self.evaluate(self.data.val)
        state["eval_wall_s"] += time.perf_counter() - t1
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        energy = self._collect_energy(self._window_scope)
        flops = self.epoch_flops[epoch] if self.epoch_flops is not None else None
        record = EpochRecord(
            epoch=epoch, drop_rate=mean_drop, train_loss=loss, train_accuracy=self._as_accuracy(acc),
            val_loss=val_loss, val_accuracy=self._as_accuracy(val_acc),
            flops_forward=flops.flops_forward if flops else 0.0,
            flops_backward=flops.flops_backward if flops else 0.0, energy_j=float(sum(energy.values())),
            wall_s=train_s, lr=float(self.optimizer.param_groups[0]["lr"]),
        )
        state["epochs"].append(record)
        state["flops_backward_conv"] += flops.flops_backward_conv if flops else 0.0
        better = val_acc > state["best_val_accuracy"] if self.task.higher_is_better else val_acc < state["best_val_accuracy"]
        if state["best_epoch"] < 0 or better:
            state["best_val_accuracy"], state["best_epoch"] = val_acc, epoch
            state["best_state"] = copy.deepcopy(self.model.state_dict())
        state["next_epoch"] = epoch + 1
        if self.checkpoint_path is not None:
            self._save(state)
        self.callbacks.on_epoch_end(self, EpochResult(record, energy))
        return record

    def run_epoch(self) -> EpochRecord:
        """Train the next epoch in one ``train`` window, validate, checkpoint; returns its record."""
        self.start_epoch()
        self.train_slice(None)
        return self.finish_epoch()

    def fit(self) -> TrainResult:
        """Train for ``config.epochs`` epochs (resuming from the checkpoint if one exists) and test."""
        self.begin()
        while not self.done:
            self.run_epoch()
        return self.finish()

    def finish(self) -> TrainResult:
        """Test the weights of the best validation epoch (as in the paper's code) and return the result."""
        assert self.state is not None, "call begin() first"
        state = self.state
        if state["best_state"] is not None:
            self.model.load_state_dict(state["best_state"])
        self._window_scope = f"{self.scope}/test"
        t0 = time.perf_counter()
        with self._window("eval"):
            test_loss, test_acc = self.evaluate(self.data.test)
            noise_acc = {f"{s:g}": self.evaluate(self.data.test, s)[1] for s in self.config.eval_noise}
        state["eval_wall_s"] += time.perf_counter() - t0
        self._collect_energy(self._window_scope)
        self.callbacks.on_train_end(self)
        epochs = state["epochs"]
        components = [
            EnergyComponent(component=comp, energy_j=energy_j, source=state["component_info"][comp][0],
                            device=state["component_info"][comp][1])
            for comp, energy_j in sorted(state["energy_by_component_j"].items())
        ]
        return TrainResult(
            epochs=epochs,
            test_accuracy=self._as_accuracy(test_acc),
            test_loss=test_loss,
            best_epoch=state["best_epoch"],
            best_val_accuracy=self._as_accuracy(state["best_val_accuracy"]),
            noise_accuracy=noise_acc,
            train_wall_s=sum(e.wall_s for e in epochs),
            eval_wall_s=state["eval_wall_s"],
            flops_forward=sum(e.flops_forward for e in epochs),
            flops_backward=sum(e.flops_backward for e in epochs),
            flops_backward_conv=state["flops_backward_conv"],
            energy_components=components,
            phases={k: dict(v) for k, v in state["phases"].items()},
        )

    # ------------------------------------------------------------------------------------------ checkpoints

    def _resume_state(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {
            "next_epoch": 0, "epochs": [], "best_val_accuracy": -1.0, "best_epoch": -1, "best_state": None,
            "energy_by_component_j": {}, "component_info": {}, "phases": {}, "eval_wall_s": 0.0,
            "flops_backward_conv": 0.0,
        }
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return fresh
        ckpt = load_checkpoint(self.checkpoint_path, self.device)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.lr_schedule is not None and ckpt.get("lr_schedule") is not None:
            self.lr_schedule.load_state_dict(ckpt["lr_schedule"])
        state = ckpt["state"]
        state["epochs"] = [EpochRecord(**e) for e in state["epochs"]]
        log.info("resumed %s at epoch %d", self.checkpoint_path, state["next_epoch"] + 1)
        return state

    def _save(self, state: dict[str, Any]) -> None:
        plain = dict(state)
        plain["epochs"] = [vars(e).copy() for e in state["epochs"]]
        save_checkpoint(
            self.checkpoint_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict() if self.lr_schedule is not None else None,
                "state": plain,
            },
        )
