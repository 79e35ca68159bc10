"""Optimisers and learning-rate schedules by name."""

from __future__ import annotations

from typing import Iterable

import torch

from ssprop_energy.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("none", "cosine")


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Build an optimiser. Adam uses betas (0.9, 0.999) as the paper's public code; SGD uses momentum 0.9."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def make_lr_schedule(
    name: str, optimizer: torch.optim.Optimizer, total_epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """An epoch-stepped LR schedule, or None for a constant LR (the paper's setting)."""
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_epochs))
    raise ConfigError(f"unknown lr schedule {name!r}; choose from {', '.join(LR_SCHEDULES)}")
