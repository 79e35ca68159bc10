"""Appending runs to the ledger: a ``running`` row at the start, completed at the end.

A run must never lose its own row. When the ledger cannot be written (locked longer than the busy timeout,
corrupt, on a full or read-only disk), the row is written as JSON instead: next to the run
(``RUN_DIR/ledger_entry.json``) or, for runs without a folder, in the ledger's pending folder
(``<ledger>.pending/<uid>.json``). A warning names the file, and :func:`import_fallback` (``ssprop-energy
audit import``) moves such rows into the ledger later. The rows carry a random ``uid`` so that importing
one twice, or importing the completed version of a row the ledger holds as ``running``, stays correct.

For a PostgreSQL ledger, a row the server could not take (unreachable, or stopped mid-run) is spooled in a
local folder (:func:`db.pending_dir`) and sent at the next ledger access from this machine, or by
``ssprop-energy audit sync``; the uid makes a second send a no-op, so nothing is lost or counted twice.

The ledger stores no environment variables beyond the scheduler's job metadata (:data:`JOB_ENV`: SLURM job
id, array task id, node list, partition, and ``CUDA_VISIBLE_DEVICES``), and nothing else the caller did not
pass: the command is stored as given, or with every argument after the program replaced by ``<redacted>``.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ssprop_energy.energy.carbon import co2_g as carbon_co2_g
from ssprop_energy.errors import ConfigError, LedgerError, RecordError
from ssprop_energy.ledger.attribution import ATTRIBUTION_RULE, AttributedComponent, CpuAttribution
from ssprop_energy.ledger.db import COMPONENTS, ENTRIES, LedgerLocation, locate, pending_dir, transaction
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
    "slurm_job_id", "slurm_array_task_id", "slurm_nodelist", "slurm_partition", "cuda_visible_devices",
    "gpu_share", "gpu_share_method", "heartbeat_at",
)
COMPONENT_COLUMNS = ("component", "energy_j", "source", "device", "machine_energy_j", "share", "share_method")

# ledger column <- environment variable (SLURM sets these in every job step; an array job has a task id)
JOB_ENV = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_nodelist": "SLURM_JOB_NODELIST",
    "slurm_partition": "SLURM_JOB_PARTITION",
    "cuda_visible_devices": "CUDA_VISIBLE_DEVICES",
}

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


def job_metadata(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """The scheduler's job metadata of this process (:data:`JOB_ENV`); None for each variable not set.

    ``SLURM_NODELIST`` is read where the newer ``SLURM_JOB_NODELIST`` is missing (older SLURM versions).
    """
    env = os.environ if environ is None else environ
    out: dict[str, str | None] = {col: (env.get(var) or None) for col, var in JOB_ENV.items()}
    if out["slurm_nodelist"] is None:
        out["slurm_nodelist"] = env.get("SLURM_NODELIST") or None
    if out["slurm_partition"] is None:
        out["slurm_partition"] = env.get("SLURM_PARTITION") or None
    return out


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


def _insert(conn: Connection, row: dict[str, Any], components: Sequence[dict[str, Any]]) -> int:
    values = {c: _db_value(row[c]) for c in ENTRY_COLUMNS if c in row}
    entry_id = int(conn.execute(sa.insert(ENTRIES).values(**values)).inserted_primary_key[0])
    _insert_components(conn, entry_id, components)
    return entry_id


def _insert_components(conn: Connection, entry_id: int, components: Sequence[dict[str, Any]]) -> None:
    if components:
        conn.execute(sa.insert(COMPONENTS),
                     [{"entry_id": entry_id, **{k: _db_value(c.get(k)) for k in COMPONENT_COLUMNS}} for c in components])


def utf8_text(value: str) -> str:
    r"""``value`` as valid UTF-8 text: bytes that were not UTF-8 (decoded by Python with surrogateescape, as in
    ``sys.argv``) become ``\xNN``, so that every reader, a UTF-8 HTML page, and PostgreSQL can take it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _db_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return json.dumps([utf8_text(v) if isinstance(v, str) else v for v in value])
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return utf8_text(value)
    return value


