"""The interface every power source implements, and the dataclasses the meter returns.

A source exposes *components* (``gpu:0``, ``cpu:package-0``, ``dram:package-0``, ``cpu``, ``ram``). Each
component has a cumulative energy reading (``counter``), an instantaneous power reading (``power``), or
both; the meter reads counters at window edges and samples power on a background thread. The provenance
label of a component's energy figure (``counter``, ``sampled``, ``estimated``) is a separate field because
the CPU estimate is read like a counter (cumulative CPU seconds x watts) but is not a measurement.

Sources are only called with the meter's lock held, so they need no locking of their own. This module
never imports torch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from ssprop_energy.records import EnergyComponent

#: the figure covers the whole machine or device (every process on it)
SCOPE_MACHINE = "machine"
#: the figure covers only the measuring process and its descendants
SCOPE_PROCESS_TREE = "process tree"


@dataclass(frozen=True)
class ComponentSpec:
    """What a source offers for one component.

    Attributes:
        component: component name, e.g. ``gpu:0``.
        source: provenance of the energy figure: ``counter``, ``sampled``, ``estimated`` or ``fake``.
        device: human-readable hardware name.
        counter: the source has a cumulative energy reading (J) for it.
        power: the source has an instantaneous power reading (W) for it.
        scope: what the figure covers: :data:`SCOPE_MACHINE` (the whole device or machine, every process on
            it: RAPL packages and DRAM, a GPU) or :data:`SCOPE_PROCESS_TREE` (already limited to the measuring
            process and its descendants: the estimate's CPU time and its per-process RAM model). A consumer
            that charges one process tree (``audit run``) attributes only machine-scoped figures.
    """

    component: str
    source: str
    device: str
    counter: bool
    power: bool
    scope: str = SCOPE_MACHINE


@dataclass(frozen=True, slots=True)
class PowerSample:
    """One point of the power trace.

    Attributes:
        t_s: seconds since the meter started.
        component: component name.
        power_w: power in watts (for counter components: the mean power since the previous sample).
        source: how the value was obtained: ``sampled`` (a power reading), ``counter`` (counter delta /
            time) or ``estimated``.
    """

    t_s: float
    component: str
    power_w: float
    source: str


@dataclass
class EnergyReport:
    """The result of one measured interval (``meter.start()`` to ``meter.stop()``).

    Attributes:
        components: energy per component, each with its source.
        energy_j: sum over components (J).
        source: the components' common source, or ``mixed``.
        wall_s: seconds between start and stop.
        windows: ``{name: {"energy_j", "wall_s", "count"}}`` summed over every time the window was open.
        window_components: ``{name: {component: energy_j}}``, the same windows split by component.
        unattributed_energy_j: energy outside every top-level window (never negative).
        trace: the power samples, in time order per component.
        idle_power_w: the idle baseline measured before start (W per component), empty if none was
            measured; it is reported, never subtracted.
    """

    components: list[EnergyComponent]
    energy_j: float
    source: str
    wall_s: float
    windows: dict[str, dict[str, float]] = field(default_factory=dict)
    window_components: dict[str, dict[str, float]] = field(default_factory=dict)
    unattributed_energy_j: float = 0.0
    trace: list[PowerSample] = field(default_factory=list)
    idle_power_w: dict[str, float] = field(default_factory=dict)

    def component(self, name: str) -> EnergyComponent:
        """The component called ``name``; KeyError if the report has none."""
        for comp in self.components:
            if comp.component == name:
                return comp
        raise KeyError(name)


class PowerSource(abc.ABC):
    """One kind of energy hardware (or a model of it), read through one API."""

    #: short name used by ``open_meter`` and in records: ``nvml``, ``rapl``, ``estimate``, ``fake``.
    kind: str = ""

    @abc.abstractmethod
    def components(self) -> list[ComponentSpec]:
        """The components this source measures."""

    def read_energy_j(self) -> dict[str, float]:
        """Cumulative energy (J, arbitrary origin, non-decreasing) of every ``counter`` component."""
        return {}

    def read_power_w(self) -> dict[str, float]:
        """Instantaneous power (W) of every ``power`` component."""
        return {}

    def refresh(self) -> None:  # noqa: B027 - most sources need no housekeeping
        """Slow housekeeping (e.g. listing child processes), called by the sampler thread before each sample
        and outside the meter's lock, so that window edges never pay for it."""

    def start(self) -> None:  # noqa: B027 - most sources need no start action
        """Called when the meter starts (e.g. to fix a baseline that depends on the moment)."""

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release the hardware handle; the source is not read again."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Provenance for the run record: the source kind, hardware names, models and constants used."""
