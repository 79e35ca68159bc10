"""Carbon intensity and CO2e: ``grams = kWh x intensity (g/kWh) x PUE``.

Intensities come from the data files shipped inside the installed codecarbon package, read through its
``codecarbon.input.DataSource`` (never the network):

- a country: the ``carbon_intensity`` field (g CO2e/kWh of electricity generated, with its ``year``) of
  ``data/private_infra/global_energy_mix.json``, keyed by ISO 3166-1 alpha-3 code. codecarbon compiles it
  from Our World in Data / Ember. (codecarbon's tracker instead recomputes a figure from the country's
  generation mix and per-fuel factors; we use the published country figure as is.)
- no country: the world average of ``data/private_infra/carbon_intensity_per_source.json``
  (``world_average``, 475 g/kWh in codecarbon 3, from the IEA Global Energy & CO2 Status Report 2019), the
  same default codecarbon uses.
- a user override in g/kWh, recorded as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ssprop_energy.errors import ConfigError

J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class CarbonIntensity:
    """Grid carbon intensity used to turn energy into CO2e.

    Attributes:
        g_per_kwh: grams CO2e per kWh.
        source: where the figure comes from (file, year, or ``user override``).
        region: ISO-3 country code, ``WORLD`` for the world average, or what the user named.
    """

    g_per_kwh: float
    source: str
    region: str


def _codecarbon_data() -> tuple[dict[str, Any], dict[str, Any], str]:
    try:
        import codecarbon
        from codecarbon.input import DataSource
    except ImportError:
        raise ConfigError(
            "carbon intensity: codecarbon (which ships the country data) is not installed; "
            "`pip install codecarbon`, or give the intensity in g CO2e/kWh"
        ) from None

    data = DataSource()
    version = str(getattr(codecarbon, "__version__", "unknown"))
    return data.get_global_energy_mix_data(), data.get_carbon_intensity_per_source_data(), version


def list_countries() -> list[dict[str, Any]]:
    """Every country codecarbon has an intensity for: ``[{"code", "name", "g_per_kwh", "year"}]`` by code."""
    mix, _, _ = _codecarbon_data()
    return [
        {"code": code, "name": row.get("country_name", ""), "g_per_kwh": float(row["carbon_intensity"]),
         "year": row.get("year")}
        for code, row in sorted(mix.items())
    ]


def _check_intensity(value: float, what: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{what} must be a non-negative number of g CO2e/kWh, got {value}")
    return value


def resolve_intensity(country: str | None = None, override_g_per_kwh: float | None = None) -> CarbonIntensity:
    """The carbon intensity to use: the override if given, else the country's, else the world average.

    Args:
        country: ISO 3166-1 alpha-3 code (``FRA``, ``USA``); case-insensitive.
        override_g_per_kwh: a figure the user supplies (g CO2e/kWh); wins over everything.

    Raises:
        ConfigError: unknown country code, or a negative / non-finite override.
    """
    code = country.strip().upper() if country else None
    if override_g_per_kwh is not None:
        value = _check_intensity(override_g_per_kwh, "the carbon intensity override")
        return CarbonIntensity(value, "user override", code or "user")
    mix, per_source, version = _codecarbon_data()
    if code is None:
        value = _check_intensity(per_source["world_average"], "codecarbon's world average")
        origin = per_source.get("world_average_source", "")
        return CarbonIntensity(
            value,
            f"codecarbon {version} carbon_intensity_per_source.json world_average ({origin})",
            "WORLD",
        )
    if code not in mix:
        raise ConfigError(
            f"unknown country code {country!r}: use an ISO 3166-1 alpha-3 code such as USA, FRA, DEU or IND "
            f"(`ssprop-energy env --countries` lists the {len(mix)} codes with data), or give the intensity "
            "in g CO2e/kWh directly"
        )
    row = mix[code]
    value = _check_intensity(row["carbon_intensity"], f"codecarbon's intensity for {code}")
    return CarbonIntensity(
        value,
        f"codecarbon {version} global_energy_mix.json, {row.get('country_name', code)} {row.get('year', '')}".rstrip(),
        code,
    )


def co2_g(energy_j: float, g_per_kwh: float, pue: float = 1.0) -> float:
    """Grams CO2e of ``energy_j`` joules at ``g_per_kwh``, scaled by the data centre's PUE (>= 1).

    Raises:
        ConfigError: negative energy or intensity, or PUE below 1.
    """
    if not (math.isfinite(energy_j) and energy_j >= 0):
        raise ConfigError(f"energy must be a non-negative number of joules, got {energy_j}")
    _check_intensity(g_per_kwh, "carbon intensity")
    if not (math.isfinite(pue) and pue >= 1.0):
        raise ConfigError(f"PUE must be at least 1.0 (total facility power / IT power), got {pue}")
    return energy_j / J_PER_KWH * g_per_kwh * pue
