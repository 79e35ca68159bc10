"""The ssProp method: sparse-backward layers, model conversion and drop-rate schedules (pure torch).

Names are loaded lazily so that the torch-free schedules (``ssprop_energy.sparse.schedules``, used by the
CLI's ``schedule`` command and the experiment config) can be imported without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_LAZY = {
    "LAYER_KINDS": "ssprop_energy.sparse.convert",
    "densify": "ssprop_energy.sparse.convert",
    "set_drop_rate": "ssprop_energy.sparse.convert",
    "sparsify": "ssprop_energy.sparse.convert",
    "ssprop_layers": "ssprop_energy.sparse.convert",
    "SELECTIONS": "ssprop_energy.sparse.functional",
    "keep_count": "ssprop_energy.sparse.functional",
    "ssprop_conv2d": "ssprop_energy.sparse.functional",
    "ssprop_linear": "ssprop_energy.sparse.functional",
    "SSPropConv2d": "ssprop_energy.sparse.layers",
    "SSPropLinear": "ssprop_energy.sparse.layers",
    "BY": "ssprop_energy.sparse.schedules",
    "SCHEDULES": "ssprop_energy.sparse.schedules",
    "DropSchedule": "ssprop_energy.sparse.schedules",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ssprop_energy.sparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
