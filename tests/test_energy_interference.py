"""The interference monitor: exact arithmetic on a fake procfs, fake sysfs and fake pynvml, and real busy
processes outside and inside this process tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from energy_fakes import FakeClock, FakeGpu, make_pynvml

from ssprop_energy.energy import interference
from ssprop_energy.energy.interference import (
    InterferenceMonitor,
    InterferenceReading,
    decode_throttle_reasons,
    measure_foreign_load,
)
from ssprop_energy.errors import RecordError

HZ = os.sysconf("SC_CLK_TCK")


class FakeProc:
    """A procfs tree under ``root``: the machine's ``stat`` and ``loadavg``, and processes with
    ``stat`` (utime, stime, cutime, cstime in ticks; a start time) and per-thread ``children`` files."""

    FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")

    def __init__(self, root: Path, n_cpus: int = 4) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.n_cpus = n_cpus
        self.cpu = dict.fromkeys(self.FIELDS, 0)
        self.cpu.update(user=100_000, system=20_000, idle=900_000, iowait=500)
        self.procs: dict[int, dict] = {}
        self.write_machine()
        (root / "loadavg").write_text("1.25 0.80 0.50 2/345 6789\n")

    def write_machine(self) -> None:
        line = "cpu  " + " ".join(str(self.cpu[f]) for f in self.FIELDS)
        per_cpu = [f"cpu{i} " + " ".join("0" for _ in self.FIELDS) for i in range(self.n_cpus)]
        (self.root / "stat").write_text("\n".join([line, *per_cpu, "intr 1 2 3", "ctxt 99"]) + "\n")

    def tick(self, **deltas: int) -> None:
        for k, v in deltas.items():
            self.cpu[k] += v
        self.write_machine()

    def add(self, pid: int, utime: int = 0, stime: int = 0, cutime: int = 0, cstime: int = 0,
            start: int = 5000, parent: int | None = None, comm: str = "py (x) y") -> None:
        self.procs[pid] = dict(utime=utime, stime=stime, cutime=cutime, cstime=cstime, start=start, children=[])
        (self.root / str(pid) / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
        self.procs[pid]["comm"] = comm
        if parent is not None:
            self.procs[parent]["children"].append(pid)
            self.write(parent)
        self.write(pid)

    def write(self, pid: int) -> None:
        p = self.procs[pid]
        # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime
        # cstime priority nice threads itrealvalue starttime ...
        fields = ["S", "1", "1", "1", "0", "-1", "0", "0", "0", "0", "0",
                  str(p["utime"]), str(p["stime"]), str(p["cutime"]), str(p["cstime"]),
                  "20", "0", "1", "0", str(p["start"]), "1000", "100"]
        (self.root / str(pid) / "stat").write_text(f"{pid} ({p['comm']}) " + " ".join(fields) + "\n")
        (self.root / str(pid) / "task" / str(pid) / "children").write_text(
            "".join(f"{c} " for c in p["children"]))

    def update(self, pid: int, **ticks: int) -> None:
        for k, v in ticks.items():
            self.procs[pid][k] += v
        self.write(pid)

    def detach(self, pid: int, parent: int) -> None:
        """``pid`` leaves ``parent``'s children (re-parented away, or reaped) but keeps its stat."""
        self.procs[parent]["children"].remove(pid)
        self.write(parent)

    def remove(self, pid: int) -> None:
        """The process no longer exists (reaped)."""
        for q in self.procs.values():
            if pid in q["children"]:
                q["children"].remove(pid)
        del self.procs[pid]
        for f in sorted((self.root / str(pid)).rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (self.root / str(pid)).rmdir()
        for q in list(self.procs):
            self.write(q)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(0.0)


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    fp = FakeProc(tmp_path / "proc")
    fp.add(100, utime=5000, stime=700, cutime=40, cstime=2)
    return fp


def monitor(proc: FakeProc, clock: FakeClock, tmp_path: Path, **kw) -> InterferenceMonitor:
    kw.setdefault("sys_root", tmp_path / "sys")
    kw.setdefault("cpus", None)  # all CPUs of the fake machine, whatever this process's affinity
    return InterferenceMonitor(kw.pop("sample_period_s", 1.0), proc_root=proc.root, root_pid=100, clock=clock, **kw)


# ------------------------------------------------------------------------------------ exact arithmetic


def test_foreign_is_machine_busy_minus_tree_over_wall(proc, clock, tmp_path):
    mon = monitor(proc, clock, tmp_path)
    assert mon.source == "procfs"
    tok = mon.begin()
    # second 1: 250 busy ticks (user 150, system 50, irq 10, softirq 10, steal 20, nice 10) = 2.5 cores;
    # idle, iowait and guest (already inside user) are not busy; this tree used 100 ticks = 1 core.
    clock.advance(1.0)
    proc.tick(user=150, nice=10, system=50, irq=10, softirq=10, steal=20, idle=150, iowait=30, guest=80)
    proc.update(100, utime=80, stime=20)
    mon.sample()
    # second 2: 130 busy ticks, tree 30 (of which 10 from a child reaped into cutime) -> 1.0 foreign core
    clock.advance(1.0)
    proc.tick(user=100, system=30, idle=270)
    proc.update(100, utime=15, stime=5, cutime=8, cstime=2)
    r = mon.end(tok)
    assert r.wall_s == pytest.approx(2.0)
    assert r.foreign_cpu_cores_mean == pytest.approx(((250 + 130) - (100 + 30)) / HZ / 2.0)  # 1.25
    assert r.foreign_cpu_cores_max == pytest.approx((250 - 100) / HZ / 1.0)  # 1.5, the first second
    assert r.own_cpu_cores_mean == pytest.approx(130 / HZ / 2.0)
    assert r.steal_cpu_cores_mean == pytest.approx(20 / HZ / 2.0)
    assert (r.n_samples, r.cpu_count, r.load_avg_1m, r.source) == (3, 4, 1.25, "procfs")
    assert r.cpu_freq_mhz_mean is None and r.gpu_foreign_processes_max is None and r.gpu_temperature_c_max is None


def test_foreign_load_is_clamped_to_zero_and_the_cpu_count(proc, clock, tmp_path):
    mon = monitor(proc, clock, tmp_path)
    tok = mon.begin()
    clock.advance(1.0)
    proc.tick(user=50)
    proc.update(100, utime=60)  # tick truncation can make the tree look busier than the machine
    r = mon.end(tok)
    assert r.foreign_cpu_cores_mean == 0.0 and r.foreign_cpu_cores_max == 0.0
    assert r.own_cpu_cores_mean == pytest.approx(0.6)
    tok = mon.begin()
    clock.advance(0.5)
    proc.tick(user=203)  # 4.06 cores on a 4-CPU machine: truncation at the edges
    assert mon.end(tok).foreign_cpu_cores_mean == 4.0


def test_descendants_count_as_own_and_reaped_ones_once(proc, clock, tmp_path):
    proc.add(101, utime=300, parent=100)  # a live child with a 3 s history before the window
    proc.add(102, utime=40, parent=101)   # and its child
    mon = monitor(proc, clock, tmp_path)
    tok = mon.begin()
    clock.advance(1.0)
    proc.tick(user=200)
    proc.update(101, utime=50)
    proc.update(102, utime=30)
    mon.sample()
    # 102 ends: 101 reaps it, so 102's whole 70 ticks move into 101's cutime; 101 then runs 20 more.
    clock.advance(1.0)
    proc.tick(user=100)
    proc.remove(102)
    proc.update(101, cutime=70, utime=20)
    r = mon.end(tok)
    own_ticks = 50 + 30 + 20  # the history before the window is not charged
    assert r.own_cpu_cores_mean == pytest.approx(own_ticks / HZ / 2.0)
    assert r.foreign_cpu_cores_mean == pytest.approx((300 - own_ticks) / HZ / 2.0)
    assert r.foreign_cpu_cores_max == pytest.approx(max(200 - 80, 100 - 20) / HZ)


def test_a_process_that_leaves_the_tree_alive_becomes_foreign(proc, clock, tmp_path):
    proc.add(103, utime=5000, parent=100)  # a daemon-to-be with a 50 s history
    mon = monitor(proc, clock, tmp_path)
    tok = mon.begin()
    clock.advance(1.0)
    proc.detach(103, parent=100)  # its parent's tree lets go; it keeps running (re-parented to init)
    proc.update(103, utime=90)
    proc.tick(user=100)
    r = mon.end(tok)
    # Its history is not subtracted from ours (which would make foreign 51 cores); its work is foreign.
    assert r.own_cpu_cores_mean == 0.0
    assert r.foreign_cpu_cores_mean == pytest.approx(100 / HZ)


def test_a_reused_pid_is_a_different_process(proc, clock, tmp_path):
    proc.add(104, utime=700, parent=100, start=6000)
    mon = monitor(proc, clock, tmp_path)
    tok = mon.begin()
    clock.advance(1.0)
    proc.remove(104)
    proc.update(100, cutime=700 + 10)  # reaped after 10 more ticks
    proc.add(104, utime=0, start=7000)  # an unrelated process got the same PID
    proc.tick(user=60)
    r = mon.end(tok)
    assert r.own_cpu_cores_mean == pytest.approx(10 / HZ)
    assert r.foreign_cpu_cores_mean == pytest.approx(50 / HZ)


def test_window_shorter_than_the_period_uses_its_own_edges(proc, clock, tmp_path):
    mon = monitor(proc, clock, tmp_path, sample_period_s=0.25)
    clock.advance(0.11)
    tok = mon.begin()
    clock.advance(0.1)
    proc.tick(user=15)
    proc.update(100, utime=5)
    r = mon.end(tok)
    assert r.n_samples == 2 and r.wall_s == pytest.approx(0.1)
    assert r.foreign_cpu_cores_mean == pytest.approx(0.1 / 0.1) == r.foreign_cpu_cores_max


def test_max_merges_a_short_tail_into_the_last_interval(proc, clock, tmp_path):
    mon = monitor(proc, clock, tmp_path, sample_period_s=1.0)
    tok = mon.begin()
    for busy in (50, 120):  # two sampled 1 s intervals: 0.5 and 1.2 foreign cores
        clock.advance(1.0)
        proc.tick(user=busy)
        mon.sample()
    clock.advance(0.1)  # a 0.1 s tail with 3 busy ticks alone would read 0.3 cores; 4 would read 0.4
    proc.tick(user=4)
    r = mon.end(tok)
    assert r.foreign_cpu_cores_max == pytest.approx((120 + 4) / HZ / 1.1)
    assert r.foreign_cpu_cores_mean == pytest.approx(174 / HZ / 2.1)
    assert r.n_samples == 4


def test_a_short_first_interval_merges_into_the_next(proc, clock, tmp_path):
    mon = monitor(proc, clock, tmp_path, sample_period_s=1.0)
    tok = mon.begin()
    clock.advance(0.02)
    proc.tick(user=3)  # 3 ticks in 20 ms would read as 1.5 cores on their own
    mon.sample()
    clock.advance(1.0)
    proc.tick(user=40)
    mon.sample()
    clock.advance(1.0)
    proc.tick(user=60)
    r = mon.end(tok)
    assert r.foreign_cpu_cores_max == pytest.approx(max(43 / 1.02, 60 / 1.0) / HZ)


def test_overlapping_and_nested_windows(proc, clock, tmp_path):
    mon = monitor(proc, clock, tmp_path)
    outer = mon.begin("epoch")
    clock.advance(1.0)
    proc.tick(user=100)
    inner = mon.begin("step")
    clock.advance(1.0)
    proc.tick(user=40)
    mon.sample()
    other = mon.begin()
    clock.advance(1.0)
    proc.tick(user=10)
    r_inner = mon.end(inner)
    clock.advance(1.0)
    proc.tick(user=70)
    r_outer, r_other = mon.end(outer), mon.end(other)
    assert r_inner.foreign_cpu_cores_mean == pytest.approx(0.25)
    assert r_outer.foreign_cpu_cores_mean == pytest.approx(0.55)
    assert r_other.foreign_cpu_cores_mean == pytest.approx(0.4)
    # every window's edge read is also a sample of the windows open at the time
    assert (r_inner.n_samples, r_outer.n_samples, r_other.n_samples) == (4, 6, 4)
    assert r_outer.foreign_cpu_cores_max == pytest.approx(1.0)  # [0, 1] s, read at the inner window's begin
    with pytest.raises(KeyError):
        mon.end(inner)


def test_only_the_cpus_this_process_may_use_count(proc, clock, tmp_path):
    def write(ticks: dict[int, tuple[int, int]]) -> None:  # cpu -> (user, steal)
        lines = ["cpu  " + " ".join(["99999"] * 10)]  # the aggregate must not be read when CPUs are chosen
        lines += [f"cpu{i} {u} 0 0 5000 0 0 0 {st} 0 0" for i, (u, st) in ticks.items()]
        (proc.root / "stat").write_text("\n".join(lines) + "\nctxt 1\n")

    write({0: (100, 0), 1: (100, 0), 2: (100, 0), 3: (100, 0)})
    mon = monitor(proc, clock, tmp_path, cpus={1, 3})
    tok = mon.begin()
    clock.advance(1.0)
    write({0: (200, 0), 1: (130, 10), 2: (200, 0), 3: (150, 0)})  # CPUs 0 and 2: busy, but not ours
    r = mon.end(tok)
    assert r.cpu_count == 2
    assert r.foreign_cpu_cores_mean == pytest.approx((30 + 10 + 50) / HZ)
    assert r.steal_cpu_cores_mean == pytest.approx(10 / HZ)
    with pytest.raises(ValueError):
        monitor(proc, clock, tmp_path, cpus="all")


def test_default_cpus_follow_this_process_affinity(tmp_path):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    mon = InterferenceMonitor(0.25)
    r = mon.end(mon.begin())
    assert r.cpu_count == len(os.sched_getaffinity(0))


def test_cpu_frequency_from_a_fake_sysfs(proc, clock, tmp_path):
    sysfs = tmp_path / "sys"
    files = []
    for cpu, khz in ((0, 2_000_000), (1, 3_000_000), (2, None)):
        d = sysfs / "devices" / "system" / "cpu" / f"cpu{cpu}"
        d.mkdir(parents=True)
        if khz is not None:
            (d / "cpufreq").mkdir()
            files.append(d / "cpufreq" / "scaling_cur_freq")
            files[-1].write_text(f"{khz}\n")
    (sysfs / "devices" / "system" / "cpu" / "cpufreq").mkdir()  # not a cpuN directory
    mon = monitor(proc, clock, tmp_path, sys_root=sysfs)
    tok = mon.begin()
    clock.advance(1.0)
    files[0].write_text("1000000\n")  # 2.0 GHz mean at the first read, then 2.0, then 1.5 GHz mean
    mon.sample()
    clock.advance(1.0)
    files[1].write_text("2000000\n")
    r = mon.end(tok)
    assert r.cpu_freq_mhz_mean == pytest.approx((2500 + 2000 + 1500) / 3)
    pinned = monitor(proc, clock, tmp_path, sys_root=sysfs, cpus={1, 2})  # CPU 1 alone has a frequency
    assert pinned.end(pinned.begin()).cpu_freq_mhz_mean == pytest.approx(2000.0)
    bare = monitor(proc, clock, tmp_path, sys_root=tmp_path / "empty")  # as on this project's VM
    assert bare.end(bare.begin()).cpu_freq_mhz_mean is None


def test_no_procfs_falls_back_to_psutil(tmp_path):
    mon = InterferenceMonitor(0.1, proc_root=tmp_path / "nothing", sys_root=tmp_path, cpus=None)
    assert mon.source == "psutil"
    tok = mon.begin()
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    r = mon.end(tok)
    assert r.source == "psutil" and r.cpu_count == psutil.cpu_count()
    assert r.own_cpu_cores_mean * r.wall_s == pytest.approx(0.2, abs=0.05)
    assert r.foreign_cpu_cores_mean >= 0.0


def test_period_must_be_positive():
    with pytest.raises(ValueError):
        InterferenceMonitor(0.0)
    with pytest.raises(ValueError):
        measure_foreign_load(0.0)


# ------------------------------------------------------------------------------------------ the record


def _reading(**kw) -> InterferenceReading:
    base = dict(wall_s=2.0, foreign_cpu_cores_mean=0.1, foreign_cpu_cores_max=0.9, own_cpu_cores_mean=1.0,
                cpu_freq_mhz_mean=None, load_avg_1m=0.5, n_samples=9, source="procfs")
    base.update(kw)
    return InterferenceReading(**base)


def test_round_trip_through_json():
    r = _reading(gpu_foreign_processes_max=2, gpu_foreign_pids=[5, 9], gpu_throttle_reasons=["sw_power_cap"],
                 gpu_temperature_c_max=71.0, steal_cpu_cores_mean=0.0, cpu_count=16, gpu_processes_max=3,
                 gpu_pids_comparable=True, cpu_freq_mhz_mean=2400.0)
    d = json.loads(json.dumps(r.to_dict()))
    assert InterferenceReading.from_dict(d) == r
    for key in ("wall_s", "foreign_cpu_cores_mean", "foreign_cpu_cores_max", "own_cpu_cores_mean",
                "cpu_freq_mhz_mean", "load_avg_1m", "n_samples", "source", "gpu_foreign_processes_max",
                "gpu_foreign_pids", "gpu_throttle_reasons", "gpu_temperature_c_max"):
        assert key in d
    cpu_only = _reading()
    assert InterferenceReading.from_dict(json.loads(json.dumps(cpu_only.to_dict()))) == cpu_only
    assert cpu_only.to_dict()["gpu_foreign_processes_max"] is None
    assert InterferenceReading.from_dict({**d, "added_later": 1}) == r  # a newer record's extra field


@pytest.mark.parametrize("broken", [
    {"wall_s": None}, {"n_samples": 2.5}, {"source": 3}, {"foreign_cpu_cores_mean": "0.1"},
    {"gpu_foreign_pids": [1, "2"]}, {"gpu_pids_comparable": "yes"}, {"load_avg_1m": True},
])
def test_from_dict_rejects_malformed_fields(broken):
    with pytest.raises(RecordError):
        InterferenceReading.from_dict({**_reading().to_dict(), **broken})


def test_from_dict_requires_the_contract_fields():
    d = _reading().to_dict()
    del d["foreign_cpu_cores_max"]
    with pytest.raises(RecordError, match="foreign_cpu_cores_max"):
        InterferenceReading.from_dict(d)
    with pytest.raises(RecordError):
        InterferenceReading.from_dict([1, 2])


def test_combine_weights_means_by_wall_time():
    a = _reading(wall_s=1.0, foreign_cpu_cores_mean=1.0, foreign_cpu_cores_max=1.5, own_cpu_cores_mean=0.5,
                 cpu_freq_mhz_mean=2000.0, load_avg_1m=3.0, n_samples=5, steal_cpu_cores_mean=0.1, cpu_count=2,
                 gpu_foreign_processes_max=1, gpu_foreign_pids=[7], gpu_throttle_reasons=["sw_power_cap"],
                 gpu_temperature_c_max=70.0, gpu_processes_max=2, gpu_pids_comparable=True)
    b = _reading(wall_s=3.0, foreign_cpu_cores_mean=0.2, foreign_cpu_cores_max=0.4, own_cpu_cores_mean=1.0,
                 cpu_freq_mhz_mean=None, load_avg_1m=1.0, n_samples=13, steal_cpu_cores_mean=0.0, cpu_count=2,
                 gpu_foreign_processes_max=0, gpu_foreign_pids=[], gpu_throttle_reasons=["hw_slowdown"],
                 gpu_temperature_c_max=75.0, gpu_processes_max=1, gpu_pids_comparable=True,
                 gpu_error="nvmlDeviceGetTemperature failed (GPU is lost)")
    c = InterferenceReading.combine([a, b])
    assert c.wall_s == 4.0
    assert c.foreign_cpu_cores_mean == pytest.approx((1.0 * 1 + 0.2 * 3) / 4)  # 0.4, not the plain mean 0.6
    assert c.own_cpu_cores_mean == pytest.approx((0.5 + 3.0) / 4)
    assert c.foreign_cpu_cores_max == 1.5 and c.cpu_freq_mhz_mean == 2000.0 and c.load_avg_1m == 1.0
    assert c.steal_cpu_cores_mean == pytest.approx(0.1 / 4) and c.n_samples == 18 and c.cpu_count == 2
    assert (c.gpu_foreign_processes_max, c.gpu_foreign_pids, c.gpu_temperature_c_max) == (1, [7], 75.0)
    assert c.gpu_throttle_reasons == ["hw_slowdown", "sw_power_cap"] and c.gpu_processes_max == 2
    assert c.gpu_pids_comparable is True and "GPU is lost" in c.gpu_error
    assert InterferenceReading.combine([_reading()]) == _reading()
    with pytest.raises(ValueError):
        InterferenceReading.combine([])
    with pytest.raises(ValueError):
        InterferenceReading.combine([_reading(), _reading(source="psutil")])


def test_is_material():
    assert not _reading(foreign_cpu_cores_mean=0.249, foreign_cpu_cores_max=1.9).is_material()
    assert _reading(foreign_cpu_cores_mean=0.25).is_material()
    assert _reading(foreign_cpu_cores_mean=0.3).is_material(threshold_cores=0.25)
    assert not _reading(foreign_cpu_cores_mean=0.3).is_material(threshold_cores=0.5)
    assert _reading(foreign_cpu_cores_mean=0.0, gpu_foreign_processes_max=1).is_material()
    assert not _reading(foreign_cpu_cores_mean=0.0, gpu_foreign_processes_max=0,
                        gpu_throttle_reasons=["sw_power_cap"]).is_material()


def test_differs_from():
    quiet, busy = _reading(foreign_cpu_cores_mean=0.05), _reading(foreign_cpu_cores_mean=0.35)
    assert busy.differs_from(quiet) and quiet.differs_from(busy)
    assert not _reading(foreign_cpu_cores_mean=0.25).differs_from(quiet)  # 0.20 apart
    assert not busy.differs_from(quiet, threshold_cores=0.5)
    assert _reading(gpu_foreign_processes_max=1).differs_from(_reading(gpu_foreign_processes_max=0))
    assert not _reading(gpu_foreign_processes_max=2).differs_from(_reading(gpu_foreign_processes_max=1))


def test_decode_throttle_reasons():
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x4 | 0x40 | 0x1000) == ["sw_power_cap", "hw_thermal_slowdown", "unknown_0x1000"]
    assert decode_throttle_reasons(0x1 | 0x8 | 0x200) == ["gpu_idle", "hw_slowdown", "board_limit"]


