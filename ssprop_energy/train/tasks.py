"""What a model is trained to do: the per-batch loss, how a split is evaluated, and the headline metric.

The trainer knows nothing about classification: it asks its task for the loss of a batch and for the
metrics of a split. Classification (cross-entropy, accuracy) is the default; a generation task (e.g. DDPM:
noise-prediction MSE, validation loss at fixed timesteps) implements the same four members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ssprop_energy.data import DatasetSplits, TensorSplit


class Task(Protocol):
    """The four things the trainer needs from a task.

    Attributes:
        metric: name of the headline quality metric (``accuracy``), a fraction or a score.
        higher_is_better: direction of ``metric`` (best-epoch selection uses it).
    """

    metric: str
    higher_is_better: bool

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean loss, sum of the metric over the batch)``; both stay on the device (no sync)."""
        ...

    def evaluate(self, model: nn.Module, split: TensorSplit, data: DatasetSplits, batch_size: int,
                 device: torch.device, noise_std: float = 0.0) -> tuple[float, float]:
        """``(mean loss, metric)`` of ``model`` on ``split``, optionally under input noise."""
        ...


class ClassificationTask:
    """Cross-entropy training, accuracy (fraction in [0, 1]) as the headline metric."""

    metric = "accuracy"
    higher_is_better = True

    def __init__(self, autocast: object | None = None) -> None:
        self._autocast = autocast

    def _ctx(self):  # noqa: ANN202 - a context manager factory
        import contextlib

        return self._autocast() if callable(self._autocast) else contextlib.nullcontext()

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._ctx():
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
        return loss, (out.detach().argmax(1) == y).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: TensorSplit, data: DatasetSplits, batch_size: int,
                 device: torch.device, noise_std: float = 0.0) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on a split; optional Gaussian input noise.

        The noise is added to pixel values on the [0, 1] scale before normalisation, with a fixed generator,
        so every arm is evaluated on the same noisy inputs.
        """
        from ssprop_energy.data import BatchLoader

        was_training = model.training
        model.eval()
        loader = BatchLoader(split, max(batch_size, 256), shuffle=False, seed=0, mean=data.mean, std=data.std,
                             device=device)
        gen = torch.Generator(device="cpu").manual_seed(1234)
        std = torch.as_tensor(data.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        n = 0
        for x, y in loader:
            if noise_std > 0:
                # x is normalised: (p - mean) / std, so pixel noise of sigma becomes sigma / std.
                noise = torch.randn(x.shape, generator=gen).to(device)
                x = x + noise * (noise_std / std)
            with self._ctx():
                out = model(x)
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            n += len(y)
        model.train(was_training)
        return float(loss_sum) / max(n, 1), float(correct) / max(n, 1)
