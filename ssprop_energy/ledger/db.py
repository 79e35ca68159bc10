"""Where the ledger lives, how it is opened, its schema and its migrations: an SQLite file or a PostgreSQL server.

Choice: SQLAlchemy Core 2.x for both backends, psycopg 3 as the PostgreSQL driver. One set of table
definitions and one list of migrations serve both; SQLAlchemy compiles the few differences (identity
columns, ``DOUBLE PRECISION``, quoting the reserved word ``user``) per dialect, so there are no two
hand-written SQL dialects to keep in step. The ORM is not used: the ledger is two tables and a handful of
statements. psycopg 3 is the maintained PostgreSQL adapter (binary wheels, no libpq build); SQLite stays
the standard library's ``sqlite3`` underneath, so a file ledger needs no server and no extra package.

A ledger is named by ``$SSPROP_ENERGY_LEDGER`` or ``--ledger``: a file path (SQLite) or a
``postgresql://user@host:port/dbname`` URL (``postgres://`` and ``postgresql+psycopg://`` too). Any other
URL scheme, or a malformed URL, is a :class:`LedgerError` before anything is created.

SQLite: WAL mode (readers never block the writer; a crash mid-write leaves the last committed state) and a
busy timeout, so several runs finishing at once queue instead of failing. Every write is one ``BEGIN
IMMEDIATE`` transaction: the write lock is taken up front, which avoids the deadlock two deferred
transactions hit when both try to upgrade a read lock.

PostgreSQL: every write is one transaction at READ COMMITTED; ids come from an identity column, and the
rare writes that must see "is this uid there yet" (finishing, importing) take a transaction-scoped advisory
lock on the uid, so two hosts importing the same row cannot both insert it. Connections are not pooled:
a run touches the ledger twice, and a pool would not survive ``fork``.

Schema version: ``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``; opening a database
applies the missing ones in one transaction (PostgreSQL's DDL is transactional too). The version is
``PRAGMA user_version`` in SQLite (as since version 1, so existing files keep working) and the one row of
the ``ledger_schema`` table in PostgreSQL (migrations there serialise on an advisory lock).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import platformdirs
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from ssprop_energy.errors import LedgerError

logger = logging.getLogger(__name__)

LEDGER_ENV = "SSPROP_ENERGY_LEDGER"
LEDGER_FILE = "ledger.sqlite"
BUSY_TIMEOUT_S = 30.0
# how long to wait for a PostgreSQL server before spooling the row locally
CONNECT_TIMEOUT_S = 5
SERVER_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
POSTGRES_INSTALL_FIX = "pip install 'ssprop-energy[postgres]' (psycopg 3)"
_PG_MIGRATION_LOCK = 0x55_50_E7  # advisory lock key: one migrating process at a time
# "name:" at the start: a URL attempt (two letters at least, so a Windows drive letter is still a path)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")


# ------------------------------------------------------------------------------------------ locations


@dataclass(frozen=True)
class LedgerLocation:
    """A ledger: an SQLite ``path`` or a PostgreSQL ``url`` (exactly one is set).

    ``str()`` gives the path, or the URL with its password hidden (safe to print and to store).
    """

    path: Path | None = None
    url: URL | None = None

    @property
    def is_server(self) -> bool:
        return self.url is not None

    def __str__(self) -> str:
        if self.url is not None:
            return self.url.set(drivername=self.url.drivername.split("+")[0]).render_as_string(hide_password=True)
        return str(self.path)


def locate(ledger: str | os.PathLike[str] | LedgerLocation | None = None) -> LedgerLocation:
    """Resolve a ledger name (path, URL, or None for the default) to a :class:`LedgerLocation`.

    Raises:
        LedgerError: a URL with an unsupported scheme, or a malformed ``postgresql://`` URL.
    """
    if isinstance(ledger, LedgerLocation):
        return ledger
    if ledger is None:
        env = os.environ.get(LEDGER_ENV)
        if not env:
            path = Path(platformdirs.user_data_dir("ssprop-energy", appauthor=False)) / LEDGER_FILE
            if not os.environ.get("HOME") and not os.environ.get("XDG_DATA_HOME"):
                # Python then takes the home folder from the password database (e.g. /root under sudo -E):
                # a ledger nobody expects, so say which one it is.
                logger.warning("HOME is not set; using the ledger %s (set %s or --ledger to choose)", path, LEDGER_ENV)
            return LedgerLocation(path=path)
        ledger = env
    if isinstance(ledger, Path):
        return LedgerLocation(path=ledger.expanduser())
    text = os.fspath(ledger)
    m = _SCHEME.match(text)
    if m is None:
        return LedgerLocation(path=Path(text).expanduser())
    scheme = m.group(1).lower()
    if scheme not in SERVER_SCHEMES:
        raise LedgerError(f"ledger {text!r}: unsupported scheme {scheme!r} (give a file path for SQLite, "
                          "or a postgresql://user@host:port/dbname URL)")
    if not text[m.end():].startswith("//"):
        raise LedgerError(f"ledger {text!r}: malformed URL (expected postgresql://user@host:port/dbname)")
    try:
        url = make_url(text)
        port = url.port  # a non-numeric port raises here
    except (ArgumentError, ValueError) as exc:
        raise LedgerError(f"ledger {text!r}: malformed URL ({exc})") from None
    if not url.host and not url.query.get("host"):
        raise LedgerError(f"ledger {text!r}: malformed URL (no host; expected postgresql://user@host:port/dbname)")
    if port is not None and not 0 < port < 65536:
        raise LedgerError(f"ledger {text!r}: malformed URL (port {port} out of range)")
    return LedgerLocation(url=url.set(drivername="postgresql+psycopg"))


def default_ledger_path() -> Path | str:
    """The default ledger: ``$SSPROP_ENERGY_LEDGER`` (a path, or a server URL as text), else ``ledger.sqlite``
    in the user's data directory."""
    loc = locate(None)
    return loc.path if loc.path is not None else str(loc)


