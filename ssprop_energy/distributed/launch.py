"""``--nproc-per-node P``: run the same command in P worker processes through torch's elastic launcher.

This is what ``torchrun --standalone --nproc-per-node P -m ssprop_energy ...`` does (a c10d rendezvous on a
free local port, no restarts), through the launcher's Python API, so the workers see exactly torchrun's
environment. SIGINT / SIGTERM to this process reach the workers, which stop at the same batch and save
the run as interrupted.
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Sequence

from ssprop_energy.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130


def strip_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE`` (the workers must not launch again)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out


def launch(argv: Sequence[str], nproc_per_node: int) -> int:
    """Run ``python -m ssprop_energy *argv`` in ``nproc_per_node`` workers on this node; the exit code.

    The code is the first failed worker's (2 for a user error, 130 for an interrupted run), 130 when this
    process was signalled, 0 when every worker succeeded.

    Raises:
        ConfigError: ``nproc_per_node`` is not a positive integer.
    """
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be a positive integer, got {nproc_per_node}")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "ssprop_energy", *argv)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        log.info("workers failed with exit codes %s", codes)
        for wanted in (2, EXIT_INTERRUPTED):
            if wanted in codes:
                return wanted
        return next((c for c in codes if c and c > 0), 1)
    except SignalException:
        return EXIT_INTERRUPTED
    return 0
