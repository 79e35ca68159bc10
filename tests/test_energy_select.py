"""open_meter('auto'): NVML, then RAPL, then estimate, with a warning at each fallback."""

from __future__ import annotations

import logging
import sys

import pytest
from energy_fakes import FakeClock, FakeGpu, RaplTree, make_pynvml, sine

from ssprop_energy.energy import available_sources, open_meter
from ssprop_energy.errors import ConfigError, MeterUnavailableError

EST = dict(cpu_model="x", cpu_tdp_w=40.0, ram_power_w=5.0, logical_cpus=2)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(FakeClock(), [], init_error=12))


@pytest.fixture
def one_gpu(monkeypatch):
    clock = FakeClock()
    p, e = sine(200.0, 20.0, 1.0)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(clock, [FakeGpu("NVIDIA A100-SXM4-40GB", p, e)]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return clock


def rapl_tree(root) -> RaplTree:
    t = RaplTree(root)
    t.domain("intel-rapl:0", "package-0", 1000)
    return t


def test_auto_falls_back_nvml_then_rapl_then_estimate(no_gpu, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ssprop_energy"):
        meter = open_meter("auto", sysfs_root=tmp_path, background=False, estimate_options=EST)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 2
    assert msgs[0].startswith("no GPU energy") and "trying RAPL" in msgs[0]
    assert msgs[1].startswith("no RAPL counters") and "estimate" in msgs[1]
    desc = meter.describe()
    assert [s["kind"] for s in desc["sources"]] == ["estimate"]
    assert set(desc["unavailable"]) == {"nvml", "rapl"}
    meter.close()


def test_auto_uses_rapl_when_readable(no_gpu, tmp_path, caplog):
    rapl_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ssprop_energy"):
        meter = open_meter("auto", sysfs_root=tmp_path, background=False)
    assert [s["kind"] for s in meter.describe()["sources"]] == ["rapl"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # only the NVML fallback
    meter.close()


def test_gpu_box_without_rapl_reports_mixed_sources(one_gpu, tmp_path):
    clock = one_gpu
    meter = open_meter("auto", sysfs_root=tmp_path, clock=clock, background=False, sync=None,
                       estimate_options=dict(EST, cpu_seconds=lambda: 0.0))
    meter.start()
    clock.advance(2.0)
    rep = meter.stop()
    assert {c.component: c.source for c in rep.components} == {"gpu:0": "counter", "cpu": "estimated",
                                                               "ram": "estimated"}
    assert rep.source == "mixed"
    assert rep.component("gpu:0").energy_j == pytest.approx(400.0, abs=2e-3)
    assert rep.component("ram").energy_j == pytest.approx(10.0)


def test_gpu_box_with_rapl_is_all_counters(one_gpu, tmp_path):
    rapl_tree(tmp_path)
    meter = open_meter("auto", sysfs_root=tmp_path, clock=one_gpu, background=False, sync=None)
    assert [c["source"] for c in meter.describe()["components"]] == ["counter", "counter"]
    meter.start()
    rep = meter.stop()
    assert rep.source == "counter"


def test_specific_kind_unavailable_and_unknown_kind(no_gpu, tmp_path):
    with pytest.raises(MeterUnavailableError, match="nvidia-ml-py"):
        open_meter("nvml")
    with pytest.raises(MeterUnavailableError, match="RAPL"):
        open_meter("rapl", sysfs_root=tmp_path)
    with pytest.raises(ConfigError, match="choose one of"):
        open_meter("joulemeter")


def test_available_sources(no_gpu, tmp_path):
    rapl_tree(tmp_path)
    av = available_sources(sysfs_root=tmp_path)
    assert av["nvml"]["available"] is False and "Library Not Found" in av["nvml"]["reason"]
    assert av["rapl"]["available"] is True
    assert av["rapl"]["description"]["domains"]["cpu:package-0"].endswith("intel-rapl:0")
    assert av["estimate"]["available"] is True and av["estimate"]["description"]["cpu_tdp_w"] > 0


def test_meter_choice_is_resolved_once_and_reopened_without_new_warnings(caplog) -> None:
    import logging

    from ssprop_energy.energy.select import resolve_meter

    with caplog.at_level(logging.WARNING, logger="ssprop_energy.energy"):
        choice = resolve_meter("estimate", estimate_options={"cpu_model": "Imaginary CPU 9000"})
        first = len(caplog.records)
        meters = [open_meter(choice=choice) for _ in range(3)]
    assert choice.sources == ("estimate",) and first >= 1  # the unknown CPU was warned about once
    assert len(caplog.records) == first  # and not again for the three meters of the run
    for m in meters:
        src = m.describe()["sources"][0]
        assert (src["cpu_tdp_w"], src["cpu_tdp_from"]) == (choice.estimate["cpu_tdp_w"], choice.estimate["cpu_tdp_from"])
        m.close()
