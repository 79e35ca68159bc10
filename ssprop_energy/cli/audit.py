"""``ssprop-energy audit``: the lab's carbon-audit ledger.

- ``audit run [OPTIONS] -- CMD ARGS...``  run a command under an energy meter and record it (exit code passed through)
- ``audit list``                         recent runs
- ``audit summary --by project|user|host|month``  totals per group
- ``audit export --csv FILE``            every row as CSV
- ``audit report -o FILE.html``          a lab-level HTML summary
- ``audit import PATH...``               bring JSON fallback rows (written when the ledger was unusable) in
"""

from __future__ import annotations

import argparse
import math
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from ssprop_energy.energy import KINDS
from ssprop_energy.errors import ConfigError
from ssprop_energy.ledger.db import default_ledger_path, pending_dir
from ssprop_energy.ledger.entries import import_fallback, pending_rows
from ssprop_energy.ledger.summary import GROUP_KEYS, export_csv, load_entries, parse_since, summarize
from ssprop_energy.records import write_text_atomic
from ssprop_energy.fmt import fmt_co2_compact as _fmt_co2
from ssprop_energy.fmt import fmt_energy_compact as _fmt_energy
from ssprop_energy.fmt import fmt_wall_compact as _fmt_wall



def _since(text: str) -> Any:
    try:
        return parse_since(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def register(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("audit", help="the lab's carbon-audit ledger: record any command's energy and CO2, summarise",
                       description="Carbon-audit ledger (SQLite; $SSPROP_ENERGY_LEDGER or the user data directory).")
    p.add_argument("--ledger", type=Path, help="ledger file (default $SSPROP_ENERGY_LEDGER, else the user data dir)")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=type(p))
    asub.required = True

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--since", type=_since, help="only runs started on or after this date (YYYY-MM-DD, UTC)")
    filters.add_argument("--project", help="only this project")

    r = asub.add_parser("run", help="run a command under an energy meter and record it",
                        description="Run CMD, measure its energy, record it in the ledger, exit with its exit code.")
    r.add_argument("--project", help="project to charge (default $SSPROP_ENERGY_PROJECT, else 'default')")
    r.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG", help="a label (repeatable)")
    r.add_argument("--meter", choices=KINDS, default="auto", help="energy source (default auto: the best available)")
    r.add_argument("--sample-period", dest="sample_period_s", type=_positive_float, default=0.5,
                   help="power sampling period in s (default 0.5)")
    r.add_argument("--carbon-intensity", type=float, help="grid carbon intensity override, g CO2e/kWh")
    r.add_argument("--country", help="ISO-3 country code for the carbon intensity (default: world average)")
    r.add_argument("--pue", type=float, default=1.0, help="data-centre power usage effectiveness (default 1.0)")
    r.add_argument("--whole-machine", action="store_true",
                   help="charge machine-wide CPU/RAM energy whole instead of by the command's CPU-time share")
    r.add_argument("--redact", action="store_true", help="store only the program name, not its arguments")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")
    r.set_defaults(func=run_command)

    ls = asub.add_parser("list", parents=[filters], help="recent runs")
    ls.add_argument("-n", "--limit", type=int, default=20, help="how many (default 20; 0 = all)")
    ls.set_defaults(func=list_command)

    sm = asub.add_parser("summary", parents=[filters], help="totals per project, user, host or month")
    sm.add_argument("--by", choices=GROUP_KEYS, default="project", help="grouping (default project)")
    sm.set_defaults(func=summary_command)

    ex = asub.add_parser("export", parents=[filters], help="every row as CSV")
    ex.add_argument("--csv", type=Path, required=True, metavar="FILE", help="output CSV file (written atomically)")
    ex.set_defaults(func=export_command)

    rp = asub.add_parser("report", parents=[filters], help="lab-level HTML summary")
    rp.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.html", help="output HTML file")
    rp.set_defaults(func=report_command)

    im = asub.add_parser("import", help="add JSON fallback rows (from run folders or the pending folder)")
    im.add_argument("paths", nargs="*", type=Path,
                    help="fallback files or folders (default: the ledger's pending folder)")
    im.set_defaults(func=import_command)
    return p


def _ledger(args: argparse.Namespace) -> Path:
    return args.ledger if args.ledger is not None else default_ledger_path()


def _nothing(args: argparse.Namespace, ledger: Path) -> str:
    if args.since is not None or args.project is not None:
        return f"no runs in {ledger} match the filters"
    return f"no runs recorded in {ledger}"


def _pending_note(ledger: Path) -> None:
    pending = pending_rows(ledger)
    if pending:
        print(f"note: {len(pending)} run(s) wait as JSON in {pending_dir(ledger)} (ledger was unusable when they "
              "ended); `ssprop-energy audit import` adds them", file=sys.stderr)


def _print_table(header: list[str], rows: list[list[str]], left: int = 1) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left or i == len(cells) - 1 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(header))
    for r in rows:
        print(line(r))


# ------------------------------------------------------------------------------------------ actions


