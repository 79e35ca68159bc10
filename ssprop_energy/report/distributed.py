"""Energy per rank and per node of a distributed run, and the share of time in gradient all-reduce.

Computed from the arms' labelled energy components (``records.energy_by``), so the figures are the
record's own joules grouped, never re-measured; node-wide counters (RAPL, the node's RAM estimate) have a
node but no rank and appear under the node only.
"""

from __future__ import annotations

from typing import Any

from ssprop_energy.records import COMM_SHARE_LABEL, RunSummary, energy_by


def is_distributed(summary: RunSummary) -> bool:
    return summary.world_size > 1 or summary.nodes > 1


def energy_rows(summary: RunSummary) -> list[dict[str, Any]]:
    """One row per (arm, rank) and per (arm, node): ``arm, scope, host, energy_j, source, share``
    (share of the arm's training energy)."""
    ranks = {r["rank"]: r for r in summary.environment.get("distributed", {}).get("ranks", [])}
    hosts = {r["node"]: r.get("hostname", "") for r in ranks.values()}
    rows = []
    for name, arm in summary.arms.items():
        total = arm.energy_j
        for label, prefix, where in (("rank", "rank", lambda k: ranks.get(k, {}).get("hostname", "")),
                                     ("node", "node", lambda k: hosts.get(k, ""))):
            for key, (energy_j, source) in energy_by(arm.energy_components, label).items():
                if key is None:
                    if label == "rank":  # node-wide counters: shown per node
                        rows.append({"arm": name, "scope": "node-wide (no rank)", "host": "", "energy_j": energy_j,
                                     "source": source, "share": energy_j / total if total > 0 else float("nan")})
                    continue
                rows.append({"arm": name, "scope": f"{prefix} {key}", "host": where(key), "energy_j": energy_j,
                             "source": source, "share": energy_j / total if total > 0 else float("nan")})
    return rows


def comm_text(summary: RunSummary) -> str:
    """One sentence per arm: the share of training time with a gradient all-reduce in flight."""
    parts = [f"{name} {arm.comm_share:.1%}" for name, arm in summary.arms.items() if arm.comm_share is not None]
    if not parts:
        return ""
    return f"Communication ({COMM_SHARE_LABEL}, mean over ranks): " + "; ".join(parts) + "."


def header_text(summary: RunSummary) -> str:
    info = summary.environment.get("distributed", {})
    return (f"Distributed run: {summary.world_size} processes on {summary.nodes} node(s), backend "
            f"{info.get('backend', '?')}; --batch-size is the global batch (each process trains on its part of every "
            "batch; ssProp selects channels on each process's part). FLOPs and energy are summed over processes.")
