"""Drop-rate schedules: which drop rate the ssProp layers use at each epoch / iteration.

These are the schedules of the paper's public code (``utils.py``, class ``DropSchedular``, driven by its
``train()``, which calls ``step(epoch, batch_idx)`` on every batch), reproduced exactly and written as a pure
function of ``(epoch, iteration)`` so that resume, FLOP pre-counting and pairing can ask for any batch.

The public code speaks in *keep* fractions; this module speaks in *drop* rates, ``drop = 1 - keep``:
``start_drop_rate = 1 - percentage`` and ``drop_rate = 1 - min_percentage`` (for ``constant``, whose only
fraction is ``percentage``, ``drop_rate = 1 - percentage``). :meth:`DropSchedule.from_official` takes the
public code's own arguments.

Name clash, resolved here: the paper's *text* calls its headline scheduler "bar" (dense and 80%-drop epochs
alternate); the public code's ``drop_mode='bar'`` is a different, half-and-half schedule. In this package the
short name ``bar`` is the paper's headline (constant drop, interleaved, by epoch) and the code's
``drop_mode='bar'`` is called ``halves``.

With ``S = start_drop_rate``, ``D = drop_rate``, ``E = total_epochs``, ``W = warmup_epochs``, period ``T``,
``epoch`` 0-based and ``iteration`` the batch index within the epoch. Priority, as in the public code:
warm-up, then interleave, then the mode.

- warm-up: every epoch ``< W`` is dense (0).
- interleave (by epoch only): from the end of the warm-up, epochs alternate dense, sparse, dense, ... The public
  code flips a toggle on each call after warm-up, so the first epoch after warm-up is dense: epoch ``e`` is
  dense when ``(e - W)`` is even (after an odd warm-up this is *not* the parity of ``e``). A sparse epoch
  takes the mode's value at its absolute epoch. (The public code's ``--resume`` re-seeds the toggle from the
  absolute parity of the checkpoint epoch, so after an odd warm-up its resumed run departs from its own
  uninterrupted one; this closed form is the uninterrupted run, which a resume here reproduces.)
- modes by epoch (the ramps use the absolute epoch ``e``, ignoring the warm-up):
    - ``constant``: ``D``;
    - ``linear``:   ``min(D, S + (D - S) * e / (E - 1))`` (reaches ``D`` on the last epoch; if ``D < S`` the
      public code's clamp makes it ``D`` throughout);
    - ``cosine``:   ``S + (D - S) * (1 - cos(e * PI / (E - 1))) / 2`` with ``PI = 3.14159`` as in the public
      code (the last epoch is ``D`` to within 4e-12 * |D - S|);
    - ``halves``:   ``S`` for ``e < E // 2``, ``D`` after (the code's ``drop_mode='bar'``).
- modes by iteration (the public code has no interleave here and ignores the flag):
    - ``linear``:   a sawtooth ``min(D, S + (D - S) * (i % T) / T)``: it never reaches ``D``;
    - ``cosine``:   ``S + (D - S) * (1 - cos(i * PI / T)) / 2``: period ``2T``, no modulo;
    - ``halves``:   ``S`` while ``i % T < T // 2``, ``D`` after (for odd ``T`` the sparse half is the larger);
    - ``constant``: ``D`` (the public code raises here; :meth:`from_official` does too, with a ConfigError).
  Every post-warm-up epoch repeats the same pattern (``i`` restarts at 0 each epoch).

Short names (:meth:`DropSchedule.from_name`, the CLI's ``--schedule``): ``bar`` = ``constant`` + interleave by
epoch (the headline; by iteration, where the public code has no interleave, ``bar`` is the ``halves`` square
wave from dense to ``D``); ``constant``, ``linear``, ``cosine``, ``halves`` = the modes, from ``S`` (default 0,
dense) to ``D``, interleaved only when asked.

Changed in issue 11 (the schedules used to be the project's own, not the public code's): ``bar`` after an odd
warm-up, linear/cosine by epoch with warm-up (they used to restart the ramp after it), by-iteration
linear/cosine (they used to reach ``D`` with period ``T``) and ``bar`` by iteration with odd ``T``.

This module does not import torch (only :meth:`DropSchedule.step` does, when called), so the CLI and the
report can use it without torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from ssprop_energy.errors import ConfigError

__all__ = ["BY", "MODES", "OFFICIAL_MODES", "OFFICIAL_PI", "SCHEDULES", "DropSchedule"]

log = logging.getLogger(__name__)

#: Short names accepted by :meth:`DropSchedule.from_name` and the CLI (``bar`` = the paper's headline).
SCHEDULES: tuple[str, ...] = ("bar", "constant", "linear", "cosine", "halves")
#: What :attr:`DropSchedule.mode` may be (``halves`` = the public code's ``drop_mode='bar'``).
MODES: tuple[str, ...] = ("constant", "linear", "cosine", "halves")
#: The public code's ``drop_mode`` values.
OFFICIAL_MODES: tuple[str, ...] = ("constant", "linear", "cosine", "bar")
BY: tuple[str, ...] = ("epoch", "iteration")
#: The public code's cosine uses this literal, not math.pi; kept so that rates match it to float rounding.
OFFICIAL_PI = 3.14159


def _int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _drop(name: str, value: object) -> float:
    """``value`` as a drop rate in [0, 1), or a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1) (0 = dense backward), got {value!r}")
    return float(value)


