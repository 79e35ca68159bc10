"""``Experiment(cfg, dir).run()`` from Python writes exactly the files the CLI writes (the CLI only parses
and prints: the loggers, report.html, the ledger row and the run directory are the runner's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssprop_energy.cli import main
from ssprop_energy.experiment.config import ExperimentConfig
from ssprop_energy.experiment.runner import Experiment, ExperimentHooks
from ssprop_energy.tracking import TrackingConfig


def _files(root: Path) -> list[str]:
    # TensorBoard names its event files after the host, time and pid: compare the folder they are in
    return sorted(str(p.relative_to(root).parent / "<events>") if p.name.startswith("events.out.tfevents.")
                  else str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_python_run_writes_what_the_cli_writes(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    cli_dir, py_dir = tmp_path / "cli", tmp_path / "py"
    assert main(["compare", "--model", "cnn", "--dataset", "synthetic:1x8x8:4:64", "--epochs", "1", "--batch-size",
                 "32", "--meter", "fake", "--schedule", "constant", "--quiet", "--log-to", "tensorboard",
                 "--out", str(cli_dir)]) == 0
    cfg = ExperimentConfig(model="cnn", dataset="synthetic:1x8x8:4:64", epochs=1, batch_size=32, meter="fake",
                           schedules=["constant"], out=str(py_dir))
    cfg.validate()
    Experiment(cfg, py_dir, ExperimentHooks(tracking=TrackingConfig(("tensorboard",)))).run()
    cli_files = _files(cli_dir)
    assert "report.html" in cli_files and "summary.json" in cli_files
    assert any(f.startswith("tensorboard/") for f in cli_files)
    assert _files(py_dir) == cli_files


def test_a_new_run_refuses_a_used_directory_and_leaves_it_alone(tmp_path: Path) -> None:
    from ssprop_energy.errors import ConfigError

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    cfg = ExperimentConfig(model="cnn", dataset="synthetic:1x8x8:4:64", epochs=1, batch_size=32, meter="fake",
                           schedules=["constant"], out=str(out))
    cfg.validate()
    with pytest.raises(ConfigError, match="already exists and is not an empty directory"):
        Experiment(cfg, out, ExperimentHooks(monitor=None, ledger=False), resume=False).run()
    assert [p.name for p in out.iterdir()] == ["summary.json"]
