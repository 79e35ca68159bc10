"""Importing runs that a lab tracked with CodeCarbon, from its ``emissions.csv``.

CodeCarbon's file output (``codecarbon.output_methods.file.FileOutput``) writes one row per tracker run with
the fields of ``codecarbon.output_methods.emissions_data.EmissionsData``. The ones used here:

- ``run_id``: the run's uuid; the ledger row's uid is ``codecarbon:<run_id>``, so importing a file twice (or
  two files holding the same run) adds each run once. Within one file a repeated run id keeps its last row:
  CodeCarbon rewrites a run's cumulative totals when it flushes again.
- ``cpu_energy``, ``gpu_energy``, ``ram_energy`` (kWh) become components ``cpu``, ``gpu``, ``ram`` in joules
  (x 3.6e6), with source ``codecarbon``; ``energy_consumed`` (kWh) must equal their sum.
- ``emissions`` (kg CO2e) is kept as CodeCarbon computed it (x 1000 g); the intensity stored beside it is
  ``emissions / energy_consumed / pue``, so the row's CO2 = energy x intensity x PUE still holds.
- ``tracking_mode`` (``machine`` or ``process``) is kept in the row's tags and note: it says whether the
  figure is the whole machine's or CodeCarbon's per-process estimate.
- ``timestamp`` is the run's end in the tracking machine's local time without an offset (CodeCarbon writes
  ``datetime.now()``); it is read as this machine's local time unless it carries an offset, and the start is
  the end minus ``duration`` (s).

CodeCarbon records no user or host: the row's user is whoever imports it, its host ``unknown``, and the note
says so.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ssprop_energy.energy.carbon import J_PER_KWH
from ssprop_energy.errors import RecordError
from ssprop_energy.ledger.db import LedgerLocation, locate
from ssprop_energy.ledger.entries import current_user, store_rows

logger = logging.getLogger(__name__)

SOURCE = "codecarbon"
UID_PREFIX = "codecarbon:"
REQUIRED_COLUMNS = ("timestamp", "project_name", "run_id", "duration", "emissions", "energy_consumed",
                    "cpu_energy", "gpu_energy", "ram_energy", "tracking_mode")
# relative tolerance of energy_consumed against cpu + gpu + ram (CodeCarbon writes full floats)
_SUM_RTOL = 1e-6


def _number(row: pd.Series, col: str, where: str, default: float | None = None) -> float:
    value = row.get(col)
    if (value is None or (isinstance(value, float) and math.isnan(value)) or value == "") and default is not None:
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RecordError(f"{where}: column {col} is not a number ({value!r})") from None
    if not (math.isfinite(out) and out >= 0):
        raise RecordError(f"{where}: column {col} must be a non-negative number, got {value!r}")
    return out


def _text(row: pd.Series, col: str) -> str:
    value = row.get(col)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _utc(timestamp: str, where: str) -> datetime:
    try:
        value = datetime.fromisoformat(timestamp)
    except ValueError:
        raise RecordError(f"{where}: bad timestamp {timestamp!r}") from None
    if value.tzinfo is None:
        value = value.astimezone()  # CodeCarbon's datetime.now(): this machine's local time
    return value.astimezone(timezone.utc)


def codecarbon_rows(path: str | os.PathLike[str], project: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """Ledger rows (fallback-document shape: ``entry`` + ``components``) from a CodeCarbon CSV.

    Returns:
        ``(docs, repeated)``: one document per run id, and how many earlier rows of a repeated run id were
        dropped.

    Raises:
        RecordError: the file is missing, not CSV, lacks CodeCarbon's columns, or holds a bad value.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"run_id": str, "experiment_id": str, "timestamp": str})
    except FileNotFoundError:
        raise RecordError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RecordError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise RecordError(f"{path}: not a CodeCarbon emissions file (missing columns {', '.join(missing)})")
    by_run: dict[str, dict[str, Any]] = {}
    repeated = 0
    importer = current_user()
    for i, row in df.iterrows():
        where = f"{path} row {int(i) + 2}"
        run_id = _text(row, "run_id")
        if not run_id:
            raise RecordError(f"{where}: empty run_id")
        kwh = {k: _number(row, f"{k}_energy", where) for k in ("cpu", "gpu", "ram")}
        total_kwh = _number(row, "energy_consumed", where)
        parts_kwh = sum(kwh.values())
        if not math.isclose(total_kwh, parts_kwh, rel_tol=_SUM_RTOL, abs_tol=1e-12):
            raise RecordError(f"{where}: energy_consumed {total_kwh} kWh is not cpu + gpu + ram = {parts_kwh} kWh")
        pue = _number(row, "pue", where, default=1.0) or 1.0
        co2_g = _number(row, "emissions", where) * 1000.0
        duration_s = _number(row, "duration", where)
        end = _utc(_text(row, "timestamp"), where)
        mode = _text(row, "tracking_mode") or "unknown"
        version = _text(row, "codecarbon_version")
        energy_j = parts_kwh * J_PER_KWH
        intensity = co2_g / parts_kwh / pue if parts_kwh > 0 else None
        devices = {"cpu": _text(row, "cpu_model"), "gpu": _text(row, "gpu_model"), "ram": ""}
        components = [
            {"component": k, "energy_j": v * J_PER_KWH, "source": SOURCE, "device": devices[k],
             "machine_energy_j": None, "share": None, "share_method": None}
            for k, v in kwh.items() if v > 0 or k != "gpu"
        ]
        region = " ".join(x for x in (_text(row, "country_iso_code"), _text(row, "region")) if x)
        entry = {
            "uid": UID_PREFIX + run_id,
            "kind": "codecarbon",
            "project": project or _text(row, "project_name") or "default",
            "user": importer,
            "host": "unknown",
            "command": [],
            "redacted": False,
            "tags": ["codecarbon", f"tracking_mode:{mode}"],
            "started_at": (end - timedelta(seconds=duration_s)).isoformat(timespec="milliseconds"),
            "finished_at": end.isoformat(timespec="milliseconds"),
            "wall_s": duration_s,
            "status": "complete",
            "exit_code": None,
            "energy_j": energy_j,
            "energy_source": SOURCE,
            "co2_g": co2_g if intensity is not None else None,
            "intensity_g_per_kwh": intensity,
            "intensity_source": f"codecarbon {region}".strip(),
            "pue": pue,
            "note": (f"imported from CodeCarbon {version} ({mode} tracking mode), {path.name}, run {run_id}; "
                     f"CodeCarbon records no user or host: user is the importer").replace("  ", " "),
        }
        if run_id in by_run:
            repeated += 1
        by_run[run_id] = {"entry": entry, "components": components}
    return list(by_run.values()), repeated


def import_codecarbon(
    path: str | os.PathLike[str], ledger: str | os.PathLike[str] | LedgerLocation | None = None,
    project: str | None = None,
) -> tuple[int, int]:
    """Add the runs of a CodeCarbon emissions CSV to the ledger.

    Returns:
        ``(added, skipped)``: runs written, and duplicates skipped (already in the ledger, or an earlier row
        of a run id repeated in the file).

    Raises:
        RecordError: the file is not a CodeCarbon CSV. LedgerError: the ledger cannot be written.
    """
    docs, repeated = codecarbon_rows(path, project)
    added, skipped = store_rows(locate(ledger), docs)
    return added, skipped + repeated