def _keep_to_drop(name: str, keep: object) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise ConfigError(f"{name} (a keep fraction) must be in (0, 1], got {keep!r}")
    # round(): 1 - 0.2 is 0.8 exactly in decimal but not in binary; keep the figure the user meant.
    return round(1.0 - float(keep), 12)


@dataclass(frozen=True)
class DropSchedule:
    """A drop-rate schedule (see the module docstring for the exact formulas).

    Attributes:
        mode: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"halves"``.
        drop_rate: ``D``, the drop rate the mode moves to (``constant``: the drop rate), in [0, 1).
        total_epochs: ``E``, the run length in epochs (the by-epoch ramps span it).
        warmup_epochs: ``W``, leading dense epochs.
        by: ``"epoch"`` or ``"iteration"``.
        period: ``T``, the period in iterations for ``by="iteration"`` (>= 1).
        start_drop_rate: ``S``, where linear / cosine / halves start, in [0, 1) (0 = dense).
        interleave: alternate dense and sparse epochs after the warm-up, dense first (by epoch only).
        name: the short name it was built from (``bar``, ...), for display; defaults to ``mode``.
    """

    mode: str
    drop_rate: float
    total_epochs: int
    warmup_epochs: int = 0
    by: str = "epoch"
    period: int = 10
    start_drop_rate: float = 0.0
    interleave: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            hint = " (the paper's headline 'bar' is a short name: use DropSchedule.from_name)" if self.mode == "bar" else ""
            raise ConfigError(f"unknown schedule mode {self.mode!r}; allowed: {', '.join(MODES)}{hint}")
        object.__setattr__(self, "drop_rate", _drop("drop rate", self.drop_rate))
        object.__setattr__(self, "start_drop_rate", _drop("start drop rate", self.start_drop_rate))
        _int_at_least("total_epochs", self.total_epochs, 1)
        _int_at_least("warmup_epochs", self.warmup_epochs, 0)
        if self.by not in BY:
            raise ConfigError(f"unknown schedule unit by={self.by!r}; allowed: {', '.join(BY)}")
        _int_at_least("period", self.period, 1)
        if not isinstance(self.interleave, bool):
            raise ConfigError(f"interleave must be True or False, got {self.interleave!r}")
        if self.interleave and self.by == "iteration":
            raise ConfigError(
                "interleave alternates whole epochs and applies only by epoch (the public code ignores it by "
                "iteration)"
            )
        if self.by == "epoch" and self.mode in ("linear", "cosine") and self.total_epochs < 2:
            raise ConfigError(
                f"a {self.mode} schedule by epoch needs at least 2 epochs: it ramps over total_epochs - 1 "
                "(the public code divides by zero here)"
            )
        if not self.name:
            object.__setattr__(self, "name", self.mode)

    # ------------------------------------------------------------------------------------------ builders

    @classmethod
    def from_name(
        cls,
        name: str,
        drop_rate: float,
        total_epochs: int,
        warmup_epochs: int = 0,
        by: str = "epoch",
        period: int = 10,
        start_drop_rate: float = 0.0,
        interleave: bool | None = None,
    ) -> DropSchedule:
        """Build a schedule from a short name (see the module docstring); raises :class:`ConfigError`.

        Args:
            name: ``bar`` (the paper's headline: constant ``drop_rate``, interleaved, by epoch), ``constant``,
                ``linear``, ``cosine`` or ``halves`` (the public code's ``drop_mode='bar'``).
            drop_rate: ``D``; the headline is ``bar`` at 0.8 (average 0.4).
            start_drop_rate: ``S`` for linear / cosine / halves (default 0, dense); not used by bar / constant.
            interleave: None = the name's default (on for ``bar`` by epoch, off otherwise).
        """
        if name not in SCHEDULES:
            raise ConfigError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
        if name in ("bar", "constant") and start_drop_rate:
            raise ConfigError(
                f"the {name} schedule applies one drop rate (--drop-rate); a start drop rate is for linear, "
                "cosine and halves"
            )
        mode = name
        if name == "bar":
            if interleave is False:
                raise ConfigError("bar is constant + interleave; without interleave use the constant schedule")
            # By iteration the public code has no interleave; bar is then its square wave from dense to D.
            mode, interleave = ("constant", True) if by == "epoch" else ("halves", False)
        schedule = cls(mode, drop_rate, total_epochs, warmup_epochs, by, period, start_drop_rate,
                       bool(interleave), name)
        if warmup_epochs >= total_epochs and (schedule.drop_rate > 0 or schedule.start_drop_rate > 0):
            raise ConfigError(
                f"warmup_epochs ({warmup_epochs}) must be below total_epochs ({total_epochs}), "
                "or no epoch would be sparse"
            )
        return schedule

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
        """:meth:`from_name` with the sparsest keep fraction instead of a drop rate: ``drop_rate = 1 - keep``."""
        return cls.from_name(name, _keep_to_drop("keep fraction", keep), total_epochs, warmup_epochs, by, period)

    @classmethod
    def from_official(
        cls,
        drop_mode: str,
        percentage: float,
        min_percentage: float,
        total_epoch: int,
        interleave: bool = False,
        warmup: int = 0,
        by_epoch: bool = True,
        T: int = 10,  # noqa: N803 - the public code's argument name
    ) -> DropSchedule:
        """The schedule the public code's ``DropSchedular`` applies, from its own arguments (keep fractions).

        ``rate(epoch, iteration)`` then equals ``1 - layer.percentage`` after the public ``train()`` has called
        ``step(epoch, iteration)`` for every batch up to that one. Raises :class:`ConfigError` where the public
        code raises (``constant`` by iteration, an unknown mode, linear / cosine by epoch over one epoch) and
        for keep fractions outside (0, 1] (keep 0 is a drop rate of 1, which no layer here accepts).
        Note the public code's ``by_epoch`` command-line flag defaults to off (by iteration); this one to on.
        """
        if drop_mode not in OFFICIAL_MODES:
            raise ConfigError(f"unknown drop_mode {drop_mode!r}; the public code accepts {', '.join(OFFICIAL_MODES)}")
        if not by_epoch and drop_mode == "constant":
            raise ConfigError("drop_mode 'constant' by iteration: the public code raises 'not recognized' here")
        start = _keep_to_drop("percentage", percentage)
        end = _keep_to_drop("min_percentage", min_percentage)
        if not by_epoch and interleave:
            log.info("interleave is ignored by iteration, as in the public code")
            interleave = False
        mode = "halves" if drop_mode == "bar" else drop_mode
        if mode == "constant":  # the public constant mode applies `percentage`; min_percentage is unused
            start, end = 0.0, start
        return cls(mode, end, total_epoch, warmup, "epoch" if by_epoch else "iteration", T, start,
                   bool(interleave), f"official-{drop_mode}")

    # ------------------------------------------------------------------------------------------ rates

    def rate(self, epoch: int, iteration: int = 0) -> float:
        """The drop rate at 0-based ``epoch`` and batch index ``iteration`` within that epoch."""
        _int_at_least("epoch", epoch, 0)
        _int_at_least("iteration", iteration, 0)
        if epoch < self.warmup_epochs:
            return 0.0
        if self.by == "epoch":
            if self.interleave and (epoch - self.warmup_epochs) % 2 == 0:
                return 0.0
            return self._epoch_rate(epoch)
        return self._iteration_rate(iteration)

    def _epoch_rate(self, epoch: int) -> float:
        s, d, e = self.start_drop_rate, self.drop_rate, self.total_epochs
        if self.mode == "constant":
            return d
        if self.mode == "halves":
            return s if epoch < e // 2 else d
        if self.mode == "linear":
            return min(d, s + (d - s) * epoch / (e - 1))
        return s + (d - s) * (1.0 - math.cos(epoch * OFFICIAL_PI / (e - 1))) / 2.0

    def _iteration_rate(self, iteration: int) -> float:
        s, d, t = self.start_drop_rate, self.drop_rate, self.period
        if self.mode == "constant":
            return d
        if self.mode == "halves":
            return s if iteration % t < t // 2 else d
        if self.mode == "linear":
            return min(d, s + (d - s) * (iteration % t) / t)
        return s + (d - s) * (1.0 - math.cos(iteration * OFFICIAL_PI / t)) / 2.0

    def rates(self, total_epochs: int | None = None, iters_per_epoch: int = 1) -> list[list[float]]:
        """``rates[epoch][iteration]`` for a run of ``total_epochs`` (default the schedule's) epochs."""
        epochs = self.total_epochs if total_epochs is None else _int_at_least("total_epochs", total_epochs, 1)
        iters = _int_at_least("iters_per_epoch", iters_per_epoch, 1)
        return [[self.rate(e, i) for i in range(iters)] for e in range(epochs)]

    def step(self, model: Any, epoch: int, iteration: int = 0) -> float:
        """Set this step's drop rate on every ssProp layer of ``model`` (an ``nn.Module``); returns the rate."""
        from ssprop_energy.sparse.convert import set_drop_rate  # torch, only when a model is stepped

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

    # ------------------------------------------------------------------------------------------ describing

    def official_args(self) -> dict[str, Any] | None:
        """The public code's ``DropSchedular`` arguments giving this schedule, or None if it has none
        (``constant`` by iteration, which the public code rejects)."""
        if self.mode == "constant" and self.by == "iteration":
            return None
        if self.mode == "constant":
            percentage, minimum = round(1.0 - self.drop_rate, 12), round(1.0 - self.drop_rate, 12)
        else:
            percentage, minimum = round(1.0 - self.start_drop_rate, 12), round(1.0 - self.drop_rate, 12)
        return {
            "drop_mode": "bar" if self.mode == "halves" else self.mode, "percentage": percentage,
            "min_percentage": minimum, "total_epoch": self.total_epochs, "interleave": self.interleave,
            "warmup": self.warmup_epochs, "by_epoch": self.by == "epoch", "T": self.period,
        }

    def describe(self) -> str:
        """One line for people, e.g. ``bar: constant drop 0.8, interleaved (dense first), by epoch``."""
        if self.mode == "constant":
            what = f"constant drop {self.drop_rate:g}"
        else:
            what = f"{self.mode} drop {self.start_drop_rate:g} -> {self.drop_rate:g}"
        parts = [f"{self.name}: {what}"]
        if self.interleave:
            parts.append("interleaved (dense first)")
        if self.warmup_epochs:
            parts.append(f"{self.warmup_epochs} dense warm-up epoch(s)")
        parts.append("by epoch" if self.by == "epoch" else f"by iteration, period {self.period}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
