"""FLOPs of whole epochs and runs: one counted step per drop-rate configuration, multiplied out.

Counting a step is slow (seconds for ResNet-18 on a CPU) but the executed FLOPs of a step depend only on the
shapes and on the drop rate of each ssProp layer, and they are linear in the batch size. So the meter counts
one small step per distinct configuration, caches it, and multiplies the per-sample figures by the samples
each epoch (or batch) sees. Training itself never runs under the counter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from ssprop_energy.errors import ConfigError
from ssprop_energy.flops.counter import LayerFlops, StepFlops, StepFn, count_step
from ssprop_energy.sparse.convert import ssprop_layers
from ssprop_energy.sparse.functional import keep_count, validate_drop_rate

logger = logging.getLogger(__name__)


class RateSchedule(Protocol):
    """Anything that gives the drop rate of a batch, e.g. :class:`ssprop_energy.sparse.DropSchedule`."""

    def rate(self, epoch: int, iteration: int = 0) -> float: ...


@dataclass(frozen=True)
class EpochFlops:
    """Counted FLOPs of one training epoch (training steps only).

    Attributes:
        epoch: 0-based epoch index.
        samples: training samples seen in the epoch.
        mean_drop_rate: drop rate averaged over the epoch's samples.
        flops_forward / flops_backward / flops_backward_conv: FLOPs over the epoch.
    """

    epoch: int
    samples: int
    mean_drop_rate: float
    flops_forward: float
    flops_backward: float
    flops_backward_conv: float

    @property
    def flops_total(self) -> float:
        return self.flops_forward + self.flops_backward


@dataclass(frozen=True)
class RunFlops:
    """Counted FLOPs of a whole run, per epoch and in total.

    Attributes:
        epochs: one entry per epoch.
        layers: per-module FLOPs summed over the whole run (the rows of a run's ``layers.csv``).
    """

    epochs: list[EpochFlops]
    layers: list[LayerFlops]

    @property
    def flops_forward(self) -> float:
        return sum(e.flops_forward for e in self.epochs)

    @property
    def flops_backward(self) -> float:
        return sum(e.flops_backward for e in self.epochs)

    @property
    def flops_backward_conv(self) -> float:
        return sum(e.flops_backward_conv for e in self.epochs)

    @property
    def flops_total(self) -> float:
        return self.flops_forward + self.flops_backward

    @property
    def mean_drop_rate(self) -> float:
        """Drop rate averaged over every sample of the run."""
        samples = sum(e.samples for e in self.epochs)
        return sum(e.mean_drop_rate * e.samples for e in self.epochs) / samples if samples else 0.0

    def saving_vs(self, dense: RunFlops) -> dict[str, float]:
        """Fraction of ``dense``'s FLOPs this run saves: ``1 - self / dense`` per quantity."""

        def frac(mine: float, ref: float) -> float:
            return 1.0 - mine / ref if ref else 0.0

        return {
            "forward": frac(self.flops_forward, dense.flops_forward),
            "backward": frac(self.flops_backward, dense.flops_backward),
            "backward_conv": frac(self.flops_backward_conv, dense.flops_backward_conv),
            "total": frac(self.flops_total, dense.flops_total),
        }


def _config_key(layer: nn.Module, drop_rate: float) -> tuple[object, ...]:
    """What decides the ops an ssProp layer executes at ``drop_rate``: dense or not, and channels kept.

    Grouped convolutions keep channels per group (a rule of their own in ``sparse.functional``), so for
    them the exact rate is the key: never a shared count that might be wrong, at worst an extra count.
    """
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        return ("rate", drop_rate)
    channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features  # type: ignore[union-attr]
    return (drop_rate == 0.0, keep_count(drop_rate, int(channels)))


def _layer_totals(by_rate: dict[float, StepFlops], samples_at: dict[float, int]) -> list[LayerFlops]:
    """Per-module FLOPs over a run: each rate's per-sample layer counts times the samples run at it."""
    totals: dict[str, list[Any]] = {}
    for rate, step in by_rate.items():
        for layer in step.layers:
            row = totals.setdefault(layer.name, [layer.type, 0.0, 0.0])
            row[1] += layer.forward * samples_at[rate]
            row[2] += layer.backward * samples_at[rate]
    return [LayerFlops(name, kind, fwd, bwd) for name, (kind, fwd, bwd) in totals.items()]


class FlopMeter:
    """Per-sample step FLOPs of a model, counted once per drop-rate configuration and cached.

    Args:
        model: the network (dense, or with ssProp layers). It is left as found after every count: drop
            rates, gradients, buffers, mode and RNG state are restored.
        input_shape: one sample's shape, e.g. ``(3, 32, 32)``.
        num_classes: number of classes of the loss.
        batch_size: samples in each counted step.
        loss_fn: ``loss_fn(output, labels)``; cross-entropy by default.
        step_fn: ``step_fn(model, x, generator) -> loss`` for a step that is not ``loss_fn(model(x), y)``
            (see :func:`~ssprop_energy.flops.counter.count_step`), e.g. a diffusion training step.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        num_classes: int,
        batch_size: int = 2,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        step_fn: StepFn | None = None,
    ) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.loss_fn = loss_fn
        self.step_fn = step_fn
        self._cache: dict[tuple[float, ...], StepFlops] = {}

    @property
    def counts(self) -> int:
        """How many steps have been counted so far (one per distinct configuration)."""
        return len(self._cache)

    def per_sample(self, drop_rate: float | None = None) -> StepFlops:
        """Step FLOPs per sample with every ssProp layer at ``drop_rate`` (None: the rates the model has).

        Two drop rates that keep the same number of channels in every layer execute the same ops, so they
        share one count; a model without ssProp layers has one configuration whatever ``drop_rate`` says.

        Raises:
            ConfigError: ``drop_rate`` outside [0, 1).
        """
        layers = ssprop_layers(self.model)
        current = [float(layer.drop_rate) for layer in layers]  # type: ignore[arg-type]
        rates = current if drop_rate is None else [validate_drop_rate(drop_rate)] * len(layers)
        key = tuple(_config_key(layer, rate) for layer, rate in zip(layers, rates))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            for layer, rate in zip(layers, rates):
                layer.drop_rate = rate  # type: ignore[attr-defined]
            counted = count_step(
                self.model, self.input_shape, self.num_classes, self.batch_size, self.loss_fn, self.step_fn
            )
        finally:
            for layer, rate in zip(layers, current):
                layer.drop_rate = rate  # type: ignore[attr-defined]
        logger.info(
            "counted step at drop rate %s: %.4g FLOPs forward, %.4g backward per sample (%.2f s)",
            drop_rate, counted.forward, counted.backward, counted.count_wall_s,
        )
        self._cache[key] = counted
        return counted

    def for_epoch(self, drop_rate: float | None, n_samples: int) -> tuple[float, float]:
        """``(flops_forward, flops_backward)`` of ``n_samples`` training samples at ``drop_rate``."""
        if n_samples < 0:
            raise ConfigError(f"n_samples must be >= 0, got {n_samples}")
        step = self.per_sample(drop_rate)
        return step.forward * n_samples, step.backward * n_samples

    def for_schedule(
        self,
        schedule: RateSchedule,
        total_epochs: int,
        n_samples: int,
        batch_size: int,
        drop_last: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> RunFlops:
        """Integrate the step FLOPs over a run that follows ``schedule`` batch by batch.

        Args:
            schedule: gives the drop rate of batch ``iteration`` of ``epoch`` (``schedule.rate``).
            total_epochs: epochs in the run.
            n_samples: training samples per epoch.
            batch_size: samples per batch; the last batch is partial unless ``drop_last``.
            drop_last: drop the partial last batch, as the loader does with the same flag.
            batch_sizes: the samples of each batch of an epoch, given explicitly (one rank's parts of the
                global batches in a distributed run); ``n_samples`` / ``batch_size`` / ``drop_last`` then
                only count the batches.

        Returns:
            The run's FLOPs per epoch and in total.
        """
        if total_epochs < 0 or n_samples < 0 or batch_size < 1:
            raise ConfigError(
                "need total_epochs >= 0, n_samples >= 0, batch_size >= 1; "
                f"got {total_epochs}, {n_samples}, {batch_size}"
            )
        sizes = [batch_size] * (n_samples // batch_size)
        if n_samples % batch_size and not drop_last:
            sizes.append(n_samples % batch_size)
        if batch_sizes is not None:
            if len(batch_sizes) != len(sizes) or any(b < 0 for b in batch_sizes):
                raise ConfigError(f"batch_sizes: expected {len(sizes)} non-negative sizes, got {list(batch_sizes)}")
            sizes = [int(b) for b in batch_sizes]
        epochs = []
        by_rate: dict[float, StepFlops] = {}  # a run has ~1e5 batches but few distinct rates
        samples_at: dict[float, int] = {}
        for epoch in range(total_epochs):
            fwd = bwd = bwd_conv = rate_sum = 0.0
            for iteration, size in enumerate(sizes):
                rate = float(schedule.rate(epoch, iteration))
                step = by_rate.get(rate)
                if step is None:
                    step = by_rate[rate] = self.per_sample(rate)
                fwd += step.forward * size
                bwd += step.backward * size
                bwd_conv += step.backward_conv * size
                rate_sum += rate * size
                samples_at[rate] = samples_at.get(rate, 0) + size
            samples = sum(sizes)
            epochs.append(
                EpochFlops(epoch, samples, rate_sum / samples if samples else 0.0, fwd, bwd, bwd_conv)
            )
        return RunFlops(epochs, _layer_totals(by_rate, samples_at))
