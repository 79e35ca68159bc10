"""``ssprop-energy env`` with faked hardware."""

from __future__ import annotations

import json
import sys

from energy_fakes import FakeClock, FakeGpu, RaplTree, make_pynvml, sine

from ssprop_energy.cli import main


def test_env_json_on_a_gpu_box(monkeypatch, tmp_path, capsys):
    p, e = sine(100.0, 1.0, 1.0)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(FakeClock(), [FakeGpu("NVIDIA H100 80GB HBM3", p, e)]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["env", "--json", "--sysfs-root", str(tmp_path), "--country", "SWE"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gpus"] == ["NVIDIA H100 80GB HBM3"]
    assert info["sources"]["nvml"]["available"] and not info["sources"]["rapl"]["available"]
    assert "powercap" in info["sources"]["rapl"]["reason"]
    assert info["auto_uses"] == ["nvml", "estimate"]
    assert info["carbon_intensity"]["region"] == "SWE" and info["carbon_intensity"]["g_per_kwh"] < 100


def test_env_text_without_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(FakeClock(), [], init_error=12))
    RaplTree(tmp_path).domain("intel-rapl:0", "package-0", 0)
    assert main(["env", "--sysfs-root", str(tmp_path), "--carbon-intensity", "250"]) == 0
    out = capsys.readouterr().out
    assert "nvml      unavailable: NVML: cannot initialise" in out
    assert "rapl      available" in out
    assert "--meter auto uses: rapl" in out
    assert "250 g CO2e/kWh for user (user override)" in out


def test_env_bad_country_is_one_line_exit_2(capsys):
    assert main(["env", "--country", "XX"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alpha-3" in err
