"""``audit run`` wrapper: exit codes, signals, CPU-time attribution. The meter is faked at its interface."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from ssprop_energy.errors import ConfigError, MeterError
from ssprop_energy.ledger import attribute, cpu_share
from ssprop_energy.ledger.attribution import CpuAttribution, machine_busy_cpu_s
from ssprop_energy.ledger.wrap import run_wrapped
from ssprop_energy.records import EnergyComponent

INTENSITY = SimpleNamespace(g_per_kwh=360.0, source="override", region=None)


class FakeMeter:
    """Stands in for an energy meter: fixed machine-wide CPU and per-device GPU energy over the run."""

    def __init__(self, cpu_j: float = 100.0, gpu_j: float = 50.0, fail: bool = False) -> None:
        self.cpu_j, self.gpu_j, self.fail = cpu_j, gpu_j, fail
        self.started = self.stopped = 0

    def start(self) -> None:
        self.started += 1

    def stop(self) -> SimpleNamespace:
        self.stopped += 1
        if self.fail:
            raise MeterError("RAPL counter vanished")
        comps = [EnergyComponent("cpu:package-0", self.cpu_j, "counter", "Fake CPU"),
                 EnergyComponent("gpu:0", self.gpu_j, "sampled", "Fake GPU")]
        return SimpleNamespace(components=comps, source="mixed")


def fake_clock(*values: float):
    it = iter(values)
    return lambda: next(it)


def _row(path: Path, entry_id: int = 1) -> dict:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone())
    finally:
        conn.close()


def test_cpu_share_arithmetic():
    assert cpu_share(3.0, 12.0) == 0.25
    assert cpu_share(12.5, 12.0) == 1.0  # clock granularity: clamped
    assert cpu_share(0.0, 0.0) == 0.0
    assert cpu_share(0.004, 0.0) == 1.0
    with pytest.raises(ValueError):
        cpu_share(-1.0, 2.0)
    comps = [EnergyComponent("cpu:package-0", 200.0, "counter"), EnergyComponent("dram:package-0", 40.0, "counter"),
             EnergyComponent("gpu:0", 70.0, "counter", sampled_energy_j=69.0)]
    out = attribute(comps, CpuAttribution(3.0, 12.0, 0.25))
    assert [a.component.energy_j for a in out] == [50.0, 10.0, 70.0]
    assert [a.machine_energy_j for a in out] == [200.0, 40.0, None]
    assert [a.share for a in out] == [0.25, 0.25, None]
    assert out[2].component.sampled_energy_j == 69.0
    assert [a.component.energy_j for a in attribute(comps, None)] == [200.0, 40.0, 70.0]


def test_machine_busy_clock_moves_with_work():
    t0 = machine_busy_cpu_s()
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert machine_busy_cpu_s() - t0 >= 0.15  # our own 0.2 s of CPU is part of the machine's busy time


def test_exit_code_passthrough_and_failed(tmp_path):
    path = tmp_path / "ledger.sqlite"
    meter = FakeMeter()
    res = run_wrapped([sys.executable, "-c", "import sys; sys.exit(3)"], meter=meter, intensity=INTENSITY,
                      ledger_path=path, project="p", tags=["t"], cpu_clock=fake_clock(0.0, 1000.0))
    assert res.exit_code == 3 and res.status == "failed"
    assert meter.started == meter.stopped == 1
    row = _row(path)
    assert row["status"] == "failed" and row["exit_code"] == 3 and row["kind"] == "audit-run"
    assert json.loads(row["command"])[1:] == ["-c", "import sys; sys.exit(3)"]

    res = run_wrapped([sys.executable, "-c", "pass"], meter=FakeMeter(), intensity=INTENSITY, ledger_path=path,
                      cpu_clock=fake_clock(0.0, 1000.0))
    assert (res.exit_code, res.status, _row(path, 2)["exit_code"]) == (0, "complete", 0)


def test_attribution_recorded_from_tree_cpu_time_including_grandchildren(tmp_path):
    path = tmp_path / "ledger.sqlite"
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}], check=True)"
    res = run_wrapped([sys.executable, "-c", child], meter=FakeMeter(cpu_j=100.0, gpu_j=50.0), intensity=INTENSITY,
                      ledger_path=path, cpu_clock=fake_clock(500.0, 510.0))
    row = _row(path)
    tree = row["tree_cpu_s"]
    assert tree >= 0.4  # the grandchild's 0.4 s of CPU is charged to the tree
    assert row["machine_cpu_s"] == 10.0 and row["cpu_share"] == pytest.approx(tree / 10.0)
    assert row["energy_j"] == pytest.approx(100.0 * tree / 10.0 + 50.0)
    assert res.energy_j == row["energy_j"] and res.machine_energy_j == 150.0
    assert row["co2_g"] == pytest.approx(row["energy_j"] / 3.6e6 * 360.0)
    assert "attributed" in row["note"]

    run_wrapped([sys.executable, "-c", "pass"], meter=FakeMeter(), intensity=INTENSITY, ledger_path=path,
                whole_machine=True, cpu_clock=fake_clock(0.0, 1.0))
    row = _row(path, 2)
    assert row["energy_j"] == 150.0 and row["cpu_share"] is None


def test_command_not_found_and_meter_failure_are_recorded(tmp_path):
    path = tmp_path / "ledger.sqlite"
    res = run_wrapped(["/nonexistent/program-xyz"], meter=FakeMeter(), intensity=INTENSITY, ledger_path=path,
                      cpu_clock=fake_clock(0.0, 0.0))
    assert res.exit_code == 127 and res.status == "failed" and "could not start" in _row(path)["note"]

    res = run_wrapped([sys.executable, "-c", "pass"], meter=FakeMeter(fail=True), intensity=INTENSITY,
                      ledger_path=path, cpu_clock=fake_clock(0.0, 1.0))
    row = _row(path, 2)
    assert res.status == "complete" and row["energy_j"] is None and row["co2_g"] is None
    assert "RAPL counter vanished" in row["note"]
    with pytest.raises(ConfigError):
        run_wrapped([], meter=FakeMeter(), intensity=INTENSITY, ledger_path=path)


def test_child_killed_by_crash_signal_is_failed(tmp_path):
    path = tmp_path / "ledger.sqlite"
    res = run_wrapped([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                      meter=FakeMeter(), intensity=INTENSITY, ledger_path=path, cpu_clock=fake_clock(0.0, 1.0))
    assert res.exit_code == 128 + signal.SIGKILL and res.status == "failed"


_DRIVER = textwrap.dedent(
    """
    import sys
    from types import SimpleNamespace
    sys.path.insert(0, {tests!r})
    from test_ledger_wrap import FakeMeter, INTENSITY
    from ssprop_energy.ledger.wrap import run_wrapped
    child = "import time; print('ready', flush=True); time.sleep(60)"
    res = run_wrapped([sys.executable, "-c", child], meter=FakeMeter(), intensity=INTENSITY,
                      ledger_path={ledger!r})
    sys.exit(res.exit_code)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_recorded_interrupted(tmp_path, signum):
    path = tmp_path / "ledger.sqlite"
    code = _DRIVER.format(tests=str(Path(__file__).parent), ledger=str(path))
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert driver.stdout.readline().strip() == b"ready"
        assert _row(path)["status"] == "running"  # the evidence exists while the command runs
        driver.send_signal(signum)
        assert driver.wait(30) == 128 + signum
    finally:
        driver.kill()
        driver.wait()
    row = _row(path)
    assert row["status"] == "interrupted"
    assert row["exit_code"] == 128 + signum  # the child died of the forwarded signal
    assert row["energy_j"] is not None and row["finished_at"] is not None


