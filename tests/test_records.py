"""records.py: typed round trips, atomic writes, schema version 1 compatibility."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ssprop_energy.errors import RecordError
from ssprop_energy.records import (
    SCHEMA_VERSION,
    ArmRun,
    EnergyComponent,
    EpochRecord,
    add_components,
    load_summary,
    summary_from_dict,
    total_energy,
    write_json_atomic,
    write_text_atomic,
)

V1_RUN = Path(__file__).parent / "data" / "v1_run"


def _arm_run() -> ArmRun:
    return ArmRun(
        arm="ssprop", seed=3, repeat=1, test_accuracy=0.5, test_loss=1.25, best_epoch=1, best_val_accuracy=0.625,
        wall_s=12.5, eval_wall_s=1.5, flops_forward=1e9, flops_backward=1.5e9, flops_backward_conv=1.25e9,
        average_drop_rate=0.4,
        energy_components=[EnergyComponent("cpu", 100.0, "estimated", "EPYC"), EnergyComponent("ram", 20.0, "estimated")],
        epochs=[EpochRecord(0, 0.0, 2.0, 0.25, 1.9, 0.3, 5e8, 1e9, 70.0, 6.0, 1e-3),
                EpochRecord(1, 0.8, 1.5, 0.5, 1.4, 0.625, 5e8, 5e8, 50.0, 6.5, 1e-3)],
        phases={"train": {"energy_j": 120.0, "wall_s": 12.5, "count": 2}},
        interference=[{"seed": 3, "repeat": 1, "epoch": 0, "foreign_cpu_cores_mean": 0.1}],
        trace=[[0.0, "cpu", 50.0, "estimated", "train dense"]],
        layers=[{"layer": "conv1", "type": "Conv2d", "flops_forward": 1.0, "flops_backward": 2.0}],
    )


def test_arm_run_round_trips_through_json(tmp_path: Path) -> None:
    run = _arm_run()
    write_json_atomic(tmp_path / "r.json", run.to_dict())
    back = ArmRun.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert back == run
    assert back.energy_j == 120.0 and back.energy_source == "estimated"


def test_malformed_arm_run_names_the_file() -> None:
    with pytest.raises(RecordError, match="runs/x.json: malformed arm-run record"):
        ArmRun.from_dict({"arm": "dense"}, "runs/x.json")


def test_totals_and_sums_keep_provenance() -> None:
    counter = EnergyComponent("gpu:0", 10.0, "counter")
    est = EnergyComponent("cpu", 5.0, "estimated")
    fake = EnergyComponent("cpu", 1.0, "fake")
    assert total_energy([counter, est]) == (15.0, "mixed")
    assert total_energy([counter, fake]) == (11.0, "fake")  # any synthetic joule makes the total synthetic
    summed = add_components([counter, est], [counter], scale=0.5)
    assert {(c.component, c.energy_j) for c in summed} == {("gpu:0", 10.0), ("cpu", 2.5)}
    with pytest.raises(RecordError, match="unknown source 'guessed'"):
        EnergyComponent("cpu", 1.0, "guessed")


def test_atomic_write_keeps_the_old_file_when_serialising_fails(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_text_atomic(path, '{"old": true}\n')
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind
    mode = path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_version_1_run_directory_loads_into_the_same_types() -> None:
    summary = load_summary(V1_RUN)
    raw = json.loads((V1_RUN / "summary.json").read_text())
    assert raw["schema_version"] == 1 and summary.schema_version == 1 and SCHEMA_VERSION == 2
    assert summary.interleave == "none"
    dense = summary.arms["dense"]
    # version 1 kept evaluation energy twice; the typed record has it once, in phases
    assert dense.eval_energy_j == pytest.approx(raw["arms"]["dense"]["phases"]["eval"]["energy_j"])
    # (version 1 measured the duplicate through snapshots, a second channel: it differs in the 5th digit)
    assert dense.eval_energy_j == pytest.approx(raw["arms"]["dense"]["eval_energy_j"], rel=1e-3)
    assert dense.energy_j == pytest.approx(raw["arms"]["dense"]["energy_j"])
    assert dense.repeats[0].energy_j == pytest.approx(raw["arms"]["dense"]["repeats"][0]["energy_j"])
    stat = summary.arms["ssprop"].paired["wall_s"]
    assert stat.n == 1 and stat.delta_mean == pytest.approx(raw["paired"]["wall_s"]["delta_mean"])
    assert summary.carbon.intensity_g_per_kwh == pytest.approx(raw["carbon"]["intensity_g_per_kwh"])


def test_version_1_run_directory_renders_a_report(tmp_path: Path) -> None:
    from ssprop_energy.report import render_report

    html = render_report([V1_RUN], tmp_path / "report.html").read_text()
    assert "cnn on digits" in html and "arms run one after the other" in html
    assert 'data-warning="synthetic"' not in html  # the v1 fixture used the estimate meter


def test_unknown_schema_version_is_refused() -> None:
    raw = json.loads((V1_RUN / "summary.json").read_text())
    raw["schema_version"] = 99
    with pytest.raises(RecordError, match="unsupported schema_version 99"):
        summary_from_dict(raw, "x/summary.json")


def test_version_2_summary_round_trips(tmp_path: Path) -> None:
    from ssprop_energy.records import write_summary

    summary = load_summary(V1_RUN)
    summary.schema_version = SCHEMA_VERSION
    write_summary(tmp_path, summary)
    again = load_summary(tmp_path)
    assert again == summary


def test_layer_coverage_round_trips_in_arm_runs_and_summaries(tmp_path: Path) -> None:
    from ssprop_energy.layer_coverage import KindCoverage, LayerCoverage
    from ssprop_energy.records import write_summary

    cov = LayerCoverage({"conv": KindCoverage(20, 3.0e8), "linear": KindCoverage(1, 1.0e6)}, flops_backward=4.0e8)
    run = _arm_run()
    run.layer_coverage = cov
    back = ArmRun.from_dict(json.loads(json.dumps(run.to_dict())))
    assert back == run and back.layer_coverage.share == pytest.approx(3.01e8 / 4.0e8)
    # summary.json: the coverage on the ssProp arm, the resolved layer kinds on the run
    summary = load_summary(V1_RUN)
    summary.arms["ssprop"].layer_coverage = cov
    summary.layer_kinds = ["conv", "linear"]
    summary.schema_version = SCHEMA_VERSION
    write_summary(tmp_path, summary)
    raw = json.loads((tmp_path / "summary.json").read_text())
    assert raw["arms"]["ssprop"]["layer_coverage"] == {
        "kinds": {"conv": {"layers": 20, "flops_backward": 3.0e8}, "linear": {"layers": 1, "flops_backward": 1.0e6}},
        "flops_backward": 4.0e8}
    again = load_summary(tmp_path)
    assert again.arms["ssprop"].layer_coverage == cov and again.arms["dense"].layer_coverage is None
    assert again.layer_kinds == ["conv", "linear"]
    raw["arms"]["ssprop"]["layer_coverage"]["kinds"]["conv"]["layers"] = -1
    with pytest.raises(RecordError, match="arms.ssprop: layer_coverage holds a negative"):
        summary_from_dict(raw, "x/summary.json")
    del raw["arms"]["ssprop"]["layer_coverage"]["flops_backward"]
    with pytest.raises(RecordError, match="malformed layer_coverage"):
        summary_from_dict(raw, "x/summary.json")
