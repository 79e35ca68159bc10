"""Summarize: arm-runs -> per-arm means, paired statistics, single-run intervals, interference, CSVs.

Everything here works on typed records (:class:`~ssprop_energy.records.ArmRun`) and computes each figure in
one place: CO2 through ``energy.carbon.co2_g`` only, paired statistics through ``stats.paired_stats``, the
within-run interval through ``stats.epoch_interval``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ssprop_energy.energy.carbon import co2_g
from ssprop_energy.energy.interference import DEFAULT_THRESHOLD_CORES, InterferenceReading
from ssprop_energy.experiment.config import ArmSpec
from ssprop_energy.experiment.headline import headlines
from ssprop_energy.experiment.stats import epoch_interval, paired_stats
from ssprop_energy.records import (
    EPOCH_COLUMNS,
    EPOCHS_FILE,
    LAYER_COLUMNS,
    LAYERS_FILE,
    SLICE_COLUMNS,
    SLICES_FILE,
    TRACE_COLUMNS,
    TRACE_FILE,
    ArmRecord,
    ArmRun,
    CarbonBlock,
    EpochInterval,
    EpochRecord,
    Interference,
    PairedStat,
    RepeatFigures,
    add_components,
    total_energy,
    write_csv_atomic,
)

PAIRED_METRICS = ("energy_j", "co2_g", "wall_s", "flops_backward", "flops_backward_conv", "flops_total",
                  "test_accuracy")
# A generation run has no accuracy: its quality figure (``fid`` or ``fid_classifier``, lower is better) takes
# test accuracy's place, beside the test noise MSE and the sampling window's time and energy.
GENERATION_PAIRED_METRICS = ("energy_j", "co2_g", "wall_s", "flops_backward", "flops_backward_conv", "flops_total",
                             "test_loss", "sample_wall_s", "sample_energy_j")
INTERVAL_METRICS = ("wall_s", "energy_j")
STEP_PHASES = ("data", "forward", "backward", "optimizer")  # the windows nested in each epoch's "train"
MATERIAL_CORES = DEFAULT_THRESHOLD_CORES  # foreign busy cores from which a time/energy figure is flagged


def _co2(energy_j: float, carbon: CarbonBlock) -> float:
    return co2_g(energy_j, carbon.intensity_g_per_kwh, carbon.pue)


def _value(run: ArmRun, metric: str, carbon: CarbonBlock) -> float:
    if metric == "co2_g":
        return _co2(run.energy_j, carbon)
    if metric == "flops_total":
        return run.flops_forward + run.flops_backward
    if metric == "energy_j":
        return run.energy_j
    value = getattr(run, metric)
    return math.nan if value is None else float(value)


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the values, or None when any is missing (a mean over part of the runs would mislead)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def arm_record(arm: ArmSpec, runs: Sequence[ArmRun], carbon: CarbonBlock,
               idle_power_w: dict[str, float] | None = None) -> ArmRecord:
    """The arm's means over its arm-runs (energy per component, epochs, phases) with per-run figures."""
    n = len(runs)

    def mean(metric: str) -> float:
        return sum(_value(r, metric, carbon) for r in runs) / n

    components = add_components(*(r.energy_components for r in runs), scale=1.0 / n)
    energy_j, source = total_energy(components)
    n_epochs = min(len(r.epochs) for r in runs)
    epochs = [
        EpochRecord(**{
            f: (i if f == "epoch" else sum(getattr(r.epochs[i], f) for r in runs) / n)
            for f in EpochRecord.__dataclass_fields__
        })
        for i in range(n_epochs)
    ]
    phases: dict[str, dict[str, float]] = {}
    for r in runs:
        for name, w in r.phases.items():
            p = phases.setdefault(name, {})
            for k, v in w.items():
                p[k] = p.get(k, 0.0) + float(v) / n
    noise = {k: sum(r.noise_accuracy[k] for r in runs) / n for k in runs[0].noise_accuracy}
    shares = [r.comm_share for r in runs if r.comm_share is not None]
    # training energy outside the nested step windows (callbacks, schedule stepping, loop overhead)
    nested_j = sum(phases.get(p, {}).get("energy_j", 0.0) for p in STEP_PHASES)
    unattributed_j = max(0.0, phases["train"]["energy_j"] - nested_j) if "train" in phases else 0.0
    return ArmRecord(
        name=arm.name, drop_rate=arm.drop_rate, schedule=arm.schedule, average_drop_rate=mean("average_drop_rate"),
        test_accuracy=mean("test_accuracy"), wall_s=mean("wall_s"), flops_forward=mean("flops_forward"),
        flops_backward=mean("flops_backward"), flops_backward_conv=mean("flops_backward_conv"),
        energy_j=energy_j, energy_source=source, energy_components=components, co2_g=_co2(energy_j, carbon),
        carbon_intensity_g_per_kwh=carbon.intensity_g_per_kwh, pue=carbon.pue, epochs=epochs,
        test_loss=mean("test_loss"), best_val_accuracy=mean("best_val_accuracy"),
        best_epoch=int(round(mean("best_epoch"))), dropout=arm.dropout, noise_accuracy=noise, phases=phases,
        unattributed_energy_j=unattributed_j, idle_power_w=dict(idle_power_w or {}),
        world_size=runs[0].world_size, nodes=runs[0].nodes,
        comm_share=sum(shares) / len(shares) if shares else None,
        repeats=[RepeatFigures(seed=r.seed, repeat=r.repeat, test_accuracy=r.test_accuracy, wall_s=r.wall_s,
                               energy_j=r.energy_j, co2_g=_co2(r.energy_j, carbon), flops_forward=r.flops_forward,
                               flops_backward=r.flops_backward, flops_backward_conv=r.flops_backward_conv,
                               energy_source=r.energy_source,
                               eval_energy_j=float(r.phases.get("eval", {}).get("energy_j", 0.0)),
                               fid=r.fid, fid_classifier=r.fid_classifier, sample_wall_s=r.sample_wall_s,
                               sample_energy_j=r.sample_energy_j)
                 for r in runs],
        # the same layers are sparsified in every run of an arm (one architecture, one --layers)
        layer_coverage=runs[0].layer_coverage,
        **_generation_fields(runs),
    )


