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


def paired_stats(baseline: Sequence[float], arm: Sequence[float]) -> dict[str, Any]:
    """Compare paired measurements of one metric.

    Args:
        baseline: the dense arm's values, one per pair.
        arm: the ssProp arm's values, in the same pair order.

    Returns:
        ``n``; ``baseline_mean``, ``arm_mean``; ``delta_mean`` = mean(arm - baseline) and its 95% CI
        ``delta_ci``; ``saving_fraction`` = 1 - mean(arm)/mean(baseline) (positive: the arm uses less) and
        ``saving_ci``. CIs are None with fewer than 2 pairs; ``saving_*`` is None when the baseline mean is 0.
    """
    b = np.asarray(baseline, dtype=float)
    a = np.asarray(arm, dtype=float)
    if b.shape != a.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError("paired_stats needs two equally long, non-empty sequences")
    b_mean, a_mean = float(b.mean()), float(a.mean())
    out: dict[str, Any] = {
        "n": int(len(b)),
        "baseline_mean": b_mean,
        "arm_mean": a_mean,
        "delta_mean": float((a - b).mean()),
        "delta_ci": _ci((b, a), lambda x, y: float(np.mean(y - x))),
        "saving_fraction": None,
        "saving_ci": None,
        "confidence": CONFIDENCE,
    }
    if b_mean != 0:
        out["saving_fraction"] = 1.0 - a_mean / b_mean
        out["saving_ci"] = _ci((b, a), lambda x, y: 1.0 - float(np.mean(y)) / float(np.mean(x)) if np.mean(x) else 0.0)
    return out