def pending_dir(ledger: str | os.PathLike[str] | LedgerLocation | None = None) -> Path:
    """Folder for rows that could not be written to the ledger.

    ``<ledger file>.pending/`` for a file; for a server, a local spool folder per server and database in the
    user's data directory (rows wait there until the next ledger access or ``audit sync`` sends them).
    """
    loc = locate(ledger)
    if loc.path is not None:
        return loc.path.with_name(loc.path.name + ".pending")
    assert loc.url is not None
    name = f"{loc.url.host or 'socket'}_{loc.url.port or 5432}_{loc.url.database or ''}"
    digest = hashlib.sha256(str(loc).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return Path(platformdirs.user_data_dir("ssprop-energy", appauthor=False)) / "ledger-spool" / f"{safe}-{digest}"


# ----------------------------------------------------------------------------------------- the schema

# The current schema, for statements (the migrations below create it step by step).
METADATA = sa.MetaData()
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite's AUTOINCREMENT needs INTEGER exactly

_ENTRY_SPECS: list[tuple[str, Any, dict[str, Any]]] = [
    ("id", _ID, {"primary_key": True}),
    ("uid", sa.Text, {"nullable": False, "unique": True}),
    ("kind", sa.Text, {"nullable": False}),
    ("project", sa.Text, {"nullable": False}),
    ("user", sa.Text, {"nullable": False}),
    ("host", sa.Text, {"nullable": False}),
    ("command", sa.Text, {"nullable": False}),  # JSON array of arguments, as given or redacted
    ("redacted", sa.Integer, {"nullable": False, "server_default": "0"}),
    ("tags", sa.Text, {"nullable": False, "server_default": "[]"}),  # JSON array
    ("started_at", sa.Text, {"nullable": False}),  # ISO 8601, UTC (sorts as text)
    ("finished_at", sa.Text, {}),
    ("wall_s", sa.Double, {}),
    ("status", sa.Text, {"nullable": False}),
    ("exit_code", sa.Integer, {}),
    ("energy_j", sa.Double, {}),  # NULL: not measured (still running, or the meter failed)
    ("energy_source", sa.Text, {}),
    ("co2_g", sa.Double, {}),
    ("intensity_g_per_kwh", sa.Double, {}),
    ("intensity_source", sa.Text, {}),
    ("pue", sa.Double, {}),
    ("run_dir", sa.Text, {}),
    ("note", sa.Text, {}),
    # v2: CPU-time attribution
    ("pid", sa.Integer, {}),
    ("cpu_share", sa.Double, {}),
    ("tree_cpu_s", sa.Double, {}),
    ("machine_cpu_s", sa.Double, {}),
    # v3: the scheduler's job metadata, GPU visibility, the GPU share's method, and the running heartbeat
    ("slurm_job_id", sa.Text, {}),
    ("slurm_array_task_id", sa.Text, {}),
    ("slurm_nodelist", sa.Text, {}),
    ("slurm_partition", sa.Text, {}),
    ("cuda_visible_devices", sa.Text, {}),
    ("gpu_share", sa.Double, {}),
    ("gpu_share_method", sa.Text, {}),
    ("heartbeat_at", sa.Text, {}),  # last time a running row's energy so far was written (ISO 8601, UTC)
]
_COMPONENT_SPECS: list[tuple[str, Any, dict[str, Any]]] = [
    ("entry_id", _ID, {"nullable": False}),
    ("component", sa.Text, {"nullable": False}),
    ("energy_j", sa.Double, {"nullable": False}),
    ("source", sa.Text, {"nullable": False}),
    ("device", sa.Text, {"nullable": False, "server_default": ""}),
    ("machine_energy_j", sa.Double, {}),  # v2
    ("share", sa.Double, {}),  # v2
    ("share_method", sa.Text, {}),  # v3: "cpu-time share", "nvml utilisation", "compute processes"
]
_V1_ENTRY_COLUMNS = 22  # id .. note
_V1_COMPONENT_COLUMNS = 5  # entry_id .. device


def _entries_table(md: sa.MetaData, n: int | None = None) -> sa.Table:
    return sa.Table("entries", md, *(sa.Column(name, t, **kw) for name, t, kw in _ENTRY_SPECS[:n]),
                    sqlite_autoincrement=True)


def _components_table(md: sa.MetaData, n: int | None = None) -> sa.Table:
    return sa.Table("components", md, *(sa.Column(name, t, **kw) for name, t, kw in _COMPONENT_SPECS[:n]),
                    sa.ForeignKeyConstraint(["entry_id"], ["entries.id"], ondelete="CASCADE"),
                    sa.PrimaryKeyConstraint("entry_id", "component"))


ENTRIES = _entries_table(METADATA)
COMPONENTS = _components_table(METADATA)


def _add_columns(conn: Connection, table: sa.Table, names: tuple[str, ...]) -> None:
    prep = conn.dialect.identifier_preparer
    for name in names:
        col = table.c[name]
        ddl_type = col.type.compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE {prep.quote(table.name)} ADD COLUMN {prep.quote(name)} {ddl_type}")


def _v1(conn: Connection) -> None:
    md = sa.MetaData()
    entries = _entries_table(md, _V1_ENTRY_COLUMNS)
    _components_table(md, _V1_COMPONENT_COLUMNS)
    sa.Index("entries_started", entries.c.started_at)
    md.create_all(conn)


def _v2(conn: Connection) -> None:
    # `audit run` attributes machine-wide CPU energy to the wrapped process tree; keep the machine-wide
    # figure and the share beside the attributed one so the arithmetic stays checkable.
    _add_columns(conn, ENTRIES, ("pid", "cpu_share", "tree_cpu_s", "machine_cpu_s"))
    _add_columns(conn, COMPONENTS, ("machine_energy_j", "share"))
    conn.exec_driver_sql("CREATE INDEX entries_project ON entries(project)")


def _v3(conn: Connection) -> None:
    # Who ran what, where (a lab ledger spans machines and a scheduler), and the GPU share of shared GPUs.
    _add_columns(conn, ENTRIES, ("slurm_job_id", "slurm_array_task_id", "slurm_nodelist", "slurm_partition",
                                 "cuda_visible_devices", "gpu_share", "gpu_share_method", "heartbeat_at"))
    _add_columns(conn, COMPONENTS, ("share_method",))
    prep = conn.dialect.identifier_preparer
    conn.exec_driver_sql(f"CREATE INDEX entries_user ON entries({prep.quote('user')})")


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3]
SCHEMA_VERSION = len(MIGRATIONS)


