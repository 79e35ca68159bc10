"""train/: the trainer, checkpoint round trip, optimizers, device choice, and energy from meter windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssprop_energy.data import load_dataset
from ssprop_energy.energy import Constant, FakeChannel, open_meter
from ssprop_energy.errors import ConfigError, RunInterrupted
from ssprop_energy.models import get_model
from ssprop_energy.train import TrainConfig, Trainer, resolve_device
from ssprop_energy.train.checkpoint import load_checkpoint, save_checkpoint
from ssprop_energy.train.loop import epoch_seed
from ssprop_energy.train.optim import make_lr_schedule, make_optimizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic:1x8x8:4:96", seed=0)


def _model(data, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return get_model("cnn", num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=32, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_fit_trains_and_reports_epochs(data) -> None:
    trainer = Trainer(_model(data), data, _cfg(), CPU)
    result = trainer.fit()
    assert [e.epoch for e in result.epochs] == [0, 1]
    assert all(0.0 <= e.val_accuracy <= 1.0 for e in result.epochs)
    assert result.epochs[1].train_loss < result.epochs[0].train_loss  # Adam on 3 batches learns something
    assert result.best_epoch in (0, 1) and result.best_val_accuracy == max(e.val_accuracy for e in result.epochs)
    assert result.train_wall_s == pytest.approx(sum(e.wall_s for e in result.epochs))
    assert result.energy_components == [] and result.flops_backward == 0.0  # no meter, no FLOP counts


def test_two_trainers_with_the_same_seed_agree_bit_for_bit(data) -> None:
    a = Trainer(_model(data), data, _cfg(), CPU).fit()
    b = Trainer(_model(data), data, _cfg(), CPU).fit()
    assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
    assert epoch_seed(1, 2) != epoch_seed(2, 1)


def test_epoch_energy_comes_from_the_meter_windows(data) -> None:
    t = [0.0]

    def clock() -> float:
        t[0] += 0.001  # every clock read advances 1 ms: windows have a known, deterministic length
        return t[0]

    meter = open_meter("fake", clock=clock, background=False, sync=None,
                       fake_channels=[FakeChannel("cpu", Constant(100.0), counter=True)])
    meter.start()
    trainer = Trainer(_model(data), data, _cfg(epochs=1), CPU, meter=meter, scope="dense__s0__r0")
    result = trainer.fit()
    report = meter.stop()
    # 100 W constant: each window's energy is 100 W x its clock length, so the epoch's training energy is
    # exactly 100 x the train window's wall time on the meter clock
    train = report.windows["train"]
    assert result.epochs[0].energy_j == pytest.approx(100.0 * train["wall_s"], rel=1e-9)
    assert result.phases["train"]["energy_j"] == pytest.approx(result.epochs[0].energy_j, rel=1e-9)
    assert result.phases["eval"]["count"] == 2  # one validation, one final test
    assert [c.source for c in result.energy_components] == ["fake"]
    assert sum(c.energy_j for c in result.energy_components) == pytest.approx(result.epochs[0].energy_j)


class _StopAfter:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self) -> bool:
        self.n -= 1
        return self.n < 0


def test_checkpoint_resume_equals_a_straight_run(data, tmp_path: Path) -> None:
    straight = Trainer(_model(data), data, _cfg(epochs=3), CPU).fit()
    ckpt = tmp_path / "c.pt"
    with pytest.raises(RunInterrupted):
        Trainer(_model(data), data, _cfg(epochs=3), CPU, checkpoint_path=ckpt, stop_requested=_StopAfter(3 + 1)).fit()
    assert load_checkpoint(ckpt, CPU)["state"]["next_epoch"] == 1
    resumed = Trainer(_model(data, seed=99), data, _cfg(epochs=3), CPU, checkpoint_path=ckpt).fit()
    assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in straight.epochs]
    assert resumed.test_accuracy == straight.test_accuracy


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    payload = {"model": {"w": torch.arange(4.0)}, "state": {"next_epoch": 2, "epochs": [{"epoch": 0}]}}
    save_checkpoint(tmp_path / "x.pt", payload)
    back = load_checkpoint(tmp_path / "x.pt", CPU)
    assert torch.equal(back["model"]["w"], payload["model"]["w"]) and back["state"] == payload["state"]


@pytest.mark.parametrize("name, cls, lr", [("adam", torch.optim.Adam, 1e-3), ("adamw", torch.optim.AdamW, 2e-4),
                                            ("sgd", torch.optim.SGD, 0.1)])
def test_optimizers(name: str, cls: type, lr: float) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer(name, [p], lr, weight_decay=0.01)
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == lr
    assert opt.param_groups[0]["weight_decay"] == 0.01
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'"):
        make_optimizer("lamb", [p], lr)


def test_cosine_lr_schedule_reaches_zero_at_the_end() -> None:
    opt = make_optimizer("sgd", [torch.nn.Parameter(torch.ones(1))], 1.0)
    sched = make_lr_schedule("cosine", opt, 4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert make_lr_schedule("none", opt, 4) is None


def test_device_choice() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")
