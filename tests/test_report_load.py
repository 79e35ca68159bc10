"""Reading run directories for the report: validation, errors naming the file, paired statistics."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import report_fixtures as fx

from ssprop_energy.errors import RecordError
from ssprop_energy.report.load import load_run, load_run_dirs


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compare") / "run"
    fx.compare_run(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_report_package_never_imports_torch() -> None:
    code = (
        "import sys, ssprop_energy.report, ssprop_energy.report.html, ssprop_energy.report.markdown, "
        "ssprop_energy.cli.report; assert 'torch' not in sys.modules, 'torch imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_loads_every_file_with_types(compare_dir: Path) -> None:
    run = load_run(compare_dir)
    assert set(run.arms) == {"dense", "ssprop"}
    assert run.baseline_name == "dense" and run.sparse_arm_names == ["ssprop"]
    assert len(run.epochs) == 2 * 3 * 6  # arms x repeats x epochs
    assert run.epochs["val_accuracy"].dtype == float and run.epochs["epoch"].dtype == int
    assert set(run.epochs["repeat"]) == {"s0r0", "s0r1", "s0r2"}
    assert run.trace is not None and run.layers is not None and run.missing == []
    assert run.title == "resnet18 on digits" and run.planned_epochs == 6


def test_paired_statistics_are_read_from_the_arm(compare_dir: Path) -> None:
    raw = json.loads((compare_dir / "summary.json").read_text())["arms"]["ssprop"]["paired"]["energy_j"]
    stat = load_run(compare_dir).paired["ssprop"]["energy_j"]
    assert stat.n == 3 and stat.delta_mean == raw["delta_mean"]
    assert stat.saving_ci == tuple(raw["saving_ci"]) and stat.delta_ci == tuple(raw["delta_ci"])


@pytest.mark.parametrize("name", ["summary.json", "config.json", "epochs.csv"])
def test_missing_required_file_names_it(compare_dir: Path, tmp_path: Path, name: str) -> None:
    run_dir = _copy(compare_dir, tmp_path / "r")
    (run_dir / name).unlink()
    with pytest.raises(RecordError, match=rf"{name}: file not found"):
        load_run(run_dir)


def test_optional_files_may_be_absent(compare_dir: Path, tmp_path: Path) -> None:
    run_dir = _copy(compare_dir, tmp_path / "r")
    (run_dir / "power_trace.csv").unlink()
    (run_dir / "layers.csv").unlink()
    run = load_run(run_dir)
    assert run.trace is None and run.layers is None
    assert run.missing == ["power_trace.csv", "layers.csv"]


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="not a run directory"):
        load_run(tmp_path / "nope")
    with pytest.raises(RecordError, match="no run directory"):
        load_run_dirs([])


def _edit_summary(run_dir: Path, edit) -> None:
    data = json.loads((run_dir / "summary.json").read_text())
    edit(data)
    (run_dir / "summary.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(schema_version=99), "unsupported schema_version"),
        (lambda d: d.pop("arms"), "missing field"),
        (lambda d: d["arms"]["ssprop"].update(test_accuracy=94.7), "not a fraction"),
        (lambda d: d["arms"]["ssprop"].update(energy_j=-1.0), "negative"),
        (lambda d: d["arms"]["ssprop"]["paired"]["energy_j"].update(delta_ci=[1.0, -1.0]), "above high"),
        (lambda d: d["arms"]["ssprop"]["paired"]["energy_j"].pop("delta_mean"), "delta_mean"),
        (lambda d: d["arms"]["ssprop"]["paired"].update(wall_s=3), "expected an object"),
        (lambda d: d["arms"]["ssprop"].update(energy_source="guess"), "unknown energy_source"),
    ],
)
def test_malformed_summary_names_the_file(compare_dir: Path, tmp_path: Path, edit, message: str) -> None:
    run_dir = _copy(compare_dir, tmp_path / "r")
    _edit_summary(run_dir, edit)
    with pytest.raises(RecordError, match=message) as info:
        load_run(run_dir)
    assert "summary.json" in str(info.value)


def test_truncated_json_names_the_file(compare_dir: Path, tmp_path: Path) -> None:
    run_dir = _copy(compare_dir, tmp_path / "r")
    text = (run_dir / "summary.json").read_text()
    (run_dir / "summary.json").write_text(text[: len(text) // 2])
    with pytest.raises(RecordError, match=r"summary.json: malformed JSON"):
        load_run(run_dir)


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("epochs.csv", lambda lines: [lines[0].replace("val_loss,", "")] + lines[1:], "missing column"),
        ("epochs.csv", lambda lines: lines[:3] + [lines[3].replace("dense,", "ghost,", 1)] + lines[4:],
         r"line 4: arm 'ghost'"),
        ("epochs.csv", lambda lines: lines[:2] + [",".join(lines[2].split(",")[:5])] + lines[3:], r"line 3"),
        ("power_trace.csv", lambda lines: lines[:5] + [lines[5].replace("counter", "psychic")] + lines[6:],
         r"line 6: unknown source"),
        ("layers.csv", lambda lines: lines[:2] + [lines[2].rsplit(",", 1)[0] + ",lots"] + lines[3:],
         r"line 3: column 'flops_backward' is not a number"),
    ],
)
def test_malformed_csv_names_file_and_line(compare_dir: Path, tmp_path: Path, name: str, mutate, message: str) -> None:
    run_dir = _copy(compare_dir, tmp_path / "r")
    lines = (run_dir / name).read_text().splitlines()
    (run_dir / name).write_text("\n".join(mutate(lines)) + "\n")
    with pytest.raises(RecordError, match=message) as info:
        load_run(run_dir)
    assert name in str(info.value)


def test_accuracy_as_percent_in_csv_is_rejected(compare_dir: Path, tmp_path: Path) -> None:
    run_dir = _copy(compare_dir, tmp_path / "r")
    lines = (run_dir / "epochs.csv").read_text().splitlines()
    cols = lines[0].split(",")
    row = lines[1].split(",")
    row[cols.index("val_accuracy")] = "52.5"
    (run_dir / "epochs.csv").write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    with pytest.raises(RecordError, match=r"epochs.csv: line 2: val_accuracy 52.5 is not a fraction"):
        load_run(run_dir)


def test_reads_the_harness_paired_stats_output(compare_dir: Path, tmp_path: Path) -> None:
    """The report reads what ``experiment.stats.paired_stats`` writes (the contract, end to end)."""
    from ssprop_energy.experiment.stats import paired_stats
    from ssprop_energy.report.savings import compare_arm

    stat = paired_stats([100.0, 102.0, 98.0], [60.0, 63.0, 57.0])
    run_dir = _copy(compare_dir, tmp_path / "r")
    plain = json.loads(json.dumps(dataclasses.asdict(stat)))
    _edit_summary(run_dir, lambda d: d["arms"]["ssprop"]["paired"].update(energy_j=plain))
    c = compare_arm(load_run(run_dir), "ssprop")
    assert c.energy.saved_frac == pytest.approx(1 - 180 / 300)
    assert c.energy.ci_frac == pytest.approx(tuple(stat.saving_ci))
    assert c.energy.n_pairs == 3 and c.energy.saved == pytest.approx(40.0)
