"""Paired statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ssprop_energy.experiment.stats import paired_stats


def test_single_pair_has_means_and_no_interval() -> None:
    s = paired_stats([100.0], [60.0])
    assert s.n == 1
    assert s.delta_mean == pytest.approx(-40.0)
    assert s.saving_fraction == pytest.approx(0.4)
    assert s.delta_ci is None and s.saving_ci is None


def test_interval_contains_the_mean_and_reflects_spread() -> None:
    base = [100.0, 102.0, 98.0, 101.0, 99.0]
    arm = [60.0, 63.0, 57.0, 61.0, 59.0]
    s = paired_stats(base, arm)
    assert s.delta_mean == pytest.approx(-40.0)
    assert s.saving_fraction == pytest.approx(1 - 300 / 500)
    lo, hi = s.delta_ci
    assert lo <= -40.0 <= hi
    # per-pair deltas range over [-42, -38]: a percentile interval of their mean lies inside that range
    assert -42.0 <= lo < hi <= -38.0
    slo, shi = s.saving_ci
    assert slo <= 0.4 <= shi


def test_pairing_matters_more_than_levels() -> None:
    # Large level differences between pairs but a constant paired delta: the interval collapses to it.
    s = paired_stats([10.0, 100.0, 1000.0], [9.0, 99.0, 999.0])
    assert s.delta_ci == pytest.approx([-1.0, -1.0])


def test_zero_baseline_has_no_saving_fraction() -> None:
    s = paired_stats([0.0, 0.0], [1.0, 2.0])
    assert s.saving_fraction is None
    assert not math.isnan(s.delta_mean)


def test_rejects_unpaired_input() -> None:
    with pytest.raises(ValueError):
        paired_stats([1.0, 2.0], [1.0])
