"""Training progress on stderr: a live bar per slice of batches, and one line per finished epoch."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ssprop_energy.train import Callback


class RichProgress(Callback):
    """Shows the arm-run's epoch on stderr (stdout stays clean for the results).

    With time-sliced arms, slices of different arm-runs alternate and rich allows one live display at a
    time: the live bar lives for one slice (transient, erased when the slice ends) and each finished epoch
    leaves one plain line behind (arm, epoch, drop rate, its loss, validation figure, energy so far). On a
    console that is not a terminal only the epoch lines are printed. The loss shown while an epoch runs is
    that epoch's running mean, read at slice edges only (a read per batch would sync a GPU every step).
    """

    def __init__(self, label: str, total_epochs: int, console: Console | None = None) -> None:
        self.label = label
        self.total_epochs = total_epochs
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None
        self.energy_j = 0.0
        self._epoch = 0
        self._drop = 0.0
        self._done = 0
        self._loss: float | None = None

    def _epoch_label(self) -> str:
        return f"{self.label} epoch {self._epoch + 1}/{self.total_epochs} drop {self._drop:.2f}"

    def on_epoch_start(self, trainer: Any, epoch: int, drop_rate: float) -> None:
        self._epoch, self._drop, self._done, self._loss = epoch, drop_rate, 0, None

    def on_slice_start(self, trainer: Any, epoch: int) -> None:
        if not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=self.console, transient=True,
        )
        self.progress.start()
        status = f"loss {self._loss:.3f}" if self._loss is not None else ""
        self.task = self.progress.add_task("train", total=len(trainer.train_loader), completed=self._done,
                                           status=status, label=escape(self._epoch_label()))

    def on_batch_end(self, trainer: Any, epoch: int, batch: int) -> None:
        self._done += 1
        if self.progress is not None:
            self.progress.advance(self.task)

    def on_slice_end(self, trainer: Any, epoch: int) -> None:
        self._loss = trainer.running_loss()
        self._stop()

    def on_epoch_end(self, trainer: Any, result: Any) -> None:
        self._stop()
        rec = result.record
        self.energy_j += rec.energy_j
        # a generation run has no accuracy (NaN): its validation figure is the loss (noise MSE)
        val = f"val loss {rec.val_loss:.4f}" if rec.val_accuracy != rec.val_accuracy else f"val acc {rec.val_accuracy:.1%}"
        self.console.print(
            f"{escape(self._epoch_label())}: {self._done} batches, {rec.wall_s:.1f} s of training, "
            f"loss {rec.train_loss:.3f}, {val}, energy so far {self.energy_j:,.0f} J", highlight=False, soft_wrap=True)

    def on_train_end(self, trainer: Any) -> None:
        self._stop()  # an interrupted epoch

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
