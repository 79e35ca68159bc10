"""ssprop-energy: measure what scheduled sparse back-propagation (ssProp) really saves.

The public names are loaded lazily so that torch-free parts of the package (``ssprop_energy.report``,
``ssprop_energy.records``, the ledger) can be imported without importing torch.
"""

from __future__ import annotations

import logging

from ssprop_energy._lazy import lazy_exports

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# public name -> module that defines it
_LAZY = {
    "SSPropConv2d": "ssprop_energy.sparse.layers",
    "SSPropLinear": "ssprop_energy.sparse.layers",
    "sparsify": "ssprop_energy.sparse.convert",
    "set_drop_rate": "ssprop_energy.sparse.convert",
    "densify": "ssprop_energy.sparse.convert",
    "DropSchedule": "ssprop_energy.sparse.schedules",
    "get_model": "ssprop_energy.models",
    "load_dataset": "ssprop_energy.data",
    "count_step": "ssprop_energy.flops",
    "FlopMeter": "ssprop_energy.flops",
    "open_meter": "ssprop_energy.energy",
    "render_report": "ssprop_energy.report",
    "load_runs": "ssprop_energy.runs",
}

__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
