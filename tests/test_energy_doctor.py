"""``ssprop-energy env --check`` (energy/doctor.py): each known failure with its fix, on fake sysfs and pynvml."""

from __future__ import annotations

import json
import sys

import pytest
from energy_fakes import FakeClock, FakeGpu, RaplTree, make_pynvml, sine

from ssprop_energy.cli import main
from ssprop_energy.energy import doctor


def _gpu(name: str = "NVIDIA H100 80GB HBM3", counter: bool = True) -> FakeGpu:
    p, e = sine(100.0, 1.0, 1.0)
    return FakeGpu(name, p, e if counter else None)


@pytest.fixture(autouse=True)
def _all_gpus_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _levels(findings, source):
    return [(f.level, f.problem, f.fix) for f in findings if f.source == source]


def test_rapl_root_only_energy_uj_is_the_cve_2020_8694_case(tmp_path):
    tree = RaplTree(tmp_path)
    (tree.domain("intel-rapl:0", "package-0", 5) / "energy_uj").chmod(0o400)  # the post-2020 mode, owner root
    as_user = doctor.check_rapl(tmp_path, euid=1000)
    assert len(as_user) == 1 and as_user[0].level == "fail"
    assert "CVE-2020-8694" in as_user[0].problem and "0400" in as_user[0].problem
    assert "chmod o+r" in as_user[0].fix and "/etc/udev/rules.d/" in as_user[0].fix and "SUBSYSTEM==\"powercap\"" in as_user[0].fix
    # The same tree read by root works, but the doctor still warns: a run as another user would not read it.
    as_root = doctor.check_rapl(tmp_path, euid=0)
    assert [f.level for f in as_root] == ["ok", "warn"] and "root-only" in as_root[1].problem


def test_rapl_readable_tree_is_ok_with_no_fix(tmp_path):
    tree = RaplTree(tmp_path)
    tree.domain("intel-rapl:0", "package-0", 5)
    tree.domain("intel-rapl:0:0", "dram", 5)
    for d in ("intel-rapl:0", "intel-rapl:0:0"):
        (tree.base / d / "energy_uj").chmod(0o444)
    (f,) = doctor.check_rapl(tmp_path, euid=1000)
    assert f.level == "ok" and f.fix is None and "cpu:package-0" in f.problem and "dram:package-0" in f.problem


def test_rapl_container_without_powercap(tmp_path):
    (f,) = doctor.check_rapl(tmp_path, euid=1000)
    assert f.level == "fail" and "container" in f.problem
    assert "-v /sys/class/powercap:/sys/class/powercap:ro" in f.fix


def test_rapl_powercap_without_domains_names_the_module(tmp_path):
    RaplTree(tmp_path)  # the directory exists, no intel-rapl:N in it
    (f,) = doctor.check_rapl(tmp_path, euid=1000)
    assert f.level == "fail" and "modprobe intel_rapl_msr" in f.fix


def test_nvml_binding_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    (f,) = doctor.check_nvml()
    assert f.level == "fail" and "pip install nvidia-ml-py" in f.fix


@pytest.mark.parametrize("code, needle", [
    (12, "--gpus all"),  # libnvidia-ml.so not found: no driver, or a container without the NVIDIA runtime
    (18, "reboot"),  # driver/library version mismatch after an upgrade
    (9, "modprobe nvidia"),
])
def test_nvml_init_failures_each_get_their_fix(monkeypatch, code, needle):
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(FakeClock(), [], init_error=code))
    (f,) = doctor.check_nvml()
    assert f.level == "fail" and f"NVML error {code}" in f.problem and needle in f.fix


def test_nvml_mig_device_is_warned_whole_gpu_energy(monkeypatch):
    gpu = _gpu()
    gpu.mig_mode = (1, 1)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(FakeClock(), [gpu, _gpu()]))
    findings = doctor.check_nvml()
    assert [f.level for f in findings] == ["ok", "warn", "ok"]
    mig = findings[1]
    assert "GPU 0" in mig.problem and "MIG" in mig.problem and "nvidia-smi -i 0 -mig 0" in mig.fix


def test_nvml_older_gpu_without_counter_is_sampled_with_the_1s_window(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(FakeClock(), [_gpu("Tesla P100-PCIE-16GB", counter=False)]))
    (f,) = doctor.check_nvml()
    assert f.level == "warn" and "sampled" in f.problem and "1 s" in f.fix


def test_check_exit_code_follows_the_chosen_meter(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(FakeClock(), [], init_error=12))
    # NVML asked for and broken: exit 1, and the fix is printed.
    assert main(["env", "--check", "--meter", "nvml", "--sysfs-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] nvml" in out and "--gpus all" in out and "--meter nvml does not work here" in out
    # auto falls back to the estimate and works: exit 0, the failures still listed.
    assert main(["env", "--check", "--json", "--sysfs-root", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meter_works"] and report["meter_sources"] == ["estimate"]
    levels = {f["source"]: f["level"] for f in report["findings"]}
    assert levels == {"nvml": "fail", "rapl": "fail", "estimate": "ok"}


def test_check_exit_0_on_a_working_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(FakeClock(), [_gpu()]))
    assert main(["env", "--check", "--meter", "nvml", "--sysfs-root", str(tmp_path)]) == 0
    assert "--meter nvml works here: nvml" in capsys.readouterr().out


def test_doctor_imports_no_torch():
    import subprocess

    code = "import sys, ssprop_energy.energy.doctor; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
