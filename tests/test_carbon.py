"""Carbon intensity from codecarbon's shipped data, and the CO2e arithmetic."""

from __future__ import annotations

import importlib.resources
import json

import pytest

from ssprop_energy.energy.carbon import co2_g, list_countries, resolve_intensity
from ssprop_energy.errors import ConfigError


def shipped(name: str) -> dict:
    ref = importlib.resources.files("codecarbon").joinpath(f"data/private_infra/{name}")
    return json.loads(ref.read_text(encoding="utf-8"))


def test_world_average_default():
    ci = resolve_intensity()
    assert ci.g_per_kwh == shipped("carbon_intensity_per_source.json")["world_average"]
    assert ci.region == "WORLD" and "world_average" in ci.source and "iea.org" in ci.source


@pytest.mark.parametrize("code", ["FRA", "usa", " deu "])
def test_country_from_global_energy_mix(code):
    row = shipped("global_energy_mix.json")[code.strip().upper()]
    ci = resolve_intensity(code)
    assert ci.g_per_kwh == row["carbon_intensity"]
    assert ci.region == code.strip().upper()
    assert row["country_name"] in ci.source and str(row["year"]) in ci.source


def test_france_is_far_below_the_world_average():
    assert resolve_intensity("FRA").g_per_kwh < 0.3 * resolve_intensity().g_per_kwh


def test_override_wins_and_is_labelled():
    ci = resolve_intensity("FRA", override_g_per_kwh=123.0)
    assert (ci.g_per_kwh, ci.source, ci.region) == (123.0, "user override", "FRA")
    assert resolve_intensity(override_g_per_kwh=0.0).region == "user"


def test_unknown_country_explains_codes():
    with pytest.raises(ConfigError, match="alpha-3") as info:
        resolve_intensity("FR")
    assert isinstance(info.value, ValueError) and "--countries" in str(info.value)


def test_bad_override():
    with pytest.raises(ConfigError):
        resolve_intensity(override_g_per_kwh=-5.0)
    with pytest.raises(ConfigError):
        resolve_intensity(override_g_per_kwh=float("nan"))


def test_co2_arithmetic():
    assert co2_g(3.6e6, 400.0) == pytest.approx(400.0)        # 1 kWh
    assert co2_g(3.6e6, 400.0, pue=1.5) == pytest.approx(600.0)
    assert co2_g(1800.0, 56.039, pue=1.1) == pytest.approx(0.0005 * 56.039 * 1.1)
    assert co2_g(0.0, 500.0) == 0.0


@pytest.mark.parametrize("args", [(-1.0, 400.0, 1.0), (1.0, -1.0, 1.0), (1.0, 400.0, 0.9)])
def test_co2_rejects_impossible_inputs(args):
    with pytest.raises(ConfigError):
        co2_g(*args)


def test_list_countries_matches_the_file():
    mix = shipped("global_energy_mix.json")
    rows = list_countries()
    assert [r["code"] for r in rows] == sorted(mix)
    assert next(r for r in rows if r["code"] == "IND")["g_per_kwh"] == mix["IND"]["carbon_intensity"]


def test_missing_codecarbon_needs_an_override(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "codecarbon", None)
    monkeypatch.setitem(sys.modules, "codecarbon.input", None)
    with pytest.raises(ConfigError, match="pip install codecarbon"):
        resolve_intensity("FRA")
    assert resolve_intensity(override_g_per_kwh=300.0).g_per_kwh == 300.0
