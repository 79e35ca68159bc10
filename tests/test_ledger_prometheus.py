"""Prometheus exposition of the ledger, scraped over HTTP and parsed with prometheus_client's parser."""

import socket
import sqlite3
import urllib.request

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from ssprop_energy.ledger import db
from ssprop_energy.ledger.prometheus import exposition, serve

ROWS = [  # (uid, project, user, status, energy_j, source, co2_g, started_at)
    ("a", "p1", "ann", "complete", 100.0, "counter", 0.5, "2025-01-02T03:00:00.000+00:00"),
    ("b", "p1", "ann", "complete", 50.0, "counter", 0.25, "2025-01-02T04:00:00.000+00:00"),
    ("c", "p2", "bob", "failed", None, "estimated", None, "2025-01-03T00:00:00.000+00:00"),
]


def _ledger(tmp_path):
    path = tmp_path / "ledger.sqlite"
    db.connect(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    for uid, project, user, status, e_j, src, co2, started in ROWS:
        conn.execute("INSERT INTO entries (uid, kind, project, user, host, command, started_at, finished_at, "
                     "status, energy_j, energy_source, co2_g) VALUES (?, 'run', ?, ?, 'h1', '[\"x\"]', ?, ?, ?, ?, ?, ?)",
                     (uid, project, user, started, started, status, e_j, src, co2))
    conn.close()
    return path


def _samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_scrape_over_http(tmp_path):
    path = _ledger(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(path, port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        if isinstance(server, tuple):
            server[0].shutdown()
    got = _samples(text)
    p1 = (("host", "h1"), ("project", "p1"), ("source", "counter"), ("user", "ann"))
    assert got[("ssprop_ledger_energy_joules_total", p1)] == 150.0
    assert got[("ssprop_ledger_co2_grams_total", p1)] == 0.75
    p2 = (("host", "h1"), ("project", "p2"), ("source", "estimated"), ("user", "bob"))
    assert got[("ssprop_ledger_energy_joules_total", p2)] == 0.0  # a failed, unmetered row adds nothing
    assert got[("ssprop_ledger_runs", (("status", "complete"),))] == 2
    assert got[("ssprop_ledger_runs", (("status", "failed"),))] == 1
    # 2025-01-03T00:00:00Z = 1735862400 (date -u -d ... +%s)
    assert got[("ssprop_ledger_last_run_timestamp_seconds", ())] == 1735862400.0
    assert _samples(exposition(path)) == got


def test_cli_metrics(tmp_path, capsys):
    from ssprop_energy.cli import main

    path = _ledger(tmp_path)
    assert main(["audit", "metrics", "--ledger", str(path)]) == 0
    got = _samples(capsys.readouterr().out)
    assert got[("ssprop_ledger_runs", (("status", "complete"),))] == 2


def test_cli_serve_metrics_scraped(tmp_path):
    import subprocess
    import sys
    import time

    path = _ledger(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ssprop_energy", "audit", "serve-metrics", "--port", str(port),
                             "--ledger", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        text = None
        for _ in range(50):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert text is not None
        p1 = (("host", "h1"), ("project", "p1"), ("source", "counter"), ("user", "ann"))
        assert _samples(text)[("ssprop_ledger_energy_joules_total", p1)] == 150.0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
