"""``ssprop-energy compare``: dense vs ssProp, paired, on one model and dataset."""

from __future__ import annotations

import argparse
from typing import Any

from ssprop_energy.cli._experiment import add_common_flags, execute
from ssprop_energy.cli.schedule import SCHEDULE_HELP
from ssprop_energy.experiment.config import SCHEDULES, ExperimentConfig


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "compare", help="train dense and ssProp arms side by side and compare FLOPs, energy, CO2 and accuracy",
        description="Paired dense-vs-ssProp training run. Defaults are the paper's headline setting "
        "(bar schedule: dense and 80%%-drop epochs alternate) on the embedded digits dataset.",
    )
    add_common_flags(p, ExperimentConfig())
    p.add_argument("--drop-rate", type=float,
                   help="ssProp drop rate in [0, 1) (default 0.8): what bar / constant apply, where "
                   "linear / cosine / halves end")
    p.add_argument("--schedule", choices=SCHEDULES, help=SCHEDULE_HELP)
    p.add_argument("--dropout", type=float, help="dropout after conv blocks, both arms (default 0)")
    p.add_argument("--aa", action="store_true", default=None,
                   help="A/A check: run the dense baseline twice (same layers, same seed) and report the machine's "
                   "noise floor with the same estimator (is my machine quiet enough?)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand from parsed flags; returns the exit code."""
    return execute(
        args, "compare",
        drop_rates=[args.drop_rate] if args.drop_rate is not None else None,
        schedules=[args.schedule] if args.schedule is not None else None,
        dropouts=[args.dropout] if args.dropout is not None else None,
    )
