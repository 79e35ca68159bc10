"""`ssprop-energy compare` / `sweep` through the CLI: bad input gets one line and exit 2, nothing written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ssprop_energy.cli import main

TINY = ["--model", "cnn", "--dataset", "synthetic:1x8x8:4:64", "--epochs", "2", "--batch-size", "32",
        "--meter", "fake", "--quiet"]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--drop-rate", "1.5"], "--drop-rate: drop rate must be in [0, 1), got 1.5"),
        (["--drop-rate", "-0.1"], "drop rate must be in [0, 1), got -0.1"),
        (["--interleave", "abba"], "--interleave"),
        (["--drop-rate", "abc"], "--drop-rate"),
        (["--model", "resnet9000"], "resnet9000"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--schedule", "zigzag"], "zigzag"),
        (["--epochs", "0"], "--epochs: epochs must be a positive integer, got 0"),
        (["--epochs", "two"], "--epochs"),
        (["--batch-size", "-4"], "--batch-size"),
        (["--lr", "nan"], "--lr"),
        (["--pue", "0.5"], "--pue"),
        (["--seeds", "1,x"], "--seeds"),
        (["--country", "XXX"], "XXX"),
        (["--layers", "attention"], "attention"),
        (["--warmup-epochs", "2"], "warmup"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    rc = main(["compare", *TINY, "--out", str(out), *args])
    assert rc == 2
    assert needle in _one_line_error(capsys)
    assert not out.exists()


def test_argparse_errors_exit_2_without_usage_block(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--epochs", "x"]) == 2
    assert "invalid int value" in _one_line_error(capsys)


def test_unwritable_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["compare", *TINY, "--out", str(blocker / "run")]) == 2
    assert "not writable" in _one_line_error(capsys)


def test_out_that_holds_files_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("precious")
    assert main(["compare", *TINY, "--out", str(tmp_path)]) == 2
    assert "--resume" in _one_line_error(capsys)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_resume_of_a_non_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in _one_line_error(capsys)


def test_corrupt_dataset_file_is_reported_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data / "mnist" / name).write_bytes(gzip.compress(b"garbage"))
    monkeypatch.setenv("SSPROP_ENERGY_MIRROR", "http://127.0.0.1:9")  # never reached, and nothing listens
    out = tmp_path / "run"
    rc = main(["compare", "--model", "cnn", "--dataset", "mnist", "--data-dir", str(data), "--meter", "fake",
               "--quiet", "--out", str(out)])
    assert rc == 2
    line = _one_line_error(capsys)
    assert str(data / "mnist") in line
    assert not out.exists()


def test_unavailable_meter_is_a_user_error_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssprop_energy.errors import MeterUnavailableError
    from ssprop_energy.experiment import runner

    def no_rapl(kind: str, **kwargs: object) -> None:
        raise MeterUnavailableError(f"{kind}: energy_uj is not readable; run sudo chmod o+r ...")

    monkeypatch.setattr(runner, "resolve_meter", no_rapl)
    out = tmp_path / "run"
    assert main(["compare", *TINY, "--meter", "rapl", "--out", str(out)]) == 2
    assert "chmod" in _one_line_error(capsys)
    assert not out.exists()


def test_internal_error_exits_1_with_a_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssprop_energy.experiment import runner

    def boom(self: object) -> None:
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(runner.Experiment, "run", boom)
    rc = main(["compare", *TINY, "--out", str(tmp_path / "run")])
    assert rc == 1
    line = _one_line_error(capsys)
    assert "internal error" in line and "simulated bug" in line
    log = Path(line.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert "ZeroDivisionError" in log.read_text()


def test_compare_end_to_end_prints_table_and_writes_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["compare", *TINY, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "dense" in stdout and "ssprop" in stdout and "drop_rates=[0.8]" in stdout
    # fake energy is called what it is, never "(mixed)" or a hardware source; the interval and the order show
    assert "J (fake)" in stdout and "SYNTHETIC" in stdout and "(mixed)" not in stdout
    assert "ssprop: headline (clean-pair estimate, 95% interval)" in stdout and "verdict" in stdout
    assert "arms interleaved in time: slice (slices of" in stdout and "warm-up" in stdout
    summary = json.loads((out / "summary.json").read_text())
    headline = summary["arms"]["ssprop"]["headline"]["wall_s"]
    assert set(headline) >= {"change", "ci", "clean_share", "pairs", "method", "verdict"}
    assert headline["verdict"] in ("measured", "inconclusive") and 0 <= headline["clean_share"] <= 1
    assert summary["status"] == "complete"
    assert summary["config"]["schedules"] == ["bar"] and summary["config"]["drop_rates"] == [0.8]
    for key in ("test_accuracy", "wall_s", "flops_forward", "flops_backward", "energy_j", "energy_components",
                "co2_g", "carbon_intensity_g_per_kwh", "epochs"):
        assert key in summary["arms"]["ssprop"], key
    for epoch in summary["arms"]["ssprop"]["epochs"]:
        for key in ("train_loss", "val_accuracy", "drop_rate", "flops_backward", "energy_j", "wall_s"):
            assert key in epoch
    # the run appended itself to the (test-local) ledger as complete
    from ssprop_energy.ledger import load_entries

    rows = load_entries()
    assert list(rows["status"]) == ["complete"]
    assert rows["run_dir"].iloc[0] == str(out)
    assert list(rows["energy_source"]) == ["fake"]


def test_sigterm_saves_interrupted_and_resume_completes(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    # ~1 s per epoch: after the first checkpoint, seconds of work remain for the signal to interrupt
    args = ["compare", "--model", "cnn", "--dataset", "synthetic:1x8x8:4:2048", "--epochs", "3",
            "--batch-size", "64", "--meter", "fake", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ssprop_energy", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    checkpoint = out / "checkpoints" / "dense__s0__r0.pt"
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert checkpoint.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"

    resumed = subprocess.run([sys.executable, "-m", "ssprop_energy", "compare", "--resume", str(out), "--quiet"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert len(summary["arms"]["dense"]["epochs"]) == 3
    assert summary["interleave"] == "slice"

    # the interrupted-and-resumed interleaved run ends exactly where an uninterrupted one does
    from ssprop_energy.experiment.config import ExperimentConfig
    from ssprop_energy.experiment.runner import Experiment, ExperimentHooks, prepare_run_dir

    cfg = ExperimentConfig(model="cnn", dataset="synthetic:1x8x8:4:2048", epochs=3, batch_size=64, meter="fake",
                           out=str(tmp_path / "straight"))
    cfg.validate()
    prepare_run_dir(tmp_path / "straight")
    straight = Experiment(cfg, tmp_path / "straight", ExperimentHooks(monitor=None, ledger=False)).run()
    for arm in ("dense", "ssprop"):
        got = summary["arms"][arm]
        want = straight.arms[arm]
        assert [e["train_loss"] for e in got["epochs"]] == [e.train_loss for e in want.epochs]
        assert [e["val_accuracy"] for e in got["epochs"]] == [e.val_accuracy for e in want.epochs]
        assert got["test_accuracy"] == want.test_accuracy and got["flops_backward"] == want.flops_backward


def test_log_to_tensorboard_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["compare", *TINY, "--epochs", "1", "--schedule", "constant", "--log-to", "tensorboard", "--out", str(out)]) == 0
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    capsys.readouterr()
    assert main(["compare", *TINY, "--log-to", "wandb", "--out", str(tmp_path / "bad")]) == 2
    assert "wandb" in _one_line_error(capsys) and not (tmp_path / "bad").exists()
