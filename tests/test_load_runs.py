"""``ssprop_energy.load_runs``: one row per arm-run, values equal to the record's per-repeat figures, units in
the column names, errors naming the path, and no torch import."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from report_fixtures import compare_run, sweep_run

import ssprop_energy
from ssprop_energy.errors import RecordError
from ssprop_energy.records import load_summary
from ssprop_energy.runs import RUN_COLUMNS


def test_one_row_per_arm_and_repeat_with_the_records_figures(tmp_path):
    compare_run(tmp_path / "a", repeats=3)
    frame = ssprop_energy.load_runs([tmp_path / "a"])
    assert list(frame.columns) == RUN_COLUMNS
    assert len(frame) == 2 * 3
    summary = load_summary(tmp_path / "a")
    for name, arm in summary.arms.items():
        rows = frame[frame["arm"] == name].sort_values("repeat")
        assert rows["energy_j"].tolist() == [r.energy_j for r in arm.repeats]
        assert rows["co2_g"].tolist() == [r.co2_g for r in arm.repeats]
        assert rows["seed"].tolist() == [r.seed for r in arm.repeats]
        # The arm's record is the mean of its repeats: the frame must give it back.
        assert rows["energy_j"].mean() == pytest.approx(arm.energy_j)
        assert (rows["flops_total"] == rows["flops_forward"] + rows["flops_backward"]).all()
        assert (rows["is_baseline"] == (name == "dense")).all()
        assert set(rows["energy_source"]) == {arm.energy_source}
        # this fixture's records predate the per-run evaluation energy: 3 runs' mean is no run's figure
        assert rows["eval_energy_j"].isna().all()
    assert set(frame["model"]) == {"resnet18"}


def test_folder_of_runs_and_several_paths(tmp_path):
    compare_run(tmp_path / "runs" / "r1", repeats=2)
    sweep_run(tmp_path / "runs" / "r2", repeats=2)
    frame = ssprop_energy.load_runs(tmp_path / "runs")
    assert sorted(set(frame["run_kind"])) == ["compare", "sweep"]
    assert len(frame) == 2 * 2 + 5 * 2
    both = ssprop_energy.load_runs([tmp_path / "runs" / "r1", tmp_path / "runs" / "r2"])
    assert len(both) == len(frame)


def test_record_without_repeats_gives_its_averages(tmp_path):
    compare_run(tmp_path / "a", repeats=1)
    path = tmp_path / "a" / "summary.json"
    data = json.loads(path.read_text())
    for arm in data["arms"].values():
        arm["repeats"] = []
    path.write_text(json.dumps(data))
    frame = ssprop_energy.load_runs(tmp_path / "a")
    assert len(frame) == 2
    assert frame["seed"].isna().all()
    assert frame.set_index("arm")["energy_j"]["ssprop"] == data["arms"]["ssprop"]["energy_j"]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(RecordError, match="nowhere"):
        ssprop_energy.load_runs([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordError, match="empty"):
        ssprop_energy.load_runs([tmp_path / "empty"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(RecordError, match="summary.json"):
        ssprop_energy.load_runs([bad])


def test_load_runs_does_not_import_torch(tmp_path):
    compare_run(tmp_path / "a", repeats=1)
    code = ("import sys, ssprop_energy; f = ssprop_energy.load_runs([sys.argv[1]]); "
            "assert len(f) == 2; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], check=True)


V1_RUN = Path(__file__).parent / "data" / "v1_run"


def test_a_version_1_run_dir_loads_with_its_own_figures():
    """A run directory written before the typed records (schema 1): every figure comes from its own JSON."""
    raw = json.loads((V1_RUN / "summary.json").read_text())
    assert raw["schema_version"] == 1
    frame = ssprop_energy.load_runs(V1_RUN)
    assert list(frame.columns) == RUN_COLUMNS and len(frame) == 2
    for _, row in frame.iterrows():
        arm = raw["arms"][row["arm"]]
        [rep] = arm["repeats"]
        for col in ("energy_j", "co2_g", "eval_energy_j", "wall_s", "test_accuracy", "flops_backward"):
            assert row[col] == rep[col], col
        assert row["flops_total"] == rep["flops_forward"] + rep["flops_backward"]
        assert row["energy_source"] == arm["energy_source"] == "estimated"
        assert (row["seed"], row["repeat"]) == (rep["seed"], rep["repeat"])
    assert set(frame["schema_version"]) == {1} and set(frame["interleave"]) == {"none"}
    assert set(frame["layer_kinds"]) == {"conv"}  # version 1 named its layers in the config
    by_arm = frame.set_index("arm")
    assert by_arm.loc["dense", "sparsified_layers"] == 0 and by_arm.loc["dense", "sparsified_backward_share"] == 0
    assert math.isnan(by_arm.loc["ssprop", "sparsified_layers"])  # not recorded then: unknown, not zero


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real compare (cnn on synthetic data, fake meter, default layers), written by the harness."""
    from ssprop_energy.experiment.config import ExperimentConfig
    from ssprop_energy.experiment.runner import Experiment, ExperimentHooks, prepare_run_dir

    out = tmp_path_factory.mktemp("real") / "run"
    cfg = ExperimentConfig(kind="compare", model="cnn", dataset="synthetic:1x8x8:4:64", epochs=2, batch_size=32,
                           meter="fake", sample_period_s=0.05, out=str(out), seeds=[0, 1])
    cfg.validate()
    prepare_run_dir(out)
    Experiment(cfg, out, ExperimentHooks(ledger=False)).run()
    return out


def test_a_real_run_gives_one_row_per_arm_run_with_its_own_record(real_run):
    frame = ssprop_energy.load_runs(real_run)
    assert len(frame) == 2 * 2 and set(frame["schema_version"]) == {2}
    for _, row in frame.iterrows():
        run = json.loads((real_run / "runs" / f"{row['arm']}__s{row['seed']}__r{row['repeat']}.json").read_text())
        assert row["flops_backward"] == run["flops_backward"]
        assert row["eval_energy_j"] == pytest.approx(run["phases"]["eval"]["energy_j"], rel=1e-12)
        assert row["energy_source"] == {c["source"] for c in run["energy_components"]}.pop() == "fake"
    layers = [r for r in csv.DictReader((real_run / "layers.csv").open()) if r["arm"] == "dense"]
    conv = sum(float(r["flops_backward"]) for r in layers if r["type"] == "Conv2d")
    total = sum(float(r["flops_backward"]) for r in layers)
    sparse = frame[frame["arm"] == "ssprop"]
    assert set(sparse["layer_kinds"]) == {"conv"} and set(sparse["sparsified_layers"]) == {3}  # cnn: 3 convs
    assert sparse["sparsified_backward_share"].tolist() == pytest.approx([conv / total] * 2, rel=1e-12)
    dense = frame[frame["is_baseline"]]
    assert (dense["sparsified_layers"] == 0).all() and (dense["sparsified_backward_share"] == 0).all()


def test_the_readme_example_runs(real_run, tmp_path, monkeypatch):
    """The README's three-line example, verbatim, on a runs/ folder holding a version-1 and a new run."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Your own model, data and run table"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 3
    shutil.copytree(V1_RUN, tmp_path / "runs" / "v1")
    shutil.copytree(real_run, tmp_path / "runs" / "new")
    monkeypatch.chdir(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}).stdout
    assert "energy_j" in out and "ssprop" in out and "estimated" in out and "fake" in out