def run_command(args: argparse.Namespace) -> int:
    from ssprop_energy.ledger.wrap import run_wrapped

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ConfigError("no command given (usage: ssprop-energy audit run [OPTIONS] -- CMD [ARGS...])")
    ledger = _ledger(args)
    res = run_wrapped(
        cmd, meter_kind=args.meter, sample_period_s=args.sample_period_s, project=args.project, tags=args.tags,
        redact=args.redact, whole_machine=args.whole_machine, country=args.country,
        intensity_g_per_kwh=args.carbon_intensity, pue=args.pue, ledger_path=ledger,
    )
    where = (f"ledger {ledger} row #{res.entry.entry_id}" if res.entry.entry_id is not None
             else f"fallback file {res.entry.fallback_path} (the ledger was unusable)")
    if res.energy_j is None:
        energy = "energy not measured"
    else:
        energy = f"{_fmt_energy(res.energy_j)} ({res.energy_source}"
        if res.attribution is not None:
            energy += (f"; CPU-side energy attributed by CPU time, share {100 * res.attribution.share:.1f}% of "
                       f"{_fmt_energy(res.machine_energy_j or 0.0)} machine-wide")
        energy += f"), {_fmt_co2(res.co2_g if res.co2_g is not None else math.nan)} CO2e"
    print(f"ssprop-energy audit: {res.status} (exit {res.exit_code}), {energy}; recorded in {where}", file=sys.stderr)
    return res.exit_code


def list_command(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    df = load_entries(ledger, since=args.since, project=args.project)
    if args.limit > 0:
        df = df.tail(args.limit)
    if df.empty:
        print(_nothing(args, ledger))
    else:
        here = socket.gethostname()
        rows = []
        for _, r in df.iterrows():
            status = r["status"]
            gone = r["host"] == here and not pd.isna(r["pid"]) and not psutil.pid_exists(int(r["pid"]))
            if status == "running" and gone:
                status = "running (process gone)"  # a crash or kill -9 left the row behind
            share = r["cpu_share"]
            energy = _fmt_energy(r["energy_j"])
            if math.isfinite(share):
                energy += f" ({100 * share:.0f}% cpu)"
            command = shlex.join(r["command"])
            rows.append([
                str(r["id"]), r["started_at"][:16].replace("T", " "), r["project"], r["user"], r["host"], r["kind"],
                status, "" if pd.isna(r["exit_code"]) else str(int(r["exit_code"])), _fmt_wall(r["wall_s"]),
                energy, r["energy_source"] or "", _fmt_co2(r["co2_g"]),
                command if len(command) <= 60 else command[:57] + "...",
            ])
        _print_table(["id", "started (UTC)", "project", "user", "host", "kind", "status", "exit", "wall", "energy",
                      "source", "CO2e", "command"], rows, left=7)
    _pending_note(ledger)
    return 0


def summary_command(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    df = load_entries(ledger, since=args.since, project=args.project)
    if df.empty:
        print(_nothing(args, ledger))
        _pending_note(ledger)
        return 0

    def cells(key: str, r: Any) -> list[str]:
        return [str(key), str(r["runs"]), str(r["complete"]), str(r["failed"]), str(r["interrupted"]),
                str(r["running"]), _fmt_energy(r["energy_j"]), r["energy_source"] or "-", _fmt_co2(r["co2_g"]),
                _fmt_wall(r["wall_s"]), str(r["unmeasured"])]

    table = summarize(df, args.by)
    rows = [cells(key, r) for key, r in table.iterrows()]
    rows.append(cells("TOTAL", summarize(df, None).iloc[0]))
    _print_table([args.by, "runs", "complete", "failed", "interrupted", "running", "energy", "source", "CO2e",
                  "wall", "unmeasured"], rows)
    if (table["energy_source"].isin(["estimated", "mixed"])).any():
        print("note: 'estimated' energy comes from a power model, not a meter; 'mixed' adds both")
    _pending_note(ledger)
    return 0


def export_command(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    df = load_entries(ledger, since=args.since, project=args.project)
    try:
        path = export_csv(df, args.csv)
    except OSError as exc:
        raise ConfigError(f"cannot write {args.csv}: {exc.strerror or exc}") from None
    print(f"wrote {len(df)} run(s) to {path}")
    _pending_note(ledger)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from ssprop_energy.ledger.html import render_ledger_html

    ledger = _ledger(args)
    df = load_entries(ledger, since=args.since, project=args.project)
    page = render_ledger_html(df, ledger_path=ledger, since=args.since, project=args.project,
                              pending=pending_rows(ledger))
    try:
        path = write_text_atomic(args.output, page)
    except OSError as exc:
        raise ConfigError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(f"wrote the ledger report ({len(df)} run(s)) to {path}")
    return 0


def import_command(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    paths = args.paths or [pending_dir(ledger)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or folder: {', '.join(missing)}")
    imported, skipped = import_fallback(paths, ledger_path=ledger)
    print(f"imported {imported} row(s) into {ledger}; {skipped} were already there")
    return 0
