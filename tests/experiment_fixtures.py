"""The tiny experiment the runner tests share: a real training run of the paper's plain CNN in under a second."""

from __future__ import annotations

from pathlib import Path

from ssprop_energy.experiment.config import ExperimentConfig
from ssprop_energy.experiment.runner import Experiment, ExperimentHooks
from ssprop_energy.records import RunSummary

# 128 random 1x8x8 images in 4 classes: per epoch a few batches, every mechanism exercised without waiting for
# learning
DATASET = "synthetic:1x8x8:4:128"
N_TRAIN = 128


def tiny_config(out: Path, epochs: int = 2, **overrides: object) -> ExperimentConfig:
    """A validated compare config on :data:`DATASET` with the fake meter, writing to ``out``."""
    cfg = ExperimentConfig(kind="compare", model="cnn", dataset=DATASET, epochs=epochs, batch_size=32,
                           meter="fake", sample_period_s=0.05, out=str(out))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def run_experiment(cfg: ExperimentConfig, hooks: ExperimentHooks | None = None) -> RunSummary:
    """Run ``cfg`` into ``cfg.out`` (a new run directory, made by the run itself)."""
    return Experiment(cfg, Path(cfg.out), hooks).run()
