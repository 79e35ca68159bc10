"""Issue 18 through the CLI: one line and exit 2 for bad numbers, text, a held run, a full disk, an
out-of-memory error and flags given with --resume; never a bare run directory; reports of unfinished runs."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from ssprop_energy.cli import main
from ssprop_energy.experiment.config import ExperimentConfig
from ssprop_energy.experiment.runner import Experiment, ExperimentHooks, prepare_run_dir
from ssprop_energy.records import load_summary
from ssprop_energy.runlock import RunLock, run_dir_in_use

TINY = ["--model", "mlp", "--layers", "linear", "--dataset", "synthetic:1x8x8:4:64", "--epochs", "2",
        "--batch-size", "32", "--meter", "fake", "--quiet"]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def _interrupted_run(out: Path) -> None:
    """A run directory stopped at its first batch (status interrupted)."""
    from ssprop_energy.errors import RunInterrupted

    cfg = ExperimentConfig(model="mlp", layers=["linear"], dataset="synthetic:1x8x8:4:64", epochs=2, batch_size=32,
                           meter="fake", out=str(out))
    cfg.validate()
    prepare_run_dir(out)
    with pytest.raises(RunInterrupted):
        Experiment(cfg, out, ExperimentHooks(monitor=None, ledger=False, stop_requested=lambda: True)).run()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--weight-decay", "nan"], "--weight-decay: weight decay must be a number >= 0, got nan"),
        (["--seeds", "99999999999999999999"], "--seeds: a seed must be an integer from 0 to 4294967295"),
        (["--seeds", "0,-1"], "--seeds: a seed must be an integer from 0 to 4294967295, got -1"),
        (["--idle", "nan"], "--idle: idle measurement must be 0 to 86400 seconds, got nan"),
        (["--idle", "inf"], "--idle: idle measurement must be 0 to 86400 seconds, got inf"),
        (["--sample-period", "inf"], "--sample-period: power sampling period must be in (0, 60] s, got inf"),
        (["--pue", "inf"], "--pue: PUE must be a number >= 1.0, got inf"),
        (["--start-drop-rate", "nan"], "--start-drop-rate: start drop rate must be in [0, 1), got nan"),
        (["--project", "caf\udce9"], "--project: b'caf\\xe9' is not valid UTF-8 text"),
    ],
)
def test_numbers_and_text_that_must_be_refused(args: list[str], needle: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["compare", *TINY, "--out", str(out), *args]) == 2
    assert needle in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_non_utf8_out_leaves_no_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path) + "/run\udce9"  # what Python makes of the byte 0xe9 in argv (surrogateescape)
    assert main(["compare", *TINY, "--out", out]) == 2
    assert "is not valid UTF-8 text" in _one_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_flags_with_resume_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _interrupted_run(out)
    before = (out / "summary.json").read_text()
    assert main(["compare", "--resume", str(out), "--epochs", "5", "--lr", "0.1", "--quiet"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--resume continues the run with its recorded settings; remove --epochs, --lr" in line
    assert (out / "summary.json").read_text() == before


def test_a_held_run_directory_is_refused_with_the_holders_pid(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _interrupted_run(out)
    before = (out / "summary.json").read_text()
    lock = RunLock(out).acquire()  # another open file description: flock conflicts as between processes
    try:
        assert run_dir_in_use(out)
        assert main(["compare", "--resume", str(out), "--quiet"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"is in use by another ssprop-energy process (pid {os.getpid()})" in line
        assert (out / "summary.json").read_text() == before
    finally:
        lock.release()
    assert not run_dir_in_use(out)
    assert main(["compare", "--resume", str(out), "--quiet"]) == 0
    assert load_summary(out).status == "complete"


def test_disk_full_in_finalisation_names_the_file_and_never_leaves_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ssprop_energy.records as records

    real = records.tempfile.mkstemp
    full = {"on": False}

    def mkstemp(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".epochs.csv"):
            full["on"] = True  # from the first table on, the disk is full: nothing more can be written
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(records.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "run"
    assert main(["compare", *TINY, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    line = [x for x in captured.err.splitlines() if "error:" in x]
    assert len(line) == 1 and "Traceback" not in captured.err
    assert f"{out / 'epochs.csv'}: cannot write (No space left on device)" in line[0]
    # written before finalisation began: not "running", resumable, and saying why
    summary = load_summary(out)
    assert summary.status == "failed" and "finalisation did not finish" in (summary.failure_reason or "")
    assert set(summary.arms) == {"dense", "ssprop"}
    monkeypatch.setattr(records.tempfile, "mkstemp", real)  # space freed: resume finishes the run
    assert main(["compare", "--resume", str(out), "--quiet"]) == 0
    assert load_summary(out).status == "complete"


def test_report_write_failure_after_a_complete_run_keeps_exit_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ssprop_energy.report as report

    def failing_write(path, text):
        from ssprop_energy.records import RecordWriteError

        raise RecordWriteError(path, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(report, "write_text_atomic", failing_write)
    out = tmp_path / "run"
    assert main(["compare", *TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"run record: {out}" in captured.out and "report:" not in captured.out
    assert "report not written" in captured.err and "No space left on device" in captured.err
    assert load_summary(out).status == "complete"


def test_report_into_an_unwritable_place_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _interrupted_run(out)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    capsys.readouterr()
    assert main(["report", str(out), "-o", str(blocker / "r.html")]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and "cannot write the report" in lines[0] and str(blocker / "r.html") in lines[0]
    assert "Traceback" not in err


def test_report_of_an_interrupted_run_says_how_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _interrupted_run(out)
    capsys.readouterr()
    assert main(["report", str(out), "-o", str(tmp_path / "r.md")]) == 0
    err = capsys.readouterr().err
    assert f"run interrupted; the report covers the arm-runs that finished. Resume with " \
           f"`ssprop-energy compare --resume {out}`" in err
    assert "Interrupted run" in (tmp_path / "r.md").read_text()


def test_a_running_record_with_no_process_reads_as_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _interrupted_run(out)
    data = json.loads((out / "summary.json").read_text())
    data["status"] = "running"  # what kill -9 leaves
    (out / "summary.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["report", str(out), "-o", str(tmp_path / "r.md")]) == 0
    assert "run stopped before it finished" in capsys.readouterr().err
    assert "Unfinished run: it stopped" in (tmp_path / "r.md").read_text()


def test_out_of_memory_names_the_batch_and_image_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from ssprop_energy.experiment import execute

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(execute.Executor, "_warm_up", oom)
    out = tmp_path / "run"
    assert main(["compare", *TINY, "--image-size", "16", "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "out of memory with mlp at batch size 32 and image size 16: lower --batch-size or --image-size" in line
    assert load_summary(out).status == "failed"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--epochs", "1"], "the bar schedule at drop rate 0.8 never drops a gradient in 1 epoch(s) of 2 batch(es) "
                            "(bar alternates dense and sparse epochs, dense first: it needs at least 2 epochs)"),
        (["--epochs", "2", "--schedule", "halves", "--schedule-by", "iteration", "--period", "5"],
         "the halves schedule at drop rate 0.8 never drops a gradient in 2 epoch(s) of 2 batch(es)"),
        (["--dataset", "synthetic:1x8x8:4:12"], "--dataset synthetic:1x8x8:4:12: split(s) too small to measure "
                                                "(validation 3, test 3 images; at least 4 each are needed)"),
    ],
)
def test_a_sparse_arm_that_never_drops_and_tiny_splits_are_refused(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = [a for a in TINY if a != "--epochs" and a != "2"]
    assert main(["compare", *base, *args, "--out", str(out)]) == 2
    assert needle in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_drop_rate_zero_stays_an_explicit_control(tmp_path: Path) -> None:
    # an A/A control (ssProp layers at drop 0) is a deliberate dense arm, not a schedule that never drops
    assert main(["compare", *TINY, "--schedule", "constant", "--drop-rate", "0", "--out", str(tmp_path / "r")]) == 0
