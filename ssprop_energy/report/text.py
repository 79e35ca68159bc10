"""The report's words: number formatting, the verdict and the carbon statement.

The verdict says no more than the numbers: an interval that contains zero is reported as "not
distinguishable from noise", a single pair is reported without any claim of significance, estimated
energy is called estimated, and counted FLOPs are called counted.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ssprop_energy.fmt import (  # noqa: F401 - re-exported: the report's modules format through text
    MINUS,
    fmt_ci_pct,
    fmt_ci_pp,
    fmt_co2,
    fmt_energy,
    fmt_number,
    fmt_pct,
    fmt_pp,
    fmt_run_epoch,
    fmt_seconds,
    fmt_si,
    less_or_more,
)
from ssprop_energy.records import ArmRecord
from ssprop_energy.report.load import Run, repeat_count
from ssprop_energy.report.savings import ESTIMATE_DOMINATES_FRACTION, ArmComparison, Saving, estimated_fraction

SOURCE_WORDS = {
    "counter": "read from hardware energy counters",
    "sampled": "integrated from sampled power",
    "estimated": "estimated from a power model (not measured)",
    "mixed": "combined from components of different provenance",
    "fake": "synthetic (the fake meter: no hardware was read, nothing was measured)",
    "counted": "counted",
    "measured": "measured",
}


# ------------------------------------------------------------------------------------------ verdict


def pairs_word(h: Any) -> str:
    """What a headline's pairs are: slice pairs, or epoch pairs for a run not time-sliced."""
    return "slice pairs" if "slice" in h.method else "epoch pairs"


def headline_detail(s: Saving) -> str:
    """The clean-pair estimate behind a time/energy saving in one phrase: interval and clean share, or why
    it is inconclusive (the raw totals named for what they are)."""
    h = s.headline
    assert h is not None
    share = f"{h.clean_share:.0%} of {h.pairs_total} {pairs_word(h)} clean"
    if h.verdict != "measured":
        raw = (s.value / s.baseline - 1.0) if s.baseline > 0 else math.nan
        return (f"inconclusive: {h.reason} ({share}); the raw totals differ by {fmt_pct(raw)}, which includes "
                "the machine's other work")
    ci = fmt_ci_pct(s.ci_frac, s.ci_level) if s.ci_frac is not None else "no interval"
    return f"clean-pair estimate, {ci}, {share}"


def _saving_clause(s: Saving, what: str, verb_less: str, verb_more: str) -> str:
    """One clause about a measured saving, worded by its interval (and by its verdict, for a clean-pair
    headline: an inconclusive one claims nothing)."""
    if s.headline is not None:
        if s.inconclusive:
            return f"the {what} change is {headline_detail(s)}"
        direction = verb_less if s.saved_frac >= 0 else verb_more
        if s.ci_spans_zero:
            return f"the {what} difference is not distinguishable from noise ({headline_detail(s)})"
        return f"{what} {direction} {fmt_pct(abs(s.saved_frac))} ({headline_detail(s)})"
    direction = verb_less if s.saved_frac >= 0 else verb_more
    amount = fmt_pct(abs(s.saved_frac))
    if s.ci_frac is None:
        if s.n_pairs >= 2:
            return f"{what} {direction} {amount} (no interval recorded, so no claim beyond this run)"
        return f"{what} {direction} {amount} in a single pair of runs (no repeats, so no interval: this may be noise)"
    ci = fmt_ci_pct(s.ci_frac, s.ci_level)
    if s.ci_spans_zero:
        return (
            f"the {what} difference is not distinguishable from noise "
            f"({amount} {'less' if s.saved_frac >= 0 else 'more'}, {ci} of the saving, {s.n_pairs} pairs)"
        )
    return f"{what} {direction} {amount} ({ci}, {s.n_pairs} pairs)"


