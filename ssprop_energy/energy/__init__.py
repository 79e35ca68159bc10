"""Energy measurement: power sources (NVML, RAPL, estimate, fake) behind one interface, a sampling thread,
named windows, an idle baseline, and carbon intensity (:mod:`ssprop_energy.energy.carbon`).

This package never imports torch at import time; the meter imports it only to synchronise CUDA at window
edges when it measures GPUs.
"""

from __future__ import annotations

from ssprop_energy.energy.base import ComponentSpec, EnergyReport, PowerSample, PowerSource
from ssprop_energy.energy.carbon import CarbonIntensity, co2_g, resolve_intensity
from ssprop_energy.energy.fake import Constant, FakeChannel, Ramp, Sine, Step
from ssprop_energy.energy.meter import EnergyMeter, WindowEnergy
from ssprop_energy.energy.select import KINDS, MeterChoice, available_sources, open_meter, resolve_meter

__all__ = [
    "KINDS",
    "CarbonIntensity",
    "ComponentSpec",
    "Constant",
    "EnergyMeter",
    "EnergyReport",
    "FakeChannel",
    "MeterChoice",
    "PowerSample",
    "PowerSource",
    "Ramp",
    "Sine",
    "Step",
    "WindowEnergy",
    "available_sources",
    "co2_g",
    "open_meter",
    "resolve_intensity",
    "resolve_meter",
]
