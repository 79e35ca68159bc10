"""Prometheus exposition of the ledger: a custom collector that reads the ledger on every scrape.

Counters (monotonic as long as rows are only added): ``ssprop_ledger_energy_joules_total`` and
``ssprop_ledger_co2_grams_total`` by project, user, host and meter source (``energy_source``: counter /
sampled / estimated / mixed / fake), summed over rows that have a figure (a running or unmetered row adds
nothing, as in ``audit summary``). Gauges: ``ssprop_ledger_runs`` by status and
``ssprop_ledger_last_run_timestamp_seconds`` (start of the newest row, Unix seconds, UTC).
Nothing is recomputed: the figures are the ledger's own ``energy_j``/``co2_g``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ssprop_energy.errors import ConfigError
from ssprop_energy.ledger.db import LedgerLocation
from ssprop_energy.ledger.summary import load_entries

_LABELS = ["project", "user", "host", "source"]


def _prom() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError:
        raise ConfigError("Prometheus metrics need prometheus_client: `pip install ssprop-energy[metrics]`") from None
    return prometheus_client


class LedgerCollector:
    """Collector over one ledger (path, URL or location); reads it afresh at each ``collect()``."""

    def __init__(self, ledger: str | os.PathLike[str] | LedgerLocation | None = None) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[Any]:
        core = _prom().core
        df = load_entries(self.ledger)
        energy = core.CounterMetricFamily("ssprop_ledger_energy_joules", "Metered energy in the ledger, joules",
                                          labels=_LABELS)
        co2 = core.CounterMetricFamily("ssprop_ledger_co2_grams", "CO2e in the ledger, grams", labels=_LABELS)
        sums: dict[tuple[str, ...], list[float]] = {}
        for row in df.itertuples(index=False):
            key = tuple(str(getattr(row, c) or "") for c in ("project", "user", "host", "energy_source"))
            acc = sums.setdefault(key, [0.0, 0.0])
            if isinstance(row.energy_j, float) and math.isfinite(row.energy_j):
                acc[0] += row.energy_j
            if isinstance(row.co2_g, float) and math.isfinite(row.co2_g):
                acc[1] += row.co2_g
        for key, (e_j, c_g) in sorted(sums.items()):
            energy.add_metric(list(key), e_j)
            co2.add_metric(list(key), c_g)
        yield energy
        yield co2
        runs = core.GaugeMetricFamily("ssprop_ledger_runs", "Ledger rows by status", labels=["status"])
        for status, n in sorted(df["status"].value_counts().items()) if len(df) else []:
            runs.add_metric([str(status)], float(n))
        yield runs
        last = core.GaugeMetricFamily("ssprop_ledger_last_run_timestamp_seconds",
                                      "Start of the newest ledger row, Unix seconds")
        if len(df):
            last.add_metric([], max(datetime.fromisoformat(t).timestamp() for t in df["started_at"]))
        yield last


def registry(ledger: str | os.PathLike[str] | LedgerLocation | None = None) -> Any:
    """A fresh ``CollectorRegistry`` holding only the ledger collector."""
    prom = _prom()
    reg = prom.CollectorRegistry(auto_describe=False)
    reg.register(LedgerCollector(ledger))
    return reg


def exposition(ledger: str | os.PathLike[str] | LedgerLocation | None = None) -> str:
    """The Prometheus text exposition (format 0.0.4) of the ledger."""
    return _prom().generate_latest(registry(ledger)).decode()


def serve(ledger: str | os.PathLike[str] | LedgerLocation | None, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` on ``addr:port`` in a daemon thread; returns what ``start_http_server`` returns."""
    return _prom().start_http_server(port, addr=addr, registry=registry(ledger))
