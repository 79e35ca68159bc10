"""Drop-rate schedules: which drop rate the ssProp layers use at each epoch / iteration.

The paper's code (``DropSchedular``) speaks in *keep* fractions ``p``; this API speaks in *drop* rates:
``drop_rate = 1 - p``. The schedule's ``drop_rate`` is the strongest sparsity it applies (the paper's
minimum keep fraction), and every mode moves between 0 (dense, the paper's keep 1) and ``drop_rate``.
The paper's headline "0.4" setting (keep 0.2, constant, interleaved by epoch) is
``DropSchedule.from_name("bar", drop_rate=0.8, total_epochs=E)``; its average drop rate is 0.4.

Priority, as in the paper's code: warm-up first, then the mode. With ``D = drop_rate``,
``W = warmup_epochs``, ``n = total_epochs - W`` and ``j = epoch - W`` (0-based epoch after warm-up):

- warm-up: epochs ``epoch < W`` are dense (0) for every mode.
- ``by="epoch"`` (the iteration index is ignored):
    - ``constant``: ``D``;
    - ``linear``:   ``D * j / (n - 1)`` — 0 on the first epoch after warm-up, ``D`` on the last
      (``D`` throughout if ``n == 1``; epochs past the run stay at ``D``);
    - ``cosine``:   ``D * (1 - cos(pi * j / (n - 1))) / 2`` — a half cosine from 0 up to ``D``;
    - ``bar``:      the paper's interleave: ``0`` on even epochs, ``D`` on odd ones (dense, sparse, dense,
      ...; counted on the absolute epoch number, so epoch 0 is dense as in the paper).
- ``by="iteration"`` with period ``T`` and ``phase = iteration % T`` (``iteration`` = batch index within
  the epoch):
    - ``constant``: ``D``;
    - ``linear``:   a sawtooth ``D * phase / (T - 1)`` (0 at the start of each period, ``D`` at its end);
    - ``cosine``:   a wave ``D * (1 - cos(2 * pi * phase / T)) / 2`` (0 at the start of each period, ``D``
      at mid-period, continuous across periods);
    - ``bar``:      a square wave: dense while ``2 * phase < T`` (the first half of each period, the larger
      half when ``T`` is odd), ``D`` after.

:meth:`DropSchedule.average_drop_rate` is the mean of :meth:`DropSchedule.rate` over the exact grid of
(epoch, iteration) a run visits, every iteration weighted equally, so it equals what :meth:`step` applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ssprop_energy.errors import ConfigError
from ssprop_energy.sparse.convert import set_drop_rate
from ssprop_energy.sparse.functional import validate_drop_rate

__all__ = ["SCHEDULES", "BY", "DropSchedule"]

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine", "bar")
BY: tuple[str, ...] = ("epoch", "iteration")


def _int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class DropSchedule:
    """A drop-rate schedule (see the module docstring for the exact formulas).

    Attributes:
        mode: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"bar"``.
        drop_rate: the strongest drop rate applied, in [0, 1) (paper: ``1 - minimum keep``).
        total_epochs: the run length in epochs (linear/cosine by epoch reach ``drop_rate`` on the last).
        warmup_epochs: leading dense epochs.
        by: ``"epoch"`` or ``"iteration"``.
        period: ``T``, the period in iterations for ``by="iteration"`` (>= 2).
    """

    mode: str
    drop_rate: float
    total_epochs: int
    warmup_epochs: int = 0
    by: str = "epoch"
    period: int = 10

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.mode!r}; allowed: {', '.join(SCHEDULES)}")
        object.__setattr__(self, "drop_rate", validate_drop_rate(self.drop_rate))
        _int_at_least("total_epochs", self.total_epochs, 1)
        _int_at_least("warmup_epochs", self.warmup_epochs, 0)
        if self.warmup_epochs >= self.total_epochs and self.drop_rate > 0:
            raise ConfigError(
                f"warmup_epochs ({self.warmup_epochs}) must be below total_epochs ({self.total_epochs}), "
                "or no epoch would be sparse"
            )
        if self.by not in BY:
            raise ConfigError(f"unknown schedule unit by={self.by!r}; allowed: {', '.join(BY)}")
        _int_at_least("period", self.period, 2)

    @classmethod
    def from_name(
        cls,
        name: str,
        drop_rate: float,
        total_epochs: int,
        warmup_epochs: int = 0,
        by: str = "epoch",
        period: int = 10,
    ) -> DropSchedule:
        """Build a schedule by name. Raises :class:`ConfigError` naming the allowed values."""
        return cls(name, drop_rate, total_epochs, warmup_epochs, by, period)

    @classmethod
    def from_keep(
        cls,
        name: str,
        keep: float,
        total_epochs: int,
        warmup_epochs: int = 0,
        by: str = "epoch",
        period: int = 10,
    ) -> DropSchedule:
        """Build a schedule from the paper code's minimum keep fraction: ``drop_rate = 1 - keep``."""
        if not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ConfigError(f"keep fraction must be in (0, 1], got {keep!r}")
        # round(): 1 - 0.2 is 0.8 exactly in decimal but not in binary; keep the figure the user meant.
        return cls(name, round(1.0 - float(keep), 12), total_epochs, warmup_epochs, by, period)

    def rate(self, epoch: int, iteration: int = 0) -> float:
        """The drop rate at 0-based ``epoch`` and batch index ``iteration`` within that epoch."""
        _int_at_least("epoch", epoch, 0)
        _int_at_least("iteration", iteration, 0)
        if epoch < self.warmup_epochs:
            return 0.0
        if self.by == "epoch":
            return self._epoch_rate(epoch)
        return self._iteration_rate(iteration)

    def _epoch_rate(self, epoch: int) -> float:
        d = self.drop_rate
        if self.mode == "constant":
            return d
        if self.mode == "bar":
            return 0.0 if epoch % 2 == 0 else d
        n = self.total_epochs - self.warmup_epochs
        if n <= 1:
            return d
        x = min(1.0, (epoch - self.warmup_epochs) / (n - 1))
        if self.mode == "linear":
            return d * x
        return d * (1.0 - math.cos(math.pi * x)) / 2.0

    def _iteration_rate(self, iteration: int) -> float:
        d = self.drop_rate
        t = self.period
        phase = iteration % t
        if self.mode == "constant":
            return d
        if self.mode == "bar":
            return 0.0 if 2 * phase < t else d
        if self.mode == "linear":
            return d * phase / (t - 1)
        return d * (1.0 - math.cos(2.0 * math.pi * phase / t)) / 2.0

    def step(self, model: nn.Module, epoch: int, iteration: int = 0) -> float:
        """Set this step's drop rate on every ssProp layer of ``model``; returns the rate."""
        value = self.rate(epoch, iteration)
        set_drop_rate(model, value)
        return value

    def average_drop_rate(self, total_epochs: int | None = None, iters_per_epoch: int = 1) -> float:
        """Mean drop rate over ``total_epochs`` epochs of ``iters_per_epoch`` iterations each.

        Exactly the mean of :meth:`rate` over every (epoch, iteration) of that run, all iterations weighted
        equally (a smaller last batch is not down-weighted). ``total_epochs`` defaults to the schedule's.
        """
        epochs = self.total_epochs if total_epochs is None else _int_at_least("total_epochs", total_epochs, 1)
        iters = _int_at_least("iters_per_epoch", iters_per_epoch, 1)
        if self.by == "iteration":
            # Every post-warm-up epoch repeats the same per-iteration pattern.
            per_epoch = sum(self._iteration_rate(i) for i in range(iters)) / iters
            return per_epoch * max(0, epochs - self.warmup_epochs) / epochs
        return sum(self.rate(e) for e in range(epochs)) / epochs
