"""``ssprop-energy report RUN_DIR [RUN_DIR ...] [-o OUT] [--format html|md]``: render a report from records."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssprop_energy.errors import ConfigError
from ssprop_energy.records import RecordWriteError
from ssprop_energy.report import FORMATS, render_report


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "report",
        help="render a self-contained HTML (or Markdown) report from run directories",
        description="Render one report from one or more run directories (reads records only).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory holding summary.json")
    parser.add_argument(
        "-o", "--out", type=Path, default=None,
        help="output file (default: RUN_DIR/report.html for one run, ./report.html for several)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default=None,
        help="html (default), md, latex or model-card (one run; README.md); inferred from the --out suffix (.md, .tex) when omitted",
    )
    parser.set_defaults(func=run)
    return parser


def _resolve(args: argparse.Namespace) -> tuple[Path, str]:
    fmt = args.format
    if fmt is None:
        suffix = args.out.suffix.lower() if args.out is not None else ""
        fmt = "md" if suffix in (".md", ".markdown") else "latex" if suffix == ".tex" else "html"
    out = args.out
    if out is None:
        name = {"latex": "report.tex", "model-card": "README.md"}.get(fmt, f"report.{fmt}")
        out = Path(args.run_dirs[0]) / name if len(args.run_dirs) == 1 else Path(name)
    return out, fmt


def resume_hint(run_dir: str | Path) -> str | None:
    """The line for a run that did not finish (interrupted, failed, or stopped while ``running``), or None."""
    from ssprop_energy.errors import RecordError
    from ssprop_energy.records import SUMMARY_FILE, read_json
    from ssprop_energy.runlock import run_dir_in_use

    try:
        data = read_json(Path(run_dir) / SUMMARY_FILE)
    except RecordError:
        return None
    status, kind = data.get("status"), data.get("kind") or "compare"
    if status == "complete" or (status == "running" and run_dir_in_use(Path(run_dir))):
        return None
    what = {"interrupted": "run interrupted", "failed": "run failed"}.get(status, "run stopped before it finished")
    return (f"{run_dir}: {what}; the report covers the arm-runs that finished. Resume with "
            f"`ssprop-energy {kind} --resume {run_dir}`")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand from parsed flags; returns the exit code."""
    out, fmt = _resolve(args)
    for run_dir in args.run_dirs:
        hint = resume_hint(run_dir)
        if hint:
            sys.stderr.write(f"note: {hint}\n")
    try:
        path = render_report(args.run_dirs, out, fmt=fmt)
    except RecordWriteError as exc:
        raise ConfigError(f"cannot write the report: {exc}") from None
    print(f"wrote {path}")
    return 0