# ------------------------------------------------------------------------------------- GPU (fake NVML)


def install(monkeypatch, gpus, init_error=None):
    mod = make_pynvml(FakeClock(), gpus, init_error)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return mod


def test_gpu_foreign_processes_throttle_and_temperature(monkeypatch, proc, clock, tmp_path):
    proc.add(101, parent=100)
    gpu0, gpu1 = FakeGpu("A100", lambda t: 100.0, None), FakeGpu("A100", lambda t: 100.0, None)
    gpu1.compute_pids = [100, 999]  # another GPU: its processes are not ours to report
    gpu0.compute_pids, gpu0.graphics_pids = [100], [777]
    gpu0.temperature_c, gpu0.throttle_mask = 55, 0x4
    mod = install(monkeypatch, [gpu0, gpu1])
    mon = monitor(proc, clock, tmp_path, gpu_index=0)
    tok = mon.begin()
    clock.advance(1.0)
    gpu0.compute_pids = [100, 101, 555, 556]  # our child joins; two foreign compute processes
    gpu0.temperature_c, gpu0.throttle_mask = 83, 0x4 | 0x20
    mon.sample()
    clock.advance(1.0)
    gpu0.compute_pids, gpu0.graphics_pids = [100], []
    gpu0.temperature_c, gpu0.throttle_mask = 60, 0
    r = mon.end(tok)
    assert r.gpu_foreign_processes_max == 3  # 555, 556 and the graphics process 777 at the middle read
    assert r.gpu_foreign_pids == [555, 556, 777]
    assert r.gpu_processes_max == 5 and r.gpu_pids_comparable is True
    assert r.gpu_throttle_reasons == ["sw_power_cap", "sw_thermal_slowdown"]
    assert r.gpu_temperature_c_max == 83.0 and r.gpu_error is None
    assert r.is_material()
    mon.stop()
    mon.stop()
    assert mod.calls["shutdown"] == 1


