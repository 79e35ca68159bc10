"""What every experiment logger shares: the per-epoch scalars of one arm-run, with their provenance.

A logger is opened once per experiment run. It hands the trainer one :class:`~ssprop_energy.train.Callback`
per arm-run (:meth:`RunLogger.callback`), records the configuration as hyperparameters
(:meth:`RunLogger.log_config`) and, when the run directory is complete, attaches ``summary.json`` and
``report.html`` (:meth:`RunLogger.on_run_end`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ssprop_energy.energy.carbon import co2_g
from ssprop_energy.train.callbacks import Callback

if TYPE_CHECKING:
    from ssprop_energy.train.loop import EpochResult, Trainer

# Files of a finished run directory attached as artifacts (records.SUMMARY_FILE and the report's usual name).
ARTIFACT_FILES = ("summary.json", "report.html")


@dataclass(frozen=True)
class EpochScalars:
    """One epoch of one arm-run as loggable numbers.

    Attributes:
        values: metric name (units in the name) -> value. Energy and CO2 names carry their provenance:
            ``energy_j_<source>`` / ``co2_g_<source>``, ``source`` one of ``counter``, ``sampled``,
            ``estimated``, ``fake`` or ``mixed`` (components of different sources added: the name says so).
        energy_source: that provenance, also logged as a tag/text.
    """

    values: dict[str, float]
    energy_source: str


def energy_source_of(trainer: Trainer, components: Mapping[str, float]) -> str:
    """The provenance of an epoch's energy: the components' common source, ``mixed`` when they differ, and
    ``fake`` when the meter is the fake one (its figures are synthetic whatever label its specs borrow)."""
    meter = getattr(trainer, "meter", None)
    if meter is None:
        return "none"
    describe = getattr(meter, "describe", None)
    sources = describe().get("sources", []) if callable(describe) else []
    if any(src.get("kind") == "fake" for src in sources):
        return "fake"
    specs = getattr(meter, "specs", {})
    labels = {specs[c].source for c in components if c in specs}
    if not labels:
        return "none"
    return labels.pop() if len(labels) == 1 else "mixed"


def epoch_scalars(
    trainer: Trainer, result: EpochResult, carbon_g_per_kwh: float | None, pue: float = 1.0
) -> EpochScalars:
    """Loss, accuracy, drop rate, learning rate, wall time, counted FLOPs, energy and CO2 of one epoch.

    CO2 is only given when a carbon intensity is (grams CO2e = J / 3.6e6 x g/kWh x PUE, as in the record).
    """
    r = result.record
    source = energy_source_of(trainer, result.energy_by_component_j)
    values: dict[str, float] = {
        "train_loss": r.train_loss,
        "train_accuracy": r.train_accuracy,
        "val_loss": r.val_loss,
        "val_accuracy": r.val_accuracy,
        "drop_rate": r.drop_rate,
        "lr": r.lr,
        "wall_s": r.wall_s,
        "flops_forward_counted": r.flops_forward,
        "flops_backward_counted": r.flops_backward,
        "flops_total_counted": r.flops_forward + r.flops_backward,
    }
    if source != "none":
        values[f"energy_j_{source}"] = r.energy_j
        if carbon_g_per_kwh is not None and math.isfinite(r.energy_j) and r.energy_j >= 0:
            values[f"co2_g_{source}"] = co2_g(r.energy_j, carbon_g_per_kwh, pue)
    return EpochScalars({k: float(v) for k, v in values.items() if v is not None}, source)


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | float | int | bool]:
    """A configuration flattened to scalar hyperparameters: nested keys joined by ``.``, lists as JSON text,
    None as the text ``none`` (neither TensorBoard nor MLflow takes null)."""
    out: dict[str, str | float | int | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        elif value is None:
            out[name] = "none"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def arm_run_name(arm: str, seed: int, repeat: int) -> str:
    """The label of one arm-run, as ``epochs.csv`` writes it: ``ARM/s<seed>r<repeat>``."""
    return f"{arm}/s{seed}r{repeat}"


class RunLogger:
    """Base class of the experiment loggers."""

    name = "base"

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's configuration as hyperparameters."""

    def callback(self, arm: str, seed: int, repeat: int) -> Callback:
        """The trainer callback that logs one arm-run's epochs."""
        return Callback()

    def on_run_end(self, run_dir: str | Path) -> None:
        """Attach the finished run directory's ``summary.json`` and ``report.html`` (those present)."""

    def close(self, status: str = "complete") -> None:
        """Flush and release files; idempotent. ``status`` is the run's (``complete``, ``interrupted`` or
        ``failed``; ``records.RUN_STATUSES``), for trackers that keep a run state."""


def artifacts(run_dir: str | Path) -> list[Path]:
    """The artifact files present in ``run_dir``."""
    return [Path(run_dir) / f for f in ARTIFACT_FILES if (Path(run_dir) / f).is_file()]
