"""The ssProp method: sparse-backward layers, model conversion and drop-rate schedules (pure torch)."""

from __future__ import annotations

from ssprop_energy.sparse.convert import LAYER_KINDS, densify, set_drop_rate, sparsify, ssprop_layers
from ssprop_energy.sparse.functional import SELECTIONS, keep_count, ssprop_conv2d, ssprop_linear
from ssprop_energy.sparse.layers import SSPropConv2d, SSPropLinear
from ssprop_energy.sparse.schedules import BY, SCHEDULES, DropSchedule

__all__ = [
    "BY",
    "LAYER_KINDS",
    "SCHEDULES",
    "SELECTIONS",
    "DropSchedule",
    "SSPropConv2d",
    "SSPropLinear",
    "densify",
    "keep_count",
    "set_drop_rate",
    "sparsify",
    "ssprop_conv2d",
    "ssprop_layers",
    "ssprop_linear",
]