def _accuracy_clause(c: ArmComparison) -> str:
    a = c.accuracy
    if a.ci is None:
        suffix = "in a single pair of runs (no interval)" if a.n_pairs < 2 else "(no interval recorded)"
        return f"test accuracy changed by {fmt_pp(a.diff, 2)} {suffix}"
    ci = fmt_ci_pp(a.ci, a.ci_level, 2)
    if a.ci[0] == a.ci[1]:
        return (
            f"test accuracy changed by {fmt_pp(a.diff, 2)}, identically in all {a.n_pairs} pairs: repeats of one "
            "seed do not sample accuracy variation, so this is no interval (use several seeds for one)"
        )
    if a.ci_spans_zero:
        return f"the test-accuracy difference ({fmt_pp(a.diff, 2)}, {ci}) is not distinguishable from noise"
    word = "rose" if a.diff > 0 else "fell"
    return f"test accuracy {word} by {fmt_pp(abs(a.diff), 2).lstrip('+')} ({ci}, {a.n_pairs} pairs)"


def quality_clause(c: ArmComparison) -> str:
    """A generation arm's Frechet distance against the baseline, worded by its interval (lower is better)."""
    q = c.quality
    assert q is not None
    what = f"{q.metric} ({q.extractor} features, {q.n_generated} samples; lower is better)"
    change = f"{fmt_number(q.baseline)} -> {fmt_number(q.value)}"
    if q.ci is None:
        suffix = "in a single pair of runs (no interval)" if q.n_pairs < 2 else "(no interval recorded)"
        word = "fell (better)" if q.diff < 0 else "rose (worse)" if q.diff > 0 else "did not change"
        return f"{what} {word} {change} {suffix}"
    if q.ci[0] == q.ci[1]:
        return (f"{what} changed {change}, identically in all {q.n_pairs} pairs: repeats of one seed do not "
                "sample its variation, so this is no interval (use several seeds for one)")
    ci = f"{q.ci_level:.0%} CI of the difference {fmt_number(q.ci[0])} to {fmt_number(q.ci[1])}, {q.n_pairs} pairs"
    if q.ci_spans_zero:
        return f"the {what} difference ({change}, {ci}) is not distinguishable from noise"
    return f"{what} {'fell (better)' if q.diff < 0 else 'rose (worse)'} {change} ({ci})"


def verdict(c: ArmComparison, estimated_frac: float) -> str:
    """A plain-language verdict for one sparse arm that claims no more than its numbers.

    ``estimated_frac`` is the fraction of the run's energy that comes from estimated components: a total
    of counter and sampled components is measured, only estimated components make it an estimate.
    """
    fb = c.flops_backward
    flops = (
        f"ssProp ({c.arm}) executed {fmt_pct(abs(fb.saved_frac))} {'fewer' if fb.saved_frac >= 0 else 'more'} "
        f"backward FLOPs than {c.baseline_arm} "
        f"(counted; average drop rate {c.average_drop_rate:.2f})."
    )
    if estimated_frac >= 1.0:
        energy_word = "estimated energy"
    elif estimated_frac > ESTIMATE_DOMINATES_FRACTION:
        energy_word = "energy (mostly estimated)"
    elif estimated_frac > 0.0:
        energy_word = "energy (partly estimated)"
    else:
        energy_word = "energy"
    energy = _saving_clause(c.energy, energy_word, "fell by", "rose by")
    if estimated_frac > ESTIMATE_DOMINATES_FRACTION:
        energy += "; an estimate follows the power model's assumptions, not the hardware"
    time = _saving_clause(c.time, "wall time", "fell by", "rose by")
    acc = quality_clause(c) if c.quality is not None else _accuracy_clause(c)
    return f"{flops} {_cap(energy)}. {_cap(time)}. {_cap(acc)}."


# Below this many pairs a bootstrap interval is little more than the range of the differences.
FEW_PAIRS = 5


