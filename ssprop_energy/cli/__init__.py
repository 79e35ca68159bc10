"""The ``ssprop-energy`` command line: the only part of the package that prints.

Each subcommand lives in its own module of this package with two functions:

- ``register(subparsers) -> argparse.ArgumentParser`` adds the subcommand and its flags;
- ``run(args) -> int`` does the work and returns the exit code.

Error policy: an :class:`~ssprop_energy.errors.SSPropEnergyError` (a user mistake or an unusable input)
prints one line on stderr and exits 2; a bad flag exits 2 the same way; anything else is a bug and exits 1
with a short message and the path of a log file holding the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Sequence

from ssprop_energy import __version__
from ssprop_energy.errors import SSPropEnergyError

# subcommand name -> module under ssprop_energy.cli
COMMANDS: dict[str, str] = {
    "env": "env",
    "compare": "compare",
    "sweep": "sweep",
    "audit": "audit",
    "flops": "flops",
    "report": "report",
    "models": "models",
    "schedule": "schedule",
}

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage block) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"ssprop-energy {self.prog.split()[-1]}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The ``ssprop-energy`` parser with every subcommand."""
    parser = _Parser(prog="ssprop-energy", description="Measure what ssProp really saves.")
    parser.add_argument("--version", action="version", version=f"ssprop-energy {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"ssprop_energy.cli.{module}")
        mod.register(sub)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("ssprop_energy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _write_crash_log() -> Path:
    log_dir = Path(tempfile.gettempdir()) / "ssprop-energy"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(traceback.format_exc(), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssprop-energy`` script. Returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag (already reported in one line)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    _configure_logging(args.verbose)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)  # for --nproc-per-node's workers
    # a worker of a distributed run: rank 0 speaks for the run; another rank's error still shows, labelled
    where = f"rank {os.environ['RANK']}: " if os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ else ""
    try:
        return int(args.func(args) or 0)
    except SSPropEnergyError as exc:
        sys.stderr.write(f"{where}ssprop-energy {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"ssprop-energy {args.command}: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never show a user a traceback
        log = _write_crash_log()
        sys.stderr.write(
            f"{where}ssprop-energy {args.command}: internal error: {type(exc).__name__}: {exc} (traceback in {log})\n"
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
