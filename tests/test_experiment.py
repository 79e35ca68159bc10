"""The paired dense-vs-ssProp harness: pairing, FLOP accounting, resume, interruption, records."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from experiment_fixtures import N_TRAIN, tiny_config
from experiment_fixtures import run_experiment as run

from ssprop_energy.errors import RunInterrupted
from ssprop_energy.experiment.execute import Executor
from ssprop_energy.experiment.runner import Experiment, ExperimentHooks, load_run_config, prepare_run_dir
from ssprop_energy.records import load_summary, read_csv_rows


def test_arms_are_paired_identical_at_drop_zero(tmp_path: Path) -> None:
    summary = run(tiny_config(tmp_path / "run", drop_rates=[0.0], schedules=["constant"]))
    dense, sparse = summary.arms["dense"], summary.arms["ssprop"]
    # Same initial weights, same data order, same RNG: at drop 0 every loss is bit-identical.
    assert [e.train_loss for e in dense.epochs] == [e.train_loss for e in sparse.epochs]
    assert [e.val_accuracy for e in dense.epochs] == [e.val_accuracy for e in sparse.epochs]
    assert dense.test_accuracy == sparse.test_accuracy
    assert dense.flops_backward == sparse.flops_backward


def _cnn_step_flops_per_sample(keep: int | None, width: int = 128, in_ch: int = 1, hw: int = 64, classes: int = 4):
    """Analytic FLOPs (2 x MACs) of the plain CNN (3 convs, 3x3, pad 1) + linear head, per sample.

    keep: output channels kept in each conv's backward (None: dense). The first conv computes no grad_input
    (the input needs no gradient); bias gradients and non-conv/linear ops are outside the convention.
    """
    k = width if keep is None else keep
    fwd = width * in_ch * 9 * hw + 2 * width * width * 9 * hw + width * classes
    bwd_conv = k * in_ch * 9 * hw + 2 * (2 * k * width * 9 * hw)  # conv1: grad_weight only
    bwd = bwd_conv + 2 * width * classes  # linear: grad_input + grad_weight
    return 2 * fwd, 2 * bwd, 2 * bwd_conv


def test_compare_records_and_flops_follow_the_schedule(tmp_path: Path) -> None:
    run(tiny_config(tmp_path / "run", epochs=4))  # bar 0.8: dense, sparse, dense, sparse
    loaded = load_summary(tmp_path / "run")
    assert loaded.status == "complete" and loaded.schema_version == 2 and loaded.interleave == "slice"
    assert set(loaded.arms) == {"dense", "ssprop"}

    fwd, bwd_dense, conv_dense = _cnn_step_flops_per_sample(None)
    _, bwd_sparse, conv_sparse = _cnn_step_flops_per_sample(int(0.2 * 128))  # k = 25
    dense, sparse = loaded.arms["dense"], loaded.arms["ssprop"]
    assert [e.drop_rate for e in sparse.epochs] == [0.0, 0.8, 0.0, 0.8]
    assert sparse.average_drop_rate == pytest.approx(0.4)
    assert dense.flops_forward == sparse.flops_forward == 4 * N_TRAIN * fwd
    assert dense.flops_backward == 4 * N_TRAIN * bwd_dense
    assert sparse.flops_backward == 2 * N_TRAIN * (bwd_dense + bwd_sparse)
    assert sparse.flops_backward_conv == 2 * N_TRAIN * (conv_dense + conv_sparse)
    # the paper's "~40% fewer conv-backward FLOPs" under bar 0.8 (k = 25 of 128 keeps 19.5%, so slightly more)
    saving = 1 - sparse.flops_backward_conv / dense.flops_backward_conv
    assert saving == pytest.approx(0.5 * (1 - 25 / 128), rel=1e-3)
    assert sparse.paired["flops_backward_conv"].saving_fraction == pytest.approx(saving)

    for arm in (dense, sparse):
        assert arm.energy_j > 0 and arm.energy_components
        assert {c.source for c in arm.energy_components} == {"fake"}
        assert arm.energy_j == pytest.approx(sum(c.energy_j for c in arm.energy_components))
        assert arm.energy_j == pytest.approx(sum(e.energy_j for e in arm.epochs))
        assert arm.co2_g == pytest.approx(arm.energy_j / 3.6e6 * arm.carbon_intensity_g_per_kwh * arm.pue)
        assert arm.wall_s == pytest.approx(sum(e.wall_s for e in arm.epochs))
        assert 0.0 <= arm.test_accuracy <= 1.0
        assert "backward" in arm.phases and arm.phases["backward"]["energy_j"] > 0
    # the fake meter reads a counter GPU and a sampled CPU, both synthetic: the total says fake, never mixed
    assert dense.energy_source == "fake"
    assert "eval" in dense.phases and dense.eval_energy_j == dense.phases["eval"]["energy_j"] > 0

    epochs = read_csv_rows(tmp_path / "run" / "epochs.csv")
    assert len(epochs) == 8 and {r["arm"] for r in epochs} == {"dense", "ssprop"}
    trace = read_csv_rows(tmp_path / "run" / "power_trace.csv")
    assert trace and {r["phase"] for r in trace} & {"train dense", "train drop 0.8", "eval"}
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


class _StopAfter:
    def __init__(self, batches: int) -> None:
        self.left = batches

    def __call__(self) -> bool:
        self.left -= 1
        return self.left < 0


@pytest.mark.parametrize("interleave, finished", [("none", ["dense"]), ("epoch", [])])
def test_resume_ends_with_the_uninterrupted_result(tmp_path: Path, interleave: str, finished: list[str]) -> None:
    straight = run(tiny_config(tmp_path / "a", epochs=3, interleave="none"))

    cfg = tiny_config(tmp_path / "b", epochs=3, interleave=interleave)
    # 4 batches per epoch: stop 2 batches into the 5th epoch trained (sequential: the second arm's second
    # epoch; interleaved dense, ssprop | ssprop, dense | dense...: dense's third epoch)
    with pytest.raises(RunInterrupted):
        run(cfg, ExperimentHooks(stop_requested=_StopAfter(4 * 4 + 2)))
    interrupted = load_summary(tmp_path / "b")
    assert interrupted.status == "interrupted"
    assert list(interrupted.arms) == finished

    resumed_cfg = load_run_config(tmp_path / "b")
    assert resumed_cfg.interleave == interleave
    resumed = Experiment(resumed_cfg, tmp_path / "b").run()
    assert resumed.status == "complete"
    for name in ("dense", "ssprop"):
        a, b = straight.arms[name], resumed.arms[name]
        assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
        assert [e.val_accuracy for e in a.epochs] == [e.val_accuracy for e in b.epochs]
        assert a.test_accuracy == b.test_accuracy
        assert a.flops_backward == b.flops_backward


def test_failure_marks_the_run_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path / "run")
    exp = Experiment(cfg, tmp_path / "run")
    prepare_run_dir(tmp_path / "run")

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Executor, "run_group", boom)
    with pytest.raises(RuntimeError):
        exp.run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "disk on fire" in summary["failure_reason"]


def test_repeats_run_abba_and_give_intervals(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", epochs=2, repeats=2, interleave="none")
    exp = Experiment(cfg, tmp_path / "run")
    order = [(key.arm.name, key.repeat) for key in exp.plan()]
    assert order == [("dense", 0), ("ssprop", 0), ("ssprop", 1), ("dense", 1)]
    prepare_run_dir(tmp_path / "run")
    summary = exp.run()
    stats = summary.paired["energy_j"]
    assert stats.n == 2 and stats.delta_ci is not None
    assert len(summary.arms["ssprop"].repeats) == 2


def test_sweep_shares_one_dense_baseline(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", kind="sweep", drop_rates=[0.4, 0.8], schedules=["constant"], epochs=1)
    assert [a.name for a in cfg.arms()] == ["dense", "constant-d0.4", "constant-d0.8"]
    summary = run(cfg)
    b04, b08 = summary.arms["constant-d0.4"], summary.arms["constant-d0.8"]
    assert summary.arms["dense"].flops_backward > b04.flops_backward > b08.flops_backward
    assert b08.paired["flops_backward"].saving_fraction > b04.paired["flops_backward"].saving_fraction > 0


def test_stop_flag_catches_sigterm() -> None:
    from ssprop_energy.cli._experiment import StopFlag

    with StopFlag() as stop:
        assert not stop()
        # the first signal stops whatever runs at once (KeyboardInterrupt), and sets the polled flag
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between bytecodes, at the latest here
                pass
        assert stop()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_eval_noise_is_reported_per_level(tmp_path: Path) -> None:
    summary = run(tiny_config(tmp_path / "run", epochs=1, schedules=["constant"], eval_noise=[0.1, 5.0]))
    for arm in summary.arms.values():
        assert set(arm.noise_accuracy) == {"0.1", "5"}
        assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in arm.noise_accuracy.values())


def test_iteration_schedule_flops_follow_each_batch(tmp_path: Path) -> None:
    # bar by iteration with period 2: batches alternate dense, 0.8, dense, 0.8 (32 samples each)
    summary = run(tiny_config(tmp_path / "run", epochs=1, schedule_by="iteration", period=2))
    sparse = summary.arms["ssprop"]
    _, bwd_dense, _ = _cnn_step_flops_per_sample(None)
    _, bwd_sparse, _ = _cnn_step_flops_per_sample(25)
    assert sparse.epochs[0].drop_rate == pytest.approx(0.4)
    assert sparse.flops_backward == 64 * bwd_dense + 64 * bwd_sparse
    assert sparse.average_drop_rate == pytest.approx(0.4)
