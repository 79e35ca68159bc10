"""``ssprop-energy audit``: the CLI over the ledger, summaries against hand sums, CSV export, HTML report."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pg_server import pg_server, pg_url  # noqa: F401 - fixtures

from ssprop_energy import ledger
from ssprop_energy.cli import main
from ssprop_energy.energy.carbon import co2_g
from ssprop_energy.ledger import entries
from ssprop_energy.records import EnergyComponent


@pytest.fixture(autouse=True, params=["sqlite", "postgresql"])
def backend(request, monkeypatch) -> str:
    """Every test here runs against an SQLite file and against a real PostgreSQL server."""
    if request.param == "postgresql":
        monkeypatch.setenv("SSPROP_ENERGY_LEDGER", request.getfixturevalue("pg_url"))
    return request.param


def _ledger_path() -> Path:
    return ledger.default_ledger_path()


def _record(*, project, user, host, started, status, energy, source="counter", intensity=400.0,
            pue=1.0, wall_s=None):
    """One finished row with a chosen user, host and start time (the clock and login are faked)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(entries, "current_user", lambda: user)
        mp.setattr(entries.socket, "gethostname", lambda: host)
        mp.setattr(entries, "utc_now", lambda: started)
        e = ledger.start_entry(kind="compare", project=project, command=["train.py", project])
    if status == "running":
        return e
    comps = [EnergyComponent(f"gpu:{i}", x, source) for i, x in enumerate(energy)]
    e.finish(status, comps, None, intensity, pue, "override", exit_code=0 if status == "complete" else 1)
    return e


@pytest.fixture
def lab():
    """Six rows over two projects, three users, two hosts and two months."""
    rows = [
        ("vision", "ann", "h1", "2026-09-03T10:00:00.000+00:00", "complete", [1000.0, 500.0], 400.0, 1.0),
        ("vision", "bob", "h1", "2026-09-20T10:00:00.000+00:00", "failed", [250.0], 400.0, 1.2),
        ("vision", "ann", "h2", "2026-10-01T00:00:00.000+00:00", "complete", [7200.0], 100.0, 1.0),
        ("nlp", "cid", "h2", "2026-10-15T08:30:00.000+00:00", "interrupted", [36.0], 500.0, 1.5),
        ("nlp", "cid", "h2", "2026-10-16T08:30:00.000+00:00", "complete", [], 500.0, 1.0),  # meter failed
        ("nlp", "ann", "h1", "2026-10-31T23:59:00.000+00:00", "running", [], 0.0, 1.0),
    ]
    for project, user, host, started, status, energy, intensity, pue in rows:
        _record(project=project, user=user, host=host, started=started, status=status,
                energy=energy, intensity=intensity, pue=pue)
    return rows


def _co2(energy_j, intensity, pue):
    return energy_j / 3.6e6 * intensity * pue


def test_summary_matches_hand_sums(lab):
    df = ledger.load_entries()
    assert len(df) == 6
    by_project = ledger.summarize(df, "project")
    assert list(by_project.index) == ["nlp", "vision"]
    v, n = by_project.loc["vision"], by_project.loc["nlp"]
    assert (v["runs"], v["complete"], v["failed"], v["interrupted"], v["running"]) == (3, 2, 1, 0, 0)
    assert v["energy_j"] == 1000 + 500 + 250 + 7200
    assert v["energy_kwh"] == pytest.approx(8950 / 3.6e6)
    assert v["co2_g"] == pytest.approx(_co2(1500, 400, 1.0) + _co2(250, 400, 1.2) + _co2(7200, 100, 1.0))
    assert (n["runs"], n["complete"], n["interrupted"], n["running"], n["unmeasured"]) == (3, 1, 1, 1, 1)
    assert n["energy_j"] == 36.0 and n["co2_g"] == pytest.approx(_co2(36, 500, 1.5))

    by_month = ledger.summarize(df, "month")
    assert list(by_month.index) == ["2026-09", "2026-10"]
    assert by_month.loc["2026-09", "energy_j"] == 1750.0 and by_month.loc["2026-10", "energy_j"] == 7236.0
    by_user = ledger.summarize(df, "user")
    assert by_user.loc["ann", "runs"] == 3 and by_user.loc["ann", "energy_j"] == 8700.0
    assert by_user.loc["cid", "energy_j"] == 36.0
    by_host = ledger.summarize(df, "host")
    assert by_host.loc["h1", "energy_j"] == 1750.0 and by_host.loc["h2", "energy_j"] == 7236.0
    total = ledger.summarize(df, None).loc["all"]
    assert total["energy_j"] == 8986.0 and total["energy_source"] == "counter"

    since = ledger.load_entries(since=ledger.parse_since("2026-10-01"))
    assert len(since) == 4 and ledger.summarize(since, None).loc["all", "energy_j"] == 7236.0
    assert len(ledger.load_entries(project="nlp")) == 3