# ----------------------------------------------------------------------------------------- engines

_ENGINES: dict[tuple[int, str], Engine] = {}


def _sqlite_engine(path: Path, timeout_s: float) -> Engine:
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.pool.NullPool,
                              connect_args={"timeout": timeout_s})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would defer BEGIN; take control of it (SQLAlchemy's recipe).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        _enable_wal(cur, path, timeout_s)
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")

    return engine


def _sqlite_read_only_engine(path: Path, timeout_s: float, immutable: bool) -> Engine:
    # mode=ro: no write, no migration, no WAL switch (which would write). immutable=1 also skips the
    # -shm file, which a WAL-mode ledger needs and a reader without write access to its folder cannot create.
    flag = "immutable=1" if immutable else "mode=ro"
    return sa.create_engine(f"sqlite:///file:{path}?{flag}&uri=true", poolclass=sa.pool.NullPool,
                            connect_args={"timeout": timeout_s})


def writable(path: Path) -> bool:
    """Whether this process may write the SQLite ledger ``path`` (the file and, for its journal, its folder)."""
    target = path if path.exists() else path.parent
    return os.access(target, os.W_OK) and os.access(path.parent, os.W_OK)


def require_driver(loc: LedgerLocation) -> None:
    """Raise :class:`LedgerError` when ``loc`` is a server and its driver (psycopg 3) is not installed: a
    setup mistake to report before a run starts, not an outage to spool around."""
    if loc.is_server:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise LedgerError(f"a PostgreSQL ledger needs the psycopg package: {POSTGRES_INSTALL_FIX}") from None


def _server_engine(url: URL) -> Engine:
    require_driver(LedgerLocation(url=url))
    args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        args["connect_timeout"] = CONNECT_TIMEOUT_S
    try:
        return sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=args)
    except (NoSuchModuleError, ArgumentError) as exc:
        raise LedgerError(f"ledger {url.render_as_string(hide_password=True)}: {exc}") from None


