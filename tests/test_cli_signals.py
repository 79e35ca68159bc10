"""Real signals through the CLI in a subprocess: SIGINT, SIGTERM and SIGHUP stop every phase within about a
second, the run is saved as interrupted with a resume hint, and a second signal exits at once, resumable.

Each phase is made to last 60 s (a patched step that signals its own process, then sleeps in small steps);
the run must end long before that."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["compare", "--model", "mlp", "--layers", "linear", "--dataset", "synthetic:1x8x8:4:64", "--epochs", "2",
        "--batch-size", "32", "--meter", "fake", "--schedule", "constant", "--quiet"]
SLOW_S = 60.0

SCRIPT = """
import importlib, json, os, signal, sys, time
from ssprop_energy.cli import main

def patch(owner, name, signame):
    module, _, cls = owner.partition(":")
    target = importlib.import_module(module)
    if cls:
        target = getattr(target, cls)
    original = getattr(target, name)
    def slow(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, signame))
        end = time.monotonic() + %r
        while time.monotonic() < end:
            time.sleep(0.05)
        return original(*args, **kwargs)
    setattr(target, name, slow)

for owner, name, signame in json.loads(sys.argv[1]):
    patch(owner, name, signame)
sys.exit(main(sys.argv[2:]))
""" % SLOW_S


def _run(tmp_path: Path, patches: list[tuple[str, str, str]], extra: list[str] | None = None,
         ) -> tuple[subprocess.CompletedProcess[str], float, Path]:
    """Run compare with each (owner, name, signal) patched to signal the process and then take 60 s."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(patches), *ARGS, *(extra or []),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    return proc, time.monotonic() - t0, out


def _resume_completes(out: Path) -> None:
    resumed = subprocess.run([sys.executable, "-m", "ssprop_energy", "compare", "--resume", str(out), "--quiet"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


@pytest.mark.parametrize(
    ("owner", "name", "signame", "resume"),
    [
        ("ssprop_energy.experiment.execute:Executor", "_prepare", "SIGINT", False),     # building + FLOP counting
        ("ssprop_energy.experiment.execute:Executor", "_warm_up", "SIGHUP", False),     # warm-up
        ("ssprop_energy.train.loop:Trainer", "finish", "SIGINT", True),                 # the final evaluation
        ("ssprop_energy.train.loop:Trainer", "evaluate", "SIGTERM", False),             # an epoch's evaluation
        ("ssprop_energy.experiment.runner:Experiment", "_finalise", "SIGHUP", True),    # finalisation
    ],
)
def test_a_signal_stops_the_phase(tmp_path: Path, owner: str, name: str, signame: str, resume: bool) -> None:
    proc, wall_s, out = _run(tmp_path, [(owner, name, signame)])
    assert proc.returncode == 130, proc.stderr
    assert wall_s < SLOW_S - 15, f"the {name} phase ran on after {signame} ({wall_s:.0f} s)"
    assert "Traceback" not in proc.stderr
    assert f"run interrupted; record saved as 'interrupted' in {out}" in proc.stderr
    assert f"ssprop-energy compare --resume {out}" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    if resume:
        _resume_completes(out)


def test_a_signal_during_setup_saves_nothing_and_leaves_no_directory(tmp_path: Path) -> None:
    proc, wall_s, out = _run(tmp_path, [("ssprop_energy.experiment.runner", "load_dataset", "SIGTERM")])
    assert proc.returncode == 130, proc.stderr
    assert wall_s < SLOW_S - 15
    assert "interrupted before the run started" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_idle_measurement_stops_on_a_real_signal(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ssprop_energy", *ARGS, "--idle", str(SLOW_S), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    summary = out / "summary.json"
    deadline = time.monotonic() + 120
    while not summary.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert summary.exists(), proc.communicate()
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 15, "the idle measurement ran on after SIGHUP"
    assert proc.returncode == 130, err
    assert json.loads(summary.read_text())["status"] == "interrupted"
    assert "--resume" in err and "Traceback" not in err


def test_a_second_signal_exits_at_once_and_the_run_stays_resumable(tmp_path: Path) -> None:
    # the first signal stops the final evaluation; the second arrives while the record is being saved
    proc, wall_s, out = _run(tmp_path, [("ssprop_energy.train.loop:Trainer", "finish", "SIGINT"),
                                        ("ssprop_energy.experiment.runner:Experiment", "_save_unfinished", "SIGTERM")])
    assert proc.returncode == 130, proc.stderr
    assert wall_s < SLOW_S - 15
    assert f"SIGTERM again: exiting now; resume with `ssprop-energy compare --resume {out}`" in proc.stderr
    assert "Traceback" not in proc.stderr
    # it exited before saving "interrupted": the record still says running, every file on disk is whole
    assert json.loads((out / "summary.json").read_text())["status"] == "running"
    _resume_completes(out)