def _generation_fields(runs: Sequence[ArmRun]) -> dict[str, Any]:
    """A generation arm's means: the quality figure, its details, and the sampling window's time and energy."""
    if runs[0].task != "generation":
        return {}
    n = len(runs)
    first = runs[0]
    metric = first.quality_metric
    quality = {k: v for k, v in first.quality.items() if k not in ("value", "wall_s")}
    if metric is not None:
        values = [getattr(r, metric) for r in runs]
        quality["per_run"] = {f"s{r.seed}r{r.repeat}": v for r, v in zip(runs, values)}
    sample_components = add_components(*(r.sample_energy_components for r in runs), scale=1.0 / n)
    sample_energy_j, sample_source = total_energy(sample_components)
    sampling = {k: v for k, v in first.sampling.items() if k not in ("grid_file", "interference")}
    sampling["grid_files"] = {f"s{r.seed}r{r.repeat}": r.sampling.get("grid_file") for r in runs}
    sampling["interference"] = {f"s{r.seed}r{r.repeat}": r.sampling.get("interference") for r in runs}
    has_samples = all(r.sample_energy_components for r in runs)
    return {
        "task": "generation",
        "fid": _mean_or_none([r.fid for r in runs]) if metric == "fid" else None,
        "fid_classifier": _mean_or_none([r.fid_classifier for r in runs]) if metric == "fid_classifier" else None,
        "quality": quality,
        "sample_wall_s": _mean_or_none([r.sample_wall_s for r in runs]),
        "sample_energy_j": sample_energy_j if has_samples else None,
        "sample_energy_source": sample_source if has_samples else None,
        "sample_energy_components": sample_components,
        "sampling": sampling,
    }


