"""Does the headline hold on a busy machine? A/A runs and the README command, quiet and beside busy loops.

Runs, each a fresh ``ssprop-energy compare`` subprocess with the CPU estimate meter:

- ``compare --aa`` (the dense baseline twice: the true change is 0) on a quiet machine;
- the same beside busy-loop processes ("hogs") of several shapes: 1 or 2 processes, covering 25% to 50% of
  the run, placed at its start, middle or end (placed from the quiet run's wall time);
- the README command (``compare --model resnet18``) quiet, and with two hogs over its middle third.

For every run it prints the headline (clean-pair estimate) of the time change, its interval, clean share and
verdict, beside the raw change of the totals (what the previous design reported) and the epochs flagged
busy; then the slice-switch cost (RNG streams saved and restored, the monitor's slice window, the meter's
two window reads) as a fraction of one slice, measured in this process. The targets (issue: paired
measurement that holds on a busy machine): A/A quiet |change| <= 2%; A/A with 2 hogs over 25-50% of the run
|change| <= 3%, verdict measured; the README command under a hog within 3 points of its quiet value; the
switch <= 1% of a slice.

The hogs are this benchmark's own children, so :mod:`_load` does not count them as foreign load: its
before/during/after check still tells whether anything *else* loaded the machine (then: NOT CITABLE).

Usage: ``python benchmarks/aa_under_load.py [--quick] [--json OUT.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load  # noqa: E402 - the benchmarks' own helper, next to this file

AA = ["--aa", "--model", "cnn", "--epochs", "6"]
README = ["--model", "resnet18"]
HOG = [sys.executable, "-c", "while True: pass"]


def _compare(args: list[str], out: Path) -> tuple[dict[str, Any], float]:
    """Run one compare into ``out``; returns its summary and wall time (s)."""
    cmd = [sys.executable, "-m", "ssprop_energy", "compare", *args, "--meter", "estimate", "--quiet",
           "--out", str(out)]
    env = {**os.environ, "SSPROP_ENERGY_LEDGER": str(out.parent / "ledger.sqlite")}  # not the user's ledger
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    wall_s = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"compare failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text()), wall_s


def _hogs(n: int, start_s: float, length_s: float) -> threading.Thread:
    """Start ``n`` busy loops ``start_s`` from now and stop them ``length_s`` later (in a thread)."""
    def run() -> None:
        time.sleep(start_s)
        procs = [subprocess.Popen(HOG, start_new_session=True) for _ in range(n)]
        time.sleep(length_s)
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _row(label: str, summary: dict[str, Any], wall_s: float, arm: str) -> dict[str, Any]:
    a, b = summary["arms"]["dense"], summary["arms"][arm]
    h = b.get("headline", {}).get("wall_s", {})
    busy = sorted({e for name in ("dense", arm) for e in (summary["arms"][name].get("interference") or {})
                   .get("affected_epochs", [])})
    return {"run": label, "change": h.get("change"), "ci": h.get("ci"), "clean_share": h.get("clean_share"),
            "pairs": h.get("pairs"), "pairs_total": h.get("pairs_total"), "verdict": h.get("verdict"),
            "reason": h.get("reason"), "raw_change": b["wall_s"] / a["wall_s"] - 1.0, "busy_epochs": busy,
            "slice_batches": (summary.get("measurement") or {}).get("slice_batches"), "wall_s": wall_s}


def _fmt(row: dict[str, Any]) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:+.1f}%"  # noqa: E731
    ci = row["ci"]
    ci_text = "n/a" if not ci else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
    share = "n/a" if row["clean_share"] is None else f"{row['clean_share']:.0%} of {row['pairs_total']}"
    busy = f"{len(row['busy_epochs'])} epoch(s)" if row["busy_epochs"] else "none"
    return (f"| {row['run']} | {pct(row['change'])} {ci_text} | {share} | {row['verdict']} | {pct(row['raw_change'])} "
            f"| {busy} | {row['wall_s']:.0f} s |")


def switch_cost(slice_batches: int, step_s: float, repeats: int = 200) -> dict[str, float]:
    """Seconds one slice switch costs (RNG capture + restore, a monitor window, two meter scope reads),
    and that as a fraction of a slice of ``slice_batches`` steps of ``step_s``."""
    import torch

    from ssprop_energy.energy import open_meter
    from ssprop_energy.energy.interference import InterferenceMonitor
    from ssprop_energy.train.loop import RngState

    device = torch.device("cpu")
    meter = open_meter("estimate", sample_period_s=0.1)
    monitor = InterferenceMonitor(sample_period_s=0.25).start()
    meter.start()
    try:
        with meter.window("train", scope="x/e0"):
            pass
        started = time.perf_counter()
        for _ in range(repeats):
            RngState.capture(device).restore(device)
            token = monitor.begin()
            meter.scope_energy("x/e0")
            monitor.end(token)
            meter.scope_energy("x/e0")
        cost_s = (time.perf_counter() - started) / repeats
    finally:
        meter.stop()
        monitor.stop()
    return {"switch_s": cost_s, "slice_s": slice_batches * step_s, "fraction": cost_s / (slice_batches * step_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the quiet A/A and one hog shape")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    check = _load.begin()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="aa-under-load-") as tmp:
        root = Path(tmp)
        quiet, quiet_s = _compare(AA, root / "aa-quiet")
        rows.append(_row("A/A quiet", quiet, quiet_s, "dense-aa"))
        shapes = [(2, "start", 0.0, 0.35), (2, "middle", 0.3, 0.35), (2, "end", 0.6, 0.35), (1, "middle", 0.25, 0.5),
                  (2, "middle, half the run", 0.25, 0.5)]
        if args.quick:
            shapes = shapes[1:2]
        for n, where, at, length in shapes:
            hog = _hogs(n, at * quiet_s, length * quiet_s)
            s, wall_s = _compare(AA, root / f"aa-{n}-{where.replace(' ', '').replace(',', '-')}")
            hog.join()
            rows.append(_row(f"A/A, {n} hog(s), {where}, {length:.0%} of the run", s, wall_s, "dense-aa"))
        if not args.quick:
            readme, readme_s = _compare(README, root / "readme-quiet")
            rows.append(_row("README command quiet", readme, readme_s, "ssprop"))
            hog = _hogs(2, 0.33 * readme_s, 0.33 * readme_s)
            s, wall_s = _compare(README, root / "readme-hog")
            hog.join()
            rows.append(_row("README command, 2 hogs, middle third", s, wall_s, "ssprop"))
        m = quiet.get("measurement") or {}
        cost = switch_cost(int(m.get("slice_batches") or 1), float(m.get("step_s") or 0.1))
    _load.end(check)
    print("| run | headline time change [95%] | clean pairs | verdict | raw change of totals | flagged | wall |")
    print("|:---|---:|---:|:---|---:|---:|---:|")
    for row in rows:
        print(_fmt(row))
    print(f"\nslice switch: {cost['switch_s'] * 1e3:.2f} ms per switch = {100 * cost['fraction']:.2f}% of a "
          f"{cost['slice_s']:.2f} s slice ({m.get('slice_batches')} batches of {1e3 * float(m.get('step_s') or 0):.0f} ms)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "switch": cost}, indent=2))


if __name__ == "__main__":
    main()
