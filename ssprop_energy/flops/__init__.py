"""Executed-FLOP counting: one training step at dispatch level, analytic formulas, schedule integration.

Convention everywhere: FLOPs = 2 x multiply-adds of convolutions and matrix products (see
:data:`CONVENTION_DESCRIPTION`); ops outside it are listed in ``StepFlops.uncounted_ops``.
"""

from __future__ import annotations

from ssprop_energy.flops.counter import (
    CONVENTION,
    CONVENTION_DESCRIPTION,
    LayerFlops,
    StepFlops,
    StepFn,
    count_step,
    ssprop_drop_rates,
)
from ssprop_energy.flops.integrate import EpochFlops, FlopMeter, RunFlops

__all__ = [
    "CONVENTION",
    "CONVENTION_DESCRIPTION",
    "EpochFlops",
    "FlopMeter",
    "LayerFlops",
    "RunFlops",
    "StepFlops",
    "StepFn",
    "count_step",
    "ssprop_drop_rates",
]
