"""Attributing machine-wide CPU energy to one process tree by its share of the CPU time.

Each component declares its scope (:attr:`~ssprop_energy.energy.base.ComponentSpec.scope`):

- **machine-wide** (RAPL ``cpu:package-N`` and ``dram:package-N``): on a shared lab server the counters
  include every other user's work. ``audit run`` charges the wrapped command with

      share = (CPU seconds of the command's process tree) / (busy CPU seconds of the whole machine)

  over the same interval, times the machine-wide energy. Idle power is thus split in proportion to the work
  done, the rule Scaphandre and similar per-process meters use.
- **process tree** (the estimate's ``cpu`` and ``ram``): the figure is already the command's: TDP x the
  tree's CPU seconds / logical CPUs, and codecarbon's per-process RAM model x wall time. It is charged as
  is; scaling it by the share again would count the command's CPU fraction twice (issue 18: 53 J charged
  where the estimate said 116 J). With the estimate meter the charged figure follows CodeCarbon's
  ``OfflineEmissionsTracker(tracking_mode="process")`` CPU + RAM formula with the same TDP and RAM power
  (CodeCarbon's own figure differs by a few percent: it samples live processes, and counts the tracking
  process itself), the convention ``compare`` uses; :func:`codecarbon_process_j` names it.

GPU components are per device and are kept whole here: a process's share of a GPU cannot be read from CPU
time (see :mod:`.gpushare`).

CodeCarbon's process mode applies to its load x TDP estimate only: where it reads RAPL it reports the
package counters whole in either mode, and models RAM separately. A RAPL row therefore has no
CodeCarbon-process figure of its own; its machine-wide figure (kept beside the charged one) is what
CodeCarbon would report for the CPU package.

The tree's CPU seconds come from ``wait4`` on the child (its own time plus every descendant it waited
for); the machine's from ``/proc/stat`` through :func:`psutil.cpu_times`. A descendant that outlives the
command or is never waited for (a daemon that detaches) is not charged to it: its work counts as someone
else's. Both figures are kept in the ledger row (``tree_cpu_s``, ``machine_cpu_s``, ``cpu_share``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Collection, Sequence

import psutil

from ssprop_energy.records import EnergyComponent

logger = logging.getLogger(__name__)

ATTRIBUTION_RULE = "cpu-time share"


@dataclass(frozen=True)
class AttributedComponent:
    """A component as recorded in the ledger.

    Attributes:
        component: the energy charged to the run (the machine-wide figure x ``share`` when attributed).
        machine_energy_j: the machine-wide energy measured over the run, in joules; None when not attributed.
        share: the fraction of ``machine_energy_j`` charged to the run; None when not attributed.
        method: how the share was found (:data:`ATTRIBUTION_RULE` for CPU-side components; see
            :mod:`.gpushare` for GPUs).
    """

    component: EnergyComponent
    machine_energy_j: float | None = None
    share: float | None = None
    method: str = "cpu-time share"


@dataclass(frozen=True)
class CpuAttribution:
    """The CPU-time share of one process tree over one interval (seconds are CPU seconds, summed over cores)."""

    tree_cpu_s: float
    machine_cpu_s: float
    share: float


def machine_busy_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot, summed over cores.

    Busy = user + nice + system + irq + softirq. Left out: idle and iowait (no work), steal (another
    virtual machine's work), and guest/guest_nice, which Linux already counts inside user/nice.
    """
    t = psutil.cpu_times()
    return float(sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq")))


def machine_cpu_resolution_s() -> float:
    """The smallest busy-time difference /proc/stat can show for the whole machine, in CPU seconds.

    Each core's counter advances in clock ticks (``SC_CLK_TCK``, usually 100 per second) and is truncated
    at each of the two reads, so a difference summed over N cores is uncertain by up to 2 x N ticks.
    """
    try:
        ticks = os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        ticks = 100
    return 2.0 * (psutil.cpu_count() or 1) / float(ticks or 100)


def cpu_share(tree_cpu_s: float, machine_cpu_s: float, resolution_s: float = 0.0) -> float:
    """The tree's fraction of the machine's busy CPU time, in [0, 1].

    The tree's time (exact, from rusage) and the machine's (in clock ticks of /proc/stat) are read by
    different clocks, so a tree that was nearly alone on the machine can come out a little above 1;
    the share is clamped. The machine's time is floored at ``resolution_s`` (see
    :func:`machine_cpu_resolution_s`): below it, the counter cannot tell 0 from one tick, and an idle
    command (``sleep 2``) would be charged 100% or a few percent of the machine depending on whether a
    tick fell inside the run. With no busy time and no floor, a tree with zero CPU time gets no share,
    one with some gets all of it.
    """
    if tree_cpu_s < 0 or machine_cpu_s < 0 or resolution_s < 0:
        raise ValueError(f"negative CPU time (tree {tree_cpu_s} s, machine {machine_cpu_s} s, "
                         f"resolution {resolution_s} s)")
    machine_cpu_s = max(machine_cpu_s, resolution_s)
    if machine_cpu_s <= 0.0:
        return 1.0 if tree_cpu_s > 0.0 else 0.0
    return min(1.0, tree_cpu_s / machine_cpu_s)


def process_scoped_components(meter: object) -> frozenset[str]:
    """Names of the meter's components whose figure already covers only the measuring process tree.

    Read from the meter's ``specs`` (``{name: ComponentSpec}``); a meter without them (a test double, an
    older meter) declares none, so all its CPU-side components count as machine-wide.
    """
    from ssprop_energy.energy.base import SCOPE_PROCESS_TREE

    specs = getattr(meter, "specs", None) or {}
    return frozenset(name for name, spec in specs.items()
                     if getattr(spec, "scope", None) == SCOPE_PROCESS_TREE)


def is_machine_wide(component: EnergyComponent, process_scoped: Collection[str] = ()) -> bool:
    """True for components that measure the whole machine's CPU side: not ``gpu:*``, not process-scoped."""
    return not component.component.startswith("gpu") and component.component not in process_scoped


def codecarbon_process_j(components: Sequence[EnergyComponent], process_scoped: Collection[str]) -> float | None:
    """CodeCarbon's ``tracking_mode="process"`` CPU + RAM energy for the run, joules, where it is defined.

    Defined when the CPU side was measured by the process-tree estimate (every non-GPU component is
    process-scoped): it is then the sum of those components, which are charged as is. None where a
    machine-wide counter (RAPL) measured the CPU side: CodeCarbon reads those whole in either mode.
    """
    cpu_side = [c for c in components if not c.component.startswith("gpu")]
    if not cpu_side or any(c.component not in process_scoped for c in cpu_side):
        return None
    return sum(c.energy_j for c in cpu_side)


def attribute(
    components: Sequence[EnergyComponent],
    attribution: CpuAttribution | None,
    process_scoped: Collection[str] = (),
) -> list[AttributedComponent]:
    """Charge the run with its share of every machine-wide component.

    Args:
        components: the meter's components over the run.
        attribution: the run's CPU-time share; None keeps every component whole (``--whole-machine``).
        process_scoped: names of components already limited to the command's process tree (see
            :func:`process_scoped_components`); they are charged as measured, never scaled by the share.

    Returns:
        One :class:`AttributedComponent` per input; GPU and process-scoped components unchanged.
    """
    out: list[AttributedComponent] = []
    for comp in components:
        if attribution is None or not is_machine_wide(comp, process_scoped):
            out.append(AttributedComponent(comp))
            continue
        charged = EnergyComponent(
            component=comp.component,
            energy_j=comp.energy_j * attribution.share,
            source=comp.source,
            device=comp.device,
            sampled_energy_j=None if comp.sampled_energy_j is None else comp.sampled_energy_j * attribution.share,
        )
        out.append(AttributedComponent(charged, machine_energy_j=comp.energy_j, share=attribution.share))
    return out