def few_pairs_note(comps: list[ArmComparison]) -> str | None:
    """A caution when intervals rest on fewer than :data:`FEW_PAIRS` pairs, or None."""
    ns = [s.n_pairs for c in comps for s in (c.energy, c.time) if s.ci_frac is not None]
    ns += [c.accuracy.n_pairs for c in comps if c.accuracy.ci is not None]
    if not ns or min(ns) >= FEW_PAIRS:
        return None
    return (
        f"The intervals rest on only {min(ns)} pair{'s' if min(ns) != 1 else ''}: a bootstrap over so few pairs "
        f"understates the uncertainty. Run more repeats (--repeats {FEW_PAIRS} or more) before relying on them."
    )


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def status_banner(run: Run) -> str | None:
    """A sentence for a run that is not complete, or None."""
    s = run.summary
    if s.status == "complete":
        return None
    done = max((len(a.epochs) for a in run.arms.values()), default=0)
    planned = run.planned_epochs
    progress = f"{done} of {planned} epochs" if planned else f"{done} epochs"
    if s.status == "interrupted":
        return (
            f"Interrupted run: it stopped after {progress} (of the longest arm); every number covers only "
            "the completed part and is not a finished result."
        )
    if s.status == "failed":
        reason = s.failure_reason or "no reason recorded"
        return f"Failed run ({reason}): numbers cover {progress} and are not a finished result."
    from ssprop_energy.runlock import run_dir_in_use

    if not run_dir_in_use(run.path):
        return (
            f"Unfinished run: it stopped after {progress} without saying why (the process was killed, or its "
            "disk filled); every number covers only the completed part and is not a finished result."
        )
    return f"Run still in progress ({progress} so far): numbers are provisional."


def diverged_parts(arms: Mapping[str, Any]) -> list[str]:
    """One clause per arm with arm-runs whose loss became NaN/inf (left out of means and pairs); the CLI and
    the reports word the same fact with it."""
    parts = []
    for name, arm in arms.items():
        if not arm.diverged_runs:
            continue
        runs = ", ".join(arm.diverged_runs)
        if arm.status == "diverged":
            parts.append(f"{name}: every run diverged ({runs}); its accuracy and loss are not results, its time, "
                         "FLOPs and energy are what the diverged runs spent, and it is compared with nothing")
        else:
            parts.append(f"{name}: diverged run(s) {runs} left out of the means, pairs and intervals")
    return parts


def diverged_warning(run: Run) -> str | None:
    """A sentence naming the arm-runs whose loss became NaN/inf (left out of means and pairs), or None."""
    parts = diverged_parts(run.arms)
    if not parts:
        return None
    return ("Diverged training (loss NaN or infinite; label s<seed>r<repeat>e<first diverged epoch>): "
            + "; ".join(parts) + ".")


def run_warnings(run: Run) -> list[tuple[str, str]]:
    """The run's warnings, in the order the reports show them: ``(kind, sentence)`` with kind one of
    ``synthetic``, ``interference``, ``diverged``, ``estimated``, ``coverage`` (the status banner is apart)."""
    busy = interference_text(run, list(run.arms))
    found = [
        ("synthetic", synthetic_warning(run)),
        ("interference", _cap(busy) if busy else None),
        ("diverged", diverged_warning(run)),
        ("estimated", estimate_warning(run)),
        ("coverage", layer_coverage_warning(run)),
    ]
    return [(kind, text) for kind, text in found if text]


def estimate_warning(run: Run) -> str | None:
    """A warning when estimated energy dominates the run's energy figures, or None."""
    frac = estimated_fraction(run.arms)
    if frac > ESTIMATE_DOMINATES_FRACTION:
        return (
            f"{fmt_pct(frac, 0)} of this run's energy is estimated from a power model, not measured: energy and "
            "CO2 savings reflect the model's assumptions (e.g. TDP x utilisation) more than the hardware."
        )
    return None


def synthetic_warning(run: Run) -> str | None:
    """A warning when any energy figure of the run is synthetic (``--meter fake``), or None."""
    sources = {c.source for a in run.arms.values() for c in a.energy_components}
    sources |= {a.energy_source for a in run.arms.values()}
    if "fake" in sources:
        return ("The energy in this run is SYNTHETIC: it comes from the fake meter (--meter fake), no hardware was "
                "read, and every energy and CO2 figure below is a test value, not a measurement.")
    return None


def _coverages(run: Run) -> dict[str, Any]:
    """Arm name -> its ``LayerCoverage``, for the ssProp arms whose record holds one."""
    return {name: a.layer_coverage for name, a in run.arms.items() if a.layer_coverage is not None}


def layer_coverage_text(run: Run) -> str | None:
    """Which layers ssProp replaced, how many of each kind, and the share of a dense step's backward FLOPs they
    hold (``records.ArmRecord.layer_coverage``); None for records that predate it."""
    covs = _coverages(run)
    if not covs:
        return None
    kinds = "+".join(run.summary.layer_kinds)
    default = "layers" in run.summary.config and run.summary.config["layers"] is None
    origin = ", the model's default" if default else ""
    head = f"ssProp layers ({kinds}{origin})" if kinds else "ssProp layers"
    described = {c.describe() for c in covs.values()}
    if len(described) == 1:
        return f"{head}: {described.pop()} (a dense step, counted)."
    return f"{head}: " + "; ".join(f"{name}: {c.describe()}" for name, c in covs.items()) + " (a dense step, counted)."


