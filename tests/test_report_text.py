"""The report's words and small numbers: formatting, savings from paired statistics, the Pareto front,
verdict wording and the carbon statement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import report_fixtures as fx

from ssprop_energy.report import text as report_text
from ssprop_energy.report.load import PairedStat, load_run
from ssprop_energy.report.savings import (
    AccuracyDiff,
    ArmComparison,
    Saving,
    comparisons,
    estimated_fraction,
    pareto_front,
    saving,
)

MINUS = "\u2212"


def test_formatting() -> None:
    assert report_text.fmt_pct(0.1234) == "12.3%"
    assert report_text.fmt_pct(-0.1234) == f"{MINUS}12.3%"
    assert report_text.fmt_pct(-0.00001) == "0.0%"  # no "negative zero"
    assert report_text.fmt_pp(0.0123, 2) == "+1.23 pp" and report_text.fmt_pp(-0.0123, 2) == f"{MINUS}1.23 pp"
    assert report_text.fmt_si(1.234e15, "FLOP") == "1.23 PFLOP"
    assert report_text.fmt_energy(7200.0) == "7.2 kJ (2 Wh)"
    assert report_text.fmt_co2(0.0525) == "52.5 mg CO2e" and report_text.fmt_co2(1500.0) == "1.5 kg CO2e"
    assert report_text.fmt_seconds(59.7) == "59.7 s" and report_text.fmt_seconds(7200) == "2.00 h"
    assert report_text.less_or_more(0.25) == "25.0% less" and report_text.less_or_more(-0.05) == "5.0% more"
    assert report_text.fmt_pct(math.nan) == "n/a"


def test_saving_prefers_the_harness_ratio_statistics() -> None:
    stat = PairedStat(n=3, delta_mean=-40.0, delta_ci=(-42.0, -38.0), saving_fraction=0.4, saving_ci=(0.38, 0.42))
    s = saving("energy_j", 100.0, 60.0, stat, "counter")
    assert s.saved == 40.0 and s.saved_frac == 0.4 and s.ci_frac == (0.38, 0.42) and not s.ci_spans_zero
    # only a delta interval: divided by the baseline, with the sign turned into a saving
    s = saving("energy_j", 100.0, 60.0, PairedStat(3, -40.0, (-42.0, -38.0), None, None), "counter")
    assert s.saved_frac == pytest.approx(0.4) and s.ci_frac == pytest.approx((0.38, 0.42))
    # counted FLOPs: a zero-width interval is dropped
    s = saving("flops_backward", 10.0, 6.0, PairedStat(2, -4.0, (-4.0, -4.0), 0.4, (0.4, 0.4)), "counted")
    assert s.ci_frac is None and s.saved_frac == 0.4
    # no statistics: arm difference, no interval
    s = saving("wall_s", 50.0, 55.0, None, "measured")
    assert s.saved_frac == pytest.approx(-0.1) and s.ci_frac is None and s.n_pairs == 0


def test_pareto_front_against_brute_force() -> None:
    pts = [("a", 10.0, 0.90), ("b", 8.0, 0.90), ("c", 12.0, 0.95), ("d", 9.0, 0.85), ("e", 8.0, 0.80)]
    # b dominates a (less energy, same accuracy) and e (same energy, higher accuracy); d: b has less energy
    # and higher accuracy. c has the highest accuracy.
    assert pareto_front(pts) == ["b", "c"]
    assert pareto_front([("x", 1.0, 0.5)]) == ["x"]


def _cmp(energy: Saving, acc: AccuracyDiff) -> ArmComparison:
    flops = Saving("flops_backward", 10.0, 6.0, 4.0, 0.4, None, 0, 0.95, "counted")
    time = Saving("wall_s", 10.0, 9.0, 1.0, 0.1, (0.05, 0.15), 5, 0.95, "measured")
    return ArmComparison("ssprop", "dense", energy, energy, time, flops, flops, flops, acc, 0.4)


def test_verdict_wording_follows_the_interval() -> None:
    acc = AccuracyDiff(0.95, 0.94, -0.01, (-0.02, 0.005), 5, 0.95)
    spans = Saving("energy_j", 100.0, 97.0, 3.0, 0.03, (-0.02, 0.08), 5, 0.95, "counter")
    v = report_text.verdict(_cmp(spans, acc), estimated_frac=0.0)
    assert "The energy difference is not distinguishable from noise" in v
    assert "test-accuracy difference" in v and "not distinguishable from noise" in v.split("Wall time")[1]
    clear = Saving("energy_j", 100.0, 80.0, 20.0, 0.2, (0.15, 0.25), 5, 0.95, "counter")
    v = report_text.verdict(_cmp(clear, acc), estimated_frac=0.0)
    assert "Energy fell by 20.0% (95% CI 15.0% to 25.0%, 5 pairs)" in v
    more = Saving("energy_j", 100.0, 110.0, -10.0, -0.1, (-0.15, -0.05), 5, 0.95, "counter")
    assert "Energy rose by 10.0%" in report_text.verdict(_cmp(more, acc), estimated_frac=0.0)
    assert "Estimated energy fell by" in report_text.verdict(_cmp(clear, acc), estimated_frac=1.0)
    single = Saving("energy_j", 100.0, 80.0, 20.0, 0.2, None, 1, 0.95, "counter")
    one = AccuracyDiff(0.95, 0.94, -0.01, None, 1, 0.95)
    v = report_text.verdict(_cmp(single, one), estimated_frac=0.0)
    assert "single pair of runs" in v and "this may be noise" in v and "CI" not in v.split("Wall time")[0]
    same = AccuracyDiff(0.95, 0.90, -0.05, (-0.05, -0.05), 2, 0.95)
    v = report_text.verdict(_cmp(clear, same), estimated_frac=0.0)
    assert "identically in all 2 pairs" in v and "fell by 5.00 pp" not in v


def test_few_pairs_note() -> None:
    acc = AccuracyDiff(0.95, 0.94, -0.01, (-0.02, 0.0), 3, 0.95)
    e = Saving("energy_j", 100.0, 80.0, 20.0, 0.2, (0.15, 0.25), 3, 0.95, "counter")
    assert "only 3 pairs" in report_text.few_pairs_note([_cmp(e, acc)])
    assert report_text.few_pairs_note([]) is None


def test_carbon_statement_totals_every_repeat(tmp_path: Path) -> None:
    fx.compare_run(tmp_path / "run")
    data = json.loads((tmp_path / "run" / "summary.json").read_text())
    energy_j = sum(r["energy_j"] for a in data["arms"].values() for r in a["repeats"])
    co2_g = sum(r["co2_g"] for a in data["arms"].values() for r in a["repeats"])
    # independent check of the CO2: J -> kWh x intensity x PUE
    assert co2_g == pytest.approx(energy_j / 3.6e6 * 380.0 * 1.2)
    run = load_run(tmp_path / "run")
    text = report_text.carbon_statement(run, comparisons(run))
    assert f"{energy_j / 1e3:.3g} kJ ({energy_j / 3600:.3g} Wh)" in text
    assert f"{co2_g:.3g} g CO2e" in text
    assert "6 training runs across 2 arms, 6 epochs each" in text
    assert "Intel Xeon Gold 6338" in text and "380 g CO2e/kWh for DE" in text and "PUE of 1.2" in text
    sp = data["arms"]["ssprop"]
    assert f"used {100 * (1 - sp['energy_j'] / data['arms']['dense']['energy_j']):.1f}% less energy" in text
    assert estimated_fraction(run.arms) == 0.0