def _engine(loc: LedgerLocation, timeout_s: float) -> Engine:
    key = (os.getpid(), f"{loc}|{timeout_s}")
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _sqlite_engine(loc.path, timeout_s) if loc.path is not None else _server_engine(loc.url)  # type: ignore[arg-type]
        _ENGINES[key] = engine
    return engine


def _enable_wal(cur: Any, path: Path, timeout_s: float) -> None:
    # Switching a fresh file to WAL needs an exclusive lock, and SQLite does not always call the busy
    # handler for it, so several processes creating the ledger at once retry here themselves.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if str(mode).lower() != "wal":
        logger.warning("ledger %s: WAL mode unavailable (journal mode %s); concurrent writers will wait longer",
                       path, mode)


# ----------------------------------------------------------------------------------------- errors


def ledger_error(ledger: LedgerLocation | str | os.PathLike[str], exc: BaseException) -> LedgerError:
    """Translate a database error into a one-line :class:`LedgerError` naming the ledger."""
    orig = getattr(exc, "orig", None) or exc
    msg = " ".join(str(orig).split()) or type(orig).__name__
    where = str(ledger)
    if isinstance(ledger, LedgerLocation) and ledger.is_server:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated or _unreachable(msg):
            return LedgerError(f"ledger server {where} is unreachable ({msg})")
        return LedgerError(f"ledger server {where}: {msg}")
    if "locked" in msg or "busy" in msg:
        return LedgerError(f"ledger {where} is locked by another process ({msg})")
    if "not a database" in msg or "malformed" in msg:
        return LedgerError(f"ledger {where} is corrupt or not an SQLite database ({msg})")
    return LedgerError(f"ledger {where}: {msg}")


def _unreachable(msg: str) -> bool:
    words = ("connection refused", "could not connect", "timeout expired", "connection failed",
             "server closed the connection", "no route to host", "could not translate host", "terminating connection",
             "the database system is shutting down", "the database system is starting up", "consuming input failed")
    low = msg.lower()
    return any(w in low for w in words)


# ----------------------------------------------------------------------------------------- connecting


