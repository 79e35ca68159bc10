"""benchmarks/gpu_check.py --dry-run: the whole GPU plan on CPU with fakes, so the script never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_part(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path),
                           "--dry-run", "--only", "grads,nvml"], capture_output=True, text=True, env=env,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] and "fake" in summary["provenance"]
    grads = summary["parts"]["grads"]
    assert grads["status"] == "done" and grads["result"]["ok"]
    rows = grads["result"]["rows"]
    # conv2d and linear x drop 0.5, 0.8 x fp32, bf16 (fp16 only on CUDA: CPU half convolutions are not the target)
    assert {(r["layer"], r["drop_rate"], r["dtype"]) for r in rows} == {
        (layer, d, t) for layer in ("conv2d", "linear") for d in (0.5, 0.8) for t in ("fp32", "bf16")}
    assert all(r["max_rel_err"] <= r["tolerance"] for r in rows)
    nvml = summary["parts"]["nvml"]["result"]
    # the fake counter is the exact integral of the fake power; the sampled trapezoid agrees closely
    assert nvml["ok"] and nvml["rel_diff"] < 0.01 and nvml["counter_energy_j"] > 0
    assert 250 < nvml["idle_power_w"] < 350  # the fake GPU's 300 W +- 50 W sine
    assert (tmp_path / "gpu_check.md").read_text().startswith("# gpu_check (DRY RUN")
    assert "grads" in proc.stdout and "nvml" in proc.stdout


def test_a_part_over_its_budget_is_stopped_and_keeps_what_it_wrote(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    monkeypatch.setitem(gpu_check.DRY_BUDGET_S, "nvml", 1.0)  # the nvml dry part needs ~3 s
    part = gpu_check._run_part("nvml", tmp_path, dry=True)
    assert part["status"] == "timed_out" and part["wall_s"] < 10
    assert "rel_diff" not in part["result"]  # the load never finished
