"""The ranks' records of one arm-run -> the one record rank 0 writes (torch-free).

What every rank computed alike (accuracy, losses, best epoch: already reduced over ranks) comes from rank 0;
what each rank did its own share of is summed: counted FLOPs (per epoch and in total) and energy (per epoch,
per phase, per slice, and per component, each component labelled with its rank and node).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from ssprop_energy.records import ArmRun, EnergyComponent, EpochRecord, SliceRecord, total_energy


def label_components(components: Sequence[EnergyComponent], info: dict[str, Any]) -> list[EnergyComponent]:
    """``components`` with the rank / node labels of the rank described by ``info``.

    Node-wide sources (RAPL packages and DRAM, the node's RAM estimate), read by local rank 0 only, are
    labelled with the node and no rank. A non-zero local rank's zero RAM estimate (the node's RAM is counted
    once, by local rank 0) is dropped.
    """
    out = []
    for c in components:
        # a GPU and the CPU estimate of the rank's own process are the rank's; anything else (RAPL domains,
        # the RAM estimate) is the node's
        node_wide = not (c.component.startswith("gpu") or c.component == "cpu")
        if node_wide and info["local_rank"] != 0 and c.energy_j == 0.0:
            continue
        out.append(replace(c, rank=None if node_wide else info["rank"], node=info["node"]))
    return out


def _merge_slices(runs: Sequence[ArmRun]) -> list[SliceRecord]:
    """Rank 0's slices (its clock and machine readings: rank 0 alone observes the machine) with the energy
    of every rank's same slice summed; the ranks run the same slices in lock step."""
    base = runs[0].slices
    if any(len(r.slices) != len(base) for r in runs):
        return list(base)  # a rank resumed with another history: keep rank 0's own figures
    out = []
    for i, s in enumerate(base):
        sources = {r.slices[i].energy_source for r in runs}
        out.append(replace(s, energy_j=sum(r.slices[i].energy_j for r in runs),
                           energy_source=sources.pop() if len(sources) == 1 else "mixed"))
    return out


def merge_runs(runs: Sequence[ArmRun], infos: Sequence[dict[str, Any]], nodes: int) -> ArmRun:
    """One :class:`ArmRun` from every rank's record of it (``runs[i]`` from the rank ``infos[i]``)."""
    base = runs[0]
    epochs: list[EpochRecord] = []
    for i, e in enumerate(base.epochs):
        epochs.append(replace(
            e, flops_forward=sum(r.epochs[i].flops_forward for r in runs),
            flops_backward=sum(r.epochs[i].flops_backward for r in runs),
            energy_j=sum(r.epochs[i].energy_j for r in runs),
        ))
    phases: dict[str, dict[str, float]] = {name: dict(w) for name, w in base.phases.items()}
    for name, w in phases.items():
        w["energy_j"] = sum(float(r.phases.get(name, {}).get("energy_j", 0.0)) for r in runs)
    components = [c for r, info in zip(runs, infos) for c in label_components(r.energy_components, info)]
    # generation: every rank sampled its shard in its own window; the sampling energy is all ranks' (rank 0's
    # wall time: the shards are gathered at the window's end)
    sample_components = [c for r, info in zip(runs, infos) for c in label_components(r.sample_energy_components, info)]
    trace = [[t, f"r{info['rank']}:{comp}", p, s, ph] for r, info in zip(runs, infos) for t, comp, p, s, ph in r.trace]
    ranks = []
    shares = []
    for r, info in zip(runs, infos):
        # the rank's own devices; node-wide counters it read for its node are under the node's components
        energy_j, source = total_energy([c for c in label_components(r.energy_components, info)
                                         if c.rank == info["rank"]])
        entry = {**info, "flops_forward": r.flops_forward, "flops_backward": r.flops_backward,
                 "energy_j": energy_j, "energy_source": source}
        ranks.append(entry)
        if info.get("train_wall_s"):
            shares.append(info["comm_wall_s"] / info["train_wall_s"])
    return replace(
        base, slices=_merge_slices(runs), flops_forward=sum(r.flops_forward for r in runs), flops_backward=sum(r.flops_backward for r in runs),
        flops_backward_conv=sum(r.flops_backward_conv for r in runs), energy_components=components, epochs=epochs,
        phases=phases, trace=trace, world_size=len(runs), nodes=nodes, ranks=ranks,
        sample_energy_components=sample_components,
        comm_share=sum(shares) / len(shares) if shares else None,
    )
