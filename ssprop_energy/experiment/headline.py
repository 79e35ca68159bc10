"""The headline time and energy change: a clean-pair estimate from adjacent slices, with a block bootstrap.

A time-sliced run (``--interleave slice``) gives, for every slice of the baseline, the slice of the other
arm that trained the same batches of the same epoch right next to it in time. Such a pair saw the same
machine unless something else ran in one of its halves; the interference monitor says which.

The estimate:

1. **Pairs.** Slice ``(seed, repeat, epoch, index)`` of the arm with the same slice of the baseline.
2. **Clean pairs.** Neither slice saw foreign load: a mean below ``SLICE_CLEAN_MEAN_CORES`` busy cores outside
   this run and no sampled interval inside it at ``SLICE_CLEAN_PEAK_CORES`` or more (records.py), and no other process on the GPU.
3. **Phase mix.** The schedule phase of a pair is the arm's drop rate over the slice (rounded to 0.1). The
   per-sample cost of each arm in each phase comes from that phase's clean pairs; the run total of each arm
   is rebuilt with the run's own mix of samples per phase (every slice counts there, clean or not), so a
   hog that hit mostly dense epochs does not tilt the mix. ``change = total(arm) / total(baseline) - 1``.
4. **Interval.** A moving-block bootstrap over the clean pairs, within each phase (blocks of consecutive
   pairs keep slow drifts together), 2000 resamples, percentile interval.
5. **Verdict.** ``measured`` when at least ``MIN_CLEAN_SHARE`` of the pairs are clean, every phase has
   two clean pairs, and the interval's half-width is at most the larger of ``|change|`` and
   ``RESOLUTION`` (3 percentage points: the precision this instrument claims for a time or energy change;
   on the 2-core CPU VM a quiet ~1 s slice pair varies by about 6%, so an A/A run of a minute resolves
   about +/-3%, BENCHMARKS.md); otherwise ``inconclusive``, with the reason. A change smaller than its
   interval is still ``measured`` when the interval is within the resolution: "no change, to +/-3 points".

Runs interleaved by epoch (or not at all) have one slice per epoch; the same estimator then works on epoch
pairs (``method`` says so).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ssprop_energy.records import HEADLINE_METRICS, ArmRun, Headline, SliceRecord

MIN_CLEAN_SHARE = 0.30
RESOLUTION = 0.03
CONFIDENCE = 0.95
RESAMPLES = 2000


def phase_of(s: SliceRecord) -> str:
    """The schedule phase of a slice: the arm's mean drop rate over it, to one decimal."""
    return f"{round(s.drop_rate, 1):.1f}"


@dataclass(frozen=True)
class _Pair:
    phase: str
    order: int
    samples: int
    base: float
    arm: float
    clean: bool


def _pairs(base: Sequence[ArmRun], arm: Sequence[ArmRun], metric: str) -> tuple[list[_Pair], dict[str, int]]:
    """Every slice pair of the matched arm-runs and the run's samples per phase (the arm's slices)."""
    by_key = {(r.seed, r.repeat): r for r in base}
    pairs: list[_Pair] = []
    mix: dict[str, int] = defaultdict(int)
    for ra in arm:
        rb = by_key.get((ra.seed, ra.repeat))
        if rb is None:
            continue
        base_slices = {(s.epoch, s.index): s for s in rb.slices}
        for sa in ra.slices:
            phase = phase_of(sa)
            mix[phase] += sa.samples
            sb = base_slices.get((sa.epoch, sa.index))
            if sb is None or sb.samples != sa.samples:
                continue  # not the same batches (a resumed epoch run alone): no pair
            b, a = float(getattr(sb, metric)), float(getattr(sa, metric))
            usable = math.isfinite(a) and math.isfinite(b) and b > 0
            pairs.append(_Pair(phase, sa.order, sa.samples, b, a, usable and sa.clean and sb.clean))
    return pairs, dict(mix)


