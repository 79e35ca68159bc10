"""Experiment loggers for where researchers look: TensorBoard and MLflow (optional extra
``pip install 'ssprop-energy[tracking]'``).

``open_loggers(["tensorboard", "mlflow"], ...)`` gives :class:`RunLogger` objects; each hands the trainer one
callback per arm-run (``logger.callback(arm, seed, repeat)``), takes the configuration
(``logger.log_config(cfg)``) and, once the run directory is complete, its artifacts
(``logger.on_run_end(run_dir)``); ``logger.close()`` at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ssprop_energy.errors import ConfigError
from ssprop_energy.tracking.base import EpochScalars, RunLogger, epoch_scalars

__all__ = ["LOG_TARGETS", "EpochScalars", "RunLogger", "epoch_scalars", "open_loggers"]

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
    unknown = [t for t in targets if t not in LOG_TARGETS]
    if unknown:
        raise ConfigError(f"unknown --log-to target(s) {', '.join(unknown)}; choose from {', '.join(LOG_TARGETS)}")
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
