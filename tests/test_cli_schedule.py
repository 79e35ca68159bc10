"""`ssprop-energy schedule`, the schedule flags of `compare`, and `compare --preset paper`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ssprop_energy.cli import build_parser, compare, main
from ssprop_energy.cli._experiment import config_from_args
from ssprop_energy.experiment.config import ExperimentConfig


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["schedule", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_table_of_the_headline_after_an_odd_warmup(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--epochs", "6", "--warmup-epochs", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.strip() and line.split()[0].isdigit()]
    # warm-up epoch 0, then the public code's toggle: dense, 0.8, dense, 0.8, dense
    assert [(int(r[0]), float(r[1]), float(r[2])) for r in rows] == [
        (0, 0.0, 1.0), (1, 0.0, 1.0), (2, 0.8, 0.2), (3, 0.0, 1.0), (4, 0.8, 0.2), (5, 0.0, 1.0)]
    assert "percentage=0.2" in out[1] and "interleave=True" in out[1] and "warmup=1" in out[1]
    assert out[-1].startswith("average drop rate: 0.2667")  # 1.6 / 6


def test_json_by_iteration_every_batch(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(capsys, "--epochs", "2", "--schedule", "linear", "--start-drop-rate", "0.2", "--schedule-by",
                 "iteration", "--period", "3", "--iterations-per-epoch", "4", "--warmup-epochs", "1")
    # warm-up epoch dense; then the sawtooth 0.2 + 0.6 * (i % 3) / 3 = 0.2, 0.4, 0.6, 0.2
    assert data["rates"][0]["drop_rates"] == [0.0] * 4
    assert data["rates"][1]["drop_rates"] == pytest.approx([0.2, 0.4, 0.6, 0.2], abs=1e-12)
    assert data["rates"][1]["mean_drop_rate"] == pytest.approx(0.35)
    assert data["average_drop_rate"] == pytest.approx(0.35 / 2)
    assert data["official_args"] == {"drop_mode": "linear", "percentage": 0.8, "min_percentage": 0.2,
                                     "total_epoch": 2, "interleave": False, "warmup": 1, "by_epoch": False, "T": 3}


def test_halves_is_the_public_codes_bar_mode(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(capsys, "--epochs", "5", "--schedule", "halves", "--drop-rate", "0.6")
    assert [r["drop_rate"] for r in data["rates"]] == [0, 0, 0.6, 0.6, 0.6]  # 5 // 2 = 2 dense epochs
    assert data["official_args"]["drop_mode"] == "bar"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--epochs", "3", "--schedule-by", "iteration"], "--iterations-per-epoch"),
        (["--epochs", "3", "--schedule", "bar", "--no-schedule-interleave"], "use the constant schedule"),
        (["--epochs", "3", "--schedule", "constant", "--start-drop-rate", "0.1"], "start drop rate"),
        (["--epochs", "1", "--schedule", "linear"], "at least 2 epochs"),
        (["--epochs", "3", "--schedule", "linear", "--schedule-interleave", "--schedule-by", "iteration",
          "--iterations-per-epoch", "2"], "interleave"),
        (["--epochs", "3", "--drop-rate", "1"], "drop rate"),
        (["--epochs", "3", "--schedule", "zigzag"], "zigzag"),
        (["--epochs", "3", "--iterations-per-epoch", "0"], "--iterations-per-epoch"),
    ],
)
def test_bad_schedule_flags_are_one_line_exit_2(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schedule", *args]) == 2
    assert needle in _one_line_error(capsys)


def test_schedule_command_does_not_import_torch() -> None:
    code = ("import sys; from ssprop_energy.cli import main; main(['schedule', '--epochs', '3']); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, check=False).returncode == 0


def test_help_resolves_the_bar_name_clash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "paper's headline" in text and "drop_mode='bar'" in text and "halves" in text


# ---------------------------------------------------------------------------------------------- compare


def _compare_config(*args: str) -> ExperimentConfig:
    """The config `compare` would run with these flags (its real run(), with execute() stopped short)."""
    seen: list[ExperimentConfig] = []

    def capture(args: argparse.Namespace, kind: str, **lists: Any) -> int:
        seen.append(config_from_args(args, kind, **lists))
        return 0

    parsed = build_parser().parse_args(["compare", *args])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare, "execute", capture)
        assert parsed.func(parsed) == 0
    return seen[0]


def test_paper_preset_sets_the_public_training_settings() -> None:
    cfg = _compare_config("--preset", "paper", "--optimizer", "sgd")  # an explicit flag wins over the preset
    assert cfg.optimizer == "sgd"
    cfg = _compare_config("--preset", "paper")
    assert (cfg.optimizer, cfg.weight_decay, cfg.lr_schedule, cfg.batch_size) == ("adam", 0.0, "none", 128)
    assert (cfg.schedules, cfg.drop_rates, cfg.schedule_interleave, cfg.warmup_epochs, cfg.schedule_by) == (
        ["bar"], [0.8], None, 0, "epoch")
    assert cfg.preset == "paper"
    headline = cfg.drop_schedule("bar", 0.8)
    assert headline.official_args() | {"total_epoch": 0} == {
        "drop_mode": "constant", "percentage": 0.2, "min_percentage": 0.2, "total_epoch": 0, "interleave": True,
        "warmup": 0, "by_epoch": True, "T": 10}


def test_explicit_flags_override_the_preset() -> None:
    cfg = _compare_config("--preset", "paper", "--batch-size", "32", "--schedule", "linear", "--drop-rate", "0.6",
                          "--weight-decay", "0.01", "--schedule-interleave")
    assert (cfg.batch_size, cfg.schedules, cfg.drop_rates, cfg.weight_decay, cfg.schedule_interleave) == (
        32, ["linear"], [0.6], 0.01, True)
    assert cfg.lr_schedule == "none" and cfg.preset == "paper"
    plain = _compare_config()
    assert plain.batch_size != 128 and plain.preset is None  # no preset: the project's defaults


def test_compare_runs_an_official_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # public code: drop_mode='linear', percentage=0.8, min_percentage=0.2, total_epoch=4, interleave=True,
    # warmup=1, by_epoch=True -> e0 warm-up, e1 dense (toggle), e2 keep max(0.2, 0.8 - 0.6 * 2 / 3) = 0.4, e3 dense
    flags = ["--schedule", "linear", "--start-drop-rate", "0.2", "--drop-rate", "0.8", "--schedule-interleave",
             "--warmup-epochs", "1", "--epochs", "4"]
    out = tmp_path / "run"
    assert main(["compare", "--model", "cnn", "--dataset", "synthetic:1x8x8:4:64", "--batch-size", "32",
                 "--meter", "fake", "--quiet", "--out", str(out), *flags]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    ran = [e["drop_rate"] for e in summary["arms"]["ssprop"]["epochs"]]
    assert ran == pytest.approx([0.0, 0.0, 0.6, 0.0], abs=1e-12)
    assert summary["config"]["schedule_interleave"] is True and summary["config"]["start_drop_rate"] == 0.2
    # `schedule` with the same flags prints what the run applied
    printed = _json(capsys, *flags)
    assert [r["drop_rate"] for r in printed["rates"]] == pytest.approx(ran, abs=1e-12)
