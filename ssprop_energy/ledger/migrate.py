"""``audit migrate --to URL``: copy a local SQLite ledger into another ledger (a PostgreSQL server).

Rows keep their uid and every field; the target assigns new ids, and each row's components follow it (ids
mapped in one transaction). A uid the target already holds finished is skipped, so running the copy twice
adds nothing the second time. After the copy the target is read back: the copied uids must all be there,
with the same number of components and the same energy sums, or the copy is reported as failed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import sqlalchemy as sa

from ssprop_energy.errors import ConfigError, LedgerError
from ssprop_energy.ledger.db import COMPONENTS, ENTRIES, LedgerLocation, connect, locate
from ssprop_energy.ledger.entries import COMPONENT_COLUMNS, ENTRY_COLUMNS, store_rows

_CHUNK = 500


@dataclass(frozen=True)
class CopyResult:
    """What a copy did and what the read-back found (energies in joules)."""

    added: int
    skipped: int
    source_rows: int
    source_components: int
    source_energy_j: float
    target_rows: int
    target_components: int
    target_energy_j: float


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def _read_docs(loc: LedgerLocation) -> list[dict[str, Any]]:
    conn = connect(loc, create=False)
    try:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(ENTRIES).order_by(ENTRIES.c.id))]
        comps: dict[int, list[dict[str, Any]]] = {}
        for r in conn.execute(sa.select(COMPONENTS)):
            comps.setdefault(r.entry_id, []).append({k: r._mapping[k] for k in COMPONENT_COLUMNS})
    finally:
        conn.close()
    return [{"entry": {k: r[k] for k in ENTRY_COLUMNS}, "components": comps.get(r["id"], [])} for r in rows]


def _energy(docs: Sequence[dict[str, Any]]) -> tuple[float, float]:
    rows = sum(d["entry"]["energy_j"] or 0.0 for d in docs)
    parts = sum(c["energy_j"] for d in docs for c in d["components"])
    return rows, parts


def _read_back(loc: LedgerLocation, uids: Sequence[str]) -> tuple[int, int, float, float]:
    conn = connect(loc)
    n_rows = n_comps = 0
    energy = comp_energy = 0.0
    try:
        for chunk in _chunks(uids):
            r = conn.execute(sa.select(sa.func.count(), sa.func.sum(ENTRIES.c.energy_j))
                             .where(ENTRIES.c.uid.in_(chunk))).one()
            n_rows += int(r[0])
            energy += float(r[1] or 0.0)
            c = conn.execute(sa.select(sa.func.count(), sa.func.sum(COMPONENTS.c.energy_j))
                             .select_from(COMPONENTS.join(ENTRIES, COMPONENTS.c.entry_id == ENTRIES.c.id))
                             .where(ENTRIES.c.uid.in_(chunk))).one()
            n_comps += int(c[0])
            comp_energy += float(c[1] or 0.0)
    finally:
        conn.close()
    return n_rows, n_comps, energy, comp_energy


def copy_ledger(source: str | os.PathLike[str] | LedgerLocation | None,
                target: str | os.PathLike[str] | LedgerLocation) -> CopyResult:
    """Copy every row of the SQLite ledger ``source`` into ``target`` and verify the copy.

    Raises:
        ConfigError: the source is not a local file, or source and target are the same ledger.
        LedgerError: a ledger cannot be opened, or the read-back disagrees with the source.
    """
    src, dst = locate(source), locate(target)
    if src.path is None:
        raise ConfigError(f"audit migrate copies a local SQLite ledger; {src} is a server")
    if str(src) == str(dst) or (dst.path is not None and dst.path.resolve() == src.path.resolve()):
        raise ConfigError(f"source and target are the same ledger ({src})")
    if not src.path.exists():
        raise LedgerError(f"no ledger at {src.path} (nothing to migrate)")
    docs = _read_docs(src)
    added, skipped = store_rows(dst, docs)
    src_energy, src_comp_energy = _energy(docs)
    src_comps = sum(len(d["components"]) for d in docs)
    n_rows, n_comps, energy, comp_energy = _read_back(dst, [d["entry"]["uid"] for d in docs])
    result = CopyResult(added, skipped, len(docs), src_comps, src_energy, n_rows, n_comps, energy)
    same = (n_rows == len(docs) and n_comps == src_comps
            and math.isclose(energy, src_energy, rel_tol=1e-9, abs_tol=1e-9)
            and math.isclose(comp_energy, src_comp_energy, rel_tol=1e-9, abs_tol=1e-9))
    if not same:
        raise LedgerError(
            f"copy to {dst} does not verify: source {len(docs)} rows / {src_comps} components / {src_energy:.6g} J, "
            f"target holds {n_rows} rows / {n_comps} components / {energy:.6g} J for the same uids "
            "(a row there may be a different version of the same run)"
        )
    return result
