"""Experiment loggers for where researchers look: TensorBoard and MLflow (optional extra
``pip install 'ssprop-energy[tracking]'``).

``open_loggers(["tensorboard", "mlflow"], ...)`` gives :class:`RunLogger` objects; each hands the trainer one
callback per arm-run (``logger.callback(arm, seed, repeat)``), takes the configuration
(``logger.log_config(cfg)``) and, once the run directory is complete, its artifacts
(``logger.on_run_end(run_dir)``); ``logger.close()`` at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ssprop_energy.errors import ConfigError
from ssprop_energy.tracking.base import EpochScalars, RunLogger, epoch_scalars

__all__ = [
    "LOG_TARGETS", "EpochScalars", "RunLogger", "add_tracking_arguments", "epoch_scalars", "loggers_from_args",
    "open_loggers", "parse_targets",
]

LOG_TARGETS = ("tensorboard", "mlflow")


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
        "--log-to", default="", metavar="TARGETS",
        help="also log to: tensorboard, mlflow or both, comma-separated (pip install 'ssprop-energy[tracking]')",
    )
    parser.add_argument("--tensorboard-dir", default=None, help="TensorBoard log dir (default RUN_DIR/tensorboard)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default)")
    parser.add_argument("--mlflow-experiment", default="ssprop-energy", help="MLflow experiment name")


def parse_targets(text: str | None) -> list[str]:
    """``"tensorboard,mlflow"`` -> ``["tensorboard", "mlflow"]``; unknown names are a :class:`ConfigError`."""
    targets = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    unknown = [t for t in targets if t not in LOG_TARGETS]
    if unknown:
        raise ConfigError(f"unknown --log-to target(s) {', '.join(unknown)}; choose from {', '.join(LOG_TARGETS)}")
    return list(dict.fromkeys(targets))


def loggers_from_args(args: Any, run_dir: str | Path, carbon_g_per_kwh: float | None = None,
                      pue: float = 1.0) -> list[RunLogger]:
    """Open the loggers the ``add_tracking_arguments`` flags ask for (none when ``--log-to`` is empty).
    Call it after the run directory is prepared (the TensorBoard folder lives inside it)."""
    return open_loggers(
        parse_targets(getattr(args, "log_to", "")), run_dir, tensorboard_dir=getattr(args, "tensorboard_dir", None),
        mlflow_uri=getattr(args, "mlflow_uri", None),
        mlflow_experiment=getattr(args, "mlflow_experiment", "ssprop-energy"),
        carbon_g_per_kwh=carbon_g_per_kwh, pue=pue,
    )
