"""Diverged training (loss NaN/inf): marked with its epoch, left out of means and pairs, the run finishes,
the report renders, and a NaN saved as null loads back for --resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ssprop_energy.cli import main
from ssprop_energy.experiment.config import ArmSpec, ExperimentConfig
from ssprop_energy.experiment.runner import Experiment, ExperimentHooks, prepare_run_dir
from ssprop_energy.experiment.summarize import summarize_arms
from ssprop_energy.records import ArmRun, CarbonBlock, EnergyComponent, EpochRecord, load_summary, write_json_atomic

MLP = ["--model", "mlp", "--layers", "linear", "--dataset", "synthetic:1x8x8:4:128", "--batch-size", "32",
       "--meter", "fake", "--quiet"]


def _run(seed: int, acc: float, energy_j: float, losses: list[float], arm: str = "dense") -> ArmRun:
    epochs = [EpochRecord(epoch=i, drop_rate=0.0, train_loss=loss, train_accuracy=acc, val_loss=loss,
                          val_accuracy=acc, flops_forward=1.0, flops_backward=2.0, energy_j=energy_j / len(losses),
                          wall_s=1.0) for i, loss in enumerate(losses)]
    run = ArmRun(arm=arm, seed=seed, repeat=0, test_accuracy=acc, test_loss=losses[-1], best_epoch=0,
                 best_val_accuracy=acc, wall_s=float(len(losses)), eval_wall_s=0.1, flops_forward=1.0,
                 flops_backward=2.0, flops_backward_conv=0.0, average_drop_rate=0.0,
                 energy_components=[EnergyComponent("cpu", energy_j, "fake", "Fake CPU")], epochs=epochs)
    # what the executor records, through the same rule
    from ssprop_energy.records import diverged_epoch

    run.diverged_epoch = diverged_epoch(run.epochs, run.test_loss)
    return run


def test_nan_saved_as_null_loads_back_and_names_the_epoch(tmp_path: Path) -> None:
    run = _run(0, 0.25, 10.0, [1.0, math.nan, math.inf])
    assert run.diverged_epoch == 1
    path = write_json_atomic(tmp_path / "r.json", run.to_dict())
    data = json.loads(path.read_text())
    assert data["epochs"][1]["train_loss"] is None and data["test_loss"] is None
    del data["diverged_epoch"]  # a record written before the field existed: derived from the losses
    loaded = ArmRun.from_dict(data)
    assert math.isnan(loaded.epochs[1].train_loss) and math.isnan(loaded.test_loss)
    assert loaded.diverged_epoch == 1


def test_diverged_runs_are_left_out_of_means_and_pairs() -> None:
    carbon = CarbonBlock(intensity_g_per_kwh=100.0, source="test")
    specs = {"dense": ArmSpec("dense", False), "ssprop": ArmSpec("ssprop", True, 0.8, "constant")}
    by_arm = {
        "dense": [_run(0, 0.50, 10.0, [1.0, 0.5]), _run(1, 0.60, 12.0, [1.0, 0.4]), _run(2, 0.9, 99.0, [1.0, math.nan])],
        "ssprop": [_run(0, 0.40, 6.0, [1.0, 0.6], "ssprop"), _run(1, 0.45, 8.0, [1.0, 0.5], "ssprop"),
                   _run(2, 0.30, 7.0, [1.0, 0.7], "ssprop")],
    }
    arms = summarize_arms(specs, by_arm, carbon, {}, complete=True)
    dense, sparse = arms["dense"], arms["ssprop"]
    assert dense.status == "complete" and dense.diverged_runs == ["s2r0e2"]
    assert dense.test_accuracy == pytest.approx(0.55) and dense.energy_j == pytest.approx(11.0)
    assert sparse.diverged_runs == [] and sparse.test_accuracy == pytest.approx((0.40 + 0.45 + 0.30) / 3)
    # seed 2's pair is dropped for both arms: the pairs are seeds 0 and 1 only
    energy = sparse.paired["energy_j"]
    assert energy.n == 2 and energy.baseline_mean == pytest.approx(11.0) and energy.arm_mean == pytest.approx(7.0)
    assert energy.saving_fraction == pytest.approx(1 - 7.0 / 11.0)
    assert sparse.epoch_intervals["energy_j"].n_epochs == 4


def test_an_arm_whose_every_run_diverged_has_no_accuracy_and_no_pairs() -> None:
    carbon = CarbonBlock(intensity_g_per_kwh=100.0, source="test")
    specs = {"dense": ArmSpec("dense", False), "ssprop": ArmSpec("ssprop", True, 0.8, "constant")}
    by_arm = {"dense": [_run(0, 0.5, 10.0, [1.0, 0.5])], "ssprop": [_run(0, 0.1, 6.0, [math.inf, math.nan], "ssprop")]}
    arms = summarize_arms(specs, by_arm, carbon, {}, complete=True)
    sparse = arms["ssprop"]
    assert sparse.status == "diverged" and sparse.diverged_runs == ["s0r0e1"]
    assert math.isnan(sparse.test_accuracy) and sparse.paired == {} and sparse.epoch_intervals == {}
    assert sparse.energy_j == pytest.approx(6.0)  # what it spent is still what it spent


def test_a_diverging_compare_finishes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["compare", *MLP, "--epochs", "2", "--optimizer", "sgd", "--lr", "1e6", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    assert "diverged" in captured.out and "every run diverged" in captured.out
    summary = load_summary(out)
    assert summary.status == "complete"
    for arm in summary.arms.values():
        assert arm.status == "diverged" and arm.diverged_runs == ["s0r0e1"] and math.isnan(arm.test_accuracy)
    assert (out / "report.html").exists()
    assert main(["report", str(out), "-o", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "every run diverged (s0r0e1)" in md
    assert "| diverged |" in md


def test_resume_after_an_interrupt_with_a_nan_in_a_finished_arm_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = ExperimentConfig(model="mlp", layers=["linear"], dataset="synthetic:1x8x8:4:128", epochs=2, batch_size=32,
                           meter="fake", optimizer="sgd", lr=1e6, interleave="none", out=str(out))
    cfg.validate()
    dense_record = out / "runs" / "dense__s0__r0.json"
    # stop as soon as the first (dense) arm-run's record is saved: the next arm-run's first batch stops
    hooks = ExperimentHooks(monitor=None, ledger=False, stop_requested=lambda: dense_record.exists())
    prepare_run_dir(out)
    from ssprop_energy.errors import RunInterrupted

    with pytest.raises(RunInterrupted):
        Experiment(cfg, out, hooks).run()
    assert load_summary(out).status == "interrupted"
    assert json.loads(dense_record.read_text())["test_loss"] is None  # NaN saved as null
    summary = Experiment(cfg, out, ExperimentHooks(monitor=None, ledger=False)).run()
    assert summary.status == "complete" and summary.arms["dense"].status == "diverged"
