"""MLflow logging: one parent run per experiment run (the configuration as parameters, ``summary.json`` and
``report.html`` as artifacts, the energy provenance as tags) and one nested run per arm-run with its
per-epoch metrics (step = epoch). Uses an explicit ``MlflowClient``, never MLflow's global active run, so it
cannot collide with a run the user's own code has open."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ssprop_energy.errors import ConfigError
from ssprop_energy.tracking.base import RunLogger, arm_run_name, artifacts, epoch_scalars, flat_params
from ssprop_energy.train.callbacks import Callback

if TYPE_CHECKING:
    from ssprop_energy.train.loop import EpochResult, Trainer

logger = logging.getLogger(__name__)

TRACKING_EXTRA_HINT = "pip install 'ssprop-energy[tracking]'"
DEFAULT_EXPERIMENT = "ssprop-energy"
# MLflow caps a parameter value's length (6000 characters in MLflow 2-3); longer values are cut, and say so.
_MAX_PARAM_CHARS = 6000
# The run's status (records.RUN_STATUSES) -> MLflow's run state; an interrupted run can be resumed, so KILLED.
_MLFLOW_STATUS = {"complete": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


def _client(tracking_uri: str | None) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ConfigError(f"--log-to mlflow needs the mlflow package ({exc}); install it with: "
                          f"{TRACKING_EXTRA_HINT}") from None
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except Exception as exc:  # an unusable URI is the user's to fix
        raise ConfigError(f"MLflow tracking URI {tracking_uri!r} cannot be used: {type(exc).__name__}: {exc}") from None


class _EpochLogger(Callback):
    def __init__(self, owner: MlflowLogger, arm: str, seed: int, repeat: int) -> None:
        self.owner = owner
        self.arm, self.seed, self.repeat = arm, seed, repeat
        self.run_id: str | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self._ensure_run()

    def _ensure_run(self) -> str:
        if self.run_id is None:
            self.run_id = self.owner.child_run(self.arm, self.seed, self.repeat)
        return self.run_id

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        run_id = self._ensure_run()
        scalars = epoch_scalars(trainer, result, self.owner.carbon_g_per_kwh, self.owner.pue)
        step = int(result.record.epoch)
        for key, value in scalars.values.items():
            self.owner.client.log_metric(run_id, key, value, step=step)
        self.owner.client.set_tag(run_id, "energy_source", scalars.energy_source)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.run_id is not None:
            self.owner.client.set_terminated(self.run_id, "FINISHED")
            self.owner.open_children.discard(self.run_id)


class MlflowLogger(RunLogger):
    """Logs to an MLflow tracking server or store.

    Args:
        tracking_uri: e.g. ``file:/path/mlruns``, ``sqlite:///mlflow.db``, ``http://host:5000``; None uses
            MLflow's own default (``$MLFLOW_TRACKING_URI``, else its local default).
        experiment: MLflow experiment name, created if missing.
        run_name: name of the parent run (e.g. the run directory's name).
        carbon_g_per_kwh, pue: to log CO2 per epoch (grams CO2e); None logs no CO2.
    """

    name = "mlflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        carbon_g_per_kwh: float | None = None,
        pue: float = 1.0,
    ) -> None:
        self.client = _client(tracking_uri)
        self.carbon_g_per_kwh = carbon_g_per_kwh
        self.pue = pue
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            tags = {"mlflow.runName": run_name} if run_name else {}
            self.run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"MLflow: cannot open experiment {experiment!r} at {tracking_uri or 'the default URI'}: "
                              f"{type(exc).__name__}: {exc}") from None
        self._closed = False
        self.open_children: set[str] = set()  # arm-runs whose training has not finished

    def child_run(self, arm: str, seed: int, repeat: int) -> str:
        """Create the nested run of one arm-run; returns its id."""
        run = self.client.create_run(
            self.experiment_id,
            tags={"mlflow.parentRunId": self.run_id, "mlflow.runName": arm_run_name(arm, seed, repeat), "arm": arm},
        )
        for key, value in (("arm", arm), ("seed", seed), ("repeat", repeat)):
            self.client.log_param(run.info.run_id, key, value)
        self.open_children.add(run.info.run_id)
        return run.info.run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's configuration as hyperparameters (flattened, see ``base.flat_params``)."""
        for key, value in flat_params(config).items():
            text = str(value)
            if len(text) > _MAX_PARAM_CHARS:
                text = text[: _MAX_PARAM_CHARS - 12] + "...[cut]"
            self.client.log_param(self.run_id, key, text)

    def callback(self, arm: str, seed: int, repeat: int) -> Callback:
        """The trainer callback that logs one arm-run's epochs."""
        return _EpochLogger(self, arm, seed, repeat)

    def on_run_end(self, run_dir: str | Path) -> None:
        """Upload ``summary.json`` and ``report.html`` (those present) to the parent run; tag each arm's energy
        provenance; log each arm's final figures as ``<arm>.<metric>`` metrics of the parent run."""
        from ssprop_energy.records import load_summary

        for path in artifacts(run_dir):
            self.client.log_artifact(self.run_id, str(path))
        if (Path(run_dir) / "summary.json").is_file():
            summary = load_summary(run_dir)
            for name, arm in summary.arms.items():
                self.client.set_tag(self.run_id, f"energy_source.{name}", arm.energy_source)
                self.client.log_metric(self.run_id, f"{name}.test_accuracy", arm.test_accuracy)
                self.client.log_metric(self.run_id, f"{name}.energy_j_{arm.energy_source}", arm.energy_j)
                self.client.log_metric(self.run_id, f"{name}.co2_g_{arm.energy_source}", arm.co2_g)
                self.client.log_metric(self.run_id, f"{name}.flops_backward_counted", arm.flops_backward)

    def close(self, status: str = "complete") -> None:
        """End the parent run, and any arm-run still open (an interrupted or failed run), with ``status``."""
        if not self._closed:
            state = _MLFLOW_STATUS.get(status, "FAILED")
            for run_id in sorted(self.open_children):
                self.client.set_terminated(run_id, state)
            self.open_children.clear()
            self.client.set_terminated(self.run_id, state)
            self._closed = True
