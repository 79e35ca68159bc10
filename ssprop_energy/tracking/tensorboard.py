"""TensorBoard logging: one event-file folder per arm-run (``LOG_DIR/<arm>/s<seed>r<repeat>``) so that
TensorBoard overlays the arms' curves; the configuration as hyperparameters (the HParams plugin) and as text
in ``LOG_DIR``; at the end, the summary headline as text and its figures as scalars."""

from __future__ import annotations

import json
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


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(f"--log-to tensorboard needs the tensorboard package ({exc}); install it with: "
                          f"{TRACKING_EXTRA_HINT}") from None
    return SummaryWriter


class _EpochWriter(Callback):
    def __init__(self, owner: TensorBoardLogger, name: str) -> None:
        self.owner = owner
        self.name = name

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        scalars = epoch_scalars(trainer, result, self.owner.carbon_g_per_kwh, self.owner.pue)
        writer = self.owner.writer(self.name)
        step = int(result.record.epoch)
        for key, value in scalars.values.items():
            writer.add_scalar(key, value, global_step=step)
        writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        self.owner.writer(self.name).flush()


class TensorBoardLogger(RunLogger):
    """Writes TensorBoard event files under ``log_dir``.

    Args:
        log_dir: the folder to point ``tensorboard --logdir`` at.
        carbon_g_per_kwh, pue: to log CO2 per epoch (grams CO2e); None logs no CO2.
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, carbon_g_per_kwh: float | None = None, pue: float = 1.0) -> None:
        self._writer_cls = _summary_writer()
        self.log_dir = Path(log_dir)
        self.carbon_g_per_kwh = carbon_g_per_kwh
        self.pue = pue
        self._writers: dict[str, Any] = {}

    def writer(self, name: str) -> Any:
        """The writer of one sub-run (``""``: the log dir itself)."""
        if name not in self._writers:
            self._writers[name] = self._writer_cls(log_dir=str(self.log_dir / name) if name else str(self.log_dir))
        return self._writers[name]

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's configuration as hyperparameters (flattened, see ``base.flat_params``)."""
        from torch.utils.tensorboard.summary import hparams

        params = flat_params(config)
        root = self.writer("")
        exp, ssi, sei = hparams(params, {})
        for summary in (exp, ssi, sei):
            root.file_writer.add_summary(summary)
        root.add_text("config", "```\n" + json.dumps(dict(config), indent=2, default=str) + "\n```")
        root.flush()

    def callback(self, arm: str, seed: int, repeat: int) -> Callback:
        """The trainer callback that logs one arm-run's epochs."""
        return _EpochWriter(self, arm_run_name(arm, seed, repeat))

    def on_run_end(self, run_dir: str | Path) -> None:
        """Arm figures of ``summary.json`` as scalars (tag ``final/<metric>``) and the artifacts' paths as text
        (TensorBoard holds no files)."""
        from ssprop_energy.records import load_summary

        root = self.writer("")
        files = artifacts(run_dir)
        if (Path(run_dir) / "summary.json").is_file():
            summary = load_summary(run_dir)
            lines = []
            for name, arm in summary.arms.items():
                w = self.writer(name)
                w.add_scalar("final/test_accuracy", arm.test_accuracy, 0)
                w.add_scalar(f"final/energy_j_{arm.energy_source}", arm.energy_j, 0)
                w.add_scalar(f"final/co2_g_{arm.energy_source}", arm.co2_g, 0)
                w.add_scalar("final/flops_backward_counted", arm.flops_backward, 0)
                w.flush()
                lines.append(f"| {name} | {arm.test_accuracy:.4f} | {arm.energy_j:.6g} J ({arm.energy_source}) | "
                             f"{arm.co2_g:.6g} g | {arm.flops_backward:.6g} |")
            table = "| arm | test accuracy | energy | CO2e | backward FLOPs (counted) |\n|---|---|---|---|---|\n"
            root.add_text("summary", table + "\n".join(lines))
        root.add_text("artifacts", "\n".join(str(p.resolve()) for p in files) or "none")
        root.flush()

    def close(self, status: str = "complete") -> None:
        """Flush and close every writer; idempotent."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()
