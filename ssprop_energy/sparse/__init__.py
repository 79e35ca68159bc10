"""The ssProp method: sparse-backward layers, model conversion and drop-rate schedules (pure torch).

Names are loaded lazily so that the torch-free schedules (``ssprop_energy.sparse.schedules``, used by the
CLI's ``schedule`` command and the experiment config) can be imported without importing torch.
"""

from __future__ import annotations

from ssprop_energy._lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
