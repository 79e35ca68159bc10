"""An exclusive lock on a run directory, so that two processes never train into the same run.

Two ``compare --resume DIR`` at once would both retrain the pending arm-runs, the ledger would charge the
energy twice and the timings would come from two processes fighting over the cores. The lock is
``fcntl.flock`` on ``RUN_DIR/.lock``: the kernel drops it when the holder exits, however it exits (kill -9
included), so a stale lock file never blocks a later resume. The file holds the holder's pid, for the
message the second process prints.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import IO

from ssprop_energy.errors import ConfigError

LOCK_FILE = ".lock"


class RunLock:
    """Holds the lock of one run directory until :meth:`release` (or the process ends)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fh: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock without waiting.

        Raises:
            ConfigError: another process holds it (the message names its pid), or the lock file cannot be
                opened.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system: no lock, as before
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # Experiment.run() makes its directory
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot open the run lock ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{self.path.parent} is in use by another ssprop-energy process (pid {holder}); "
                                  "wait for it to finish or stop it first") from None
            raise ConfigError(f"{self.path}: cannot lock the run directory ({exc.strerror or exc})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fh is not None


def run_dir_in_use(run_dir: Path) -> bool:
    """True while a process holds the run directory's lock (a run in progress); never creates the lock file.

    A ``running`` summary with no holder belongs to a process that is gone (killed, or stopped by a full
    disk before it could say so): the run is stopped, and ``--resume`` continues it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return False
    try:
        fh = open(Path(run_dir) / LOCK_FILE, encoding="utf-8")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False
