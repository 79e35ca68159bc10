"""``load_runs(paths)``: run records as one pandas DataFrame, one row per arm-run (arm x seed x repeat).

Reads only ``summary.json`` (through :func:`ssprop_energy.records.load_summary`, which validates it and reads
schema version 1, before the typed records, and 2); never imports torch. Column names carry their units
(``energy_j``, ``co2_g``, ``wall_s``; ``flops_*`` are FLOPs counted over the run's training steps; accuracies
and ``sparsified_backward_share`` are fractions in [0, 1]).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ssprop_energy.errors import RecordError
from ssprop_energy.records import SUMMARY_FILE, ArmRecord, RunSummary, load_summary

__all__ = ["RUN_COLUMNS", "load_runs", "run_rows"]

# Column order of the frame; fields a record lacks are NaN / None.
RUN_COLUMNS = [
    "run_dir", "run_kind", "run_status", "schema_version", "created_at", "model", "dataset", "interleave",
    "layer_kinds", "arm", "is_baseline", "seed", "repeat", "drop_rate", "schedule", "average_drop_rate", "dropout",
    "sparsified_layers", "sparsified_backward_share", "test_accuracy", "wall_s", "flops_forward", "flops_backward",
    "flops_backward_conv", "flops_total", "energy_j", "energy_source", "eval_energy_j", "co2_g",
    "carbon_intensity_g_per_kwh", "pue", "epochs",
    # generation runs (DDPM): the Frechet distance by extractor and the sampling window (apart from training)
    "task", "fid", "fid_classifier", "sample_wall_s", "sample_energy_j",
]


def _run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a run directory, or a folder whose immediate subfolders are run directories."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / SUMMARY_FILE).is_file():
            out.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if (p / SUMMARY_FILE).is_file())
            if not found:
                raise RecordError(f"{path}: no {SUMMARY_FILE} in it or in its subfolders")
            out.extend(found)
        else:
            raise RecordError(f"{path}: no such run directory")
    return out


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _layer_kinds(summary: RunSummary) -> str | None:
    """The run's ssProp layer kinds, e.g. ``conv,linear``: recorded since the per-model defaults; before them
    the config always named them."""
    kinds = summary.layer_kinds or (summary.config or {}).get("layers") or []
    return ",".join(kinds) if kinds else None


def _coverage(name: str, arm: ArmRecord, summary: RunSummary) -> tuple[float, float]:
    """(layers sparsified, their share of a dense step's backward FLOPs); the baseline sparsifies nothing,
    an arm whose record predates the coverage gives NaN."""
    if arm.layer_coverage is not None:
        return float(arm.layer_coverage.layers), arm.layer_coverage.share
    if name == summary.baseline:
        return 0.0, 0.0
    return math.nan, math.nan


# The figures an arm record and each of its repeat records both carry, under the same names.
_FIGURES = (
    "test_accuracy", "wall_s", "flops_forward", "flops_backward", "flops_backward_conv", "energy_j", "co2_g",
    "fid", "fid_classifier", "sample_wall_s", "sample_energy_j",
)


def _repeat_rows(arm: ArmRecord) -> list[dict[str, Any]]:
    """The arm-run figures of one arm: its per-run figures, or its averages when the record has none."""
    if not arm.repeats:
        return [{"seed": None, "repeat": None, **{k: getattr(arm, k) for k in _FIGURES},
                 "energy_source": arm.energy_source, "eval_energy_j": arm.eval_energy_j}]
    rows = []
    for rep in arm.repeats:
        eval_j = rep.eval_energy_j
        if eval_j is None and len(arm.repeats) == 1:
            eval_j = arm.eval_energy_j  # one run: the arm's mean is that run's figure
        rows.append({
            "seed": rep.seed, "repeat": rep.repeat, **{k: getattr(rep, k) for k in _FIGURES},
            # every run of a record shares one meter choice; older records name the source per arm only
            "energy_source": rep.energy_source or arm.energy_source, "eval_energy_j": eval_j,
        })
    return rows


def run_rows(run_dir: str | Path, summary: RunSummary | None = None) -> list[dict[str, Any]]:
    """The rows of one run directory (see :func:`load_runs`)."""
    run_dir = Path(run_dir)
    summary = summary if summary is not None else load_summary(run_dir)
    cfg = summary.config or {}
    rows = []
    for name, arm in summary.arms.items():
        layers, share = _coverage(name, arm, summary)
        base = {
            "run_dir": str(run_dir), "run_kind": summary.kind, "run_status": summary.status,
            "schema_version": summary.schema_version, "created_at": summary.created_at, "model": cfg.get("model"),
            "dataset": cfg.get("dataset"), "interleave": summary.interleave, "layer_kinds": _layer_kinds(summary),
            "arm": name, "is_baseline": name == summary.baseline, "drop_rate": arm.drop_rate,
            "schedule": arm.schedule, "average_drop_rate": arm.average_drop_rate, "dropout": arm.dropout,
            "sparsified_layers": layers, "sparsified_backward_share": share,
            "carbon_intensity_g_per_kwh": arm.carbon_intensity_g_per_kwh, "pue": arm.pue, "epochs": len(arm.epochs),
        }
        for rep in _repeat_rows(arm):
            fwd, bwd = _number(rep["flops_forward"]), _number(rep["flops_backward"])
            rows.append({
                **base, **{k: _number(v) for k, v in rep.items() if k not in ("seed", "repeat", "energy_source")},
                "seed": rep["seed"], "repeat": rep["repeat"], "energy_source": rep["energy_source"],
                "flops_total": fwd + bwd, "task": summary.task,
            })
    return rows


def load_runs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Load run directories into one DataFrame with a row per arm-run (per arm, seed and repeat).

    Args:
        paths: run directories (each holding ``summary.json``), or folders of run directories, or one path.

    Returns:
        A DataFrame with the columns of :data:`RUN_COLUMNS`. ``energy_source`` is the provenance of
        ``energy_j``, ``eval_energy_j`` and ``co2_g`` (``counter``, ``sampled``, ``estimated``, ``mixed``, or
        ``fake`` for the synthetic test meter: never compare figures of different sources without saying so).
        ``layer_kinds`` are the run's ssProp layer kinds; ``sparsified_layers`` and
        ``sparsified_backward_share`` say how many layers the arm replaced and what share of a dense step's
        backward FLOPs they hold (0 for the dense baseline; NaN where the record predates them, as does
        ``eval_energy_j`` per run in records that kept only the arm's mean of several runs). A record without
        per-repeat figures gives one row of the arm's averages with ``seed`` and ``repeat`` None.

    Raises:
        RecordError: a path that is not a run directory, or a malformed ``summary.json`` (naming the file).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    dirs = _run_dirs(paths)
    if not dirs:
        raise RecordError("no run directory given")
    rows = [row for d in dirs for row in run_rows(d)]
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return frame