def _lock_uid(conn: Connection, uid: str) -> None:
    """Serialise writers of one uid (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises all writers)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:uid, 0))"), {"uid": uid})


def _write(ledger: LedgerLocation, fn: Any) -> Any:
    """Run ``fn(conn)`` inside one write transaction on ``ledger``; LedgerError on any failure."""
    with transaction(ledger) as conn:
        return fn(conn)


def _check_co2(uid: str, energy_j: float, intensity_g_per_kwh: float, pue: float | None,
               co2_g: float | None) -> float:
    expected = carbon_co2_g(energy_j, intensity_g_per_kwh, 1.0 if pue is None else pue)
    if co2_g is not None and not math.isclose(co2_g, expected, rel_tol=_CO2_RTOL, abs_tol=1e-12):
        logger.warning("ledger row %s: CO2 %.6g g disagrees with energy x intensity x PUE = %.6g g; "
                       "recording the latter", uid, co2_g, expected)
    return expected


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
    ledger_path: LedgerLocation
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
        spool = self.fallback_dir / f"{self.uid}.json"
        if self.ledger_path.is_server:
            # A server that is down is expected to come back: the spool is sent at the next access.
            targets.append(spool)
        if self.run_dir is not None:
            targets.append(self.run_dir / FALLBACK_FILE)
        if not self.ledger_path.is_server:
            targets.append(spool)
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
            how = ("`ssprop-energy audit sync` sends it, as does the next ledger access" if target == spool
                   and self.ledger_path.is_server else f"import it later with `ssprop-energy audit import {target}`")
            logger.warning("could not write to the ledger (%s); the run's %s row is saved in %s (%s)",
                           reason, self.row["status"], target, how)
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
        *,
        gpu_attribution: Any = None,
    ) -> None:
        """Complete the row: status, energy per component, CO2 and carbon intensity.

        Args:
            status: ``complete``, ``failed`` or ``interrupted`` (:data:`records.RUN_STATUSES`).
            components: the energy charged to the run, per component; an :class:`AttributedComponent` also
                carries the machine-wide (or whole-device) figure, the share and its method. An empty list
                records energy as unmeasured.
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
            gpu_attribution: the GPU share used for shared GPUs (:class:`attribution.GpuAttribution`), if any.

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
                "share_method": a.method if a.share is not None else None,
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
            co2_g = _check_co2(self.uid, energy_j, intensity_g_per_kwh, pue, co2_g)
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
        notes = [note] if note else []
        if attribution is not None:
            self.row.update(
                cpu_share=attribution.share,
                tree_cpu_s=attribution.tree_cpu_s,
                machine_cpu_s=attribution.machine_cpu_s,
            )
            notes.append(f"machine-wide CPU energy attributed by {ATTRIBUTION_RULE} {attribution.share:.4f}")
        if gpu_attribution is not None:
            self.row.update(gpu_share=gpu_attribution.share, gpu_share_method=gpu_attribution.method)
            notes.append(f"shared GPU energy attributed by {gpu_attribution.method} {gpu_attribution.share:.4f}")
        self.row["note"] = "; ".join(notes) or None
        self._finished = True
        self._store()

    def heartbeat(
        self,
        components: Sequence[EnergyComponent | AttributedComponent],
        intensity_g_per_kwh: float | None,
        pue: float | None,
        intensity_source: str | None,
        attribution: CpuAttribution | None = None,
    ) -> bool:
        """Write the energy measured so far into the ``running`` row (status unchanged).

        If the process is then killed (``kill -9``, a closed ssh session, the OOM killer) the row keeps what
        was measured up to its last heartbeat, and readers label it ``partial``. A heartbeat that cannot be
        written is skipped (the next one, or ``finish``, will carry the figures); it never raises.

        Returns:
            True when the row was updated.
        """
        if self._finished or self.entry_id is None:
            return False
        attributed = [c if isinstance(c, AttributedComponent) else AttributedComponent(c) for c in components]
        if not attributed:
            return False
        energy_j, source = total_energy([a.component for a in attributed])
        co2 = (carbon_co2_g(energy_j, intensity_g_per_kwh, 1.0 if pue is None else pue)
               if intensity_g_per_kwh is not None else None)
        values = {
            "energy_j": energy_j, "energy_source": source, "co2_g": co2, "intensity_g_per_kwh": intensity_g_per_kwh,
            "intensity_source": intensity_source, "pue": pue, "wall_s": time.monotonic() - self._t0,
            "heartbeat_at": utc_now(),
        }
        if attribution is not None:
            values.update(cpu_share=attribution.share, tree_cpu_s=attribution.tree_cpu_s,
                          machine_cpu_s=attribution.machine_cpu_s)
        comps = [{"component": a.component.component, "energy_j": a.component.energy_j, "source": a.component.source,
                  "device": a.component.device, "machine_energy_j": a.machine_energy_j, "share": a.share,
                  "share_method": a.method if a.share is not None else None} for a in attributed]
        entry_id = self.entry_id

        def store(conn: Connection) -> None:
            # only while still running: a finished row (written by finish, or an import) is never overwritten
            res = conn.execute(sa.update(ENTRIES).where(ENTRIES.c.id == entry_id, ENTRIES.c.status == "running")
                               .values(**{k: _db_value(v) for k, v in values.items()}))
            if res.rowcount:
                conn.execute(sa.delete(COMPONENTS).where(COMPONENTS.c.entry_id == entry_id))
                _insert_components(conn, entry_id, comps)

        try:
            _write(self.ledger_path, store)
        except LedgerError as exc:
            logger.info("ledger heartbeat for row %s skipped: %s", self.uid, exc)
            return False
        return True

    def _store(self) -> None:
        try:
            self.entry_id = _write(self.ledger_path, self._store_finished)
        except LedgerError as exc:
            self._write_fallback(str(exc))
            return
        if self.fallback_path is not None:
            # The start row went to a fallback file; the ledger now holds the current row.
            self.fallback_path.unlink(missing_ok=True)
            self.fallback_path = None

    def _store_finished(self, conn: Connection) -> int:
        if self.entry_id is None:
            return _upsert(conn, self.row, self.components)[0]
        values = {c: _db_value(self.row[c]) for c in ENTRY_COLUMNS if c in self.row and c != "uid"}
        conn.execute(sa.update(ENTRIES).where(ENTRIES.c.id == self.entry_id).values(**values))
        conn.execute(sa.delete(COMPONENTS).where(COMPONENTS.c.entry_id == self.entry_id))
        _insert_components(conn, self.entry_id, self.components)
        return self.entry_id