def paired(base: Sequence[ArmRun], arm: Sequence[ArmRun], carbon: CarbonBlock) -> dict[str, PairedStat]:
    """Paired statistics of every metric, pairing runs by (seed, repeat)."""
    b, a = _matched(base, arm)
    metrics: tuple[str, ...] = PAIRED_METRICS
    if b and b[0].task == "generation":
        quality = b[0].quality_metric
        metrics = GENERATION_PAIRED_METRICS + ((quality,) if quality is not None else ())
    out = {}
    for m in metrics:
        bv, av = [_value(r, m, carbon) for r in b], [_value(r, m, carbon) for r in a]
        if all(math.isfinite(v) for v in bv + av):  # a figure missing from a run is not paired at all
            out[m] = paired_stats(bv, av)
    return out


def _matched(base: Sequence[ArmRun], arm: Sequence[ArmRun]) -> tuple[list[ArmRun], list[ArmRun]]:
    by_key = {(r.seed, r.repeat): r for r in base}
    pairs = [(by_key[(r.seed, r.repeat)], r) for r in arm if (r.seed, r.repeat) in by_key]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def epoch_intervals(base: Sequence[ArmRun], arm: Sequence[ArmRun]) -> dict[str, EpochInterval]:
    """Single-run intervals of the time and energy change from per-epoch pairs (epoch e of the arm with
    epoch e of the baseline, same seed and repeat), stratified by the arm's drop rate that epoch."""
    out: dict[str, EpochInterval] = {}
    b_runs, a_runs = _matched(base, arm)
    for metric in INTERVAL_METRICS:
        bv: list[float] = []
        av: list[float] = []
        phases: list[str] = []
        for rb, ra in zip(b_runs, a_runs):
            for eb, ea in zip(rb.epochs, ra.epochs):
                bv.append(getattr(eb, metric))
                av.append(getattr(ea, metric))
                phases.append(f"{ea.drop_rate:.3g}")
        interval = epoch_interval(metric, bv, av, phases)
        if interval is not None:
            out[metric] = interval
    return out


def interference(by_arm: dict[str, Sequence[ArmRun]], baseline: str = "dense",
                 threshold_cores: float = MATERIAL_CORES) -> dict[str, Interference]:
    """Per arm: the epoch readings, their combination and the epochs where the machine was not quiet.

    An epoch window is flagged when it is material (``InterferenceReading.is_material``: mean foreign CPU
    load of ``threshold_cores`` or more, or another process on the GPU), or when it saw a materially
    different machine than the other arm's same epoch (``differs_from``): both arms' windows are then
    flagged, since the pair's ratio is what is off.
    """
    readings: dict[str, list[tuple[tuple[int, int, int], InterferenceReading]]] = {}
    for name, runs in by_arm.items():
        for r in runs:
            for e in r.interference:
                key = (int(e["seed"]), int(e["repeat"]), int(e["epoch"]))
                readings.setdefault(name, []).append((key, InterferenceReading.from_dict(e)))
    base = dict(readings.get(baseline, []))
    flagged: dict[str, set[tuple[int, int, int]]] = {name: set() for name in readings}
    for name, items in readings.items():
        for key, reading in items:
            if reading.is_material(threshold_cores):
                flagged[name].add(key)
            other = base.get(key)
            if name != baseline and other is not None and reading.differs_from(other, threshold_cores):
                flagged[name].add(key)
                flagged[baseline].add(key)
    out: dict[str, Interference] = {}
    for name, items in readings.items():
        combined = InterferenceReading.combine([reading for _, reading in items])
        out[name] = Interference(
            epochs=[e for r in by_arm[name] for e in r.interference],
            foreign_cpu_cores_mean=combined.foreign_cpu_cores_mean,
            foreign_cpu_cores_max=combined.foreign_cpu_cores_max,
            affected_epochs=[f"s{k[0]}r{k[1]}e{k[2] + 1}" for k, _ in items if k in flagged[name]],
            threshold_cores=threshold_cores,
        )
    return out


