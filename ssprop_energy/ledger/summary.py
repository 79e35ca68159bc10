"""Reading the ledger: rows as pandas tables, totals per project/user/host/month, CSV export.

Times are stored and grouped in UTC: a month is a UTC calendar month, and ``since`` dates are UTC
midnights. Energy and CO2 totals add only rows that have them: a run still ``running``, or one whose meter
failed, is counted in ``runs`` and in ``unmeasured`` but adds nothing, and the tables say how many.
"""

from __future__ import annotations

import json
import os
import re
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import psutil
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from ssprop_energy.energy.carbon import J_PER_KWH
from ssprop_energy.errors import ConfigError
from ssprop_energy.ledger.db import COMPONENTS, ENTRIES, LedgerLocation, connect, ledger_error, locate, writable
from ssprop_energy.ledger.entries import COMPONENT_COLUMNS, ENTRY_COLUMNS, sync_pending
from ssprop_energy.records import write_text_atomic

GROUP_KEYS = ("project", "user", "host", "month", "kind", "status", "partition", "job")
# group key -> column (``partition`` and ``job`` are the scheduler's)
_KEY_COLUMNS = {"partition": "slurm_partition", "job": "slurm_job_id"}

# A running row whose heartbeat is older than this is presumed dead (host gone, kill -9): it is `partial`.
STALE_HEARTBEAT_S = 3 * 60.0

SUMMARY_COLUMNS = [
    "runs", "complete", "failed", "interrupted", "partial", "running", "unmeasured",
    "energy_j", "energy_kwh", "energy_source", "co2_g", "wall_s",
]