def test_gpu_pids_from_another_namespace_are_not_guessed(monkeypatch, proc, clock, tmp_path):
    monkeypatch.setattr(interference, "_in_init_pid_namespace", lambda root: False)
    gpu = FakeGpu("H100", lambda t: 100.0, None)
    gpu.compute_pids = [4242]  # the host's PID for this very process: cannot be told from a foreign one
    install(monkeypatch, [gpu])
    mon = monitor(proc, clock, tmp_path, gpu_index=0)
    tok = mon.begin()
    clock.advance(1.0)
    r = mon.end(tok)
    assert r.gpu_foreign_processes_max is None and r.gpu_foreign_pids == []
    assert r.gpu_processes_max == 1 and r.gpu_pids_comparable is False
    gpu.compute_pids = [100, 4242]  # a driver that translates PIDs: ours appears, so the rest are foreign
    tok = mon.begin()
    clock.advance(1.0)
    r = mon.end(tok)
    assert r.gpu_foreign_processes_max == 1 and r.gpu_foreign_pids == [4242] and r.gpu_pids_comparable


def test_nvml_failures_never_stop_the_run(monkeypatch, proc, clock, tmp_path):
    gpu = FakeGpu("V100", lambda t: 100.0, None)
    gpu.errors = {"nvmlDeviceGetGraphicsRunningProcesses": 3, "nvmlDeviceGetCurrentClocksEventReasons": 3}
    gpu.compute_pids, gpu.temperature_c = [100, 31], 70
    install(monkeypatch, [gpu])
    mon = monitor(proc, clock, tmp_path, gpu_index=0)
    tok = mon.begin()
    clock.advance(1.0)
    gpu.lost = True  # "GPU is lost" from every call from now on
    mon.sample()
    clock.advance(1.0)
    r = mon.end(tok)
    assert r.gpu_foreign_processes_max == 1 and r.gpu_foreign_pids == [31]  # from the read before the loss
    assert r.gpu_throttle_reasons == [] and r.gpu_temperature_c_max == 70.0
    assert "GPU is lost" in r.gpu_error
    assert r.gpu_pids_comparable is True and r.gpu_processes_max == 2  # reads that could not list are left out
    assert r.foreign_cpu_cores_mean == 0.0 and r.n_samples == 3  # the CPU side carried on