def layer_coverage_warning(run: Run) -> str | None:
    """The low-coverage warning (sparsified layers under ``layer_coverage.LOW_SHARE`` of the backward FLOPs)."""
    found: dict[str, list[str]] = {}
    for name, cov in _coverages(run).items():
        if cov.warning:
            found.setdefault(cov.warning, []).append(name)
    if not found:
        return None
    return " ".join(f"{', '.join(names)}: {text}." for text, names in found.items())


def affected_epochs(run: Run, arm_names: list[str]) -> list[str]:
    """``arm (seed 0, epoch 3)`` labels of the epochs where foreign CPU load was material, over the arms."""
    out = []
    for name in arm_names:
        arm = run.arms.get(name)
        if arm is not None and arm.interference is not None:
            out += [f"{name} ({fmt_run_epoch(label)})" for label in arm.interference.affected_epochs]
    return out


def interference_text(run: Run, arm_names: list[str]) -> str | None:
    """One sentence naming the epochs whose time and energy ran beside other work, or None."""
    epochs = affected_epochs(run, arm_names)
    if not epochs:
        return None
    return (f"busy machine: other processes used >= {_threshold(run):g} CPU core (or a different load than "
            f"dense) during {', '.join(epochs)}; time and energy include their interference")


def _threshold(run: Run) -> float:
    for arm in run.arms.values():
        if arm.interference is not None:
            return arm.interference.threshold_cores
    return 0.25


def epoch_interval_text(arm: ArmRecord, metric: str) -> str | None:
    """The single-run interval of ``metric`` (``wall_s``, ``energy_j``) as a sentence, or None."""
    iv = arm.epoch_intervals.get(metric)
    if iv is None:
        return None
    ci = (f"{iv.confidence:.0%} CI {fmt_pct(iv.ci[0])} to {fmt_pct(iv.ci[1])}" if iv.ci is not None
          else "no interval (too few epochs per phase)")
    return f"single run, {iv.n_epochs} paired epochs: {fmt_pct(iv.change)} change, {ci} ({iv.label})"


# ------------------------------------------------------------------------------------------ provenance


def carbon_info(run: Run) -> dict[str, Any]:
    """Carbon intensity (g/kWh), PUE and their sources, from ``summary.carbon`` with arm fallbacks."""
    carbon = run.summary.carbon
    arms = list(run.arms.values())
    intensity: float | None = carbon.intensity_g_per_kwh
    if (intensity is None or not math.isfinite(intensity)) and arms:
        intensity = arms[0].carbon_intensity_g_per_kwh
    pue: float | None = carbon.pue
    if (pue is None or not math.isfinite(pue)) and arms:
        pue = arms[0].pue
    return {
        "g_per_kwh": intensity,
        "source": carbon.source or "not recorded",
        "region": carbon.region,
        "pue": pue,
        "pue_source": carbon.pue_source or "run configuration",
    }


def hardware(arms: Mapping[str, ArmRecord]) -> list[tuple[str, str, str]]:
    """Distinct ``(component, device, source)`` triples across arms, in first-seen order."""
    seen: dict[tuple[str, str, str], None] = {}
    for arm in arms.values():
        for comp in arm.energy_components:
            seen.setdefault((comp.component, comp.device or "unnamed device", comp.source), None)
    return list(seen)


def provenance_line(run: Run) -> str:
    """One line for an energy figure: sources per component, hardware, intensity and PUE with sources."""
    parts = [f"{comp} ({dev}): {src}" for comp, dev, src in hardware(run.arms)]
    if not parts:
        parts = [f"{name}: {arm.energy_source}" for name, arm in run.arms.items()]
    return f"Energy: {'; '.join(parts) or 'no components recorded'}. {intensity_text(run)}."