def _upsert(conn: Connection, row: dict[str, Any], components: Sequence[dict[str, Any]]) -> tuple[int, bool]:
    """Insert a row, replacing a ``running`` row with the same uid; a finished row already there wins.

    Returns:
        ``(id, written)``: the row's id, and False when the ledger already held it (nothing changed).
    """
    _lock_uid(conn, row["uid"])
    existing = conn.execute(sa.select(ENTRIES.c.id, ENTRIES.c.status).where(ENTRIES.c.uid == row["uid"])).first()
    if existing is not None:
        if existing.status != "running" or row["status"] == "running":
            return int(existing.id), False
        conn.execute(sa.delete(COMPONENTS).where(COMPONENTS.c.entry_id == existing.id))
        conn.execute(sa.delete(ENTRIES).where(ENTRIES.c.id == existing.id))
    return _insert(conn, row, components), True


def start_entry(
    kind: str,
    project: str | None = None,
    tags: Iterable[str] = (),
    command: Sequence[str] = (),
    run_dir: str | os.PathLike[str] | None = None,
    redact: bool = False,
    *,
    ledger_path: str | os.PathLike[str] | LedgerLocation | None = None,
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
        ledger_path: the ledger: a file path or a ``postgresql://`` URL; default :func:`db.locate`.
        fallback_dir: where rows go when the ledger fails; default :func:`db.pending_dir`.
        pid: the process the row stands for (default: this one).

    Returns:
        The :class:`LedgerEntry`; call :meth:`LedgerEntry.finish` when the run ends. The ledger failing is
        not an error here: the row goes to a JSON fallback file and a warning says where.

    Raises:
        LedgerError: ``ledger_path`` is a bad URL (nothing is run or written then).
    """
    project = project or os.environ.get(PROJECT_ENV) or DEFAULT_PROJECT
    ledger = locate(ledger_path)
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
        **job_metadata(),
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
    else:
        if ledger.is_server:
            sync_pending(ledger, quiet=True)
    return entry


# ------------------------------------------------------------------------------------------ fallback rows


def pending_rows(ledger_path: str | os.PathLike[str] | LedgerLocation | None = None) -> list[Path]:
    """JSON fallback rows waiting in the ledger's pending (spool) folder; rows next to runs are not listed."""
    folder = pending_dir(ledger_path)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _read_fallback(f: Path) -> dict[str, Any]:
    doc = read_json(f)
    if not isinstance(doc, dict) or doc.get("format") != FALLBACK_FORMAT or "entry" not in doc:
        raise RecordError(f"{f}: not a ledger fallback row")
    return doc


def store_rows(ledger: LedgerLocation, docs: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Write finished or running rows (fallback documents: ``entry`` + ``components``) in one transaction.

    Returns:
        ``(written, skipped)``; a uid the ledger already holds finished is skipped.
    """
    written = skipped = 0

    def store(conn: Connection) -> None:
        nonlocal written, skipped
        for doc in docs:
            if _upsert(conn, doc["entry"], doc.get("components", []))[1]:
                written += 1
            else:
                skipped += 1

    _write(ledger, store)
    return written, skipped


def import_fallback(
    paths: Iterable[str | os.PathLike[str]], ledger_path: str | os.PathLike[str] | LedgerLocation | None = None
) -> tuple[int, int]:
    """Move JSON fallback rows into the ledger.

    Args:
        paths: fallback files, or folders (their ``*.json`` and ``ledger_entry.json`` files are taken).
        ledger_path: the ledger; default :func:`db.locate`.

    Returns:
        ``(imported, skipped)``: rows written, and rows the ledger already held in a finished state.
        Files in the pending folder are deleted once imported; files next to runs are kept as evidence.

    Raises:
        LedgerError: the ledger cannot be written.
        RecordError: a file is not a ledger fallback row.
    """
    ledger = locate(ledger_path)
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    docs = [(f, _read_fallback(f)) for f in files]
    result = store_rows(ledger, [d for _, d in docs])
    pending = pending_dir(ledger).resolve()
    for f, _ in docs:
        if f.resolve().parent == pending:
            f.unlink(missing_ok=True)
    return result


def _reclaim_abandoned(folder: Path) -> None:
    """Put back files claimed by a sync that died before it finished (its pid is gone)."""
    if not folder.is_dir():
        return
    for claimed in folder.glob("*.json.sending-*"):
        pid = claimed.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            original = claimed.with_name(claimed.name.split(".sending-")[0])
            if original.exists():
                claimed.unlink(missing_ok=True)  # a newer version of the row is waiting already
            else:
                claimed.rename(original)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sync_pending(
    ledger_path: str | os.PathLike[str] | LedgerLocation | None = None, *, quiet: bool = False
) -> tuple[int, int]:
    """Send the rows spooled for this ledger (its :func:`db.pending_dir`), each file at most once.

    A file is claimed by renaming it before it is sent, so that a run rewriting its own spooled row
    meanwhile (its finished version) writes a new file instead of losing it, and two processes syncing
    at once never send the same file twice (a second send would be skipped by its uid anyway).

    Args:
        quiet: log a failure instead of raising it (used at every ledger access).

    Returns:
        ``(sent, skipped)``.

    Raises:
        LedgerError: the ledger cannot be written (unless ``quiet``).
    """
    ledger = locate(ledger_path)
    _reclaim_abandoned(pending_dir(ledger))
    claimed: list[tuple[Path, Path, dict[str, Any]]] = []
    for f in pending_rows(ledger):
        mine = f.with_name(f"{f.name}.sending-{os.getpid()}")
        try:
            f.rename(mine)
        except OSError:
            continue  # another process claimed it first
        try:
            claimed.append((f, mine, _read_fallback(mine)))
        except RecordError as exc:
            mine.rename(f.with_name(f.name + ".bad"))
            logger.warning("spooled ledger row %s is unreadable and was set aside (%s)", f, exc)
    if not claimed:
        return 0, 0
    try:
        result = store_rows(ledger, [doc for _, _, doc in claimed])
    except LedgerError as exc:
        for original, mine, _ in claimed:
            if original.exists():
                mine.unlink(missing_ok=True)  # the run wrote a newer version meanwhile
            else:
                mine.rename(original)
        if quiet:
            logger.warning("%d spooled ledger row(s) still wait in %s (%s)", len(claimed), pending_dir(ledger), exc)
            return 0, 0
        raise
    for _, mine, _ in claimed:
        mine.unlink(missing_ok=True)
    if result[0]:
        logger.info("sent %d spooled row(s) to %s", result[0], ledger)
    return result
