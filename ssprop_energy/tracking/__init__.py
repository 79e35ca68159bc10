"""Experiment loggers for where researchers look: TensorBoard and MLflow (optional extra
``pip install 'ssprop-energy[tracking]'``).

A :class:`TrackingConfig` says which loggers a run opens (``ExperimentHooks(tracking=...)``; the CLI builds it
from ``--log-to`` and its companions). ``open_loggers(["tensorboard", "mlflow"], ...)`` gives
:class:`RunLogger` objects; each hands the trainer one callback per arm-run
(``logger.callback(arm, seed, repeat)``), takes the configuration (``logger.log_config(cfg)``) and, once the
run directory is complete, its artifacts (``logger.on_run_end(run_dir)``); ``logger.close()`` at the end.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ssprop_energy.errors import ConfigError

if TYPE_CHECKING:
    from ssprop_energy.tracking.base import EpochScalars, RunLogger, epoch_scalars

__all__ = [
    "LOG_TARGETS", "EpochScalars", "RunLogger", "TrackingConfig", "add_tracking_arguments", "epoch_scalars",
    "open_loggers", "parse_targets", "tracking_from_args",
]

LOG_TARGETS = ("tensorboard", "mlflow")

# The loggers are trainer callbacks (torch); loaded on first use so that the CLI's flags (add_tracking_arguments)
# cost no torch import for the torch-free commands.
_LAZY = ("EpochScalars", "RunLogger", "epoch_scalars")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("ssprop_energy.tracking.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_loggers(
    targets: Sequence[str],
    run_dir: str | Path,
    *,
    tensorboard_dir: str | Path | None = None,
    mlflow_uri: str | None = None,
    mlflow_experiment: str = "ssprop-energy",
    carbon_g_per_kwh: float | None = None,
    pue: float = 1.0,
) -> list[RunLogger]:
    """Open one logger per target (each at most once).

    Args:
        targets: names from :data:`LOG_TARGETS`.
        run_dir: the run directory; TensorBoard writes to ``run_dir/tensorboard`` unless ``tensorboard_dir``
            is given, and the MLflow parent run is named after it.
        tensorboard_dir: TensorBoard's folder instead of ``run_dir/tensorboard``.
        mlflow_uri: the MLflow tracking URI (None: ``$MLFLOW_TRACKING_URI``, else MLflow's default).
        mlflow_experiment: the MLflow experiment name.
        carbon_g_per_kwh: grid intensity (g CO2e/kWh) to log CO2 per epoch; None logs no CO2.
        pue: the data centre's power usage effectiveness applied to that CO2.

    Raises:
        ConfigError: unknown target, a missing package (naming the ``tracking`` extra), unusable MLflow URI.
    """
    parse_targets(",".join(targets))
    loggers: list[RunLogger] = []
    for target in dict.fromkeys(targets):
        if target == "tensorboard":
            from ssprop_energy.tracking.tensorboard import TensorBoardLogger

            loggers.append(TensorBoardLogger(tensorboard_dir or Path(run_dir) / "tensorboard",
                                             carbon_g_per_kwh=carbon_g_per_kwh, pue=pue))
        else:
            from ssprop_energy.tracking.mlflow import MlflowLogger

            loggers.append(MlflowLogger(mlflow_uri, mlflow_experiment, run_name=Path(run_dir).name,
                                        carbon_g_per_kwh=carbon_g_per_kwh, pue=pue))
    return loggers


def add_tracking_arguments(parser: Any) -> None:
    """Add ``--log-to``, ``--tensorboard-dir``, ``--mlflow-uri`` and ``--mlflow-experiment`` to an argparse
    parser (``compare`` and ``sweep``)."""
    parser.add_argument(
        "--log-to", action="append", default=None, metavar="TARGETS",
        help="also log each epoch to tensorboard and/or mlflow: comma-separated or the flag repeated "
        "(pip install 'ssprop-energy[tracking]')",
    )
    parser.add_argument("--tensorboard-dir", default=None, help="TensorBoard log dir (default RUN_DIR/tensorboard)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default)")
    parser.add_argument("--mlflow-experiment", default="ssprop-energy", help="MLflow experiment name")


def parse_targets(text: str | Sequence[str] | None) -> list[str]:
    """``"tensorboard,mlflow"`` (or ``["tensorboard", "mlflow"]``, a repeated ``--log-to``) -> ``["tensorboard",
    "mlflow"]``, each once; unknown names are a :class:`ConfigError`."""
    parts = [text] if isinstance(text, str) else list(text or [])
    targets = [t.strip().lower() for part in parts for t in part.split(",") if t.strip()]
    unknown = [t for t in targets if t not in LOG_TARGETS]
    if unknown:
        raise ConfigError(f"unknown --log-to target(s) {', '.join(unknown)}; choose from {', '.join(LOG_TARGETS)}")
    return list(dict.fromkeys(targets))


@dataclass(frozen=True)
class TrackingConfig:
    """Which experiment loggers a run opens, and where they write.

    Attributes:
        targets: names from :data:`LOG_TARGETS`, each once (empty: no logger).
        tensorboard_dir: TensorBoard's folder (None: ``RUN_DIR/tensorboard``).
        mlflow_uri: the MLflow tracking URI (None: ``$MLFLOW_TRACKING_URI``, else MLflow's default).
        mlflow_experiment: the MLflow experiment name.

    Raises:
        ConfigError: an unknown target (at construction, before anything runs).
    """

    targets: tuple[str, ...] = ()
    tensorboard_dir: str | None = None
    mlflow_uri: str | None = None
    mlflow_experiment: str = "ssprop-energy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(parse_targets(list(self.targets))))

    def open(self, run_dir: str | Path, carbon_g_per_kwh: float | None = None, pue: float = 1.0) -> list[RunLogger]:
        """Open one logger per target (see :func:`open_loggers`); none when :attr:`targets` is empty."""
        return open_loggers(self.targets, run_dir, tensorboard_dir=self.tensorboard_dir, mlflow_uri=self.mlflow_uri,
                            mlflow_experiment=self.mlflow_experiment, carbon_g_per_kwh=carbon_g_per_kwh, pue=pue)


def tracking_from_args(args: Any) -> TrackingConfig:
    """The :class:`TrackingConfig` of the flags :func:`add_tracking_arguments` adds (an argparse namespace).

    Raises:
        ConfigError: an unknown ``--log-to`` target.
    """
    return TrackingConfig(
        targets=tuple(parse_targets(getattr(args, "log_to", None))),
        tensorboard_dir=getattr(args, "tensorboard_dir", None), mlflow_uri=getattr(args, "mlflow_uri", None),
        mlflow_experiment=getattr(args, "mlflow_experiment", None) or "ssprop-energy",
    )
