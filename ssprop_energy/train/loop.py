"""The training loop of one arm: drop-rate stepping, FLOP and energy metering, evaluation, checkpoints.

Determinism is what makes the dense-vs-sparse pairing and resume exact: the data order depends only on
(seed, epoch) (``BatchLoader.set_epoch``) and the torch RNG (dropout, random channel selection) is re-seeded
from (seed, epoch) at the start of every epoch, so both arms, and a resumed run, see the same randomness.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssprop_energy.errors import RunInterrupted
from ssprop_energy.records import EpochRecord
from ssprop_energy.train.callbacks import Callback, CallbackList
from ssprop_energy.train.checkpoint import load_checkpoint, save_checkpoint
from ssprop_energy.train.optim import make_lr_schedule, make_optimizer

if TYPE_CHECKING:
    from ssprop_energy.data import DatasetSplits, TensorSplit
    from ssprop_energy.energy.meter import EnergyMeter
    from ssprop_energy.flops import FlopMeter
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
    """What one arm's training produced. FLOPs and energy cover training steps only; evaluation is separate."""

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
    train_energy_by_component_j: dict[str, float]
    eval_energy_j: float


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch RNG seed used for one epoch; a pure function so that arms and resumes agree."""
    return seed * 100_003 + epoch


class Trainer:
    """Trains one model on in-memory data, metering FLOPs and energy.

    Args:
        model: the network (already sparsified for an ssProp arm).
        data: dataset splits (``ssprop_energy.data.DatasetSplits``).
        config: hyper-parameters.
        device: where to train.
        schedule: drop-rate schedule for ssProp arms; None for the dense arm.
        meter: an energy meter, already started; None to skip energy.
        flop_meter: a FLOP meter for this model; None to skip FLOP counting.
        callbacks: progress bars and the like.
        checkpoint_path: where to save a checkpoint after every epoch (and resume from, if present).
        stop_requested: polled after each batch; when true, the run stops with :class:`RunInterrupted`.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DatasetSplits,
        config: TrainConfig,
        device: torch.device,
        schedule: DropSchedule | None = None,
        meter: EnergyMeter | None = None,
        flop_meter: FlopMeter | None = None,
        callbacks: Sequence[Callback] = (),
        checkpoint_path: Path | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        from ssprop_energy.data import BatchLoader

        self.model = model.to(device)
        self.data = data
        self.config = config
        self.device = device
        self.schedule = schedule
        self.meter = meter
        self.flop_meter = flop_meter
        self.callbacks = CallbackList(callbacks)
        self.checkpoint_path = checkpoint_path
        self.stop_requested = stop_requested
        self.optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
        self.lr_schedule = make_lr_schedule(config.lr_schedule, self.optimizer, config.epochs)
        self.train_loader = BatchLoader(
            data.train, config.batch_size, shuffle=True, seed=config.seed, mean=data.mean, std=data.std, device=device
        )
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.drop_rate = 0.0
        # (start, end, label) on the time.perf_counter clock, the energy meter's clock: shades the power trace
        self.phase_log: list[tuple[float, float, str]] = []

    # ------------------------------------------------------------------------------------------ helpers

    def _window(self, name: str) -> Any:
        if self.meter is None:
            return contextlib.nullcontext()
        return self.meter.window(name)

    def _snapshot(self) -> dict[str, float]:
        self.sync()
        return dict(self.meter.snapshot()) if self.meter is not None else {}

    def _set_drop_rate(self, epoch: int, iteration: int) -> float:
        if self.schedule is not None:
            self.drop_rate = float(self.schedule.step(self.model, epoch, iteration))
        return self.drop_rate

    def _autocast(self) -> Any:
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, split: TensorSplit, noise_std: float = 0.0) -> tuple[float, float]:
        """Mean cross-entropy and accuracy (fraction) on a split; optional Gaussian input noise.

        The noise is added to pixel values on the [0, 1] scale before normalisation, with a fixed generator,
        so every arm is evaluated on the same noisy inputs.
        """
        from ssprop_energy.data import BatchLoader

        self.model.eval()
        loader = BatchLoader(
            split, max(self.config.batch_size, 256), shuffle=False, seed=0, mean=self.data.mean,
            std=self.data.std, device=self.device,
        )
        gen = torch.Generator(device="cpu").manual_seed(1234)
        std = torch.as_tensor(self.data.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        for x, y in loader:
            if noise_std > 0:
                # x is normalised: (p - mean) / std, so pixel noise of sigma becomes sigma / std.
                noise = torch.randn(x.shape, generator=gen).to(self.device)
                x = x + noise * (noise_std / std)
            with self._autocast():
                out = self.model(x)
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            n += len(y)
        self.model.train()
        return float(loss_sum) / max(n, 1), float(correct) / max(n, 1)

    # ------------------------------------------------------------------------------------------ main loop

    def _train_epoch(self, epoch: int) -> tuple[float, float, float, float, float, float]:
        """One pass over the training data.

        Returns:
            (mean loss, accuracy, forward FLOPs, backward FLOPs, conv-backward FLOPs, mean drop rate), the
            drop rate averaged over samples (it varies per batch under an iteration schedule).
        """
        model, opt = self.model, self.optimizer
        model.train()
        torch.manual_seed(epoch_seed(self.config.seed, epoch))
        self.train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        flops_fwd = flops_bwd = flops_bwd_conv = drop_sum = 0.0
        batches = iter(self.train_loader)
        batch_idx = 0
        while True:
            with self._window("data"):
                batch = next(batches, None)
            if batch is None:
                break
            x, y = batch
            drop = self._set_drop_rate(epoch, batch_idx)
            drop_sum += drop * len(y)
            if self.flop_meter is not None:
                step = self.flop_meter.per_sample(drop)
                flops_fwd += step.forward * len(y)
                flops_bwd += step.backward * len(y)
                flops_bwd_conv += step.backward_conv * len(y)
            with self._window("forward"):
                with self._autocast():
                    out = model(x)
                    loss = F.cross_entropy(out.float(), y)
                self.sync()
            with self._window("backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                self.sync()
            with self._window("optimizer"):
                opt.step()
                self.sync()
            # accumulate on device: a .item() per step would force a GPU sync every step
            loss_sum += loss.detach().double() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            n += len(y)
            self.callbacks.on_batch_end(self, epoch, batch_idx)
            batch_idx += 1
            if self.stop_requested():
                raise RunInterrupted(f"stopped during epoch {epoch + 1}")
        mean_drop = drop_sum / max(n, 1)
        return float(loss_sum) / max(n, 1), float(correct) / max(n, 1), flops_fwd, flops_bwd, flops_bwd_conv, mean_drop

    def fit(self) -> TrainResult:
        """Train for ``config.epochs`` epochs (resuming from the checkpoint if one exists) and test.

        The test accuracy is that of the weights at the best validation epoch, as in the paper's code.
        """
        state = self._resume_state()
        self.callbacks.on_train_start(self)
        for epoch in range(state["next_epoch"], self.config.epochs):
            drop = self._set_drop_rate(epoch, 0)
            self.callbacks.on_epoch_start(self, epoch, drop)
            e0 = self._snapshot()
            t0 = time.perf_counter()
            loss, acc, f_fwd, f_bwd, f_bwd_conv, mean_drop = self._train_epoch(epoch)
            self.sync()
            t1 = time.perf_counter()
            train_s = t1 - t0
            self.phase_log.append((t0, t1, f"train drop {mean_drop:.2g}" if mean_drop > 0 else "train dense"))
            e1 = self._snapshot()
            with self._window("eval"):
                val_loss, val_acc = self.evaluate(self.data.val)
            t2 = time.perf_counter()
            state["eval_wall_s"] += t2 - t1
            self.phase_log.append((t1, t2, "eval"))
            e2 = self._snapshot()
            if self.lr_schedule is not None:
                self.lr_schedule.step()
            energy = {k: max(0.0, e1.get(k, 0.0) - e0.get(k, 0.0)) for k in e1}
            for k, v in energy.items():
                state["energy_by_component_j"][k] = state["energy_by_component_j"].get(k, 0.0) + v
            state["eval_energy_j"] += sum(max(0.0, e2.get(k, 0.0) - e1.get(k, 0.0)) for k in e2)
            record = EpochRecord(
                epoch=epoch, drop_rate=mean_drop, train_loss=loss, train_accuracy=acc, val_loss=val_loss,
                val_accuracy=val_acc, flops_forward=f_fwd, flops_backward=f_bwd, energy_j=sum(energy.values()),
                wall_s=train_s, lr=float(self.optimizer.param_groups[0]["lr"]),
            )
            state["epochs"].append(record)
            state["flops_backward_conv"] += f_bwd_conv
            if val_acc > state["best_val_accuracy"]:
                state["best_val_accuracy"], state["best_epoch"] = val_acc, epoch
                state["best_state"] = copy.deepcopy(self.model.state_dict())
            state["next_epoch"] = epoch + 1
            if self.checkpoint_path is not None:
                self._save(state)
            self.callbacks.on_epoch_end(self, EpochResult(record, energy))
        return self._finish(state)

    def _finish(self, state: dict[str, Any]) -> TrainResult:
        if state["best_state"] is not None:
            self.model.load_state_dict(state["best_state"])
        e0 = self._snapshot()
        t0 = time.perf_counter()
        with self._window("eval"):
            test_loss, test_acc = self.evaluate(self.data.test)
            noise_acc = {f"{s:g}": self.evaluate(self.data.test, s)[1] for s in self.config.eval_noise}
        t1 = time.perf_counter()
        state["eval_wall_s"] += t1 - t0
        self.phase_log.append((t0, t1, "eval"))
        e1 = self._snapshot()
        state["eval_energy_j"] += sum(max(0.0, e1.get(k, 0.0) - e0.get(k, 0.0)) for k in e1)
        self.callbacks.on_train_end(self)
        epochs = state["epochs"]
        return TrainResult(
            epochs=epochs,
            test_accuracy=test_acc,
            test_loss=test_loss,
            best_epoch=state["best_epoch"],
            best_val_accuracy=state["best_val_accuracy"],
            noise_accuracy=noise_acc,
            train_wall_s=sum(e.wall_s for e in epochs),
            eval_wall_s=state["eval_wall_s"],
            flops_forward=sum(e.flops_forward for e in epochs),
            flops_backward=sum(e.flops_backward for e in epochs),
            flops_backward_conv=state["flops_backward_conv"],
            train_energy_by_component_j=state["energy_by_component_j"],
            eval_energy_j=state["eval_energy_j"],
        )

    # ------------------------------------------------------------------------------------------ checkpoints

    def _resume_state(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {
            "next_epoch": 0, "epochs": [], "best_val_accuracy": -1.0, "best_epoch": -1, "best_state": None,
            "energy_by_component_j": {}, "eval_energy_j": 0.0, "eval_wall_s": 0.0, "flops_backward_conv": 0.0,
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

