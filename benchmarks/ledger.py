"""Benchmark: what the carbon-audit ledger costs a run, measured side by side in one run.

- ``append``:   one ``start_entry`` + ``finish`` pair (two committed transactions, fsync'd by SQLite), one process;
- ``parallel``: the same from 8 processes at once into one fresh ledger: wall time, rows per second, and a
  check that every row arrived complete;
- ``wrap``:     ``python -c pass`` run directly vs. through ``run_wrapped`` (fake meter, so the cost is the
  wrapper's: ledger rows, meter thread, wait4), rounds interleaved so machine load hits both alike.

Run: ``python benchmarks/ledger.py`` (``--pairs``, ``--rounds``). ``--server postgresql://...`` runs
``append`` and ``parallel`` against a PostgreSQL ledger too, side by side with SQLite (give an empty
database: the benchmark's rows stay there). Figures go in BENCHMARKS.md. The load
before, during and after is printed with the figures (``benchmarks/_load.py``); figures taken under load
are marked NOT CITABLE.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import _load

from ssprop_energy import ledger
from ssprop_energy.energy import open_meter
from ssprop_energy.ledger.wrap import run_wrapped
from ssprop_energy.records import EnergyComponent

COMPS = [EnergyComponent("gpu:0", 1000.0, "counter"), EnergyComponent("cpu:package-0", 200.0, "counter")]


def _pairs(path: str, n: int) -> None:
    for _ in range(n):
        ledger.start_entry(kind="bench", command=["x"], ledger_path=path).finish(
            "complete", COMPS, None, 400.0, 1.0, "override")


def _append_and_parallel(label: str, one: str, many: str, pairs: int) -> None:
    _pairs(one, 3)  # create and migrate outside the timing
    t0 = time.perf_counter()
    _pairs(one, pairs)
    per_pair_ms = (time.perf_counter() - t0) / pairs * 1e3
    print(f"{label} append: {per_pair_ms:.2f} ms per start+finish pair (1 process, {pairs} pairs)")

    ledger.load_entries(many)  # create the schema outside the timing (SQLite: creates the file)
    before = len(ledger.load_entries(many))
    procs = [multiprocessing.get_context("fork").Process(target=_pairs, args=(many, pairs)) for _ in range(8)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall_s = time.perf_counter() - t0
    df = ledger.load_entries(many).iloc[before:]
    complete = int((df["status"] == "complete").sum())
    print(f"{label} parallel: 8 processes x {pairs} pairs in {wall_s:.2f} s = {8 * pairs / wall_s:.0f} "
          f"pairs/s; rows {len(df)}, complete {complete}, all energy 1200 J: {bool((df['energy_j'] == 1200.0).all())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=100, help="start+finish pairs per process")
    ap.add_argument("--rounds", type=int, default=7, help="wrap rounds")
    ap.add_argument("--server", metavar="URL", help="also measure a PostgreSQL ledger (an empty database)")
    args = ap.parse_args()
    load = _load.begin()
    with tempfile.TemporaryDirectory() as tmp:
        _append_and_parallel("sqlite", str(Path(tmp) / "one.sqlite"), str(Path(tmp) / "many.sqlite"), args.pairs)
        if args.server:
            _append_and_parallel("postgresql", args.server, args.server, args.pairs)

        cmd = [sys.executable, "-c", "pass"]
        intensity = SimpleNamespace(g_per_kwh=400.0, source="override")
        wrapped = Path(tmp) / "wrap.sqlite"
        direct_s, wrap_s = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            direct_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_wrapped(cmd, meter=open_meter("fake", sample_period_s=0.5), intensity=intensity, ledger_path=wrapped)
            wrap_s.append(time.perf_counter() - t0)
        d, w = statistics.median(direct_s), statistics.median(wrap_s)
        print(f"wrap: median {d * 1e3:.0f} ms direct, {w * 1e3:.0f} ms wrapped: +{(w - d) * 1e3:.0f} ms per run "
              f"({args.rounds} interleaved rounds)")
    _load.end(load)


if __name__ == "__main__":
    main()
