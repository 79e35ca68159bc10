"""Training callbacks: the trainer calls these hooks; progress bars and loggers implement them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ssprop_energy.train.loop import EpochResult, Trainer


class Callback:
    """Base class; every hook is optional."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int, drop_rate: float) -> None: ...

    def on_slice_start(self, trainer: Trainer, epoch: int) -> None:
        """A run of consecutive batches of ``epoch`` starts (the whole epoch unless arms are time-sliced)."""

    def on_slice_end(self, trainer: Trainer, epoch: int) -> None:
        """That run of batches ended; another arm-run may train before this one's next slice."""

    def on_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None: ...

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


class CallbackList(Callback):
    """Fans every hook out to a sequence of callbacks, in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer)

    def on_epoch_start(self, trainer: Trainer, epoch: int, drop_rate: float) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(trainer, epoch, drop_rate)

    def on_slice_start(self, trainer: Trainer, epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_slice_start(trainer, epoch)

    def on_slice_end(self, trainer: Trainer, epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_slice_end(trainer, epoch)

    def on_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None:
        for cb in self.callbacks:
            cb.on_batch_end(trainer, epoch, batch)

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(trainer, result)

    def on_train_end(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_train_end(trainer)
