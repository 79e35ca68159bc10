"""``ssprop_energy.load_runs``: one row per arm-run, values equal to the record's per-repeat figures, units in
the column names, errors naming the path, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import ssprop_energy
from ssprop_energy.errors import RecordError
from ssprop_energy.records import load_summary
from ssprop_energy.runs import RUN_COLUMNS

from report_fixtures import compare_run, sweep_run


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
