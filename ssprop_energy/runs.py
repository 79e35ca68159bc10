"""``load_runs(paths)``: run records as one pandas DataFrame, one row per arm-run (arm x seed x repeat).

Reads only ``summary.json`` (through :func:`ssprop_energy.records.load_summary`, which validates it); never
imports torch. Column names carry their units (``energy_j``, ``co2_g``, ``wall_s``, ``flops_*`` are FLOPs
counted over the run's training steps, accuracies are fractions in [0, 1]).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ssprop_energy.errors import RecordError
from ssprop_energy.records import SUMMARY_FILE, RepeatFigures, RunSummary, load_summary

__all__ = ["RUN_COLUMNS", "load_runs", "run_rows"]

# Column order of the frame; fields a record lacks are NaN / None.
RUN_COLUMNS = [
    "run_dir", "run_kind", "run_status", "created_at", "model", "dataset", "arm", "is_baseline", "seed", "repeat",
    "drop_rate", "schedule", "average_drop_rate", "dropout", "test_accuracy", "wall_s", "flops_forward",
    "flops_backward", "flops_backward_conv", "flops_total", "energy_j", "energy_source", "eval_energy_j", "co2_g",
    "carbon_intensity_g_per_kwh", "pue", "epochs",
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


def run_rows(run_dir: str | Path, summary: RunSummary | None = None) -> list[dict[str, Any]]:
    """The rows of one run directory (see :func:`load_runs`)."""
    run_dir = Path(run_dir)
    summary = summary if summary is not None else load_summary(run_dir)
    cfg = summary.config or {}
    rows = []
    for name, arm in summary.arms.items():
        base = {
            "run_dir": str(run_dir), "run_kind": summary.kind, "run_status": summary.status,
            "created_at": summary.created_at, "model": cfg.get("model"), "dataset": cfg.get("dataset"),
            "arm": name, "is_baseline": name == summary.baseline, "drop_rate": arm.drop_rate,
            "schedule": arm.schedule, "average_drop_rate": arm.average_drop_rate, "dropout": arm.dropout,
            "carbon_intensity_g_per_kwh": arm.carbon_intensity_g_per_kwh, "pue": arm.pue, "epochs": len(arm.epochs),
        }
        # a record without per-repeat figures gives one row of its averages (seed and repeat None); every
        # repeat of an arm is measured by the same components, so the arm's source is each repeat's
        reps: list[RepeatFigures | None] = list(arm.repeats) or [None]
        for rep in reps:
            fig: Any = rep if rep is not None else arm
            fwd, bwd = _number(fig.flops_forward), _number(fig.flops_backward)
            rows.append({
                **base,
                "seed": rep.seed if rep is not None else None, "repeat": rep.repeat if rep is not None else None,
                "test_accuracy": _number(fig.test_accuracy), "wall_s": _number(fig.wall_s),
                "flops_forward": fwd, "flops_backward": bwd,
                "flops_backward_conv": _number(fig.flops_backward_conv), "flops_total": fwd + bwd,
                "energy_j": _number(fig.energy_j), "energy_source": arm.energy_source,
                "eval_energy_j": _number(arm.eval_energy_j),  # evaluation energy is kept per arm (mean)
                "co2_g": _number(fig.co2_g),
            })
    return rows


def load_runs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Load run directories into one DataFrame with a row per arm-run (per arm, seed and repeat).

    Args:
        paths: run directories (each holding ``summary.json``), or folders of run directories, or one path.

    Returns:
        A DataFrame with the columns of :data:`RUN_COLUMNS`. ``energy_source`` is the provenance of
        ``energy_j`` and ``co2_g`` (``counter``, ``sampled``, ``estimated`` or ``mixed``: never compare
        figures of different sources without saying so). A record without per-repeat figures (older runs)
        gives one row of the arm's averages with ``seed`` and ``repeat`` None.

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
