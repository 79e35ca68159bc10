"""The training loop: optimiser, drop-rate schedule stepping, energy windows, checkpoints.

Names load lazily, so that torch-free code (trainer callbacks such as the tracking loggers, the CLI's
flag registration) can import ``ssprop_energy.train.callbacks`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Callback": "ssprop_energy.train.callbacks",
    "resolve_device": "ssprop_energy.train.device",
    "EpochResult": "ssprop_energy.train.loop",
    "TrainConfig": "ssprop_energy.train.loop",
    "Trainer": "ssprop_energy.train.loop",
    "ClassificationTask": "ssprop_energy.train.tasks",
    "Task": "ssprop_energy.train.tasks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