def intensity_text(run: Run) -> str:
    """``Carbon intensity 380 g CO2e/kWh (source, region); PUE 1.2 (source)``, saying what is not recorded."""
    ci = carbon_info(run)
    region = f", {ci['region']}" if ci["region"] else ""
    intensity = (
        f"{fmt_number(ci['g_per_kwh'])} g CO2e/kWh ({ci['source']}{region})"
        if fmt_number(ci["g_per_kwh"]) != "not recorded" else "not recorded"
    )
    pue = f"{fmt_number(ci['pue'])} ({ci['pue_source']})" if fmt_number(ci["pue"]) != "not recorded" else "not recorded"
    return f"Carbon intensity {intensity}; PUE {pue}"


def run_totals(run: Run) -> tuple[float, float, float]:
    """Training energy (J), eval energy (J) and CO2 (g) of every arm and repeat of the run.

    Arm records hold means over repeats, so each is multiplied by its repeat count; per-repeat figures
    are summed directly where the record lists them.
    """
    energy = eval_energy = co2 = 0.0
    for arm in run.arms.values():
        n = repeat_count(arm)
        reps = arm.repeats
        if reps:
            energy += sum(r.energy_j for r in reps)
        else:
            energy += arm.energy_j * n
        if reps:
            co2 += sum(r.co2_g for r in reps)
        else:
            co2 += arm.co2_g * n
        eval_energy += arm.eval_energy_j * n
    return energy, eval_energy, co2


def carbon_statement(run: Run, comps: list[ArmComparison]) -> str:
    """A paragraph that can be pasted into a paper's compute/carbon statement."""
    if not run.arms:
        return "No training was recorded in this run, so there is no energy or carbon to state."
    energy_j, eval_j, co2 = run_totals(run)
    cfg = run.summary.config or run.config
    n_trainings = sum(repeat_count(a) for a in run.arms.values())
    ci = carbon_info(run)
    hw = hardware(run.arms)
    devices = sorted({dev for _, dev, _ in hw}) or ["unrecorded hardware"]
    sources = sorted({src for _, _, src in hw} or {a.energy_source for a in run.arms.values()})
    source_text = " and ".join(SOURCE_WORDS.get(s, s) for s in sources)
    region = f" for {ci['region']}" if ci["region"] else ""
    epochs = run.planned_epochs
    what = f"{cfg.get('model', 'the model')} on {cfg.get('dataset', 'the dataset')}"
    eval_text = f", plus {fmt_energy(eval_j)} for evaluation" if eval_j > 0 else ""
    text = (
        f"Training {what} ({n_trainings} training run{'s' if n_trainings != 1 else ''} across "
        f"{len(run.arms)} arm{'s' if len(run.arms) != 1 else ''}"
        f"{f', {epochs} epochs each' if epochs else ''}) used {fmt_energy(energy_j)} of electricity{eval_text}, "
        f"{source_text}, on {', '.join(devices)}. At a carbon intensity of {fmt_number(ci['g_per_kwh'])} g CO2e/kWh"
        f"{region} ({ci['source']}) and a PUE of {fmt_number(ci['pue'])}, the training energy corresponds to "
        f"{fmt_co2(co2)}."
    )
    if len(comps) == 1:
        c = comps[0]
        ci_text = f" ({fmt_ci_pct(c.energy.ci_frac, c.energy.ci_level)})" if c.energy.ci_frac else ""
        if c.quality is not None:
            effect = (f"a sample-quality {c.quality.metric} of {fmt_number(c.quality.value)} against "
                      f"{fmt_number(c.quality.baseline)} (lower is better; {c.quality.extractor} features, "
                      f"{c.quality.n_generated} samples)")
        else:
            effect = f"a test-accuracy difference of {fmt_pp(c.accuracy.diff, 2)}"
        text += (
            f" Scheduled sparse back-propagation (ssProp, drop rate {run.arms[c.arm].drop_rate:g}, "
            f"{run.arms[c.arm].schedule} schedule) used {less_or_more(c.energy.saved_frac, 'energy')}{ci_text} "
            f"than dense training, with {effect}."
        )
    sampling = [a.sample_energy_j * repeat_count(a) for a in run.arms.values() if a.sample_energy_j is not None]
    if sampling:
        text += (f" Generating the evaluation samples used a further {fmt_energy(sum(sampling))} "
                 "(metered apart from training, not included above).")
    text += " Measured with ssprop-energy."
    return text
