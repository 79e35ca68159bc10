"""Paired statistics of an arm against the dense baseline, with bootstrap confidence intervals.

Pairs are (seed, repeat) runs of both arms, so per-pair differences cancel what the pair shares (data order,
initial weights, machine state drift when run in ABBA order). Intervals use scipy's paired bootstrap
(percentile method: with the handful of pairs typical here, BCa's jackknife is unstable).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from scipy import stats

from ssprop_energy.records import EpochInterval, PairedStat

CONFIDENCE = 0.95
N_RESAMPLES = 9999


def _ci(data: tuple[np.ndarray, ...], statistic: Any) -> list[float] | None:
    if len(data[0]) < 2:
        return None
    with warnings.catch_warnings():
        # Degenerate resamples (all pairs equal) are expected with few pairs; the interval then collapses.
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            data, statistic, paired=True, vectorized=False, n_resamples=N_RESAMPLES,
            confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(0),
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return [lo, hi]


def paired_stats(baseline: Sequence[float], arm: Sequence[float]) -> PairedStat:
    """Compare paired measurements of one metric.

    Args:
        baseline: the dense arm's values, one per pair.
        arm: the ssProp arm's values, in the same pair order.

    Returns:
        A :class:`PairedStat`: ``n``; ``baseline_mean``, ``arm_mean``; ``delta_mean`` = mean(arm - baseline)
        and its 95% CI ``delta_ci``; ``saving_fraction`` = 1 - mean(arm)/mean(baseline) (positive: the arm
        uses less) and ``saving_ci``. CIs are None with fewer than 2 pairs; ``saving_*`` is None when the
        baseline mean is 0.
    """
    b = np.asarray(baseline, dtype=float)
    a = np.asarray(arm, dtype=float)
    if b.shape != a.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError("paired_stats needs two equally long, non-empty sequences")
    b_mean, a_mean = float(b.mean()), float(a.mean())
    saving = saving_ci = None
    if b_mean != 0:
        saving = 1.0 - a_mean / b_mean
        saving_ci = _ci((b, a), lambda x, y: 1.0 - float(np.mean(y)) / float(np.mean(x)) if np.mean(x) else 0.0)
    delta_ci = _ci((b, a), lambda x, y: float(np.mean(y - x)))
    return PairedStat(
        n=int(len(b)), delta_mean=float((a - b).mean()), delta_ci=None if delta_ci is None else tuple(delta_ci),
        saving_fraction=saving, saving_ci=None if saving_ci is None else tuple(saving_ci), confidence=CONFIDENCE,
        baseline_mean=b_mean, arm_mean=a_mean,
    )


def epoch_interval(
    metric: str, baseline: Sequence[float], arm: Sequence[float], phases: Sequence[str],
    n_resamples: int = N_RESAMPLES, seed: int = 0,
) -> EpochInterval | None:
    """The change ``sum(arm) / sum(baseline) - 1`` over paired epochs, with a stratified bootstrap interval.

    Args:
        metric: the metric's name (``wall_s``, ``energy_j``), for the record.
        baseline, arm: per-epoch values, paired by position (epoch e of the arm with epoch e of the baseline).
        phases: the schedule phase of each pair (the arm's drop rate that epoch, as text).

    Epochs are resampled with replacement within each phase, keeping each phase's count, so a resample has
    the schedule's mix of dense and sparse epochs: the interval then shows how much the epoch-to-epoch noise
    of this machine moves the run's change, with the schedule held fixed. None when no pair is usable.
    """
    b = np.asarray(baseline, dtype=float)
    a = np.asarray(arm, dtype=float)
    labels = np.asarray(list(phases))
    if not (len(b) == len(a) == len(labels)) or len(b) == 0 or b.sum() <= 0:
        return None
    change = float(a.sum() / b.sum() - 1.0)
    groups = [np.flatnonzero(labels == p) for p in dict.fromkeys(labels.tolist())]
    ci = None
    if any(len(g) >= 2 for g in groups):
        rng = np.random.default_rng(seed)
        picks = np.concatenate([g[rng.integers(0, len(g), size=(n_resamples, len(g)))] for g in groups], axis=1)
        b_sum, a_sum = b[picks].sum(axis=1), a[picks].sum(axis=1)
        ratios = a_sum[b_sum > 0] / b_sum[b_sum > 0] - 1.0
        alpha = (1.0 - CONFIDENCE) / 2
        lo, hi = np.quantile(ratios, [alpha, 1.0 - alpha])
        if math.isfinite(lo) and math.isfinite(hi):
            ci = (float(lo), float(hi))
    counts = {p: int((labels == p).sum()) for p in dict.fromkeys(labels.tolist())}
    return EpochInterval(metric=metric, n_epochs=int(len(b)), phases=counts, change=change, ci=ci,
                         confidence=CONFIDENCE)
