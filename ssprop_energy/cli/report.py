"""``ssprop-energy report RUN_DIR [RUN_DIR ...] [-o OUT] [--format html|md]``: render a report from records."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssprop_energy.report import FORMATS, render_report


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
        help="html (default) or md; inferred from the --out suffix when omitted",
    )
    parser.set_defaults(func=run)
    return parser


def _resolve(args: argparse.Namespace) -> tuple[Path, str]:
    fmt = args.format
    if fmt is None:
        fmt = "md" if args.out is not None and args.out.suffix.lower() in (".md", ".markdown") else "html"
    out = args.out
    if out is None:
        name = f"report.{fmt}"
        out = Path(args.run_dirs[0]) / name if len(args.run_dirs) == 1 else Path(name)
    return out, fmt


def run(args: argparse.Namespace) -> int:
    out, fmt = _resolve(args)
    path = render_report(args.run_dirs, out, fmt=fmt)
    print(f"wrote {path}")
    return 0
