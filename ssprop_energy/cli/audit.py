"""``ssprop-energy audit``: the lab's carbon-audit ledger.

- ``audit run [OPTIONS] -- CMD ARGS...``  run a command under an energy meter and record it (exit code passed through)
- ``audit list``                         recent runs
- ``audit summary --by user,project,...``  totals per group (several keys: one row per combination)
- ``audit export --csv FILE``            every row as CSV
- ``audit report -o FILE.html``          a lab-level HTML summary
- ``audit import PATH...``               bring JSON fallback rows (written when the ledger was unusable) in
- ``audit import --codecarbon FILE.csv`` add runs tracked with CodeCarbon (its emissions CSV)
- ``audit sync``                         send rows spooled while the ledger server was unreachable
- ``audit migrate --to URL``             copy a local SQLite ledger into a PostgreSQL server
- ``audit metrics``                      the ledger as Prometheus text exposition (stdout)
- ``audit serve-metrics --port P``       serve that exposition on ``http://127.0.0.1:P/metrics`` until Ctrl-C

Every action takes ``--ledger PATH|URL`` (default ``$SSPROP_ENERGY_LEDGER``, else the user data directory):
an SQLite file or a ``postgresql://user@host:port/dbname`` server.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from ssprop_energy.energy import KINDS
from ssprop_energy.errors import ConfigError
from ssprop_energy.fmt import fmt_co2_compact as _fmt_co2
from ssprop_energy.fmt import fmt_energy_compact as _fmt_energy
from ssprop_energy.fmt import fmt_wall_compact as _fmt_wall
from ssprop_energy.ledger.db import LedgerLocation, locate, pending_dir, require_driver
from ssprop_energy.ledger.entries import import_fallback, pending_rows, sync_pending
from ssprop_energy.ledger.summary import GROUP_KEYS, export_csv, load_entries, parse_since, summarize
from ssprop_energy.records import write_text_atomic


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
    """Add the ``audit`` subcommand and its own subcommands to the CLI's subparsers."""
    p = sub.add_parser("audit", help="the lab's carbon-audit ledger: record any command's energy and CO2, summarise",
                       description="Carbon-audit ledger: an SQLite file or a PostgreSQL server "
                                   "($SSPROP_ENERGY_LEDGER, --ledger, or a file in the user data directory).")
    p.add_argument("--ledger", default=None, metavar="PATH|URL", help=LEDGER_HELP)
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=type(p))
    asub.required = True

    # the same flag after the action (`audit run --ledger X`); SUPPRESS keeps the group-level value otherwise
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", default=argparse.SUPPRESS, metavar="PATH|URL", help=LEDGER_HELP)
    filters = argparse.ArgumentParser(add_help=False, parents=[common])
    filters.add_argument("--since", type=_since, help="only runs started on or after this date (YYYY-MM-DD, UTC)")
    filters.add_argument("--project", help="only this project")

    r = asub.add_parser("run", parents=[common], help="run a command under an energy meter and record it",
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
    sm.add_argument("--by", type=_group_keys, default=["project"], metavar="KEY[,KEY...]",
                    help=f"grouping, one or several of {', '.join(GROUP_KEYS)} (default project)")
    sm.set_defaults(func=summary_command)

    ex = asub.add_parser("export", parents=[filters], help="every row as CSV")
    ex.add_argument("--csv", type=Path, required=True, metavar="FILE", help="output CSV file (written atomically)")
    ex.set_defaults(func=export_command)

    rp = asub.add_parser("report", parents=[filters], help="lab-level HTML summary")
    rp.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.html", help="output HTML file")
    rp.set_defaults(func=report_command)

    im = asub.add_parser("import", parents=[common],
                         help="add JSON fallback rows (from run folders or the pending folder), or CodeCarbon runs")
    im.add_argument("paths", nargs="*", type=Path,
                    help="fallback files or folders (default: the ledger's pending folder)")
    im.add_argument("--codecarbon", type=Path, metavar="EMISSIONS.csv",
                    help="import the runs of a CodeCarbon emissions CSV (duplicate run ids are skipped)")
    im.add_argument("--project", help="project for CodeCarbon runs (default: their project_name)")
    im.set_defaults(func=import_command)

    sy = asub.add_parser("sync", parents=[common], help="send rows spooled while the ledger server was unreachable")
    sy.set_defaults(func=sync_command)

    mg = asub.add_parser("migrate", parents=[common], help="copy a local SQLite ledger into a PostgreSQL server",
                         description="Copy every row and component of the SQLite ledger (--ledger, or the "
                                     "default) into the ledger at --to; rows already there are skipped.")
    mg.add_argument("--to", required=True, metavar="URL", help="the target ledger (postgresql://...)")
    mg.set_defaults(func=migrate_command)

    mt = asub.add_parser("metrics", parents=[common], help="the ledger as Prometheus text exposition")
    mt.set_defaults(func=metrics_command)
    sv = asub.add_parser("serve-metrics", parents=[common], help="serve the Prometheus exposition over HTTP")
    sv.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    sv.add_argument("--addr", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.set_defaults(func=serve_metrics_command)
    return p


LEDGER_HELP = ("ledger: an SQLite file or a postgresql://user@host:port/dbname URL "
               "(default $SSPROP_ENERGY_LEDGER, else ledger.sqlite in the user data directory)")


class _LedgerForRun(argparse.Action):
    """``--ledger`` for commands that append through ``ledger.start_entry`` without a ledger argument
    (``compare``, ``sweep``): validated when parsed (a bad URL is one line, exit 2, before anything runs) and
    handed on as ``$SSPROP_ENERGY_LEDGER`` for this process."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        from ssprop_energy.errors import LedgerError
        from ssprop_energy.ledger.db import LEDGER_ENV

        try:
            require_driver(locate(value))
        except LedgerError as exc:
            parser.error(str(exc))
        os.environ[LEDGER_ENV] = str(value)
        setattr(namespace, self.dest, value)


def add_ledger_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--ledger PATH|URL`` to a command that records itself in the ledger (compare, sweep)."""
    parser.add_argument("--ledger", action=_LedgerForRun, metavar="PATH|URL", help=LEDGER_HELP)


def _group_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in GROUP_KEYS]
    if not keys or bad:
        raise argparse.ArgumentTypeError(f"cannot group by {text!r} (one or several of {', '.join(GROUP_KEYS)}, "
                                         "comma-separated)")
    if len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(f"a grouping key is repeated in {text!r}")
    return keys


def _ledger(args: argparse.Namespace) -> LedgerLocation:
    """The ledger named by ``--ledger`` or the environment; a bad URL is a one-line error before any work."""
    loc = locate(args.ledger)
    require_driver(loc)
    return loc


def _nothing(args: argparse.Namespace, ledger: LedgerLocation) -> str:
    if args.since is not None or args.project is not None:
        return f"no runs in {ledger} match the filters"
    return f"no runs recorded in {ledger}"


def _pending_note(ledger: LedgerLocation) -> None:
    pending = pending_rows(ledger)
    if pending:
        how = "`ssprop-energy audit sync` sends them" if ledger.is_server else "`ssprop-energy audit import` adds them"
        print(f"note: {len(pending)} run(s) wait as JSON in {pending_dir(ledger)} (ledger was unusable when they "
              f"ended); {how}", file=sys.stderr)


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
    """``audit run``: run a command under the ledger and record its energy; returns the exit code."""
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
    # a fallback file means the finished row is not in the ledger, even where its start row is
    where = (f"fallback file {res.entry.fallback_path} (the ledger was unusable)" if res.entry.fallback_path
             else f"ledger {ledger} row #{res.entry.entry_id}")
    if res.energy_j is None:
        energy = "energy not measured"
    else:
        energy = f"{_fmt_energy(res.energy_j)} ({res.energy_source}"
        if res.attribution is not None:
            energy += (f"; CPU-side energy attributed by CPU time, share {100 * res.attribution.share:.1f}% of "
                       f"{_fmt_energy(res.machine_energy_j or 0.0)} machine-wide")
        if res.codecarbon_process_j is not None:
            energy += (f"; CPU + RAM {_fmt_energy(res.codecarbon_process_j)} for the command's process tree, "
                       "as CodeCarbon's process mode")
        if res.gpu_attribution is not None:
            energy += (f"; shared GPU charged {100 * res.gpu_attribution.share:.1f}% by "
                       f"{res.gpu_attribution.method}")
        energy += f"), {_fmt_co2(res.co2_g if res.co2_g is not None else math.nan)} CO2e"
    status = f"{res.status} (exit {res.exit_code}" + (f": {res.start_error})" if res.start_error else ")")
    print(f"ssprop-energy audit: {status}, {energy}; recorded in {where}", file=sys.stderr)
    return res.exit_code


def list_command(args: argparse.Namespace) -> int:
    """``audit list``: list the ledger rows; returns the exit code."""
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
    """``audit summary``: total the ledger per project and month; returns the exit code."""
    ledger = _ledger(args)
    df = load_entries(ledger, since=args.since, project=args.project)
    if df.empty:
        print(_nothing(args, ledger))
        _pending_note(ledger)
        return 0

    keys = args.by

    def cells(key: Any, r: Any) -> list[str]:
        key = key if isinstance(key, tuple) else (key,) + ("",) * (len(keys) - 1)
        return [*map(str, key), str(r["runs"]), str(r["complete"]), str(r["failed"]), str(r["interrupted"]),
                str(r["partial"]), str(r["running"]), _fmt_energy(r["energy_j"]), r["energy_source"] or "-",
                _fmt_co2(r["co2_g"]),
                _fmt_wall(r["wall_s"]), str(r["unmeasured"])]

    table = summarize(df, keys)
    rows = [cells(key, r) for key, r in table.iterrows()]
    rows.append(cells("TOTAL", summarize(df, None).iloc[0]))
    _print_table([*keys, "runs", "complete", "failed", "interrupted", "partial", "running", "energy", "source", "CO2e",
                  "wall", "unmeasured"], rows, left=len(keys))
    if table["partial"].sum():
        print("note: 'partial' runs were killed; they are charged what was measured up to their last heartbeat")
    if (table["energy_source"].isin(["estimated", "mixed"])).any():
        print("note: 'estimated' energy comes from a power model, not a meter; 'mixed' adds both")
    _pending_note(ledger)
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``audit export``: write the ledger rows as CSV or JSON; returns the exit code."""
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
    """``audit report``: render the ledger's HTML report; returns the exit code."""
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
    """``audit import``: import rows from another ledger or a CodeCarbon CSV; returns the exit code."""
    ledger = _ledger(args)
    if args.codecarbon is not None:
        from ssprop_energy.ledger.codecarbon import import_codecarbon

        if args.paths:
            raise ConfigError("give either --codecarbon FILE or fallback PATHs, not both")
        added, skipped = import_codecarbon(args.codecarbon, ledger, project=args.project)
        print(f"imported {added} CodeCarbon run(s) from {args.codecarbon} into {ledger}; "
              f"{skipped} duplicate(s) skipped")
        return 0
    if args.project is not None:
        raise ConfigError("--project applies to --codecarbon imports only")
    paths = args.paths or [pending_dir(ledger)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or folder: {', '.join(missing)}")
    imported, skipped = import_fallback(paths, ledger_path=ledger)
    print(f"imported {imported} row(s) into {ledger}; {skipped} were already there")
    return 0


def sync_command(args: argparse.Namespace) -> int:
    """``audit sync``: copy local rows to the ledger server; returns the exit code."""
    ledger = _ledger(args)
    waiting = len(pending_rows(ledger))
    sent, skipped = sync_pending(ledger)
    print(f"sent {sent} spooled row(s) to {ledger}; {skipped} were already there "
          f"({waiting} waited in {pending_dir(ledger)})")
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    """``audit migrate``: bring a ledger's schema up to date; returns the exit code."""
    from ssprop_energy.ledger.migrate import copy_ledger

    source = _ledger(args)
    target = locate(args.to)
    res = copy_ledger(source, target)
    print(f"copied {source} -> {target}: {res.added} row(s) added, {res.skipped} already there")
    print(f"source: {res.source_rows} rows, {res.source_components} components, "
          f"{_fmt_energy(res.source_energy_j)} ({res.source_energy_j:.6g} J)")
    print(f"target: {res.target_rows} of them present, {res.target_components} components, "
          f"{_fmt_energy(res.target_energy_j)} ({res.target_energy_j:.6g} J)")
    print("verified: counts and energy sums match")
    return 0


def metrics_command(args: argparse.Namespace) -> int:
    from ssprop_energy.ledger.prometheus import exposition

    sys.stdout.write(exposition(_ledger(args)))
    return 0


def serve_metrics_command(args: argparse.Namespace) -> int:
    import time

    from ssprop_energy.ledger.prometheus import serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}")
    ledger = _ledger(args)
    try:
        serve(ledger, args.port, addr=args.addr)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.addr}:{args.port}: {exc.strerror or exc}") from None
    print(f"serving {ledger} as Prometheus metrics on http://{args.addr}:{args.port}/metrics (Ctrl-C stops)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