def connect(
    ledger: str | os.PathLike[str] | LedgerLocation | None = None,
    *,
    timeout_s: float | None = None,
    create: bool = True,
    migrate_to: int = SCHEMA_VERSION,
    read_only: bool = False,
) -> Connection:
    """Open the ledger, creating or migrating it as needed.

    Args:
        ledger: a file path, a ``postgresql://`` URL, or a :class:`LedgerLocation`; default :func:`locate`.
        timeout_s: how long to wait for another process's SQLite write lock, in seconds;
            default :data:`BUSY_TIMEOUT_S`.
        create: create a missing SQLite file; when False a missing file is a :class:`LedgerError`.
        migrate_to: the schema version to bring the ledger to (tests build older versions with it).
        read_only: open an SQLite file for reading only (no WAL switch, no migration): for a ledger this
            process may not write. Readers then see the schema version the file has.

    Returns:
        An SQLAlchemy connection; the caller closes it and opens its own transactions
        (:func:`transaction` for writes).

    Raises:
        LedgerError: a bad URL, an unreachable server, a locked, corrupt or newer-schema ledger, or a file
            that cannot be created.
    """
    loc = locate(ledger)
    timeout_s = BUSY_TIMEOUT_S if timeout_s is None else timeout_s
    if read_only and loc.path is not None:
        return _connect_read_only(loc, timeout_s)
    if loc.path is not None and not loc.path.exists():
        if not create:
            raise LedgerError(f"no ledger at {loc.path} (nothing has been recorded yet)")
        try:
            loc.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger folder {loc.path.parent}: {exc}") from None
    engine = _engine(loc, timeout_s)
    try:
        conn = engine.connect()
    except (SQLAlchemyError, sqlite3.Error) as exc:
        raise ledger_error(loc, exc) from None
    try:
        _migrate(conn, loc, migrate_to)
    except (SQLAlchemyError, sqlite3.Error) as exc:
        conn.close()
        raise ledger_error(loc, exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_read_only(loc: LedgerLocation, timeout_s: float) -> Connection:
    assert loc.path is not None
    if not loc.path.exists():
        raise LedgerError(f"no ledger at {loc.path} (nothing has been recorded yet)")
    last: BaseException | None = None
    for immutable in (False, True):
        key = (os.getpid(), f"ro|{loc}|{timeout_s}|{immutable}")
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = _sqlite_read_only_engine(loc.path, timeout_s, immutable)
        try:
            conn = engine.connect()
            version = schema_version(conn)
            conn.commit()
        except (SQLAlchemyError, sqlite3.Error) as exc:
            last = exc
            continue
        if version > SCHEMA_VERSION:
            conn.close()
            raise LedgerError(f"ledger {loc} has schema version {version}, newer than this ssprop-energy "
                              f"understands ({SCHEMA_VERSION}); upgrade ssprop-energy")
        if immutable:
            logger.warning("ledger %s is read-only here and its WAL index cannot be opened; reading the file as "
                           "it is on disk (rows not yet checkpointed by its writers may be missing)", loc)
        return conn
    raise ledger_error(loc, last)  # type: ignore[arg-type]


@contextmanager
def transaction(ledger: str | os.PathLike[str] | LedgerLocation | None = None) -> Iterator[Connection]:
    """A write transaction on the ledger (``BEGIN IMMEDIATE`` in SQLite), committed on success.

    Raises:
        LedgerError: the ledger cannot be opened or the transaction fails.
    """
    loc = locate(ledger)
    conn = connect(loc)
    try:
        if conn.dialect.name == "sqlite":
            _check_integrity(conn, loc)
        conn.info["write"] = True
        with conn.begin():
            yield conn
    except SQLAlchemyError as exc:
        raise ledger_error(loc, exc) from None
    finally:
        conn.close()


_CHECKED: dict[tuple[int, str], float] = {}
INTEGRITY_RECHECK_S = 300.0


def _check_integrity(conn: Connection, loc: LedgerLocation) -> None:
    # A partly corrupt file can still take an INSERT into a sound page while the rows already there are
    # unreadable: writing on would report "recorded" for a row nobody can list. quick_check reads every
    # page (not the index cross-checks of integrity_check): milliseconds for a lab-sized ledger, so it runs
    # before a process's first write and again at most every INTEGRITY_RECHECK_S (heartbeats write often).
    key = (os.getpid(), str(loc))
    if time.monotonic() - _CHECKED.get(key, -math.inf) < INTEGRITY_RECHECK_S:
        return
    result = conn.exec_driver_sql("PRAGMA quick_check(1)").scalar()
    conn.commit()
    if result == "ok":
        _CHECKED[key] = time.monotonic()
    else:
        _CHECKED.pop(key, None)
        conn.close()
        raise LedgerError(f"ledger {loc} is corrupt or not an SQLite database (quick_check: {result})")


def schema_version(conn: Connection) -> int:
    """The schema version stored in the ledger (0 for a new, empty one)."""
    if conn.dialect.name == "sqlite":
        return int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
    if not sa.inspect(conn).has_table("ledger_schema"):
        return 0
    value = conn.exec_driver_sql("SELECT version FROM ledger_schema").scalar()
    return int(value or 0)


def _set_version(conn: Connection, version: int) -> None:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"PRAGMA user_version = {int(version)}")
        return
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS ledger_schema (version INTEGER NOT NULL)")
    conn.exec_driver_sql("DELETE FROM ledger_schema")
    conn.exec_driver_sql(f"INSERT INTO ledger_schema (version) VALUES ({int(version)})")


def _migrate(conn: Connection, loc: LedgerLocation, target: int) -> None:
    version = schema_version(conn)
    conn.commit()  # end the read transaction SQLAlchemy opened (autobegin)
    if version == target:
        return
    conn.info["write"] = True
    try:
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            # Read again under the lock: another process may have migrated the ledger meanwhile.
            version = schema_version(conn)
            if version > SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger {loc} has schema version {version}, newer than this ssprop-energy understands "
                    f"({SCHEMA_VERSION}); upgrade ssprop-energy"
                )
            for step in range(version, target):
                MIGRATIONS[step](conn)
                logger.info("ledger %s: migrated schema %d -> %d", loc, step, step + 1)
            if target > version:
                _set_version(conn, target)
    finally:
        conn.info["write"] = False