def parse_since(text: str) -> datetime:
    """Parse ``YYYY-MM``, ``YYYY-MM-DD`` or an ISO 8601 time; times without an offset are UTC.

    Raises:
        ConfigError: the text is not such a date.
    """
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}", text):
            value = datetime.strptime(text, "%Y-%m")
        else:
            value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"bad date {text!r} (expected YYYY-MM-DD, YYYY-MM or an ISO 8601 time)") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def load_entries(
    ledger_path: str | os.PathLike[str] | LedgerLocation | None = None,
    *,
    since: datetime | None = None,
    project: str | None = None,
) -> pd.DataFrame:
    """All ledger rows (oldest first) as a DataFrame; empty, with the columns, when there is no ledger yet.

    Columns: ``id`` and :data:`entries.ENTRY_COLUMNS` (``command`` and ``tags`` decoded to lists,
    ``started_at``/``finished_at`` as ISO text in UTC), plus ``month`` (``YYYY-MM``, UTC) and ``components``
    (a list of dicts with :data:`entries.COMPONENT_COLUMNS`). For a server ledger, rows spooled on this
    machine are sent first.

    Raises:
        LedgerError: the ledger is unreachable, locked or corrupt.
    """
    loc = locate(ledger_path)
    columns = ["id", *ENTRY_COLUMNS, "month", "components"]
    if loc.path is not None and not loc.path.exists():
        return pd.DataFrame(columns=columns)
    if loc.is_server:
        sync_pending(loc, quiet=True)
    read_only = loc.path is not None and not writable(loc.path)
    conn = connect(loc, read_only=read_only)
    try:
        # A read-only ledger keeps the schema it has: columns added since read as missing values.
        have = {c["name"] for c in sa.inspect(conn).get_columns("entries")} if read_only else set(ENTRY_COLUMNS)
        have_c = ({c["name"] for c in sa.inspect(conn).get_columns("components")} if read_only
                  else set(COMPONENT_COLUMNS))
        query = sa.select(ENTRIES.c.id, *(ENTRIES.c[c] if c in have else sa.null().label(c)
                                          for c in ENTRY_COLUMNS)).order_by(ENTRIES.c.id)
        conds = []
        if since is not None:
            conds.append(ENTRIES.c.started_at >= since.astimezone(timezone.utc).isoformat(timespec="milliseconds"))
        if project is not None:
            conds.append(ENTRIES.c.project == project)
        query = query.where(*conds)
        entries = [dict(r._mapping) for r in conn.execute(query)]
        comps: dict[int, list[dict[str, Any]]] = {}
        cq = sa.select(COMPONENTS.c.entry_id, *(COMPONENTS.c[c] if c in have_c else sa.null().label(c)
                                                for c in COMPONENT_COLUMNS)).order_by(
            COMPONENTS.c.entry_id, COMPONENTS.c.component)
        if conds:  # a subquery, not a list of ids: no limit on the number of bound parameters
            cq = cq.where(COMPONENTS.c.entry_id.in_(sa.select(ENTRIES.c.id).where(*conds)))
        for r in conn.execute(cq):
            comps.setdefault(r.entry_id, []).append({k: r._mapping[k] for k in COMPONENT_COLUMNS})
    except SQLAlchemyError as exc:
        raise ledger_error(loc, exc) from None
    finally:
        conn.close()
    for e in entries:
        e["command"] = json.loads(e["command"])
        e["tags"] = json.loads(e["tags"])
        e["redacted"] = bool(e["redacted"])
        e["month"] = e["started_at"][:7]
        e["components"] = comps.get(e["id"], [])
    _label_partial(entries)
    # object columns keep None as None (pandas would turn missing text into NaN, which is truthy)
    df = pd.DataFrame(entries, columns=columns, dtype=object)
    for col in ("energy_j", "co2_g", "wall_s", "intensity_g_per_kwh", "pue", "cpu_share", "gpu_share"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def _label_partial(entries: list[dict[str, Any]]) -> None:
    """``running`` rows whose process is gone, with energy from a heartbeat, become ``partial``.

    Gone: on this host, the pid no longer exists; anywhere, the last heartbeat is older than
    :data:`STALE_HEARTBEAT_S`. Their energy is what was measured up to the last heartbeat (a lower bound).
    """
    here = socket.gethostname()
    now = datetime.now(timezone.utc)
    for e in entries:
        if e["status"] != "running" or e.get("energy_j") is None or not e.get("heartbeat_at"):
            continue
        gone = e["host"] == here and e.get("pid") is not None and not psutil.pid_exists(int(e["pid"]))
        try:
            stale = (now - datetime.fromisoformat(e["heartbeat_at"])).total_seconds() > STALE_HEARTBEAT_S
        except ValueError:
            stale = False
        if gone or stale:
            e["status"] = "partial"


def _common_source(sources: pd.Series) -> str | None:
    present = set(sources.dropna())
    if not present:
        return None
    return present.pop() if len(present) == 1 else "mixed"


def summarize(entries: pd.DataFrame, by: str | Sequence[str] | None) -> pd.DataFrame:
    """Totals per group.

    Args:
        entries: rows from :func:`load_entries`.
        by: one of :data:`GROUP_KEYS`, several of them (one group per combination), or None for a single
            ``all`` row.

    Returns:
        One row per group (indexed by the key, or a MultiIndex for several keys), sorted by group, columns
        :data:`SUMMARY_COLUMNS`: counts of runs per status, ``unmeasured`` (finished runs without an energy
        figure), ``energy_j`` and ``energy_kwh`` summed over measured runs (NaN when none),
        ``energy_source`` (the rows' common provenance, ``mixed`` when measured and estimated figures were
        added), ``co2_g``, ``wall_s``. Rows without a value for a key (no SLURM job) group under ``-``.
    """
    keys = [by] if isinstance(by, str) else list(by or [])
    for key in keys:
        if key not in GROUP_KEYS:
            raise ConfigError(f"cannot group by {key!r} (one of {', '.join(GROUP_KEYS)})")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a grouping key is repeated: {', '.join(keys)}")
    names = keys or ["all"]
    if entries.empty:
        empty = pd.DataFrame(columns=[*names, *SUMMARY_COLUMNS])
        return empty.set_index(names if len(names) > 1 else names[0])[SUMMARY_COLUMNS]
    if keys:
        frame = pd.DataFrame({k: entries[_KEY_COLUMNS.get(k, k)].map(lambda v: "-" if v is None or v != v else str(v))
                              for k in keys}, index=entries.index)
        groups = entries.groupby([frame[k] for k in keys], sort=True)
    else:
        groups = entries.groupby(pd.Series("all", index=entries.index), sort=True)
    out = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        status = group["status"]
        done = group[status != "running"]
        out.append({
            **dict(zip(names, key)),
            "runs": len(group),
            "complete": int((status == "complete").sum()),
            "failed": int((status == "failed").sum()),
            "interrupted": int((status == "interrupted").sum()),
            "partial": int((status == "partial").sum()),
            "running": int((status == "running").sum()),
            "unmeasured": int(((status != "running") & group["energy_j"].isna()).sum()),
            # a row still running (its heartbeat's figure so far) adds nothing until it ends
            "energy_j": done["energy_j"].sum(min_count=1),
            "energy_source": _common_source(done["energy_source"]),
            "co2_g": done["co2_g"].sum(min_count=1),
            "wall_s": done["wall_s"].sum(min_count=1),
        })
    table = pd.DataFrame(out).set_index(names if len(names) > 1 else names[0])
    table["energy_kwh"] = table["energy_j"] / J_PER_KWH
    return table[SUMMARY_COLUMNS]


EXPORT_COLUMNS: Sequence[str] = ("id", *ENTRY_COLUMNS, "components")


def export_frame(entries: pd.DataFrame) -> pd.DataFrame:
    """The rows as flat text for CSV: ``command``/``components`` as JSON, ``tags`` joined by ``;``."""
    flat = entries.reindex(columns=list(EXPORT_COLUMNS)).copy()
    flat["command"] = [json.dumps(c) for c in entries["command"]]
    flat["tags"] = [";".join(t) for t in entries["tags"]]
    flat["components"] = [json.dumps(c) for c in entries["components"]]
    return flat


def export_csv(entries: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write every row to ``path`` as CSV (see :func:`export_frame`), atomically. Returns the path."""
    return write_text_atomic(path, export_frame(entries).to_csv(index=False, lineterminator="\n"))
