"""What one sparse arm saves against the baseline: the numbers every part of the report shows.

A saving is ``baseline - sparse`` (positive = the sparse arm used less), as a fraction of the baseline.
Time, energy and CO2 come from the arm's clean-pair headline when the run has one (``experiment/headline.py``:
adjacent slice pairs that saw no foreign load, weighted back to the run's phase mix), with its interval,
clean share and verdict; the raw totals stay beside it as the physical totals of the run.
With paired statistics (the harness records them per arm), the point estimate and the interval are the
harness's ``saving_fraction`` (1 - mean(arm)/mean(baseline)) and ``saving_ci``; the accuracy difference is
its ``delta_mean`` and ``delta_ci``. Without them the point estimate is the difference of the two arm
records and there is no interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ssprop_energy.records import ArmRecord, Headline
from ssprop_energy.report.load import DEFAULT_CI_LEVEL, PairedStat, Run

# Fraction of a run's energy that must come from estimates before the report warns at the top.
ESTIMATE_DOMINATES_FRACTION = 0.5


@dataclass(frozen=True)
class Saving:
    """Saving of one metric (unit of the metric; fractions of the baseline for ``*_frac``).

    Attributes:
        metric: ``ArmRecord`` field name (``energy_j``, ``wall_s``...).
        baseline: the baseline arm's value.
        value: the sparse arm's value.
        saved: absolute saving (baseline - sparse), from the paired mean when there is one.
        saved_frac: ``saved`` as a fraction of ``baseline``; NaN when the baseline is 0.
        ci_frac: interval of ``saved_frac`` (low, high) or None without repeats.
        n_pairs: number of pairs behind the interval (0 without paired statistics).
        ci_level: the interval's confidence level.
        source: provenance of the figures (``counted``, ``counter``, ``sampled``, ``estimated``, ``mixed``,
            ``measured`` for wall time).
    """

    metric: str
    baseline: float
    value: float
    saved: float
    saved_frac: float
    ci_frac: tuple[float, float] | None
    n_pairs: int
    ci_level: float
    source: str
    headline: Headline | None = None

    @property
    def ci_spans_zero(self) -> bool:
        """True when the interval contains 0: the saving is not distinguishable from noise."""
        return self.ci_frac is not None and self.ci_frac[0] <= 0.0 <= self.ci_frac[1]

    @property
    def inconclusive(self) -> bool:
        """True when the clean-pair estimate behind this saving is inconclusive: no saving may be claimed."""
        return self.headline is not None and self.headline.verdict != "measured"


@dataclass(frozen=True)
class AccuracyDiff:
    """Test-accuracy difference sparse - baseline, as a fraction (x100 = percentage points)."""

    baseline: float
    value: float
    diff: float
    ci: tuple[float, float] | None
    n_pairs: int
    ci_level: float

    @property
    def ci_spans_zero(self) -> bool:
        return self.ci is not None and self.ci[0] <= 0.0 <= self.ci[1]


@dataclass(frozen=True)
class QualityDiff:
    """A generation arm's Frechet distance against the baseline's (lower is better).

    Attributes:
        metric: ``fid`` (Inception-v3) or ``fid_classifier`` (a small classifier's features).
        baseline / value: the two arms' means.
        diff: value - baseline (negative: the sparse arm's samples are closer to the real images).
        ci: interval of ``diff`` or None (fewer than 2 pairs).
        extractor, n_generated, note: the figure's provenance, from the arm's record.
    """

    metric: str
    baseline: float
    value: float
    diff: float
    ci: tuple[float, float] | None
    n_pairs: int
    ci_level: float
    extractor: str
    n_generated: int | None
    note: str

    @property
    def ci_spans_zero(self) -> bool:
        return self.ci is not None and self.ci[0] <= 0.0 <= self.ci[1]

    @property
    def rel_change(self) -> float:
        """``diff`` as a fraction of the baseline (negative: lower, i.e. better)."""
        return self.diff / self.baseline if self.baseline > 0 else math.nan


@dataclass(frozen=True)
class ArmComparison:
    """Everything the headline says about one sparse arm against the baseline."""

    arm: str
    baseline_arm: str
    energy: Saving
    co2: Saving
    time: Saving
    flops_backward: Saving
    flops_backward_conv: Saving
    flops_total: Saving
    accuracy: AccuracyDiff
    average_drop_rate: float
    quality: QualityDiff | None = None  # generation runs: the Frechet distance in accuracy's place

    @property
    def paper_conv_backward_frac(self) -> float:
        """The paper's FLOP model for this schedule: conv backward falls by the average drop rate."""
        return self.average_drop_rate

    @property
    def paper_whole_step_frac(self) -> float:
        """The paper's FLOP model for the whole step: forward F + conv backward 2F, backward sparsified.

        Saving = 2F x d / 3F = 2d/3 (SSPROP.md: 40% conv backward -> about 27% of the step).
        """
        return 2.0 * self.average_drop_rate / 3.0


def _frac(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def saving(
    metric: str, baseline: float, value: float, stat: PairedStat | None, source: str
) -> Saving:
    """Build a :class:`Saving`; ``stat`` holds the paired statistics of (arm vs baseline) or is None."""
    if stat is None:
        saved = baseline - value
        return Saving(metric, baseline, value, saved, _frac(saved, baseline), None, 0, DEFAULT_CI_LEVEL, source)
    saved = -stat.delta_mean
    saved_frac = stat.saving_fraction if stat.saving_fraction is not None else _frac(saved, baseline)
    ci = stat.saving_ci
    if source == "counted" and ci is not None and ci[0] == ci[1]:
        # Counted FLOPs repeat exactly; a zero-width interval says nothing a reader needs.
        ci = None
    elif ci is None and stat.delta_ci is not None and baseline > 0:
        # Only a delta interval recorded: divide by the baseline mean (treating the baseline as fixed).
        ci = (-stat.delta_ci[1] / baseline, -stat.delta_ci[0] / baseline)
    return Saving(metric, baseline, value, saved, saved_frac, ci, stat.n, stat.confidence, source)


def from_headline(metric: str, baseline: float, value: float, h: Headline, source: str) -> Saving:
    """A time/energy/CO2 :class:`Saving` from the arm's clean-pair headline (``experiment/headline.py``):
    the saving is minus its change, the interval its interval; ``baseline`` / ``value`` stay the raw totals."""
    ci = None if h.ci is None else (-h.ci[1], -h.ci[0])
    saved_frac = -h.change
    return Saving(metric, baseline, value, saved_frac * baseline if math.isfinite(saved_frac) else math.nan,
                  saved_frac, ci, h.pairs, h.confidence, source, headline=h)


def compare_arm(run: Run, arm_name: str) -> ArmComparison:
    """Compare one sparse arm of ``run`` with its baseline (the run must have a baseline arm)."""
    base = run.baseline
    if base is None:
        raise ValueError(f"run {run.path} has no baseline arm")
    arm = run.arms[arm_name]
    stats = run.paired.get(arm_name, {})
    energy_source = _pair_source(base, arm)

    def make(metric: str, source: str) -> Saving:
        b, v = float(getattr(base, metric)), float(getattr(arm, metric))
        # time and energy: the clean-pair estimate when the run has one (CO2 follows the energy estimate)
        h = arm.headline.get("energy_j" if metric == "co2_g" else metric)
        if h is not None:
            return from_headline(metric, b, v, h, source)
        return saving(metric, b, v, stats.get(metric), source)

    total_stat = stats.get("flops_total")
    acc_stat = stats.get("test_accuracy")
    if acc_stat is not None:
        acc = AccuracyDiff(
            base.test_accuracy, arm.test_accuracy, acc_stat.delta_mean, acc_stat.delta_ci, acc_stat.n,
            acc_stat.confidence,
        )
    else:
        acc = AccuracyDiff(
            base.test_accuracy, arm.test_accuracy, arm.test_accuracy - base.test_accuracy, None, 0, DEFAULT_CI_LEVEL
        )
    return ArmComparison(
        quality=quality_diff(base, arm, stats),
        arm=arm_name,
        baseline_arm=run.summary.baseline,
        energy=make("energy_j", energy_source),
        co2=make("co2_g", energy_source),
        time=make("wall_s", "measured"),
        flops_backward=make("flops_backward", "counted"),
        flops_backward_conv=make("flops_backward_conv", "counted"),
        flops_total=saving("flops_total", base.flops_total, arm.flops_total, total_stat, "counted"),
        accuracy=acc,
        average_drop_rate=effective_drop_rate(run, arm_name),
    )


def quality_diff(base: ArmRecord, arm: ArmRecord, stats: dict[str, PairedStat]) -> QualityDiff | None:
    """The Frechet-distance comparison of a generation arm, or None (classification, or no figure recorded)."""
    metric = base.quality_metric
    if metric is None or arm.quality_metric != metric:
        return None
    b, v = float(getattr(base, metric)), float(getattr(arm, metric))
    stat = stats.get(metric)
    diff = stat.delta_mean if stat is not None else v - b
    ci = stat.delta_ci if stat is not None else None
    q = arm.quality
    return QualityDiff(
        metric=metric, baseline=b, value=v, diff=diff, ci=ci, n_pairs=stat.n if stat is not None else 0,
        ci_level=stat.confidence if stat is not None else DEFAULT_CI_LEVEL, extractor=str(q.get("extractor", "?")),
        n_generated=q.get("n_generated"), note=str(q.get("note", "")),
    )


def effective_drop_rate(run: Run, arm_name: str) -> float:
    """The average drop rate the arm actually ran.

    For a finished arm this is the record's ``average_drop_rate`` (the schedule's average, which also
    covers by-iteration schedules). An arm that stopped early ran only its recorded epochs, so the
    schedule's average over the planned run would overstate what the paper's FLOP model predicts for it:
    the mean of the recorded epochs' drop rates is used instead.
    """
    arm = run.arms[arm_name]
    planned = run.planned_epochs
    if arm.epochs and (arm.status != "complete" or (planned is not None and len(arm.epochs) < planned)):
        return sum(e.drop_rate for e in arm.epochs) / len(arm.epochs)
    return arm.average_drop_rate


def comparisons(run: Run) -> list[ArmComparison]:
    """One comparison per sparse arm; empty when the run has no baseline arm (or it diverged)."""
    if run.baseline is None or run.baseline.status == "diverged":
        return []
    # an arm whose every run diverged has no result to compare (summarize recorded no pairs for it)
    return [compare_arm(run, name) for name in run.sparse_arm_names if run.arms[name].status != "diverged"]


def _pair_source(base: ArmRecord, arm: ArmRecord) -> str:
    """Provenance of a saving between two arms: one source, or ``mixed (counter + estimated)``."""
    sources = sorted({c.source for a in (base, arm) for c in a.energy_components}
                     or {base.energy_source, arm.energy_source})
    return sources[0] if len(sources) == 1 else f"mixed ({' + '.join(sources)})"


def estimated_fraction(arms: dict[str, ArmRecord]) -> float:
    """Fraction of the arms' recorded component energy that comes from ``estimated`` components.

    Arms without components count by their total and ``energy_source``.
    """
    total = estimated = 0.0
    for arm in arms.values():
        if arm.energy_components:
            for comp in arm.energy_components:
                total += comp.energy_j
                if comp.source == "estimated":
                    estimated += comp.energy_j
        else:
            total += arm.energy_j
            if arm.energy_source == "estimated":
                estimated += arm.energy_j
    return estimated / total if total > 0 else 0.0


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names on the energy-accuracy Pareto front: no other point has less or equal energy and higher or
    equal accuracy with one of them strictly better. ``points`` are ``(name, energy_j, accuracy)``.

    Returned in order of increasing energy.
    """
    front = []
    for name, energy, acc in points:
        dominated = any(
            (e2 <= energy and a2 >= acc) and (e2 < energy or a2 > acc) for n2, e2, a2 in points if n2 != name
        )
        if not dominated:
            front.append((energy, name))
    return [name for _, name in sorted(front)]
