"""The ledger on a real PostgreSQL server: URLs, migrations, 8 concurrent `audit run`, an outage mid-run
(spool, then sync), and `audit migrate --to URL`. The generic storage and CLI tests run on both backends in
test_ledger_db.py and test_ledger_cli.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from pg_server import pg_server, pg_url, start_server  # noqa: F401 - fixtures

from ssprop_energy import ledger
from ssprop_energy.cli import main
from ssprop_energy.errors import LedgerError
from ssprop_energy.ledger import db, entries
from ssprop_energy.records import EnergyComponent

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _audit(*args: str, ledger_url: str, cwd: Path | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ssprop_energy", "audit", "--ledger", ledger_url, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=_env(), cwd=cwd or ROOT, **kw)


# ------------------------------------------------------------------------------------------ URLs


@pytest.mark.parametrize("bad", [
    "postgresql:ledger",                          # no //
    "mysql://ann@db.lab:3306/ledger",             # another scheme
    "https://ledger.lab/api",
    "sqlite+pysqlite://x",
    "postgresql://ann@db.lab:port/ledger",        # port not a number
    "postgresql://ann@db.lab:99999/ledger",       # port out of range
    "postgresql:///ledger",                       # no host
])
def test_bad_ledger_url_one_line_and_nothing_created(bad, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    monkeypatch.setenv("SSPROP_ENERGY_LEDGER", bad)
    code = main(["audit", "run", "--meter", "fake", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "ledger" in err and "Traceback" not in err
    assert not marker.exists(), "the command must not run when the ledger is misnamed"
    assert main(["audit", "--ledger", bad, "list"]) == 2
    assert main(["audit", "list", "--ledger", bad]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    assert list(tmp_path.iterdir()) == []  # no `postgresql:` folder, no file
    with pytest.raises(LedgerError):
        ledger.start_entry(kind="compare", ledger_path=bad)


def test_urls_are_recognised_and_password_hidden():
    loc = db.locate("postgresql://ann:s3cret@db.lab:6543/ledger")
    assert loc.is_server and loc.url.drivername == "postgresql+psycopg" and loc.url.port == 6543
    assert str(loc) == "postgresql://ann:***@db.lab/ledger".replace("db.lab", "db.lab:6543")
    assert db.locate("postgres://db.lab/ledger").is_server
    assert db.locate("relative/ledger.sqlite").path == Path("relative/ledger.sqlite")
    assert db.locate("C:ledger.sqlite").path is not None  # one letter: a drive, not a scheme
    spool = db.pending_dir("postgresql://ann:s3cret@db.lab:6543/ledger")
    assert "s3cret" not in str(spool) and spool.name.startswith("db.lab_6543_ledger-")


# ------------------------------------------------------------------------------------------ migrations


def test_migrations_from_an_empty_database(pg_url):
    conn = db.connect(pg_url, migrate_to=1)
    assert db.schema_version(conn) == 1
    cols = {c["name"] for c in sa.inspect(conn).get_columns("entries")}
    assert "pid" not in cols and {"uid", "user", "energy_j"} <= cols
    conn.exec_driver_sql(
        "INSERT INTO entries (uid, kind, project, \"user\", host, command, started_at, status, energy_j) "
        "VALUES ('v1row', 'compare', 'p', 'ann', 'h', '[]', '2026-01-01T00:00:00.000+00:00', 'complete', 0.1)")
    conn.commit()
    conn.close()
    df = ledger.load_entries(pg_url)  # opening migrates 1 -> 3
    conn = db.connect(pg_url)
    try:
        assert db.schema_version(conn) == db.SCHEMA_VERSION == 3
        insp = sa.inspect(conn)
        types = {c["name"]: str(c["type"]) for c in insp.get_columns("entries")}
        assert {"slurm_job_id", "slurm_array_task_id", "slurm_nodelist", "slurm_partition",
                "cuda_visible_devices", "gpu_share", "gpu_share_method", "cpu_share"} <= set(types)
        assert types["energy_j"] == "DOUBLE PRECISION"  # not float4: joules keep 15 digits
        assert "share_method" in {c["name"] for c in insp.get_columns("components")}
        assert conn.exec_driver_sql("SELECT count(*) FROM ledger_schema").scalar() == 1
    finally:
        conn.close()
    assert list(df["uid"]) == ["v1row"] and df.loc[0, "energy_j"] == 0.1
    # a full round trip keeps a float64 exactly
    e = ledger.start_entry(kind="x", ledger_path=pg_url)
    e.finish("complete", [EnergyComponent("cpu", 1 / 3, "estimated")], None, 100.0, 1.0, "override")
    assert ledger.load_entries(pg_url).iloc[1]["energy_j"] == 1 / 3

    conn = db.connect(pg_url)
    conn.exec_driver_sql("UPDATE ledger_schema SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="newer"):
        db.connect(pg_url)


# ------------------------------------------------------------------------------------------ writers


def test_eight_concurrent_audit_runs(pg_url):
    # The database is empty: the 8 writers also race to create the schema (the migration lock serialises them).
    n = 8
    procs = [
        _audit("run", "--meter", "fake", "--sample-period", "0.05", "--carbon-intensity", "250",
               "--project", f"w{i}", "--tag", f"t{i}", "--", sys.executable, "-c",
               f"import time, sys; time.sleep(0.3); sys.exit({i})", ledger_url=pg_url)
        for i in range(n)
    ]
    for i, p in enumerate(procs):
        assert p.wait(180) == i, p.stderr.read().decode()
    assert ledger.pending_rows(pg_url) == []
    conn = db.connect(pg_url)
    assert conn.exec_driver_sql("SELECT count(*), max(version) FROM ledger_schema").one() == (1, db.SCHEMA_VERSION)
    conn.close()
    df = ledger.load_entries(pg_url)
    assert len(df) == n and df["uid"].is_unique and sorted(df["id"]) == list(range(1, n + 1))
    for _, r in df.iterrows():
        i = int(r["project"][1:])
        # every field of a row belongs to the same writer: nothing torn or mixed
        assert r["exit_code"] == i and r["tags"] == [f"t{i}"] and r["command"][-1].endswith(f"sys.exit({i})")
        assert r["status"] == ("complete" if i == 0 else "failed")
        assert r["energy_j"] == pytest.approx(sum(c["energy_j"] for c in r["components"]), rel=1e-12)
        assert r["co2_g"] == pytest.approx(r["energy_j"] / 3.6e6 * 250.0, rel=1e-12)


# ------------------------------------------------------------------------------------------ outage


def test_server_stops_mid_run_then_spool_and_sync(tmp_path):
    server = start_server()
    try:
        url = server.create_database()
        release = tmp_path / "release"
        child = (f"import os, sys, time\nprint('ready', flush=True)\n"
                 f"while not os.path.exists({str(release)!r}): time.sleep(0.05)\nsys.exit(7)")
        wrapper = _audit("run", "--meter", "fake", "--carbon-intensity", "100", "--project", "outage", "--",
                         sys.executable, "-c", child, ledger_url=url)
        assert wrapper.stdout.readline().strip() == b"ready"
        assert list(ledger.load_entries(url)["status"]) == ["running"]
        server.stop()  # the server goes away while the command runs
        release.touch()
        assert wrapper.wait(120) == 7  # the command's exit code passes through
        err = wrapper.stderr.read().decode()
        assert "unreachable" in err and "fallback file" in err
        # a second run entirely during the outage: its start and its end are spooled
        assert main(["audit", "--ledger", url, "run", "--meter", "fake", "--carbon-intensity", "100", "--",
                     sys.executable, "-c", "pass"]) == 0
        spooled = ledger.pending_rows(url)
        assert len(spooled) == 2
        assert {json.loads(p.read_text())["entry"]["status"] for p in spooled} == {"failed", "complete"}
        assert main(["audit", "--ledger", url, "list"]) == 2  # reading needs the server: one clear line

        server.start()
        assert main(["audit", "--ledger", url, "sync"]) == 0
        assert ledger.pending_rows(url) == []
        assert main(["audit", "--ledger", url, "sync"]) == 0  # nothing left, nothing sent twice
        df = ledger.load_entries(url)
        assert len(df) == 2 and df["uid"].is_unique
        first = df[df["project"] == "outage"].iloc[0]
        assert first["status"] == "failed" and first["exit_code"] == 7 and first["energy_j"] > 0

        # spooled rows also go in at the next ledger access, without `audit sync`
        server.stop()
        assert main(["audit", "--ledger", url, "run", "--meter", "fake", "--carbon-intensity", "100", "--",
                     sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
        assert len(ledger.pending_rows(url)) == 1
        server.start()
        df = ledger.load_entries(url)
        assert len(df) == 3 and sorted(df["exit_code"].dropna().astype(int)) == [0, 3, 7]
        assert ledger.pending_rows(url) == []
    finally:
        server.close()


def test_sync_claims_each_spooled_file_once(pg_url, monkeypatch):
    # A run rewriting its spooled row while a sync is sending the older version loses nothing.
    loc = db.locate(pg_url)
    entry = ledger.start_entry(kind="compare", ledger_path=pg_url)
    doc = {"format": entries.FALLBACK_FORMAT, "reason": "test", "components": [],
           "entry": {**entry.row, "uid": "spooled-1"}}
    spool = db.pending_dir(loc)
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "spooled-1.json").write_text(json.dumps(doc))
    real_store = entries.store_rows

    def store_while_run_rewrites(ledger_loc, docs):
        finished = {**doc, "entry": {**doc["entry"], "status": "complete", "exit_code": 0}}
        (spool / "spooled-1.json").write_text(json.dumps(finished))  # the run's newer version
        return real_store(ledger_loc, docs)

    monkeypatch.setattr(entries, "store_rows", store_while_run_rewrites)
    assert ledger.sync_pending(pg_url) == (1, 0)
    monkeypatch.setattr(entries, "store_rows", real_store)
    assert [p.name for p in ledger.pending_rows(pg_url)] == ["spooled-1.json"]  # the newer one waits
    assert ledger.sync_pending(pg_url) == (1, 0)  # running row replaced by the finished one
    rows = ledger.load_entries(pg_url)
    assert list(rows[rows["uid"] == "spooled-1"]["status"]) == ["complete"]


# ------------------------------------------------------------------------------------------ migrate


def test_migrate_sqlite_ledger_to_server(pg_url, tmp_path, capsys):
    src = tmp_path / "lab.sqlite"
    runs = [("vision", [EnergyComponent("gpu:0", 1000.0, "counter"), EnergyComponent("cpu", 250.5, "estimated")]),
            ("nlp", [EnergyComponent("gpu:1", 36.0, "sampled")]),
            ("nlp", [])]
    for project, comps in runs:
        ledger.start_entry(kind="compare", project=project, command=["train.py"], ledger_path=src).finish(
            "complete", comps, None, 400.0, 1.2, "override")
    ledger.start_entry(kind="compare", project="left-running", ledger_path=src)
    # the server already holds a row of its own, so the copied rows get new ids
    ledger.start_entry(kind="audit-run", project="server-side", ledger_path=pg_url).finish(
        "complete", [EnergyComponent("cpu", 5.0, "estimated")], None, 100.0, 1.0, "override")

    assert main(["audit", "--ledger", str(src), "migrate", "--to", pg_url]) == 0
    out = capsys.readouterr().out
    assert "4 row(s) added, 0 already there" in out
    assert "source: 4 rows, 3 components" in out and "1286.5 J" in out and "verified" in out
    a, b = ledger.load_entries(src), ledger.load_entries(pg_url)
    assert len(b) == 5
    copied = b[b["project"] != "server-side"].set_index("uid")
    for _, r in a.iterrows():
        c = copied.loc[r["uid"]]
        assert c["id"] == r["id"] + 1  # ids mapped
        for col in ("project", "status", "started_at", "finished_at", "command", "co2_g", "pue", "user", "host"):
            assert c[col] == r[col] or (pd_isna(c[col]) and pd_isna(r[col])), col
        assert sorted(map(json.dumps, c["components"])) == sorted(map(json.dumps, r["components"]))

    assert main(["audit", "--ledger", str(src), "migrate", "--to", pg_url]) == 0
    assert "0 row(s) added, 4 already there" in capsys.readouterr().out
    assert len(ledger.load_entries(pg_url)) == 5
    assert main(["audit", "--ledger", pg_url, "migrate", "--to", str(tmp_path / "x.sqlite")]) == 2
    assert main(["audit", "--ledger", str(tmp_path / "none.sqlite"), "migrate", "--to", pg_url]) == 2


def pd_isna(x) -> bool:
    return x is None or (isinstance(x, float) and x != x)


def test_sync_reclaims_files_of_a_sync_that_died(pg_url):
    loc = db.locate(pg_url)
    spool = db.pending_dir(loc)
    spool.mkdir(parents=True, exist_ok=True)
    e = ledger.start_entry(kind="x", ledger_path=pg_url)
    doc = {"format": entries.FALLBACK_FORMAT, "reason": "t", "components": [],
           "entry": {**e.row, "uid": "orphan", "status": "complete"}}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (spool / f"orphan.json.sending-{dead.pid}").write_text(json.dumps(doc))
    assert ledger.sync_pending(pg_url) == (1, 0)
    assert list(spool.iterdir()) == []
    assert "orphan" in set(ledger.load_entries(pg_url)["uid"])
