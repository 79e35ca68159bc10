"""``ssprop-energy sweep``: a grid of ssProp settings against one shared dense baseline."""

from __future__ import annotations

import argparse
from typing import Any

from ssprop_energy.cli._experiment import add_common_flags, execute, float_list
from ssprop_energy.cli.schedule import SCHEDULE_HELP
from ssprop_energy.experiment.config import ExperimentConfig


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "sweep", help="run a grid of drop rates / schedules / dropout against one dense baseline",
        description="Drop-rate sweep: every (schedule, drop rate, dropout) setting is an ssProp arm, all paired "
        "with one shared dense baseline (no dropout).",
    )
    add_common_flags(p, ExperimentConfig())
    p.add_argument("--drop-rates", type=float_list, default=[0.2, 0.4, 0.6, 0.8],
                   help="comma-separated drop rates (default 0.2,0.4,0.6,0.8)")
    p.add_argument("--schedules", type=_names, default=["bar"],
                   help="comma-separated schedules (default bar); " + SCHEDULE_HELP)
    p.add_argument("--dropout", type=float_list, default=[0.0], help="comma-separated dropout rates (default 0)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand from parsed flags; returns the exit code."""
    return execute(args, "sweep", drop_rates=args.drop_rates, schedules=args.schedules, dropouts=args.dropout)
