"""Appending runs to the ledger: a ``running`` row at the start, completed at the end.

A run must never lose its own row. When the ledger cannot be written (locked longer than the busy timeout,
corrupt, on a full or read-only disk), the row is written as JSON instead: next to the run
(``RUN_DIR/ledger_entry.json``) or, for runs without a folder, in the ledger's pending folder
(``<ledger>.pending/<uid>.json``). A warning names the file, and :func:`import_fallback` (``ssprop-energy
audit import``) moves such rows into the ledger later. The rows carry a random ``uid`` so that importing
one twice, or importing the completed version of a row the ledger holds as ``running``, stays correct.

The ledger stores no environment variables and nothing the caller did not pass: the command is stored as
given, or with every argument after the program replaced by ``<redacted>``.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import socket
import sqlite3
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from ssprop_energy.energy.carbon import co2_g as co2_of  # the one CO2 formula of the package
from ssprop_energy.errors import ConfigError, LedgerError, RecordError
from ssprop_energy.ledger.attribution import ATTRIBUTION_RULE, AttributedComponent, CpuAttribution
from ssprop_energy.ledger.db import connect, default_ledger_path, ledger_error, pending_dir
from ssprop_energy.records import RUN_STATUSES, EnergyComponent, read_json, total_energy, write_json_atomic

logger = logging.getLogger(__name__)

PROJECT_ENV = "SSPROP_ENERGY_PROJECT"
DEFAULT_PROJECT = "default"
REDACTED = "<redacted>"
FALLBACK_FILE = "ledger_entry.json"
FALLBACK_FORMAT = "ssprop-energy-ledger-entry"

ENTRY_COLUMNS = (
    "uid", "kind", "project", "user", "host", "command", "redacted", "tags", "started_at", "finished_at",
    "wall_s", "status", "exit_code", "energy_j", "energy_source", "co2_g", "intensity_g_per_kwh",
    "intensity_source", "pue", "run_dir", "note", "pid", "cpu_share", "tree_cpu_s", "machine_cpu_s",
)
COMPONENT_COLUMNS = ("component", "energy_j", "source", "device", "machine_energy_j", "share")

# CO2 recomputed from energy x intensity x PUE must match the caller's figure to this relative tolerance.
_CO2_RTOL = 1e-6


def utc_now() -> str:
    """The current time as ISO 8601 in UTC with milliseconds (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def current_user() -> str:
    """The login name, or the numeric uid where there is none (containers without a passwd entry)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def redact_command(command: Sequence[str]) -> list[str]:
    """Keep the program, replace every argument by one ``<redacted>`` (hiding their number too)."""
    command = list(command)
    return command[:1] + ([REDACTED] if len(command) > 1 else [])


def _check_tags(tags: Iterable[str]) -> list[str]:
    out = []
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip():
            raise ConfigError(f"tags must be non-empty strings, got {tag!r}")
        out.append(tag.strip())
    return out


# ------------------------------------------------------------------------------------------ writing


def _insert(conn: sqlite3.Connection, row: dict[str, Any], components: Sequence[dict[str, Any]]) -> int:
    cols = [c for c in ENTRY_COLUMNS if c in row]
    cur = conn.execute(
        f"INSERT INTO entries ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
        [_db_value(row[c]) for c in cols],
    )
    entry_id = int(cur.lastrowid)
    _insert_components(conn, entry_id, components)
    return entry_id


def _insert_components(conn: sqlite3.Connection, entry_id: int, components: Sequence[dict[str, Any]]) -> None:
    conn.executemany(
        f"INSERT INTO components (entry_id, {', '.join(COMPONENT_COLUMNS)}) "
        f"VALUES (?, {', '.join('?' for _ in COMPONENT_COLUMNS)})",
        [(entry_id, *(c.get(k) for k in COMPONENT_COLUMNS)) for c in components],
    )


def _db_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write(path: Path, fn: Any) -> Any:
    """Run ``fn(conn)`` inside one ``BEGIN IMMEDIATE`` transaction on the ledger at ``path``."""
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result
    except sqlite3.Error as exc:
        raise ledger_error(path, exc) from None
    finally:
        conn.close()


@dataclass
class LedgerEntry:
    """Handle on one run's ledger row, returned by :func:`start_entry`.

    Attributes:
        uid: the row's random identifier (also in any JSON fallback).
        entry_id: the row id in the ledger; None while the row lives only in a JSON fallback file.
        fallback_path: the JSON file holding the row when the ledger could not be written, else None.
    """

    uid: str
    row: dict[str, Any]
    ledger_path: Path
    fallback_dir: Path
    run_dir: Path | None
    entry_id: int | None = None
    fallback_path: Path | None = None
    components: list[dict[str, Any]] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic)
    _finished: bool = False

    # The JSON fallback and the ledger hold the same fields, so a fallback row can be imported as is.
    def _fallback_doc(self, reason: str) -> dict[str, Any]:
        return {
            "format": FALLBACK_FORMAT,
            "ledger": str(self.ledger_path),
            "reason": reason,
            "entry": self.row,
            "components": self.components,
        }

    def _write_fallback(self, reason: str) -> Path:
        targets = []
        if self.run_dir is not None:
            targets.append(self.run_dir / FALLBACK_FILE)
        targets.append(self.fallback_dir / f"{self.uid}.json")
        targets.append(Path(tempfile.gettempdir()) / "ssprop-energy-ledger-pending" / f"{self.uid}.json")
        errors = []
        for target in targets:
            try:
                write_json_atomic(target, self._fallback_doc(reason))
            except OSError as exc:
                errors.append(f"{target}: {exc}")
                continue
            if self.fallback_path is not None and self.fallback_path != target:
                self.fallback_path.unlink(missing_ok=True)
            self.fallback_path = target
            logger.warning(
                "could not write to the ledger (%s); the run's %s row is saved in %s "
                "(import it later with `ssprop-energy audit import %s`)",
                reason, self.row["status"], target, target,
            )
            return target
        raise LedgerError(f"the run's ledger row could not be saved anywhere ({reason}; {'; '.join(errors)})")

    def finish(
        self,
        status: str,
        components: Sequence[EnergyComponent | AttributedComponent],
        co2_g: float | None,
        intensity_g_per_kwh: float | None,
        pue: float | None,
        intensity_source: str | None,
        energy_source: str | None = None,
        exit_code: int | None = None,
        note: str | None = None,
        attribution: CpuAttribution | None = None,
    ) -> None:
        """Complete the row: status, energy per component, CO2 and carbon intensity.

        Args:
            status: ``complete``, ``failed`` or ``interrupted`` (:data:`records.RUN_STATUSES`).
            components: the energy charged to the run, per component; an :class:`AttributedComponent` also
                carries the machine-wide figure and the share. An empty list records energy as unmeasured.
            co2_g: grams CO2e; None computes energy x intensity x PUE. A given figure that disagrees with
                that product is replaced by it (with a warning): a row's parts and totals never disagree.
            intensity_g_per_kwh: carbon intensity used, gCO2e per kWh.
            pue: power usage effectiveness applied (1.0 = none).
            intensity_source: where the intensity came from (``override``, ``country:FR``, ...).
            energy_source: provenance of the total; derived from the components when None (``mixed`` when
                they differ). A given value that disagrees with the components is replaced, with a warning.
            exit_code: the process exit code, where there is one.
            note: free text (e.g. why energy is missing).
            attribution: the CPU-time share used to attribute machine-wide components, if any.

        Raises:
            ConfigError: an unknown status, or finishing twice.
            LedgerError: neither the ledger nor any fallback file could be written.
        """
        if status not in RUN_STATUSES or status == "running":
            raise ConfigError(f"cannot finish a ledger row as {status!r} (one of complete, failed, interrupted)")
        if self._finished:
            raise ConfigError(f"ledger row {self.uid} is already finished")
        attributed = [c if isinstance(c, AttributedComponent) else AttributedComponent(c) for c in components]
        self.components = [
            {
                "component": a.component.component,
                "energy_j": a.component.energy_j,
                "source": a.component.source,
                "device": a.component.device,
                "machine_energy_j": a.machine_energy_j,
                "share": a.share,
            }
            for a in attributed
        ]
        energy_j: float | None
        if attributed:
            energy_j, derived_source = total_energy([a.component for a in attributed])
            if energy_source is not None and energy_source != derived_source:
                logger.warning("ledger row %s: energy source %r disagrees with its components (%r); using %r",
                               self.uid, energy_source, derived_source, derived_source)
            energy_source = derived_source
        else:
            energy_j, energy_source = None, None
        if energy_j is not None and intensity_g_per_kwh is not None:
            expected = co2_of(energy_j, intensity_g_per_kwh, 1.0 if pue is None else pue)
            if co2_g is not None and not math.isclose(co2_g, expected, rel_tol=_CO2_RTOL, abs_tol=1e-12):
                logger.warning("ledger row %s: CO2 %.6g g disagrees with energy x intensity x PUE = %.6g g; "
                               "recording the latter", self.uid, co2_g, expected)
            co2_g = expected
        elif energy_j is None:
            co2_g = None
        self.row.update(
            finished_at=utc_now(),
            wall_s=time.monotonic() - self._t0,
            status=status,
            exit_code=exit_code,
            energy_j=energy_j,
            energy_source=energy_source,
            co2_g=co2_g,
            intensity_g_per_kwh=intensity_g_per_kwh,
            intensity_source=intensity_source,
            pue=pue,
            note=note,
        )
        if attribution is not None:
            self.row.update(
                cpu_share=attribution.share,
                tree_cpu_s=attribution.tree_cpu_s,
                machine_cpu_s=attribution.machine_cpu_s,
            )
            rule = f"machine-wide CPU energy attributed by {ATTRIBUTION_RULE} {attribution.share:.4f}"
            self.row["note"] = rule if not note else f"{note}; {rule}"
        self._finished = True
        try:
            self.entry_id = _write(self.ledger_path, self._store_finished)
        except LedgerError as exc:
            self._write_fallback(str(exc))
            return
        if self.fallback_path is not None:
            # The start row went to a fallback file; the ledger now holds the complete row.
            self.fallback_path.unlink(missing_ok=True)
            self.fallback_path = None

    def _store_finished(self, conn: sqlite3.Connection) -> int:
        if self.entry_id is None:
            return _upsert(conn, self.row, self.components)
        cols = [c for c in ENTRY_COLUMNS if c in self.row and c != "uid"]
        conn.execute(
            f"UPDATE entries SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
            [*(_db_value(self.row[c]) for c in cols), self.entry_id],
        )
        conn.execute("DELETE FROM components WHERE entry_id = ?", (self.entry_id,))
        _insert_components(conn, self.entry_id, self.components)
        return self.entry_id


def _upsert(conn: sqlite3.Connection, row: dict[str, Any], components: Sequence[dict[str, Any]]) -> int:
    """Insert a row, replacing a ``running`` row with the same uid; a finished row already there wins."""
    existing = conn.execute("SELECT id, status FROM entries WHERE uid = ?", (row["uid"],)).fetchone()
    if existing is not None:
        if existing["status"] != "running" or row["status"] == "running":
            return int(existing["id"])
        conn.execute("DELETE FROM entries WHERE id = ?", (existing["id"],))
    return _insert(conn, row, components)


def start_entry(
    kind: str,
    project: str | None = None,
    tags: Iterable[str] = (),
    command: Sequence[str] = (),
    run_dir: str | os.PathLike[str] | None = None,
    redact: bool = False,
    *,
    ledger_path: str | os.PathLike[str] | None = None,
    fallback_dir: str | os.PathLike[str] | None = None,
    pid: int | None = None,
) -> LedgerEntry:
    """Append a ``running`` row for a run that starts now, and return its handle.

    Args:
        kind: what is running: ``compare``, ``sweep``, ``audit-run``, ...
        project: the lab project to charge; default ``$SSPROP_ENERGY_PROJECT``, else ``default``.
        tags: free labels for filtering.
        command: the command line (``sys.argv`` or the wrapped command), stored as given unless ``redact``.
        run_dir: the run's output folder; a row the ledger cannot take is written there as JSON.
        redact: store only the program name, every argument replaced by ``<redacted>``.
        ledger_path: the ledger file; default :func:`db.default_ledger_path`.
        fallback_dir: where rows of runs without ``run_dir`` go when the ledger fails; default
            ``<ledger>.pending/``.
        pid: the process the row stands for (default: this one).

    Returns:
        The :class:`LedgerEntry`; call :meth:`LedgerEntry.finish` when the run ends. The ledger failing is
        not an error here: the row goes to a JSON fallback file and a warning says where.
    """
    project = project or os.environ.get(PROJECT_ENV) or DEFAULT_PROJECT
    ledger = Path(ledger_path) if ledger_path is not None else default_ledger_path()
    command = [str(a) for a in command]
    uid = uuid.uuid4().hex
    row: dict[str, Any] = {
        "uid": uid,
        "kind": kind,
        "project": project,
        "user": current_user(),
        "host": socket.gethostname(),
        "command": redact_command(command) if redact else command,
        "redacted": bool(redact),
        "tags": _check_tags(tags),
        "started_at": utc_now(),
        "status": "running",
        "run_dir": None if run_dir is None else str(Path(run_dir).resolve()),
        "pid": os.getpid() if pid is None else pid,
    }
    entry = LedgerEntry(
        uid=uid,
        row=row,
        ledger_path=ledger,
        fallback_dir=Path(fallback_dir) if fallback_dir is not None else pending_dir(ledger),
        run_dir=None if run_dir is None else Path(run_dir),
    )
    try:
        entry.entry_id = _write(ledger, lambda conn: _insert(conn, row, []))
    except LedgerError as exc:
        entry._write_fallback(str(exc))
    return entry


# ------------------------------------------------------------------------------------------ fallback rows


def pending_rows(ledger_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """JSON fallback rows waiting in the ledger's pending folder (rows next to runs are not listed here)."""
    folder = pending_dir(ledger_path)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def import_fallback(
    paths: Iterable[str | os.PathLike[str]], ledger_path: str | os.PathLike[str] | None = None
) -> tuple[int, int]:
    """Move JSON fallback rows into the ledger.

    Args:
        paths: fallback files, or folders (their ``*.json`` and ``ledger_entry.json`` files are taken).
        ledger_path: the ledger file; default :func:`db.default_ledger_path`.

    Returns:
        ``(imported, skipped)``: rows written, and rows the ledger already held in a finished state.
        Files in the pending folder are deleted once imported; files next to runs are kept as evidence.

    Raises:
        LedgerError: the ledger cannot be written.
        RecordError: a file is not a ledger fallback row.
    """
    ledger = Path(ledger_path) if ledger_path is not None else default_ledger_path()
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    docs = []
    for f in files:
        doc = read_json(f)
        if not isinstance(doc, dict) or doc.get("format") != FALLBACK_FORMAT or "entry" not in doc:
            raise RecordError(f"{f}: not a ledger fallback row")
        docs.append((f, doc))
    imported = skipped = 0
    pending = pending_dir(ledger).resolve()

    def store(conn: sqlite3.Connection) -> None:
        nonlocal imported, skipped
        for _, doc in docs:
            before = conn.total_changes
            _upsert(conn, doc["entry"], doc.get("components", []))
            if conn.total_changes > before:
                imported += 1
            else:
                skipped += 1

    _write(ledger, store)
    for f, _ in docs:
        if f.resolve().parent == pending:
            f.unlink(missing_ok=True)
    return imported, skipped
