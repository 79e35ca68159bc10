"""Interleaved arms, single-run intervals, interference in the record, the ledger hook, fake provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from experiment_fixtures import run_experiment, tiny_config

from ssprop_energy.energy.interference import InterferenceReading
from ssprop_energy.experiment.config import ExperimentConfig
from ssprop_energy.experiment.plan import epoch_order, plan_groups
from ssprop_energy.experiment.runner import ExperimentHooks
from ssprop_energy.experiment.stats import epoch_interval
from ssprop_energy.records import WITHIN_RUN_LABEL, load_summary, read_csv_rows


def tiny(out: Path, **overrides: Any) -> ExperimentConfig:
    return tiny_config(out, **{"epochs": 3, **overrides})


def run(cfg: ExperimentConfig, hooks: ExperimentHooks | None = None):
    return run_experiment(cfg, hooks or ExperimentHooks(monitor=None))


# ------------------------------------------------------------------------------------------ plan


def test_epoch_interleave_is_one_group_per_pair_in_abba_order(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, repeats=2)
    groups = plan_groups(cfg)
    assert [[k.arm.name for k in g.runs] for g in groups] == [["dense", "ssprop"], ["dense", "ssprop"]]
    assert [[k.arm.name for k in epoch_order(groups[0], e)] for e in range(4)] == [
        ["dense", "ssprop"], ["ssprop", "dense"], ["dense", "ssprop"], ["ssprop", "dense"]]
    # the second pair starts with the other arm, so neither arm always leads
    assert [k.arm.name for k in epoch_order(groups[1], 0)] == ["ssprop", "dense"]
    sequential = plan_groups(tiny(tmp_path, repeats=2, interleave="none"))
    assert [[k.arm.name for k in g.runs] for g in sequential] == [["dense"], ["ssprop"], ["ssprop"], ["dense"]]


def test_unknown_interleave_is_refused_in_domain_words(tmp_path: Path) -> None:
    from ssprop_energy.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown interleave 'abab'; choose from slice, epoch, none"):
        tiny(tmp_path, interleave="abab")


# ------------------------------------------------------------------------------------------ bit identity


@pytest.mark.parametrize("interleave", ["slice", "epoch"])
def test_interleaved_arms_are_bit_identical_to_sequential(tmp_path: Path, interleave: str) -> None:
    """Each arm keeps its own model, optimizer, RNG streams and data order: alternating the arms' slices or
    epochs in time changes nothing they compute (==, not approx)."""
    kw = dict(epochs=3, drop_rates=[0.8], schedules=["bar"], selection="random", dropouts=[0.2])
    inter = run(tiny(tmp_path / "inter", interleave=interleave, slice_batches=1, **kw))
    seq = run(tiny(tmp_path / "seq", interleave="none", **kw))
    assert inter.interleave == interleave and seq.interleave == "none"
    if interleave == "slice":  # one batch per slice: the arms really took turns inside every epoch
        runs = json.loads((tmp_path / "inter" / "runs" / "ssprop__s0__r0.json").read_text())
        first = [s for s in runs["slices"] if s["epoch"] == 0]
        assert len(first) > 1 and all(s["batches"] == 1 for s in first)
        assert [s["index"] for s in first] == list(range(len(first)))
        assert inter.measurement.slice_batches == 1
    fields = ("drop_rate", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "flops_forward",
              "flops_backward", "lr")
    for name in ("dense", "ssprop"):
        a, b = inter.arms[name], seq.arms[name]
        for f in fields:
            assert [getattr(e, f) for e in a.epochs] == [getattr(e, f) for e in b.epochs], (name, f)
        assert a.test_accuracy == b.test_accuracy and a.test_loss == b.test_loss
        assert a.best_epoch == b.best_epoch
        assert (a.flops_forward, a.flops_backward, a.flops_backward_conv) == (
            b.flops_forward, b.flops_backward, b.flops_backward_conv)
    # and the arms really differ (random selection + dropout consume the RNG): the test could fail
    assert inter.arms["dense"].epochs[1].train_loss != inter.arms["ssprop"].epochs[1].train_loss


# ------------------------------------------------------------------------------------------ single-run interval


def test_epoch_interval_against_hand_computed_values() -> None:
    # two phases; within each, the arm/base ratio is constant, so every resample gives the same total ratio
    base = [10.0, 20.0, 10.0, 20.0]
    arm = [10.0, 10.0, 10.0, 10.0]  # dense-phase epochs equal, sparse-phase epochs half
    iv = epoch_interval("wall_s", base, arm, ["0", "0.8", "0", "0.8"])
    assert iv is not None and iv.change == pytest.approx(40.0 / 60.0 - 1.0)
    assert iv.ci == pytest.approx((40.0 / 60.0 - 1.0, 40.0 / 60.0 - 1.0))
    assert iv.phases == {"0": 2, "0.8": 2} and iv.label == WITHIN_RUN_LABEL
    # noise within a phase widens the interval around the point estimate
    noisy = epoch_interval("wall_s", base, [9.0, 10.0, 11.0, 12.0], ["0", "0.8", "0", "0.8"])
    assert noisy.ci[0] < noisy.change < noisy.ci[1]
    # stratification keeps the mix: a resample never draws only sparse epochs, so the interval stays
    # inside the range of the two per-phase ratios
    assert -0.5 <= noisy.ci[0] and noisy.ci[1] <= 0.2
    # one epoch per phase: no interval, but the point estimate stands
    single = epoch_interval("wall_s", [10.0, 20.0], [10.0, 10.0], ["0", "0.8"])
    assert single.ci is None and single.change == pytest.approx(-1 / 3)


def test_single_run_interval_is_in_the_summary_and_matches_the_epochs(tmp_path: Path) -> None:
    summary = run(tiny(tmp_path / "run", epochs=4))
    sparse, dense = summary.arms["ssprop"], summary.arms["dense"]
    for metric in ("wall_s", "energy_j"):
        iv = sparse.epoch_intervals[metric]
        expected = sum(getattr(e, metric) for e in sparse.epochs) / sum(getattr(e, metric) for e in dense.epochs) - 1
        assert iv.change == pytest.approx(expected, rel=1e-12)
        assert iv.n_epochs == 4 and iv.phases == {"0": 2, "0.8": 2} and iv.ci is not None
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["arms"]["ssprop"]["epoch_intervals"]["wall_s"]["label"] == WITHIN_RUN_LABEL


# ------------------------------------------------------------------------------------------ interference


def _Reading(foreign_cores: float) -> InterferenceReading:  # noqa: N802 - reads like the class it builds
    return InterferenceReading(wall_s=1.0, foreign_cpu_cores_mean=foreign_cores,
                               foreign_cpu_cores_max=foreign_cores + 0.5, own_cpu_cores_mean=1.0,
                               cpu_freq_mhz_mean=None, load_avg_1m=None, n_samples=4, source="procfs")


class _ScriptedMonitor:
    """Reports a busy machine (1.5 foreign cores) for the 4th epoch window it measures, quiet otherwise."""

    def __init__(self) -> None:
        self.windows = 0
        self.started = self.stopped = False

    def start(self) -> _ScriptedMonitor:
        self.started = True
        return self

    def stop(self) -> None:
        self.stopped = True

    def begin(self) -> int:
        self.windows += 1
        return self.windows

    def end(self, token: int) -> _Reading:
        return _Reading(1.5 if token == 4 else 0.0)


def test_interference_is_stored_per_arm_epoch_and_flagged(tmp_path: Path) -> None:
    monitor = _ScriptedMonitor()
    # interleaved, 2 epochs: windows are dense e1, ssprop e1, ssprop e2, dense e2 -> the 4th is dense's e2
    summary = run(tiny(tmp_path / "run", epochs=2), ExperimentHooks(monitor=lambda device: monitor))
    assert monitor.started and monitor.stopped
    dense, sparse = summary.arms["dense"].interference, summary.arms["ssprop"].interference
    assert [e["foreign_cpu_cores_mean"] for e in dense.epochs] == [0.0, 1.5]
    assert dense.affected_epochs == ["s0r0e2"] and dense.foreign_cpu_cores_mean == pytest.approx(0.75)
    assert dense.foreign_cpu_cores_max == pytest.approx(2.0)
    # the ssProp arm was quiet, but its epoch 2 saw a different machine than dense's epoch 2: flagged too
    assert sparse.affected_epochs == ["s0r0e2"] and sparse.foreign_cpu_cores_mean == pytest.approx(0.0)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["arms"]["dense"]["interference"]["epochs"][1]["foreign_cpu_cores_mean"] == 1.5

    from ssprop_energy.cli._experiment import interference_warnings

    lines = interference_warnings(summary)
    assert len(lines) == 2 and all("seed 0, epoch 2" in line for line in lines)

    from ssprop_energy.report import render_report

    html = render_report([tmp_path / "run"], tmp_path / "report.html").read_text()
    assert 'data-warning="interference"' in html
    assert ('class="badge interference" data-interference="dense (seed 0, epoch 2), ssprop (seed 0, epoch 2)"'
            in html)
    md = render_report([tmp_path / "run"], tmp_path / "report.md", fmt="md").read_text()
    assert "Busy machine" in md and "dense (seed 0, epoch 2)" in md
    # the headline is the clean-pair estimate (epoch pairs here: each epoch is one slice of this tiny data);
    # the scripted readings' peaks (0.5 core) leave no clean pair, so no saving is claimed anywhere
    assert summary.arms["ssprop"].headline["wall_s"].verdict == "inconclusive"
    assert "| Time saved | inconclusive |" in md and "no clean pair in phase(s) drop 0.0, 0.8" in md
    assert "no clean pair" in html and ">inconclusive<" in html


def test_quiet_run_has_no_badge(tmp_path: Path) -> None:
    class Quiet(_ScriptedMonitor):
        def end(self, token: int) -> _Reading:
            return _Reading(0.1)

    summary = run(tiny(tmp_path / "run", epochs=1, schedules=["constant"]),
                  ExperimentHooks(monitor=lambda device: Quiet()))
    assert all(not a.interference.affected_epochs for a in summary.arms.values())
    from ssprop_energy.report import render_report

    html = render_report([tmp_path / "run"], tmp_path / "report.html").read_text()
    assert 'class="badge interference"' not in html and 'data-warning="interference"' not in html


# ------------------------------------------------------------------------------------------ ledger and fake


def test_python_experiment_records_a_ledger_row_with_fake_energy(tmp_path: Path) -> None:
    from ssprop_energy.ledger import load_entries

    summary = run(tiny(tmp_path / "run", epochs=1, schedules=["constant"]))
    rows = load_entries()
    assert len(rows) == 1
    row = rows.iloc[0]
    assert row["kind"] == "compare" and row["status"] == "complete" and row["energy_source"] == "fake"
    assert row["run_dir"] == str(tmp_path / "run")
    # the ledger charges all that the meters saw: at least both arms' training and evaluation windows
    windows_j = sum(a.energy_j + a.eval_energy_j for a in summary.arms.values())
    assert row["energy_j"] >= windows_j * (1 - 1e-9)


def test_ledger_opt_out(tmp_path: Path) -> None:
    from ssprop_energy.ledger import load_entries

    run(tiny(tmp_path / "run", epochs=1, schedules=["constant"]), ExperimentHooks(monitor=None, ledger=False))
    assert not Path(os.environ["SSPROP_ENERGY_LEDGER"]).exists() or len(load_entries()) == 0


def test_fake_meter_is_fake_everywhere(tmp_path: Path) -> None:
    run(tiny(tmp_path / "run", epochs=1, schedules=["constant"]))
    text = (tmp_path / "run" / "summary.json").read_text()
    data = json.loads(text)
    sources = {c["source"] for a in data["arms"].values() for c in a["energy_components"]}
    assert sources == {"fake"} and {a["energy_source"] for a in data["arms"].values()} == {"fake"}
    for word in ('"counter"', '"sampled"', '"mixed"'):
        assert word not in text
    assert {r["source"] for r in read_csv_rows(tmp_path / "run" / "power_trace.csv")} == {"fake"}
    from ssprop_energy.report import render_report

    html = render_report([tmp_path / "run"], tmp_path / "report.html").read_text()
    assert 'data-warning="synthetic"' in html and "SYNTHETIC" in html
    md = render_report([tmp_path / "run"], tmp_path / "report.md", fmt="md").read_text()
    assert "SYNTHETIC" in md
    assert "read from hardware energy counters" not in html


def test_energy_is_the_sum_of_epoch_windows_per_arm(tmp_path: Path) -> None:
    """With a shared meter, each arm's energy is its own windows: the arms' training energies plus their
    evaluation energies never exceed what the meter measured in total."""
    summary = run(tiny(tmp_path / "run", epochs=2))
    for arm in summary.arms.values():
        assert arm.energy_j == pytest.approx(sum(e.energy_j for e in arm.epochs), rel=1e-9)
        assert arm.phases["train"]["energy_j"] == pytest.approx(arm.energy_j, rel=1e-9)
        nested = sum(arm.phases[p]["energy_j"] for p in ("data", "forward", "backward", "optimizer"))
        assert nested <= arm.phases["train"]["energy_j"] * (1 + 1e-9)
        assert arm.unattributed_energy_j == pytest.approx(arm.phases["train"]["energy_j"] - nested, abs=1e-9)
        assert arm.phases["eval"]["count"] == 2 + 1  # validation each epoch and the final test
    loaded = load_summary(tmp_path / "run")
    assert np.isclose(loaded.arms["dense"].energy_j, summary.arms["dense"].energy_j)