def test_idle_command_share_is_floored_at_proc_stat_resolution(tmp_path, monkeypatch):
    from ssprop_energy.ledger import attribution, wrap

    assert attribution.machine_cpu_resolution_s() == pytest.approx(
        2 * psutil.cpu_count() / os.sysconf("SC_CLK_TCK"))
    assert cpu_share(0.004, 0.0, resolution_s=0.04) == pytest.approx(0.1)  # not 100%
    assert cpu_share(0.004, 0.01, resolution_s=0.04) == pytest.approx(0.1)  # one tick or none: same share
    assert cpu_share(3.0, 12.0, resolution_s=0.04) == 0.25  # above resolution: unchanged
    monkeypatch.setattr(wrap, "machine_cpu_resolution_s", lambda: 0.04)
    path = tmp_path / "ledger.sqlite"
    for machine_ticks in (0.0, 0.01):  # whether /proc/stat ticked during the run or not
        res = run_wrapped([sys.executable, "-c", "pass"], meter=FakeMeter(cpu_j=20.0, gpu_j=0.0),
                          intensity=INTENSITY, ledger_path=path, cpu_clock=fake_clock(100.0, 100.0 + machine_ticks))
        tree = res.attribution.tree_cpu_s
        assert res.attribution.share == pytest.approx(min(1.0, tree / 0.04))
        assert "below the resolution of /proc/stat" in _row(path, res.entry.entry_id)["note"]


