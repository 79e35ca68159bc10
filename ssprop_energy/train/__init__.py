"""The training loop: optimiser, drop-rate schedule stepping, FLOP and energy metering, checkpoints."""

from ssprop_energy.train.callbacks import Callback
from ssprop_energy.train.device import resolve_device
from ssprop_energy.train.loop import EpochResult, TrainConfig, Trainer

__all__ = ["Callback", "EpochResult", "TrainConfig", "Trainer", "resolve_device"]
