"""``ssprop-energy schedule``: the drop rate a schedule applies at every epoch (or iteration), before training.

It builds the schedule with the same function ``compare`` / ``sweep`` use (``DropSchedule.from_name``), so
what it prints is what a run with the same flags will apply. No torch is imported.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ssprop_energy.errors import ConfigError
from ssprop_energy.sparse.schedules import BY, SCHEDULES, DropSchedule

SCHEDULE_HELP = (
    "drop-rate schedule (default bar). bar = the paper's headline \"bar\" scheduler: dense and --drop-rate epochs "
    "alternate (constant + interleave, by epoch); constant; linear / cosine from --start-drop-rate to --drop-rate; "
    "halves = the public code's drop_mode='bar' (--start-drop-rate for the first half of the run, then "
    "--drop-rate). See `ssprop-energy schedule`."
)


def add_schedule_flags(p: argparse.ArgumentParser) -> None:
    """The schedule flags, with the same names and meanings as on ``compare``."""
    p.add_argument("--schedule", choices=SCHEDULES, default="bar", help=SCHEDULE_HELP)
    p.add_argument("--drop-rate", type=float, default=0.8,
                   help="the drop rate bar / constant apply and linear / cosine / halves end at (default 0.8; "
                   "public code: 1 - min_percentage, or 1 - percentage for constant)")
    p.add_argument("--start-drop-rate", type=float, default=0.0,
                   help="where linear / cosine / halves start (default 0 = dense; public code: 1 - percentage)")
    p.add_argument("--schedule-interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="alternate dense and sparse epochs after the warm-up, dense first (default: on for bar only)")
    p.add_argument("--warmup-epochs", type=int, default=0, help="dense warm-up epochs (default 0)")
    p.add_argument("--schedule-by", choices=BY, default="epoch", help="schedule granularity (default epoch)")
    p.add_argument("--period", type=int, default=10, help="period T in iterations, by iteration (default 10)")


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the ``schedule`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "schedule", help="print the drop rate a schedule applies at every epoch or iteration (no training)",
        description="What will my run do? Prints the drop rate of every epoch (or, with --schedule-by iteration, "
        "every iteration) for the schedule flags of compare / sweep, and the public code's equivalent arguments.",
    )
    add_schedule_flags(p)
    p.add_argument("--epochs", type=int, required=True, help="epochs in the run")
    p.add_argument("--iterations-per-epoch", type=int,
                   help="batches per epoch, ceil(train samples / batch size); needed with --schedule-by iteration")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def build(args: argparse.Namespace) -> DropSchedule:
    """The schedule the flags describe (the same call ``compare`` makes for its ssProp arm)."""
    return DropSchedule.from_name(
        args.schedule, drop_rate=args.drop_rate, total_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        by=args.schedule_by, period=args.period, start_drop_rate=args.start_drop_rate,
        interleave=args.schedule_interleave,
    )


def table(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``schedule`` prints, as one JSON-ready dict."""
    schedule = build(args)
    iters = args.iterations_per_epoch
    if iters is None:
        if schedule.by == "iteration":
            raise ConfigError("--schedule-by iteration needs --iterations-per-epoch (batches per epoch)")
        iters = 1
    if isinstance(iters, bool) or iters < 1:
        raise ConfigError(f"--iterations-per-epoch must be a positive integer, got {iters}")
    grid = schedule.rates(args.epochs, iters)
    if schedule.by == "epoch":
        rows: list[dict[str, Any]] = [{"epoch": e, "drop_rate": r[0]} for e, r in enumerate(grid)]
    else:
        rows = [{"epoch": e, "mean_drop_rate": sum(r) / len(r), "drop_rates": r} for e, r in enumerate(grid)]
    return {
        "description": schedule.describe(),
        "schedule": schedule.to_dict(),
        "official_args": schedule.official_args(),
        "epochs": args.epochs,
        "iterations_per_epoch": iters,
        "average_drop_rate": schedule.average_drop_rate(args.epochs, iters),
        "rates": rows,
    }


def _text(data: dict[str, Any]) -> list[str]:
    lines = [data["description"]]
    official = data["official_args"]
    if official is None:
        lines.append("public code: no equivalent (its DropSchedular rejects constant by iteration)")
    else:
        lines.append("public code: DropSchedular(" + ", ".join(f"{k}={v!r}" for k, v in official.items()) + ")")
    if data["schedule"]["by"] == "epoch":
        lines.append("epoch  drop rate   keep")
        lines += [f"{r['epoch']:5d}  {r['drop_rate']:9.4f}  {1 - r['drop_rate']:5.3f}" for r in data["rates"]]
    else:
        lines.append("epoch  mean drop  drop rate per iteration")
        previous = None
        for r in data["rates"]:
            pattern = " ".join(f"{v:.3f}".rstrip("0").rstrip(".") for v in r["drop_rates"])
            shown = "(same as above)" if pattern == previous else pattern
            lines.append(f"{r['epoch']:5d}  {r['mean_drop_rate']:9.4f}  {shown}")
            previous = pattern
    lines.append(f"average drop rate: {data['average_drop_rate']:.4f} over {data['epochs']} epoch(s) "
                 f"of {data['iterations_per_epoch']} iteration(s)")
    return lines


def run(args: argparse.Namespace) -> int:
    """Run the subcommand from parsed flags; returns the exit code."""
    data = table(args)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(_text(data)))
    return 0