def test_summary_source_is_mixed_when_estimates_are_added():
    _record(project="p", user="u", host="h", started="2026-01-01T00:00:00.000+00:00",
            status="complete", energy=[10.0])
    _record(project="p", user="u", host="h", started="2026-01-02T00:00:00.000+00:00",
            status="complete", energy=[5.0], source="estimated")
    table = ledger.summarize(ledger.load_entries(), "project")
    assert table.loc["p", "energy_j"] == 15.0 and table.loc["p", "energy_source"] == "mixed"


def test_ledger_co2_matches_energy_package(lab):
    df = ledger.load_entries()
    row = df[df["user"] == "bob"].iloc[0]
    assert row["co2_g"] == pytest.approx(co2_g(250.0, 400.0, 1.2), rel=1e-12)


def test_cli_summary_and_list(lab, capsys):
    assert main(["audit", "summary", "--by", "project"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["project", "runs", "complete"]
    assert out[1].split()[:2] == ["nlp", "3"] and out[2].split()[:2] == ["vision", "3"]
    assert out[3].split()[:2] == ["TOTAL", "6"] and "2.5 Wh" in out[3] and "0.408 g" in out[3]  # 8986 J; 0.4075 g
    assert main(["audit", "list", "-n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2].split()[0] == "6" and "running" in out[2]
    assert main(["audit", "summary", "--by", "month", "--since", "2026-10-01"]) == 0
    assert "2026-09" not in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["audit", "run"],
    ["audit", "run", "--"],
    ["audit", "summary", "--since", "yesterday"],
    ["audit", "summary", "--by", "planet"],
    ["audit", "list", "--since", "2026-02-30"],
    ["audit", "export"],
])
def test_bad_arguments_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_export_csv_content(lab, tmp_path, capsys):
    out = tmp_path / "out" / "ledger.csv"
    assert main(["audit", "export", "--csv", str(out), "--project", "vision"]) == 0
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["user"] for r in rows] == ["ann", "bob", "ann"]
    assert float(rows[0]["energy_j"]) == 1500.0
    assert float(rows[1]["co2_g"]) == pytest.approx(_co2(250, 400, 1.2))
    assert rows[1]["status"] == "failed" and rows[1]["exit_code"] == "1"
    assert json.loads(rows[0]["command"]) == ["train.py", "vision"]
    comps = json.loads(rows[0]["components"])
    assert [(c["component"], c["energy_j"]) for c in comps] == [("gpu:0", 1000.0), ("gpu:1", 500.0)]
    assert rows[0]["started_at"] == "2026-09-03T10:00:00.000+00:00"
    assert sorted(p.name for p in out.parent.iterdir()) == ["ledger.csv"]  # no temporary left behind


def test_html_report_self_contained_and_escaped(tmp_path, capsys):
    _record(project="<script>alert(1)</script>", user="u", host="h",
            started="2026-03-01T00:00:00.000+00:00", status="complete", energy=[3.6e6], intensity=200.0)
    page_path = tmp_path / "lab.html"
    assert main(["audit", "report", "-o", str(page_path)]) == 0
    page = page_path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "http://" not in page and "https://" not in page
    assert page.count(" src=") == page.count(" src='data:")  # figures are inline data: URIs, nothing fetched
    assert "<style>" in page and "By project" in page and "2026-03" in page
    assert "200 g CO2e" in page  # 1 kWh x 200 g/kWh


def test_cli_audit_run_passes_exit_code_through(capsys):
    code = main(["audit", "run", "--meter", "fake", "--sample-period", "0.02", "--carbon-intensity", "300",
                 "--project", "p", "--tag", "t1", "--redact", "--", sys.executable, "-c", "import sys; sys.exit(3)"])
    assert code == 3
    err = capsys.readouterr().err
    assert "failed (exit 3)" in err and "row #1" in err
    df = ledger.load_entries()
    row = df.iloc[0]
    assert row["status"] == "failed" and row["exit_code"] == 3 and row["project"] == "p"
    assert row["tags"] == ["t1"] and row["command"] == [sys.executable, "<redacted>"]
    # the fake meter has a GPU (kept whole) and a machine-wide CPU (charged by CPU-time share)
    comps = {c["component"]: c for c in row["components"]}
    assert comps["gpu:0"]["share"] is None
    assert comps["cpu"]["energy_j"] == pytest.approx(comps["cpu"]["machine_energy_j"] * row["cpu_share"])
    assert row["energy_j"] == pytest.approx(comps["gpu:0"]["energy_j"] + comps["cpu"]["energy_j"])
    assert row["co2_g"] == pytest.approx(row["energy_j"] / 3.6e6 * 300.0)
    assert main(["audit", "run", "--meter", "fake", "--carbon-intensity", "300", "--", sys.executable, "-c", "pass"]) == 0


def test_corrupt_ledger_cli_error_and_audit_run_fallback(capsys, backend):
    if backend != "sqlite":
        pytest.skip("a corrupt file is an SQLite matter (the server case is test_ledger_pg's outage test)")
    path = _ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x13\x37 definitely not sqlite " * 100)
    assert main(["audit", "list"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "corrupt" in err and str(path) in err

    code = main(["audit", "run", "--meter", "fake", "--carbon-intensity", "300", "--",
                 sys.executable, "-c", "import sys; sys.exit(5)"])
    assert code == 5
    err = capsys.readouterr().err
    assert "fallback file" in err and "ledger was unusable" in err
    (pending,) = ledger.pending_rows(path)
    doc = json.loads(pending.read_text())
    assert doc["entry"]["status"] == "failed" and doc["entry"]["exit_code"] == 5 and doc["components"]

    path.unlink()  # the lab replaces the broken file
    assert main(["audit", "list"]) == 0
    assert "1 run(s) wait as JSON" in capsys.readouterr().err
    assert main(["audit", "import"]) == 0
    assert "imported 1 row(s)" in capsys.readouterr().out
    assert ledger.pending_rows(path) == []
    assert list(ledger.load_entries()["exit_code"]) == [5]


def test_cli_audit_run_sigterm_records_interrupted(tmp_path, backend):
    path = tmp_path / "ledger.sqlite" if backend == "sqlite" else str(_ledger_path())
    child = "import time; print('ready', flush=True); time.sleep(60)"
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "ssprop_energy", "audit", "--ledger", str(path), "run", "--meter", "fake",
         "--carbon-intensity", "100", "--", sys.executable, "-c", child],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=dict(os.environ),
    )
    try:
        assert wrapper.stdout.readline().strip() == b"ready"
        assert list(ledger.load_entries(path)["status"]) == ["running"]
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(30) == 128 + signal.SIGTERM
    finally:
        wrapper.kill()
        wrapper.wait()
    assert b"interrupted (exit 143)" in wrapper.stderr.read()
    row = ledger.load_entries(path).iloc[0]
    assert row["status"] == "interrupted" and row["exit_code"] == 143 and row["energy_j"] > 0


def test_who_ran_what_where_summary_by_several_keys_and_report(monkeypatch, tmp_path, capsys):
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_NODELIST": "gpu[01-02]",
             "SLURM_JOB_PARTITION": "a100", "CUDA_VISIBLE_DEVICES": "0,1"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    _record(project="vision", user="ann", host="n1", started="2026-09-03T10:00:00.000+00:00", status="complete",
            energy=[3.6e6], intensity=100.0)  # 1 kWh, 100 g
    for k in slurm:
        monkeypatch.delenv(k)
    _record(project="vision", user="bob", host="n2", started="2026-09-10T10:00:00.000+00:00", status="complete",
            energy=[7.2e6], intensity=100.0)
    _record(project="nlp", user="ann", host="n1", started="2026-10-01T00:00:00.000+00:00", status="complete",
            energy=[1.8e6], intensity=200.0)
    df = ledger.load_entries()
    first = df.iloc[0]
    assert (first["slurm_job_id"], first["slurm_array_task_id"], first["slurm_nodelist"], first["slurm_partition"],
            first["cuda_visible_devices"]) == ("4242", "3", "gpu[01-02]", "a100", "0,1")
    assert df.iloc[1]["slurm_job_id"] is None

    table = ledger.summarize(df, ["user", "project"])
    assert list(table.index) == [("ann", "nlp"), ("ann", "vision"), ("bob", "vision")]
    assert table.loc[("ann", "vision"), "energy_j"] == 3.6e6 and table.loc[("bob", "vision"), "co2_g"] == 200.0
    by_part = ledger.summarize(df, ["partition", "month"])
    assert by_part.loc[("a100", "2026-09"), "runs"] == 1 and by_part.loc[("-", "2026-09"), "energy_j"] == 7.2e6

    assert main(["audit", "summary", "--by", "user,project"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["user", "project", "runs"]
    assert out[1].split()[:3] == ["ann", "nlp", "1"] and out[3].split()[:3] == ["bob", "vision", "1"]
    assert out[4].split()[:2] == ["TOTAL", "3"]
    assert main(["audit", "summary", "--by", "user,planet"]) == 2

    from ssprop_energy.ledger.html import monthly_table

    energy = monthly_table(df, "energy_j")
    assert list(energy.index) == ["2026-09", "2026-10"] and list(energy.columns) == ["vision", "nlp"]
    assert energy.loc["2026-09", "vision"] == 10.8e6 and energy.loc["2026-09", "nlp"] == 0.0
    assert monthly_table(df, "co2_g").loc["2026-10", "nlp"] == pytest.approx(100.0)  # 0.5 kWh x 200 g/kWh

    page_path = tmp_path / "lab.html"
    assert main(["audit", "report", "-o", str(page_path)]) == 0
    page = page_path.read_text()
    assert "Per month and project" in page and "data:image/svg+xml;base64," in page
    assert "4242_3" in page and "a100 gpu[01-02]" in page and "By SLURM partition" in page


def test_non_utf8_command_and_project_do_not_break_the_report(tmp_path, capsys):
    bad = "caf\udce9"  # what sys.argv holds for the bytes b"caf\xe9" (not UTF-8)
    assert main(["audit", "run", "--meter", "fake", "--carbon-intensity", "100", "--project", bad, "--",
                 sys.executable, "-c", "pass", bad]) == 0
    row = ledger.load_entries().iloc[0]
    assert row["command"][-1] == "caf\\xe9" and row["project"] == "caf\\xe9"  # the byte kept, visibly
    page = tmp_path / "r.html"
    assert main(["audit", "report", "-o", str(page)]) == 0
    assert "caf\\xe9" in page.read_text(encoding="utf-8")
    assert main(["audit", "export", "--csv", str(tmp_path / "x.csv")]) == 0
    assert main(["audit", "list"]) == 0


def test_missing_command_shows_the_reason(capsys):
    assert main(["audit", "run", "--meter", "fake", "--", "/nonexistent/prog-xyz", "a"]) == 127
    err = capsys.readouterr().err
    assert "failed (exit 127: could not start '/nonexistent/prog-xyz': No such file or directory)" in err


def test_home_unset_says_which_ledger(monkeypatch, caplog):
    monkeypatch.delenv("SSPROP_ENERGY_LEDGER")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    with caplog.at_level("WARNING"):
        loc = ledger.locate()
    assert "HOME is not set" in caplog.text and str(loc.path) in caplog.text


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_compare_and_sweep_take_ledger_flag_and_refuse_bad_url(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main([command, "--ledger", "mysql://x@y/z", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unsupported scheme 'mysql'" in err
    assert list(tmp_path.iterdir()) == []  # no run dir, no `mysql:` folder
    from ssprop_energy.cli import build_parser

    args = build_parser().parse_args([command, "--ledger", str(tmp_path / "lab.sqlite")])
    assert args.ledger == str(tmp_path / "lab.sqlite")
    assert ledger.default_ledger_path() == tmp_path / "lab.sqlite"  # what start_entry(ledger_path=None) uses