def _change(sums: dict[str, tuple[float, float, float]], mix: dict[str, int]) -> float:
    """Rebuilt totals from per-phase (samples, baseline sum, arm sum); the relative change of the arm."""
    base_total = sum(mix[p] * b / n for p, (n, b, _) in sums.items())
    arm_total = sum(mix[p] * a / n for p, (n, _, a) in sums.items())
    return arm_total / base_total - 1.0


def _bootstrap(by_phase: dict[str, list[_Pair]], mix: dict[str, int], seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of the change from a moving-block bootstrap within each phase."""
    if any(len(v) < 2 for v in by_phase.values()):
        return None
    rng = np.random.default_rng(seed)
    base_total = np.zeros(RESAMPLES)
    arm_total = np.zeros(RESAMPLES)
    for phase, pairs in by_phase.items():
        pairs = sorted(pairs, key=lambda p: p.order)
        n = len(pairs)
        block = max(1, round(n ** (1 / 3)))
        blocks = math.ceil(n / block)
        starts = rng.integers(0, n, size=(RESAMPLES, blocks))
        idx = ((starts[:, :, None] + np.arange(block)) % n).reshape(RESAMPLES, -1)[:, :n]  # circular blocks
        samples = np.array([p.samples for p in pairs], dtype=float)[idx].sum(axis=1)
        base_total += mix[phase] * np.array([p.base for p in pairs])[idx].sum(axis=1) / samples
        arm_total += mix[phase] * np.array([p.arm for p in pairs])[idx].sum(axis=1) / samples
    changes = arm_total / base_total - 1.0
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(changes, [tail, 100 - tail])
    return float(low), float(high)


def estimate(base: Sequence[ArmRun], arm: Sequence[ArmRun], metric: str, sliced: bool) -> Headline | None:
    """The clean-pair headline of ``metric`` (``wall_s`` or ``energy_j``) of ``arm`` against ``base``, or None
    when the arm-runs hold no slice pairs at all (records that predate slices)."""
    pairs, mix = _pairs(base, arm, metric)
    if not pairs:
        return None
    clean = [p for p in pairs if p.clean]
    share = len(clean) / len(pairs)
    method = ("clean adjacent slice pairs, phase mix of the run, moving-block bootstrap" if sliced
              else "clean epoch pairs (arms not time-sliced), phase mix of the run, moving-block bootstrap")
    by_phase: dict[str, list[_Pair]] = defaultdict(list)
    for p in clean:
        by_phase[p.phase].append(p)
    missing = sorted(set(mix) - set(by_phase))
    common = dict(change=math.nan, ci=None, clean_share=share, pairs=len(clean), method=method,
                  pairs_total=len(pairs), confidence=CONFIDENCE, phases={p: len(v) for p, v in sorted(by_phase.items())})
    if missing:
        return Headline(verdict="inconclusive", reason=f"no clean pair in phase(s) drop {', '.join(missing)}", **common)
    sums = {p: (float(sum(x.samples for x in v)), sum(x.base for x in v), sum(x.arm for x in v))
            for p, v in by_phase.items()}
    change = _change(sums, mix)
    ci = _bootstrap(by_phase, mix)
    common.update(change=change, ci=ci)
    if share < MIN_CLEAN_SHARE:
        return Headline(verdict="inconclusive", reason=f"only {share:.0%} of the slice pairs were clean "
                        f"(at least {MIN_CLEAN_SHARE:.0%} needed)", **common)
    if ci is None:
        return Headline(verdict="inconclusive", reason="fewer than 2 clean pairs in a phase: no interval", **common)
    half = (ci[1] - ci[0]) / 2
    if half > max(abs(change), RESOLUTION):
        return Headline(verdict="inconclusive", reason=f"the interval (+/-{half:.1%}) is wider than the effect",
                        **common)
    return Headline(verdict="measured", **common)


def headlines(base: Sequence[ArmRun], arm: Sequence[ArmRun], sliced: bool) -> dict[str, Headline]:
    """The headline of every metric in :data:`~ssprop_energy.records.HEADLINE_METRICS` that has pairs."""
    out = {}
    for metric in HEADLINE_METRICS:
        h = estimate(base, arm, metric, sliced)
        if h is not None:
            out[metric] = h
    return out
