"""A rich progress bar for training: arm, epoch, loss, accuracy, drop rate and energy so far."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ssprop_energy.train import Callback


class RichProgress(Callback):
    """Shows one bar per arm-run epoch on stderr (stdout stays clean for the results).

    The bar lives for one epoch only: with interleaved arms, epochs of different arms alternate and rich
    allows one live display at a time; each finished epoch leaves its line behind.
    """

    def __init__(self, label: str, total_epochs: int, console: Console | None = None) -> None:
        self.label = label
        self.total_epochs = total_epochs
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None
        self.energy_j = 0.0

    def on_epoch_start(self, trainer: Any, epoch: int, drop_rate: float) -> None:
        """Start the epoch's bar."""
        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=len(trainer.train_loader), completed=0, status="",
            label=f"{self.label} epoch {epoch + 1}/{self.total_epochs} drop {drop_rate:.2f}",
        )

    def on_batch_end(self, trainer: Any, epoch: int, batch: int) -> None:
        """Advance the bar by one batch."""
        if self.progress is not None:
            self.progress.advance(self.task)

    def on_epoch_end(self, trainer: Any, result: Any) -> None:
        """Show the epoch's loss, validation figure and energy (J, so far) on its bar, then stop the bar."""
        if self.progress is None:
            return
        rec = result.record
        self.energy_j += rec.energy_j
        # a generation run has no accuracy (NaN): its validation figure is the loss (noise MSE)
        nan_accuracy = rec.val_accuracy != rec.val_accuracy
        val = f"val loss {rec.val_loss:.4f}" if nan_accuracy else f"val acc {rec.val_accuracy:.1%}"
        self.progress.update(
            self.task,
            status=f"loss {rec.train_loss:.3f}  {val}  energy {self.energy_j:,.0f} J",
        )
        self.progress.stop()
        self.progress = None

    def on_train_end(self, trainer: Any) -> None:
        """Stop the bar of an epoch that did not end (an interrupted run)."""
        if self.progress is not None:  # an interrupted epoch
            self.progress.stop()
            self.progress = None