def test_nvml_unavailable_gives_none_and_the_reason(monkeypatch, proc, clock, tmp_path):
    install(monkeypatch, [], init_error=12)
    mon = monitor(proc, clock, tmp_path, gpu_index=0)
    r = mon.end(mon.begin())
    assert r.gpu_foreign_processes_max is None and r.gpu_temperature_c_max is None
    assert "nvmlInit" in r.gpu_error and "Not Found" in r.gpu_error
    monkeypatch.setitem(sys.modules, "pynvml", None)
    mon = monitor(proc, clock, tmp_path, gpu_index=0)
    r = mon.end(mon.begin())
    assert "nvidia-ml-py" in r.gpu_error and r.gpu_processes_max is None


# ---------------------------------------------------------------------------------- real processes

BURN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"

# Fork a grandchild that starts its own session and burns one core; print its PID; the middle process
# exits at once, so the grandchild is re-parented to init (or a subreaper above us): not our descendant.
DAEMONIZE = """
import os, sys, time
pid = os.fork()
if pid:
    print(pid, flush=True)
    os._exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):  # release the pipes, or the test's subprocess.run would wait for this process to end
    os.dup2(null, fd)
end = time.monotonic() + {s}
while time.monotonic() < end:
    pass
os._exit(0)
"""


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def test_a_busy_process_outside_the_tree_is_foreign(tmp_path):
    middle = subprocess.run([sys.executable, "-c", DAEMONIZE.format(s=2.0)], capture_output=True, text=True,
                            timeout=30, check=True)
    burner = psutil.Process(int(middle.stdout.split()[0]))
    try:
        assert burner.ppid() != os.getpid()
        assert burner.pid not in {c.pid for c in psutil.Process().children(recursive=True)}
        with InterferenceMonitor(0.1) as mon:
            c0 = _cpu_s(burner)
            tok = mon.begin()
            time.sleep(1.2)
            r = mon.end(tok)
            burner_cores = (_cpu_s(burner) - c0) / r.wall_s
    finally:
        if burner.is_running():
            os.kill(burner.pid, signal.SIGKILL)
    # The burner got what the machine's load left it; whatever it got must show up as foreign, not own.
    # On a quiet machine it gets a whole core, and foreign load must read at least 0.6 core.
    assert burner_cores >= 0.15, f"the burner barely ran ({burner_cores:.2f} cores): machine too loaded to test"
    assert r.foreign_cpu_cores_mean >= min(0.6, 0.8 * burner_cores)
    assert r.foreign_cpu_cores_mean >= 0.9 * burner_cores - 0.05
    assert r.own_cpu_cores_mean < 0.15  # this process slept
    assert r.n_samples >= 5


