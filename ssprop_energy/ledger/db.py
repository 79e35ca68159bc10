"""The ledger's SQLite file: where it lives, how it is opened, its schema and migrations.

The database runs in WAL mode (readers never block the writer, and a crash mid-write leaves the last
committed state) with a busy timeout, so that several runs finishing at once queue instead of failing.
Every write is one ``BEGIN IMMEDIATE`` transaction: the write lock is taken up front, which avoids the
deadlock two deferred transactions hit when both try to upgrade a read lock.

The schema version is SQLite's ``PRAGMA user_version``. ``MIGRATIONS[i]`` takes a database from version
``i`` to ``i + 1``; opening a database applies the missing ones in one transaction.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

import platformdirs

from ssprop_energy.errors import LedgerError

logger = logging.getLogger(__name__)

LEDGER_ENV = "SSPROP_ENERGY_LEDGER"
LEDGER_FILE = "ledger.sqlite"
BUSY_TIMEOUT_S = 30.0


def default_ledger_path() -> Path:
    """The ledger file: ``$SSPROP_ENERGY_LEDGER``, else ``ledger.sqlite`` in the user's data directory."""
    env = os.environ.get(LEDGER_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("ssprop-energy", appauthor=False)) / LEDGER_FILE


def pending_dir(ledger_path: str | os.PathLike[str] | None = None) -> Path:
    """Folder for rows that could not be written to the ledger (``<ledger file>.pending/``)."""
    path = Path(ledger_path) if ledger_path is not None else default_ledger_path()
    return path.with_name(path.name + ".pending")


# ----------------------------------------------------------------------------------------- migrations


def _v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE entries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            uid TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            project TEXT NOT NULL,
            user TEXT NOT NULL,
            host TEXT NOT NULL,
            command TEXT NOT NULL,            -- JSON array of arguments, as given or redacted
            redacted INTEGER NOT NULL DEFAULT 0,
            tags TEXT NOT NULL DEFAULT '[]',  -- JSON array
            started_at TEXT NOT NULL,         -- ISO 8601, UTC
            finished_at TEXT,
            wall_s REAL,
            status TEXT NOT NULL,
            exit_code INTEGER,
            energy_j REAL,                    -- NULL: not measured (still running, or the meter failed)
            energy_source TEXT,
            co2_g REAL,
            intensity_g_per_kwh REAL,
            intensity_source TEXT,
            pue REAL,
            run_dir TEXT,
            note TEXT
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE components (
            entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
            component TEXT NOT NULL,
            energy_j REAL NOT NULL,
            source TEXT NOT NULL,
            device TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (entry_id, component)
        )
        """
    )
    conn.execute("CREATE INDEX entries_started ON entries(started_at)")


def _v2(conn: sqlite3.Connection) -> None:
    # Version 2: `audit run` attributes machine-wide CPU energy to the wrapped process tree; keep the
    # machine-wide figure and the share beside the attributed one so the arithmetic stays checkable.
    conn.execute("ALTER TABLE entries ADD COLUMN pid INTEGER")
    conn.execute("ALTER TABLE entries ADD COLUMN cpu_share REAL")
    conn.execute("ALTER TABLE entries ADD COLUMN tree_cpu_s REAL")
    conn.execute("ALTER TABLE entries ADD COLUMN machine_cpu_s REAL")
    conn.execute("ALTER TABLE components ADD COLUMN machine_energy_j REAL")
    conn.execute("ALTER TABLE components ADD COLUMN share REAL")
    conn.execute("CREATE INDEX entries_project ON entries(project)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)


# ----------------------------------------------------------------------------------------- connection


def ledger_error(path: str | os.PathLike[str], exc: sqlite3.Error) -> LedgerError:
    """Translate an sqlite3 error into a one-line :class:`LedgerError` naming the file."""
    msg = str(exc)
    if "locked" in msg or "busy" in msg:
        return LedgerError(f"ledger {path} is locked by another process ({msg})")
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in msg or "malformed" in msg):
        return LedgerError(f"ledger {path} is corrupt or not an SQLite database ({msg})")
    return LedgerError(f"ledger {path}: {msg}")


def connect(
    path: str | os.PathLike[str] | None = None,
    *,
    timeout_s: float | None = None,
    create: bool = True,
    migrate_to: int = SCHEMA_VERSION,
) -> sqlite3.Connection:
    """Open the ledger, creating or migrating it as needed.

    Args:
        path: the SQLite file; default :func:`default_ledger_path`.
        timeout_s: how long to wait for another process's write lock before giving up, in seconds;
            default :data:`BUSY_TIMEOUT_S`.
        create: create a missing file; when False a missing ledger is a :class:`LedgerError`.
        migrate_to: the schema version to bring the file to (tests build older versions with it).

    Returns:
        A connection in autocommit mode (callers open their own ``BEGIN IMMEDIATE`` transactions), rows
        as :class:`sqlite3.Row`.

    Raises:
        LedgerError: the file is locked, corrupt, of a newer schema, or cannot be created.
    """
    path = Path(path) if path is not None else default_ledger_path()
    timeout_s = BUSY_TIMEOUT_S if timeout_s is None else timeout_s
    if not path.exists():
        if not create:
            raise LedgerError(f"no ledger at {path} (nothing has been recorded yet)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger folder {path.parent}: {exc}") from None
    try:
        conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None)
    except sqlite3.Error as exc:
        raise ledger_error(path, exc) from None
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        _enable_wal(conn, path, timeout_s)
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path, migrate_to)
    except sqlite3.Error as exc:
        conn.close()
        raise ledger_error(path, exc) from None
    except LedgerError:
        conn.close()
        raise
    return conn


def _enable_wal(conn: sqlite3.Connection, path: Path, timeout_s: float) -> None:
    # Switching a fresh file to WAL needs an exclusive lock, and SQLite does not always call the busy
    # handler for it, so several processes creating the ledger at once retry here themselves.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if str(mode).lower() != "wal":
        logger.warning("ledger %s: WAL mode unavailable (journal mode %s); concurrent writers will wait longer",
                       path, mode)


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version stored in the file (0 for a new, empty file)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _migrate(conn: sqlite3.Connection, path: Path, target: int) -> None:
    if schema_version(conn) == target:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated the file meanwhile.
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {path} has schema version {version}, newer than this ssprop-energy understands "
                f"({SCHEMA_VERSION}); upgrade ssprop-energy"
            )
        for step in range(version, target):
            MIGRATIONS[step](conn)
            logger.info("ledger %s: migrated schema %d -> %d", path, step, step + 1)
        if target > version:
            conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
