"""Realistic run directories for the report's tests, written through ``records.py``'s own writers.

The numbers follow the physics of a run rather than being arbitrary: FLOPs come from a small per-layer
table (conv backward = 2 x forward x keep fraction, everything else dense), epoch time and energy shrink
with the drop rate, accuracies rise along a learning curve, repeats add seeded noise, and paired
statistics are a percentile bootstrap of the per-repeat (sparse - dense) differences, as the harness does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ssprop_energy.records import (
    CONFIG_FILE,
    EPOCH_COLUMNS,
    EPOCHS_FILE,
    LAYER_COLUMNS,
    LAYERS_FILE,
    TRACE_COLUMNS,
    TRACE_FILE,
    ArmRecord,
    CarbonBlock,
    EnergyComponent,
    EpochRecord,
    RepeatFigures,
    RunSummary,
    paired_stat_from_dict,
    write_csv_atomic,
    write_json_atomic,
    write_summary,
)

N_TRAIN = 1_000  # training samples per epoch
# (layer, type, forward FLOPs per sample): a small CIFAR-style CNN
LAYERS = [
    ("conv1", "Conv2d", 3.54e6),
    ("bn1", "BatchNorm2d", 0.13e6),
    ("layer1.conv", "Conv2d", 75.5e6),
    ("layer2.conv", "Conv2d", 37.7e6),
    ("layer3.conv", "Conv2d", 18.9e6),
    ("fc", "Linear", 0.005e6),
]
# The harness's summary.carbon keys.
CARBON = {"intensity_g_per_kwh": 380.0, "source": "Ember 2024 annual average", "region": "DE", "pue": 1.2}
BOOT_SAMPLES = 2_000


@dataclass(frozen=True)
class ArmSpec:
    """One arm to fabricate: its name, nominal drop rate and schedule."""

    name: str
    drop_rate: float
    schedule: str = "bar"
    dropout: float = 0.0


def epoch_drop_rate(spec: ArmSpec, epoch: int) -> float:
    """The interleaved ("bar-like") schedule: dense on even epochs, ``drop_rate`` on odd ones."""
    if spec.drop_rate == 0.0:
        return 0.0
    if spec.schedule == "constant":
        return spec.drop_rate
    return spec.drop_rate if epoch % 2 == 1 else 0.0


def step_flops(drop: float) -> tuple[float, float, float]:
    """(forward, backward, conv backward) FLOPs per sample at drop rate ``drop``."""
    fwd = sum(f for _, _, f in LAYERS)
    conv_bwd = sum(2 * f * (1 - drop) for _, t, f in LAYERS if t == "Conv2d")
    other_bwd = sum(2 * f for _, t, f in LAYERS if t != "Conv2d")
    return fwd, conv_bwd + other_bwd, conv_bwd


def cpu_components(energy_j: float) -> list[EnergyComponent]:
    """A CPU-only machine with RAPL: package and DRAM counters."""
    return [
        EnergyComponent("cpu:package-0", 0.85 * energy_j, "counter", "Intel Xeon Gold 6338"),
        EnergyComponent("dram:package-0", 0.15 * energy_j, "counter", "Intel Xeon Gold 6338 DRAM"),
    ]


def gpu_plus_estimated_cpu(cpu_share: float) -> Callable[[float], list[EnergyComponent]]:
    """A GPU read by its NVML counter plus a CPU estimated from TDP x load (``cpu_share`` of the energy)."""

    def components(energy_j: float) -> list[EnergyComponent]:
        gpu_j = (1 - cpu_share) * energy_j
        return [
            EnergyComponent("gpu:0", gpu_j, "counter", "NVIDIA H100 80GB HBM3", sampled_energy_j=gpu_j * 1.012),
            EnergyComponent("cpu", cpu_share * energy_j, "estimated", "AMD EPYC 7R13 (TDP 280 W x load)"),
        ]

    return components


def paired_stats(base: list[float], arm: list[float], rng: np.random.Generator, level: float = 0.95) -> dict[str, Any]:
    """The harness's ``experiment.stats.paired_stats`` record format, by a vectorised percentile bootstrap
    (scipy's is too slow to fabricate dozens of statistics per test)."""
    b, a = np.asarray(base, dtype=float), np.asarray(arm, dtype=float)
    out: dict[str, Any] = {
        "n": len(b), "baseline_mean": float(b.mean()), "arm_mean": float(a.mean()),
        "delta_mean": float((a - b).mean()), "delta_ci": None,
        "saving_fraction": 1.0 - float(a.mean()) / float(b.mean()) if b.mean() else None, "saving_ci": None,
        "confidence": level,
    }
    if len(b) >= 2:
        idx = rng.integers(0, len(b), size=(BOOT_SAMPLES, len(b)))
        q = [(1 - level) / 2, 1 - (1 - level) / 2]
        out["delta_ci"] = [float(v) for v in np.quantile((a[idx] - b[idx]).mean(axis=1), q)]
        if b.mean():
            out["saving_ci"] = [float(v) for v in np.quantile(1 - a[idx].mean(axis=1) / b[idx].mean(axis=1), q)]
    return out


def _repeat(spec: ArmSpec, epochs: int, rng: np.random.Generator, power_w: float, acc_penalty: float,
            noise: float) -> dict[str, Any]:
    """Fabricate one repeat of one arm: epoch rows, totals and a power trace."""
    rows, trace = [], []
    t0 = 0.0
    totals = dict(energy_j=0.0, wall_s=0.0, flops_forward=0.0, flops_backward=0.0, flops_backward_conv=0.0)
    for e in range(epochs):
        d = epoch_drop_rate(spec, e)
        fwd, bwd, conv = step_flops(d)
        wall = 10.0 * (1 - 0.3 * d) * (1 + rng.normal(0, 0.02))
        energy = power_w * wall * (1 + rng.normal(0, noise))
        learn = 1 - math.exp(-(e + 1) / 1.5)
        val_acc = min(0.995, 0.1 + 0.87 * learn - acc_penalty * (d > 0) + rng.normal(0, 0.004))
        train_acc = min(0.999, val_acc + 0.02)
        val_loss = 2.3 * (1 - learn) + 0.08 + rng.normal(0, 0.01)
        rows.append(EpochRecord(
            epoch=e, drop_rate=d, train_loss=val_loss * 0.9, train_accuracy=train_acc, val_loss=val_loss,
            val_accuracy=val_acc, flops_forward=fwd * N_TRAIN, flops_backward=bwd * N_TRAIN,
            energy_j=energy, wall_s=wall, lr=1e-3,
        ))
        for t in np.arange(0.0, wall, 0.5):
            phase = "eval" if t > 0.85 * wall else "train"
            level = power_w * (0.55 if phase == "eval" else 1.0)
            trace.append((t0 + float(t), phase, level * (1 + rng.normal(0, 0.03))))
        totals["energy_j"] += energy
        totals["wall_s"] += wall
        totals["flops_forward"] += fwd * N_TRAIN
        totals["flops_backward"] += bwd * N_TRAIN
        totals["flops_backward_conv"] += conv * N_TRAIN
        t0 += wall
    test_acc = float(rows[-1].val_accuracy + rng.normal(0, 0.003)) if rows else float("nan")
    return {"epochs": rows, "trace": trace, "test_accuracy": min(0.999, test_acc), **totals}


def make_run(
    run_dir: Path,
    arms: list[ArmSpec],
    *,
    kind: str = "compare",
    repeats: int = 3,
    epochs: int = 6,
    planned_epochs: int | None = None,
    status: str = "complete",
    components: Callable[[float], list[EnergyComponent]] = cpu_components,
    power_w: float = 60.0,
    noise: float = 0.01,
    seed: int = 0,
    write_trace: bool = True,
    model: str = "resnet18",
    dataset: str = "digits",
) -> RunSummary:
    """Write a run directory and return the summary written. ``arms[0]`` is the dense baseline.

    ``noise`` is the relative standard deviation of each epoch's power (repeat-to-repeat energy noise).
    """
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    co2_per_j = CARBON["intensity_g_per_kwh"] * CARBON["pue"] / 3.6e6
    per_arm: dict[str, list[dict[str, Any]]] = {}
    for spec in arms:
        # Sparse arms lose a little accuracy in sparse epochs, more at higher drop rates.
        penalty = 0.01 * spec.drop_rate
        per_arm[spec.name] = [_repeat(spec, epochs, rng, power_w, penalty, noise) for _ in range(repeats)]
    arm_records: dict[str, ArmRecord] = {}
    epoch_rows: list[dict[str, Any]] = []
    trace_rows: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []
    for spec in arms:
        reps = per_arm[spec.name]

        def mean(key: str) -> float:
            return float(np.mean([r[key] for r in reps]))

        energy = mean("energy_j")
        mean_epochs = [
            EpochRecord(**{
                f: (float(np.mean([getattr(r["epochs"][e], f) for r in reps])) if f != "epoch" else e)
                for f in EpochRecord.__dataclass_fields__
            })
            for e in range(epochs)
        ]
        comps = components(energy)
        source = {c.source for c in comps}
        repeats_info = [
            RepeatFigures(repeat=i, seed=seed + i, energy_j=r["energy_j"], wall_s=r["wall_s"],
                          test_accuracy=r["test_accuracy"], co2_g=r["energy_j"] * co2_per_j,
                          flops_forward=r["flops_forward"], flops_backward=r["flops_backward"],
                          flops_backward_conv=r["flops_backward_conv"])
            for i, r in enumerate(reps)
        ]
        avg_drop = float(np.mean([epoch_drop_rate(spec, e) for e in range(planned_epochs or epochs)]))
        best = int(np.argmax([e.val_accuracy for e in mean_epochs])) if mean_epochs else -1
        wall = mean("wall_s")
        arm_records[spec.name] = ArmRecord(
            name=spec.name, drop_rate=spec.drop_rate, schedule="dense" if spec.drop_rate == 0 else spec.schedule,
            average_drop_rate=avg_drop, test_accuracy=mean("test_accuracy"), wall_s=wall,
            flops_forward=mean("flops_forward"), flops_backward=mean("flops_backward"),
            flops_backward_conv=mean("flops_backward_conv"), energy_j=energy,
            energy_source=source.pop() if len(source) == 1 else "mixed", energy_components=comps,
            co2_g=energy * co2_per_j, carbon_intensity_g_per_kwh=CARBON["intensity_g_per_kwh"], pue=CARBON["pue"],
            epochs=mean_epochs, test_loss=0.1, best_val_accuracy=mean_epochs[best].val_accuracy if mean_epochs else float("nan"),
            best_epoch=best, dropout=spec.dropout,
            noise_accuracy={"0.1": mean("test_accuracy") - 0.02, "0.2": mean("test_accuracy") - 0.09},
            phases={
                "forward": {"energy_j": 0.3 * energy, "wall_s": 0.3 * wall, "count": epochs * 8},
                "backward": {"energy_j": 0.5 * energy, "wall_s": 0.5 * wall, "count": epochs * 8},
                "optimizer": {"energy_j": 0.15 * energy, "wall_s": 0.15 * wall, "count": epochs * 8},
                "eval": {"energy_j": 0.1 * energy, "wall_s": 0.1 * wall, "count": epochs + 1},
            },
            unattributed_energy_j=0.05 * energy,
            idle_power_w={c.component: 5.0 for c in comps}, repeats=repeats_info,
            status="interrupted" if status == "interrupted" else "complete",
        )
        for r_i, r in enumerate(reps):
            label = f"s{seed}r{r_i}"  # the harness labels repeats by seed and repeat index
            for rec in r["epochs"]:
                epoch_rows.append({"arm": spec.name, "repeat": label, **rec.__dict__})
            for comp in comps:
                share = comp.energy_j / energy if energy else 0.0
                for t, phase, p in r["trace"]:
                    trace_rows.append({"arm": spec.name, "repeat": label, "t_s": round(t, 3), "component": comp.component,
                                       "power_w": round(p * share, 3), "source": comp.source, "phase": phase})
        for layer, typ, fwd in LAYERS:
            # As the harness records them: one training step per sample at the arm's nominal drop rate.
            bwd = 2 * fwd * (1 - spec.drop_rate) if typ == "Conv2d" else 2 * fwd
            layer_rows.append({"arm": spec.name, "layer": layer, "type": typ, "flops_forward": fwd, "flops_backward": bwd})
    base = arms[0].name
    co2 = lambda r: r["energy_j"] * co2_per_j  # noqa: E731
    getters = {
        "energy_j": lambda r: r["energy_j"], "co2_g": co2, "wall_s": lambda r: r["wall_s"],
        "flops_backward": lambda r: r["flops_backward"], "flops_backward_conv": lambda r: r["flops_backward_conv"],
        "flops_total": lambda r: r["flops_forward"] + r["flops_backward"],
        "test_accuracy": lambda r: r["test_accuracy"],
    }
    for spec in arms[1:]:
        arm_records[spec.name].paired = {
            m: paired_stat_from_dict(
                paired_stats([g(r) for r in per_arm[base]], [g(r) for r in per_arm[spec.name]], rng), m)
            for m, g in getters.items()
        }
    # A compare run also copies its single arm's statistics to summary.paired, as the harness does.
    paired = arm_records[arms[1].name].paired if kind == "compare" and len(arms) == 2 else {}
    config = {
        "model": model, "dataset": dataset, "epochs": planned_epochs or epochs, "batch_size": 128,
        "lr": 1e-3, "optimizer": "adam", "drop_rate": arms[-1].drop_rate, "schedule": arms[-1].schedule,
        "repeats": repeats, "seed": seed, "meter": "auto", "device": "cpu", "pue": CARBON["pue"],
    }
    summary = RunSummary(
        kind=kind, status=status, created_at="2026-11-25T14:00:00+00:00", config=config,
        environment={"torch": "2.13.0", "python": "3.11.7", "device": "cpu", "hostname": "bench-1",
                     "meter_sources": sorted({c.component + ":" + c.source for c in components(1.0)})},
        carbon=CarbonBlock(**CARBON), arms=arm_records, baseline=base, paired=paired,
        failure_reason=None, finished_at=None if status != "complete" else "2026-11-25T14:20:00+00:00",
    )
    write_json_atomic(run_dir / CONFIG_FILE, config)
    write_csv_atomic(run_dir / EPOCHS_FILE, epoch_rows, EPOCH_COLUMNS)
    if write_trace:
        write_csv_atomic(run_dir / TRACE_FILE, trace_rows, TRACE_COLUMNS)
    write_csv_atomic(run_dir / LAYERS_FILE, layer_rows, LAYER_COLUMNS)
    write_summary(run_dir, summary)
    return summary


def compare_run(run_dir: Path, **kw: Any) -> RunSummary:
    """Dense vs ssprop (drop 0.8, bar), 3 repeats: paired deltas with intervals."""
    kw.setdefault("repeats", 3)
    return make_run(run_dir, [ArmSpec("dense", 0.0), ArmSpec("ssprop", 0.8)], **kw)


def sweep_run(run_dir: Path, **kw: Any) -> RunSummary:
    """Dense plus ssprop at drop 0.2, 0.4, 0.6, 0.8 (bar), 2 repeats, one shared baseline."""
    kw.setdefault("repeats", 2)
    arms = [ArmSpec("dense", 0.0)] + [ArmSpec(f"ssprop-d{d:.1f}-bar", d) for d in (0.2, 0.4, 0.6, 0.8)]
    return make_run(run_dir, arms, kind="sweep", **kw)


def interrupted_run(run_dir: Path, **kw: Any) -> RunSummary:
    """A compare run stopped after 3 of 8 epochs, single repeat."""
    return make_run(run_dir, [ArmSpec("dense", 0.0), ArmSpec("ssprop", 0.8)], repeats=1, epochs=3,
                    planned_epochs=8, status="interrupted", **kw)


def mixed_source_run(run_dir: Path, cpu_share: float = 0.3, **kw: Any) -> RunSummary:
    """A GPU run: NVML counter for the GPU, estimated CPU (``cpu_share`` of the energy)."""
    kw.setdefault("repeats", 2)
    return make_run(run_dir, [ArmSpec("dense", 0.0), ArmSpec("ssprop", 0.8)],
                    components=gpu_plus_estimated_cpu(cpu_share), power_w=300.0, **kw)