def test_child_that_handles_sigterm_and_exits_0_is_complete(tmp_path):
    path = tmp_path / "ledger.sqlite"
    child = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: None)\n"
             "print('ready', flush=True)\ntime.sleep(1.0)\nsys.exit(0)")
    code = _DRIVER.replace("child = \"import time; print('ready', flush=True); time.sleep(60)\"",
                           f"child = {child!r}").format(tests=str(Path(__file__).parent), ledger=str(path))
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert driver.stdout.readline().strip() == b"ready"
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(30) == 0  # the command's own exit status
    finally:
        driver.kill()
        driver.wait()
    row = _row(path)
    assert row["status"] == "complete" and row["exit_code"] == 0
    assert "SIGTERM was forwarded; the command handled it and exited 0" in row["note"]


def test_kill_9_of_the_wrapper_stops_the_command(tmp_path):
    path = tmp_path / "ledger.sqlite"
    child = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    code = _DRIVER.replace("child = \"import time; print('ready', flush=True); time.sleep(60)\"",
                           f"child = {child!r}").format(tests=str(Path(__file__).parent), ledger=str(path))
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        child_pid = int(driver.stdout.readline())
        assert psutil.pid_exists(child_pid)
        driver.kill()
        driver.wait(30)
        proc = psutil.Process(child_pid)
        try:
            proc.wait(10)  # reaped by init once it got PR_SET_PDEATHSIG's SIGTERM
        except psutil.TimeoutExpired:
            proc.kill()
            pytest.fail("the wrapped command kept running after kill -9 of the wrapper")
    except psutil.NoSuchProcess:
        pass
    finally:
        driver.kill()
        driver.wait()


def test_partly_corrupt_sqlite_detected_and_row_goes_to_fallback(tmp_path):
    from ssprop_energy import ledger
    from ssprop_energy.ledger import db

    path = tmp_path / "ledger.sqlite"
    for i in range(200):
        ledger.start_entry(kind="x", command=["train.py", "x" * 200, str(i)], ledger_path=path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * page
    data[5 * page:7 * page] = b"\xa5" * (2 * page)  # two pages in the middle; header and schema intact
    path.write_bytes(bytes(data))
    db._CHECKED.clear()  # a new `audit run` process: it has not checked this ledger yet
    res = run_wrapped([sys.executable, "-c", "pass"], meter=FakeMeter(), intensity=INTENSITY, ledger_path=path,
                      cpu_clock=fake_clock(0.0, 1.0))
    assert res.entry.fallback_path == db.pending_dir(path) / f"{res.entry.uid}.json"
    assert "quick_check" in json.loads(res.entry.fallback_path.read_text())["reason"]


def test_killed_wrapper_leaves_a_partial_row_charged_up_to_its_heartbeat(tmp_path):
    from ssprop_energy import ledger

    path = tmp_path / "ledger.sqlite"
    code = textwrap.dedent(f"""
        import sys
        from ssprop_energy.energy import open_meter
        from ssprop_energy.ledger.wrap import run_wrapped
        from types import SimpleNamespace
        child = "import time; print('ready', flush=True); time.sleep(60)"
        run_wrapped([sys.executable, "-c", child], meter=open_meter("fake", sample_period_s=0.05),
                    intensity=SimpleNamespace(g_per_kwh=360.0, source="override"), ledger_path={str(path)!r},
                    heartbeat_s=0.2)
    """)
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert driver.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 30
        while _row(path)["heartbeat_at"] is None:
            assert time.monotonic() < deadline, "no heartbeat written"
            time.sleep(0.1)
        time.sleep(0.3)
        driver.kill()  # kill -9: finish() never runs
        driver.wait(30)
    finally:
        driver.kill()
        driver.wait()
    row = _row(path)
    assert row["status"] == "running" and row["finished_at"] is None  # what the file holds
    assert row["energy_j"] > 0 and row["co2_g"] == pytest.approx(row["energy_j"] / 3.6e6 * 360.0)
    df = ledger.load_entries(path)
    assert df.loc[0, "status"] == "partial"  # the wrapper's pid is gone: readers charge what was measured
    comps = df.loc[0, "components"]
    assert comps and row["energy_j"] == pytest.approx(sum(c["energy_j"] for c in comps))
    total = ledger.summarize(df, None).loc["all"]
    assert total["partial"] == 1 and total["energy_j"] == pytest.approx(row["energy_j"])