def _diverged_label(run: ArmRun) -> str:
    return f"s{run.seed}r{run.repeat}e{(run.diverged_epoch or 0) + 1}"


def summarize_arms(specs: dict[str, ArmSpec], by_arm: dict[str, list[ArmRun]], carbon: CarbonBlock,
                   idle_power_w: dict[str, float], complete: bool, sliced: bool = True) -> dict[str, ArmRecord]:
    """Every arm's record; paired statistics, intervals and the clean-pair headline (``headline.py``; its
    method names slices when ``sliced``, else epoch pairs) once the run is complete.

    Arm-runs whose loss became NaN/inf (diverged) are left out of an arm's means and of every pair (a pair
    with a diverged side is dropped for both arms); they are named in ``diverged_runs``. An arm whose every
    arm-run diverged keeps the figures of those runs, with status ``diverged``.
    """
    arms: dict[str, ArmRecord] = {}
    for name, runs in by_arm.items():
        finite = [r for r in runs if not r.diverged]
        record = arm_record(specs[name], finite or runs, carbon, idle_power_w)
        record.diverged_runs = [_diverged_label(r) for r in runs if r.diverged]
        if not finite:  # an accuracy after NaN weights is an artefact, not a result
            record.status = "diverged"
            record.test_accuracy = record.best_val_accuracy = record.test_loss = math.nan
        arms[name] = record
    for name, record in interference(by_arm).items():
        arms[name].interference = record
    if complete and "dense" in by_arm:
        dense = [r for r in by_arm["dense"] if not r.diverged]
        for name, record in arms.items():
            if name != "dense":
                arm_runs = [r for r in by_arm[name] if not r.diverged]
                if _matched(dense, arm_runs)[0]:
                    record.paired = paired(dense, arm_runs, carbon)
                    record.epoch_intervals = epoch_intervals(dense, arm_runs)
                    record.headline = headlines(dense, arm_runs, sliced)
    return arms


def write_tables(run_dir: Path, by_arm: dict[str, list[ArmRun]]) -> None:
    """``epochs.csv``, ``slices.csv``, ``power_trace.csv`` and ``layers.csv`` from the arm-runs."""
    slice_rows: list[dict[str, object]] = []
    epoch_rows: list[dict[str, object]] = []
    trace_rows: list[dict[str, object]] = []
    layer_rows: list[dict[str, object]] = []
    for name, runs in by_arm.items():
        for r in runs:
            label = f"s{r.seed}r{r.repeat}"
            epoch_rows += [{"arm": name, "repeat": label, **vars(e)} for e in r.epochs]
            slice_rows += [{"arm": name, **x.to_dict()} for x in r.slices]
            trace_rows += [{"arm": name, "repeat": label, "t_s": t, "component": c, "power_w": p, "source": s,
                            "phase": ph} for t, c, p, s, ph in r.trace]
        layer_rows += [{"arm": name, **row} for row in runs[0].layers]
    write_csv_atomic(run_dir / EPOCHS_FILE, epoch_rows, EPOCH_COLUMNS)
    write_csv_atomic(run_dir / SLICES_FILE, slice_rows, SLICE_COLUMNS)
    write_csv_atomic(run_dir / TRACE_FILE, trace_rows, TRACE_COLUMNS)
    write_csv_atomic(run_dir / LAYERS_FILE, layer_rows, LAYER_COLUMNS)


__all__ = ["GENERATION_PAIRED_METRICS", "PAIRED_METRICS", "arm_record", "epoch_intervals", "interference", "paired", "summarize_arms",
           "write_tables"]
