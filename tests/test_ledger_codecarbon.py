"""`audit import --codecarbon`: runs tracked with CodeCarbon, from a CSV that CodeCarbon itself wrote."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from pg_server import pg_server, pg_url  # noqa: F401 - fixtures

from ssprop_energy import ledger
from ssprop_energy.cli import main
from ssprop_energy.ledger.codecarbon import REQUIRED_COLUMNS


@pytest.fixture(scope="module")
def cc_csv(tmp_path_factory) -> Path:
    """An emissions.csv written by CodeCarbon's OfflineEmissionsTracker (offline, fixed country), one run per
    tracking mode."""
    codecarbon = pytest.importorskip("codecarbon")
    out = tmp_path_factory.mktemp("codecarbon")
    home = tmp_path_factory.mktemp("cc-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # CodeCarbon may look for ~/.codecarbon.config: never the real one
        mp.chdir(out)
        for mode in ("process", "machine"):
            # save_to_file (deprecated in 3.x, still honoured) works with every CodeCarbon >= 2.3 we accept
            tracker = codecarbon.OfflineEmissionsTracker(
                country_iso_code="FRA", output_dir=str(out), save_to_file=True, tracking_mode=mode,
                log_level="error", project_name=f"cc-{mode}", measure_power_secs=1)
            tracker.start()
            end = time.process_time() + 0.3
            while time.process_time() < end:
                pass
            tracker.stop()
    return out / "emissions.csv"


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "ledger.sqlite")


def test_codecarbon_csv_import(cc_csv, where, capsys):
    cc = pd.read_csv(cc_csv, dtype={"run_id": str})
    assert set(REQUIRED_COLUMNS) <= set(cc.columns)  # the columns we read are CodeCarbon's own
    assert main(["audit", "--ledger", where, "import", "--codecarbon", str(cc_csv)]) == 0
    assert "imported 2 CodeCarbon run(s)" in capsys.readouterr().out
    df = ledger.load_entries(where).set_index("uid")
    assert len(df) == 2
    for _, src in cc.iterrows():
        r = df.loc[f"codecarbon:{src['run_id']}"]
        assert r["kind"] == "codecarbon" and r["project"] == src["project_name"] and r["status"] == "complete"
        assert r["energy_j"] == pytest.approx(src["energy_consumed"] * 3.6e6, rel=1e-9)
        assert r["energy_source"] == "codecarbon"
        assert r["co2_g"] == pytest.approx(src["emissions"] * 1000.0, rel=1e-12)
        assert r["co2_g"] == pytest.approx(r["energy_j"] / 3.6e6 * r["intensity_g_per_kwh"] * r["pue"], rel=1e-9)
        assert f"tracking_mode:{src['tracking_mode']}" in r["tags"] and src["tracking_mode"] in r["note"]
        comps = {c["component"]: c for c in r["components"]}
        assert comps["cpu"]["energy_j"] == pytest.approx(src["cpu_energy"] * 3.6e6, rel=1e-12)
        assert comps["ram"]["energy_j"] == pytest.approx(src["ram_energy"] * 3.6e6, rel=1e-12)
        assert {c["source"] for c in r["components"]} == {"codecarbon"}
        end = datetime.fromisoformat(src["timestamp"]).astimezone().astimezone(timezone.utc)
        assert datetime.fromisoformat(r["finished_at"]) == pytest.approx(end, abs=timedelta(milliseconds=1))
        assert datetime.fromisoformat(r["started_at"]) == pytest.approx(
            end - timedelta(seconds=src["duration"]), abs=timedelta(milliseconds=1))
        assert r["wall_s"] == pytest.approx(src["duration"])

    # the same file again: every run is a duplicate
    assert main(["audit", "--ledger", where, "import", "--codecarbon", str(cc_csv)]) == 0
    assert "imported 0 CodeCarbon run(s)" in capsys.readouterr().out and len(ledger.load_entries(where)) == 2
    assert ledger.summarize(ledger.load_entries(where), None).loc["all", "energy_source"] == "codecarbon"


def _csv(path: Path, rows: list[dict]) -> Path:
    header = ("timestamp,project_name,run_id,experiment_id,duration,emissions,emissions_rate,cpu_power,gpu_power,"
              "ram_power,cpu_energy,gpu_energy,ram_energy,energy_consumed,water_consumed,country_name,"
              "country_iso_code,region,cloud_provider,cloud_region,os,python_version,codecarbon_version,cpu_count,"
              "cpu_model,gpu_count,gpu_model,longitude,latitude,ram_total_size,tracking_mode,"
              "cpu_utilization_percent,gpu_utilization_percent,ram_utilization_percent,ram_used_gb,on_cloud,pue,wue")
    cols = header.split(",")
    lines = [header] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _row(run_id: str, kwh: tuple[float, float, float], **kw) -> dict:
    cpu, gpu, ram = kwh
    base = {"timestamp": "2026-03-01T12:00:00+00:00", "project_name": "lab", "run_id": run_id, "duration": 3600.0,
            "emissions": (cpu + gpu + ram) * 0.05, "cpu_energy": cpu, "gpu_energy": gpu, "ram_energy": ram,
            "energy_consumed": cpu + gpu + ram, "tracking_mode": "machine", "gpu_model": "1 x A100", "pue": 1.0,
            "country_iso_code": "FRA", "codecarbon_version": "2.8.0"}
    base.update(kw)
    return base


def test_repeated_run_id_keeps_last_row_and_exact_conversion(tmp_path, capsys):
    path = _csv(tmp_path / "e.csv", [_row("r1", (0.1, 0.5, 0.02)), _row("r1", (0.2, 1.0, 0.04)),
                                      _row("r2", (0.25, 0.0, 0.05), pue=1.5, emissions=0.3 * 0.05)])
    db = tmp_path / "l.sqlite"
    assert main(["audit", "--ledger", str(db), "import", "--codecarbon", str(path), "--project", "p"]) == 0
    out = capsys.readouterr().out
    assert "imported 2 CodeCarbon run(s)" in out and "1 duplicate(s) skipped" in out
    df = ledger.load_entries(db).set_index("uid")
    r1, r2 = df.loc["codecarbon:r1"], df.loc["codecarbon:r2"]
    assert r1["energy_j"] == pytest.approx(1.24 * 3.6e6) and r1["co2_g"] == pytest.approx(1.24 * 50.0)
    assert r1["intensity_g_per_kwh"] == pytest.approx(50.0) and r1["project"] == "p"
    assert r1["started_at"] == "2026-03-01T11:00:00.000+00:00" and r1["finished_at"] == "2026-03-01T12:00:00.000+00:00"
    assert {c["component"]: c["device"] for c in r1["components"]}["gpu"] == "1 x A100"
    assert [c["component"] for c in r2["components"]] == ["cpu", "ram"]  # no GPU energy, no GPU row
    # CodeCarbon's CO2 already includes PUE: intensity x PUE x energy gives it back
    assert r2["intensity_g_per_kwh"] == pytest.approx(0.3 * 50.0 / 0.3 / 1.5) and r2["pue"] == 1.5


@pytest.mark.parametrize("rows, message", [
    ([{"run_id": "x"}], None),
    ([_row("bad", (0.1, 0.0, 0.0), energy_consumed=0.5)], "cpu + gpu + ram"),
    ([_row("neg", (-0.1, 0.0, 0.0), energy_consumed=-0.1)], "non-negative"),
])
def test_bad_codecarbon_files_one_line_exit_2(rows, message, tmp_path, capsys):
    path = tmp_path / "e.csv"
    if rows == [{"run_id": "x"}]:
        path.write_text("run_id,energy\nx,1\n")
        message = "missing columns"
    else:
        _csv(path, rows)
    assert main(["audit", "--ledger", str(tmp_path / "l.sqlite"), "import", "--codecarbon", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert main(["audit", "--ledger", str(tmp_path / "l.sqlite"), "import", "--codecarbon",
                 str(tmp_path / "missing.csv")]) == 2
