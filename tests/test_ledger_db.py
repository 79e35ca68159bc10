"""Ledger storage: round trip, concurrency, migrations, corrupt and locked files, fallback rows, redaction."""

from __future__ import annotations

import json
import logging
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from pg_server import pg_server, pg_url  # noqa: F401 - fixtures

from ssprop_energy import ledger
from ssprop_energy.errors import ConfigError, LedgerError
from ssprop_energy.ledger import db
from ssprop_energy.ledger.attribution import CpuAttribution
from ssprop_energy.ledger.entries import FALLBACK_FILE
from ssprop_energy.records import EnergyComponent


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path) -> str:
    """A fresh ledger: an SQLite file (in a folder that does not exist yet), or a database on a real server."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "sub" / "ledger.sqlite")


def _rows(path) -> list[dict]:
    conn = db.connect(path, create=False) if db.locate(path).is_server else None
    if conn is None:
        raw = sqlite3.connect(path)
        raw.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in raw.execute("SELECT * FROM entries ORDER BY id")]
        finally:
            raw.close()
    try:
        return [dict(r._mapping) for r in conn.execute(sa.select(db.ENTRIES).order_by(db.ENTRIES.c.id))]
    finally:
        conn.close()


def _components(path, entry_id: int) -> list[dict]:
    conn = db.connect(path)
    try:
        rows = conn.execute(sa.select(db.COMPONENTS).where(db.COMPONENTS.c.entry_id == entry_id))
        return [dict(r._mapping) for r in rows]
    finally:
        conn.close()


def test_default_path_and_project(monkeypatch, tmp_path):
    monkeypatch.delenv("SSPROP_ENERGY_LEDGER")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert db.default_ledger_path() == tmp_path / "xdg" / "ssprop-energy" / "ledger.sqlite"
    monkeypatch.setenv("SSPROP_ENERGY_LEDGER", str(tmp_path / "l.sqlite"))
    assert db.default_ledger_path() == tmp_path / "l.sqlite"
    monkeypatch.setenv("SSPROP_ENERGY_PROJECT", "vision")
    entry = ledger.start_entry(kind="compare", command=["x"])
    assert _rows(tmp_path / "l.sqlite")[0]["project"] == "vision"
    assert entry.entry_id == 1


def test_start_finish_round_trip(tmp_path, where):
    path = where
    entry = ledger.start_entry(kind="compare", project="p1", tags=["a", "b"], command=["train.py", "--lr", "0.1"],
                               run_dir=tmp_path / "run", ledger_path=path)
    (row,) = _rows(path)
    assert row["status"] == "running" and row["finished_at"] is None and row["energy_j"] is None
    assert json.loads(row["command"]) == ["train.py", "--lr", "0.1"]
    assert json.loads(row["tags"]) == ["a", "b"]
    assert row["run_dir"] == str((tmp_path / "run").resolve())
    if not db.locate(path).is_server:
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    conn = db.connect(path)
    assert db.schema_version(conn) == db.SCHEMA_VERSION
    conn.close()

    comps = [EnergyComponent("gpu:0", 7200.0, "counter", "H100"), EnergyComponent("cpu:package-0", 1800.0, "counter")]
    entry.finish("complete", comps, co2_g=None, intensity_g_per_kwh=400.0, pue=1.5, intensity_source="override",
                 exit_code=0)
    (row,) = _rows(path)
    assert row["status"] == "complete" and row["exit_code"] == 0
    assert row["energy_j"] == 9000.0 and row["energy_source"] == "counter"
    # 9000 J = 0.0025 kWh; x 400 g/kWh x 1.5 = 1.5 g
    assert row["co2_g"] == pytest.approx(1.5, rel=1e-12)
    assert row["wall_s"] >= 0 and row["finished_at"] >= row["started_at"]
    stored = _components(path, row["id"])
    assert sorted((c["component"], c["energy_j"], c["source"], c["device"]) for c in stored) == [
        ("cpu:package-0", 1800.0, "counter", ""), ("gpu:0", 7200.0, "counter", "H100")]
    with pytest.raises(ConfigError):
        entry.finish("complete", comps, None, 400.0, 1.0, "override")


def test_finish_checks_totals_against_parts(where, caplog):
    path = where
    entry = ledger.start_entry(kind="compare", ledger_path=path)
    comps = [EnergyComponent("gpu:0", 3.6e6, "counter"), EnergyComponent("cpu", 3.6e6, "estimated")]
    with caplog.at_level(logging.WARNING):
        entry.finish("complete", comps, co2_g=1.0, intensity_g_per_kwh=100.0, pue=1.0, intensity_source="x",
                     energy_source="counter")
    (row,) = _rows(path)
    assert row["energy_source"] == "mixed"  # a counter and an estimate added: the total says so
    assert row["co2_g"] == pytest.approx(200.0)  # 2 kWh x 100 g/kWh, not the caller's 1 g
    assert "disagrees" in caplog.text
    with pytest.raises(ConfigError):
        ledger.start_entry(kind="x", ledger_path=path).finish("finished", [], None, None, None, None)


def test_attributed_components_are_stored_with_share(where):
    path = where
    entry = ledger.start_entry(kind="audit-run", ledger_path=path)
    att = CpuAttribution(tree_cpu_s=3.0, machine_cpu_s=12.0, share=0.25)
    comps = ledger.attribute([EnergyComponent("cpu:package-0", 400.0, "counter"),
                              EnergyComponent("gpu:0", 50.0, "sampled")], att)
    entry.finish("complete", comps, None, 300.0, 1.0, "override", attribution=att)
    (row,) = _rows(path)
    assert row["energy_j"] == pytest.approx(150.0)  # 400 x 0.25 + 50
    assert (row["cpu_share"], row["tree_cpu_s"], row["machine_cpu_s"]) == (0.25, 3.0, 12.0)
    assert "attributed" in row["note"]
    stored = {c["component"]: c for c in _components(path, row["id"])}
    assert stored["cpu:package-0"]["energy_j"] == 100.0 and stored["cpu:package-0"]["machine_energy_j"] == 400.0
    assert stored["cpu:package-0"]["share"] == 0.25
    assert stored["gpu:0"]["machine_energy_j"] is None and stored["gpu:0"]["energy_j"] == 50.0


def _append_many(path: str, worker: int, n: int) -> None:
    for i in range(n):
        e = ledger.start_entry(kind="compare", project=f"w{worker}", command=[f"job-{worker}-{i}"], ledger_path=path)
        e.finish("complete", [EnergyComponent("cpu", float(1000 * worker + i), "estimated"),
                              EnergyComponent("gpu:0", float(i), "counter")],
                 None, 100.0, 1.0, "override", exit_code=worker)


def test_eight_processes_append_concurrently(where):
    path = where  # an SQLite file is created by the racing processes themselves
    n = 15
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w, n)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 8
    assert not db.pending_dir(path).exists(), "no row should have needed the JSON fallback"
    rows = _rows(path)
    assert len(rows) == 8 * n
    assert len({r["uid"] for r in rows}) == 8 * n
    seen = set()
    for r in rows:
        worker, i = map(int, json.loads(r["command"])[0].split("-")[1:])
        seen.add((worker, i))
        # every field of the row belongs to the same (worker, i): nothing torn or mixed between writers
        assert r["project"] == f"w{worker}" and r["exit_code"] == worker and r["status"] == "complete"
        assert r["energy_j"] == 1000 * worker + 2 * i and r["energy_source"] == "mixed"
        comps = {c["component"]: c["energy_j"] for c in _components(path, r["id"])}
        assert comps == {"cpu": 1000 * worker + i, "gpu:0": i}
    assert seen == {(w, i) for w in range(8) for i in range(n)}


def test_migration_from_version_1(tmp_path):
    path = tmp_path / "ledger.sqlite"
    c = db.connect(path, migrate_to=1)
    assert db.schema_version(c) == 1
    c.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "INSERT INTO entries (uid, kind, project, user, host, command, started_at, finished_at, status, energy_j, "
        "energy_source, co2_g) VALUES ('old', 'compare', 'legacy', 'ann', 'h1', '[\"a\"]', "
        "'2025-01-02T03:04:05.000+00:00', '2025-01-02T04:04:05.000+00:00', 'complete', 72.0, 'counter', 0.5)"
    )
    conn.execute("INSERT INTO components (entry_id, component, energy_j, source) VALUES (1, 'gpu:0', 72.0, 'counter')")
    conn.close()
    with pytest.raises(sqlite3.OperationalError):  # the v2 column does not exist yet
        sqlite3.connect(path).execute("SELECT cpu_share FROM entries").fetchall()

    df = ledger.load_entries(path)  # opening migrates
    conn = db.connect(path)
    assert db.schema_version(conn) == db.SCHEMA_VERSION == 3
    conn.close()
    assert list(df["uid"]) == ["old"] and df.loc[0, "energy_j"] == 72.0 and df.loc[0, "project"] == "legacy"
    assert df.loc[0, "components"] == [{"component": "gpu:0", "energy_j": 72.0, "source": "counter", "device": "",
                                        "machine_energy_j": None, "share": None, "share_method": None}]
    assert df["cpu_share"].isna().all() and df.loc[0, "month"] == "2025-01"
    new = ledger.start_entry(kind="audit-run", ledger_path=path)
    new.finish("complete", [], None, None, None, None,
               attribution=CpuAttribution(1.0, 2.0, 0.5))
    assert _rows(path)[1]["cpu_share"] == 0.5


# The DDL of schema versions 1 and 2 exactly as ssprop-energy 0.1 wrote it (hand-written sqlite3 SQL), to check
# that a ledger file made by that version opens, migrates and keeps every figure.
_OLD_V2_DDL = [
    """CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
       project TEXT NOT NULL, user TEXT NOT NULL, host TEXT NOT NULL, command TEXT NOT NULL,
       redacted INTEGER NOT NULL DEFAULT 0, tags TEXT NOT NULL DEFAULT '[]', started_at TEXT NOT NULL,
       finished_at TEXT, wall_s REAL, status TEXT NOT NULL, exit_code INTEGER, energy_j REAL, energy_source TEXT,
       co2_g REAL, intensity_g_per_kwh REAL, intensity_source TEXT, pue REAL, run_dir TEXT, note TEXT)""",
    """CREATE TABLE components (entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
       component TEXT NOT NULL, energy_j REAL NOT NULL, source TEXT NOT NULL, device TEXT NOT NULL DEFAULT '',
       PRIMARY KEY (entry_id, component))""",
    "CREATE INDEX entries_started ON entries(started_at)",
    "ALTER TABLE entries ADD COLUMN pid INTEGER",
    "ALTER TABLE entries ADD COLUMN cpu_share REAL",
    "ALTER TABLE entries ADD COLUMN tree_cpu_s REAL",
    "ALTER TABLE entries ADD COLUMN machine_cpu_s REAL",
    "ALTER TABLE components ADD COLUMN machine_energy_j REAL",
    "ALTER TABLE components ADD COLUMN share REAL",
    "CREATE INDEX entries_project ON entries(project)",
    "PRAGMA user_version = 2",
]


def test_existing_version_2_file_migrates_and_keeps_its_rows(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for stmt in _OLD_V2_DDL:
        conn.execute(stmt)
    conn.execute(
        "INSERT INTO entries (uid, kind, project, user, host, command, started_at, finished_at, wall_s, status, "
        "exit_code, energy_j, energy_source, co2_g, intensity_g_per_kwh, intensity_source, pue, pid, cpu_share, "
        "tree_cpu_s, machine_cpu_s) VALUES ('u2', 'audit-run', 'vision', 'ann', 'h1', '[\"sleep\", \"1\"]', "
        "'2026-05-01T00:00:00.000+00:00', '2026-05-01T00:00:01.000+00:00', 1.0, 'complete', 0, 25.0, 'counter', "
        "0.0025, 360.0, 'override', 1.0, 4242, 0.25, 0.5, 2.0)"
    )
    conn.execute("INSERT INTO components VALUES (1, 'cpu:package-0', 25.0, 'counter', 'Xeon', 100.0, 0.25)")
    conn.close()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    df = ledger.load_entries(path)
    row = df.iloc[0]
    assert (row["uid"], row["energy_j"], row["cpu_share"], row["pid"]) == ("u2", 25.0, 0.25, 4242)
    assert row["slurm_job_id"] is None and row["command"] == ["sleep", "1"]
    assert row["components"][0]["machine_energy_j"] == 100.0 and row["components"][0]["share_method"] is None
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 3
    cols = {r[1] for r in raw.execute("PRAGMA table_info(entries)")}
    assert {"slurm_job_id", "slurm_partition", "cuda_visible_devices", "gpu_share_method"} <= cols
    raw.close()
    e = ledger.start_entry(kind="audit-run", ledger_path=path)  # a new row after the migration
    e.finish("complete", [EnergyComponent("cpu", 3.6e6, "estimated")], None, 100.0, 1.0, "override")
    rows = _rows(path)
    assert [r["id"] for r in rows] == [1, 2] and rows[1]["slurm_job_id"] == "777"
    assert rows[1]["co2_g"] == pytest.approx(100.0)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    db.connect(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(LedgerError, match="newer"):
        db.connect(path)


def test_corrupt_ledger_clear_error_and_json_fallback(tmp_path, caplog):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not sqlite \x00\x01\x02" * 200)
    with pytest.raises(LedgerError, match="corrupt or not an SQLite database"):
        db.connect(path)
    with pytest.raises(LedgerError, match="corrupt"):
        ledger.load_entries(path)

    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        entry = ledger.start_entry(kind="compare", project="p", command=["a"], run_dir=run_dir, ledger_path=path)
    fallback = run_dir / FALLBACK_FILE
    assert entry.entry_id is None and entry.fallback_path == fallback
    assert str(fallback) in caplog.text
    doc = json.loads(fallback.read_text())
    assert doc["entry"]["status"] == "running" and "corrupt" in doc["reason"]

    entry.finish("failed", [EnergyComponent("gpu:0", 36.0, "counter")], None, 500.0, 1.0, "override", exit_code=4)
    doc = json.loads(fallback.read_text())
    assert doc["entry"]["status"] == "failed" and doc["entry"]["exit_code"] == 4
    assert doc["entry"]["co2_g"] == pytest.approx(36.0 / 3.6e6 * 500.0)
    assert doc["components"][0]["energy_j"] == 36.0

    # once the ledger is repaired, the row comes in (and only once)
    path.unlink()
    assert ledger.import_fallback([run_dir], ledger_path=path) == (1, 0)
    assert ledger.import_fallback([fallback], ledger_path=path) == (0, 1)
    (row,) = _rows(path)
    assert row["uid"] == entry.uid and row["status"] == "failed" and row["energy_j"] == 36.0
    assert fallback.exists()  # files next to a run are kept as evidence


def test_fallback_without_run_dir_goes_to_pending_and_import_removes_it(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"\xff" * 4096)
    entry = ledger.start_entry(kind="audit-run", ledger_path=path)
    assert entry.fallback_path == db.pending_dir(path) / f"{entry.uid}.json"
    entry.finish("interrupted", [], None, None, None, None, exit_code=130)
    assert ledger.pending_rows(path) == [entry.fallback_path]
    path.unlink()
    assert ledger.import_fallback([db.pending_dir(path)], ledger_path=path) == (1, 0)
    assert ledger.pending_rows(path) == []
    assert _rows(path)[0]["status"] == "interrupted"


def test_running_row_in_ledger_replaced_by_imported_finished_row(tmp_path):
    path = tmp_path / "ledger.sqlite"
    entry = ledger.start_entry(kind="compare", ledger_path=path, run_dir=tmp_path / "run")
    assert entry.entry_id == 1
    # the ledger goes bad between start and finish: the finished row must survive as JSON
    path.rename(tmp_path / "good.sqlite")
    path.write_bytes(b"garbage" * 1000)
    entry.finish("complete", [EnergyComponent("cpu", 10.0, "estimated")], None, 100.0, 1.0, "override")
    assert entry.fallback_path == tmp_path / "run" / FALLBACK_FILE
    path.unlink()
    (tmp_path / "good.sqlite").rename(path)
    assert _rows(path)[0]["status"] == "running"
    assert ledger.import_fallback([entry.fallback_path], ledger_path=path) == (1, 0)
    (row,) = _rows(path)
    assert row["status"] == "complete" and row["energy_j"] == 10.0 and row["uid"] == entry.uid


def test_finish_into_ledger_removes_start_fallback(tmp_path, monkeypatch):
    path = tmp_path / "ledger.sqlite"
    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    db.connect(path).close()
    holder.execute("BEGIN EXCLUSIVE")  # another writer holding the lock past the busy timeout
    entry = ledger.start_entry(kind="compare", ledger_path=path, run_dir=tmp_path / "run")
    assert entry.fallback_path is not None
    assert "locked" in json.loads(entry.fallback_path.read_text())["reason"]
    holder.execute("COMMIT")
    holder.close()
    entry.finish("complete", [], None, None, None, None)
    assert entry.fallback_path is None and not (tmp_path / "run" / FALLBACK_FILE).exists()
    assert _rows(path)[0]["status"] == "complete" and _rows(path)[0]["uid"] == entry.uid


def test_redaction_and_no_environment_stored(where, monkeypatch):
    path = where
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-token-value")
    argv = ["python", "train.py", "--token", "hunter2"]
    ledger.start_entry(kind="audit-run", command=argv, redact=True, ledger_path=path).finish(
        "complete", [], None, None, None, None)
    ledger.start_entry(kind="audit-run", command=argv, ledger_path=path).finish(
        "complete", [], None, None, None, None)
    rows = _rows(path)
    assert json.loads(rows[0]["command"]) == ["python", "<redacted>"] and rows[0]["redacted"] == 1
    assert json.loads(rows[1]["command"]) == argv and rows[1]["redacted"] == 0
    assert ledger.redact_command(["prog"]) == ["prog"]
    assert "s3cr3t" not in json.dumps(rows, default=str)
    if db.locate(path).is_server:
        return
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw = Path(path).read_bytes()
    assert b"s3cr3t-token-value" not in raw
    assert raw.count(b"hunter2") == 1  # only the unredacted row's command holds it


def test_read_only_ledger_is_listed_without_writing(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for stmt in _OLD_V2_DDL:  # an older schema: reading must not migrate it
        conn.execute(stmt)
    conn.execute("INSERT INTO entries (uid, kind, project, user, host, command, started_at, status, energy_j) "
                 "VALUES ('r', 'compare', 'p', 'ann', 'h', '[]', '2026-01-01T00:00:00.000+00:00', 'complete', 5.0)")
    conn.execute("INSERT INTO components (entry_id, component, energy_j, source) VALUES (1, 'cpu', 5.0, 'counter')")
    conn.close()
    before = path.read_bytes()
    # We run as root in CI, where chmod does not stop writes: the ledger's access check is what is faked.
    monkeypatch.setattr(db, "writable", lambda p: False)
    from ssprop_energy.ledger import summary

    monkeypatch.setattr(summary, "writable", lambda p: False)
    df = ledger.load_entries(path)
    assert list(df["uid"]) == ["r"] and df.loc[0, "energy_j"] == 5.0 and df.loc[0, "slurm_job_id"] is None
    assert df.loc[0, "components"][0]["share_method"] is None
    assert path.read_bytes() == before  # not migrated, not touched
    ro = db.connect(path, read_only=True)
    with pytest.raises(Exception, match="readonly"):
        ro.exec_driver_sql("DELETE FROM entries")
    ro.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