def test_a_busy_descendant_is_own_not_foreign(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", BURN.format(s=2.0)])
    short = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.5)])
    try:
        child = psutil.Process(live.pid)
        time.sleep(0.2)  # past the interpreter's start-up
        with InterferenceMonitor(0.1) as mon:
            c0 = _cpu_s(child)
            tok = mon.begin()
            # The short child is reaped inside the window; wait4's rusage is an independent figure for it.
            _, _, ru = os.wait4(short.pid, 0)
            short.returncode = 0
            time.sleep(1.0)
            r = mon.end(tok)
            live_s = _cpu_s(child) - c0
    finally:
        live.kill()
        live.wait()
    # All of the live child's time in the window, and the short child's time since the window began
    # (at most all of it), are ours.
    short_s = ru.ru_utime + ru.ru_stime
    own_s = r.own_cpu_cores_mean * r.wall_s
    assert live_s >= 0.15, f"the child barely ran ({live_s:.2f} s): machine too loaded to test"
    assert own_s >= 0.9 * live_s - 0.03  # a monitor that missed the child would read about 0 here
    assert own_s <= live_s + short_s + 0.1
    # (foreign = machine busy - own, exactly, as the fake-procfs tests show: what is own is not foreign.)


def test_measure_foreign_load_is_one_window_over_an_idle_wait(proc, clock, tmp_path):
    def sleep(s: float) -> None:  # the rest of the machine keeps 1.5 cores busy while we wait
        clock.advance(s)
        proc.tick(user=int(150 * s), system=0)

    r = measure_foreign_load(2.0, sleep=sleep, proc_root=proc.root, root_pid=100, clock=clock,
                             sys_root=tmp_path, cpus=None)
    assert r.wall_s == pytest.approx(2.0) and r.foreign_cpu_cores_mean == pytest.approx(1.5)
    assert r.own_cpu_cores_mean == 0.0 and r.load_avg_1m == 1.25


def test_measure_foreign_load_sees_a_quiet_self(tmp_path):
    r = measure_foreign_load(0.5, sample_period_s=0.1)
    assert r.wall_s == pytest.approx(0.5, abs=0.3)
    assert r.own_cpu_cores_mean < 0.15 and r.n_samples >= 3 and r.load_avg_1m is not None


def test_a_background_read_costs_well_under_one_percent_of_a_core():
    mon = InterferenceMonitor(0.25)
    tok = mon.begin()
    n = 100
    t = time.process_time()
    for _ in range(n):
        mon.sample()
    per_read_s = (time.process_time() - t) / n
    mon.end(tok)
    assert per_read_s < 0.01 * 0.25, f"{per_read_s * 1e3:.2f} ms per read"
