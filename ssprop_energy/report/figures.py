"""The report's figures: matplotlib (Agg canvas, no pyplot state) rendered to base64 ``data:`` URIs.

Line and bar charts are SVG (crisp on screen and in print); the power trace, which can hold many
thousands of samples, is PNG so that the report stays small. Output is deterministic (fixed SVG hash
salt, no date metadata) so that the same records give the same file.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ssprop_energy.records import SLICE_CLEAN_MEAN_CORES, SLICE_CLEAN_PEAK_CORES
from ssprop_energy.report.load import Run
from ssprop_energy.report.savings import ArmComparison, pareto_front
from ssprop_energy.report.text import provenance_line

WIDTH_IN = 7.5
PNG_DPI = 120
MAX_TRACE_ARMS = 6
_RC = {
    "svg.hashsalt": "ssprop-energy",
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
# Phase shading uses these at low alpha; component lines use them at full strength.
PHASE_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


@dataclass(frozen=True)
class FigureData:
    """One rendered figure: a ``data:`` URI plus what the HTML needs to show it."""

    key: str
    title: str
    caption: str
    uri: str
    mime: str
    width_px: int
    height_px: int


def render_figure(fig: Figure, key: str, title: str, caption: str, fmt: str = "svg") -> FigureData:
    """Render ``fig`` into a self-contained data URI (``svg`` or ``png``, no timestamp in the file, so the same
    records give the same bytes); the size is stated in CSS pixels (96 per inch)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format=fmt, dpi=PNG_DPI, metadata=_metadata(fmt))
    mime = "image/svg+xml" if fmt == "svg" else "image/png"
    uri = f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
    w_in, h_in = fig.get_size_inches()
    return FigureData(key, title, caption, uri, mime, int(w_in * 96), int(h_in * 96))


def _metadata(fmt: str) -> dict[str, None]:
    return {"Date": None} if fmt == "svg" else {"Software": None}


def new_figure(height_in: float, ncols: int = 1, nrows: int = 1, sharex: bool = False) -> tuple[Figure, list]:
    """A figure of the report's width and ``height_in`` inches in the report's style, with its axes flattened
    row by row (shared by the run report and the ledger report)."""
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharex=sharex, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _colours(run: Run) -> dict[str, str]:
    """Baseline in black, sparse arms along a sequential colormap (so sweeps read in drop-rate order)."""
    cmap = matplotlib.colormaps["plasma"]
    base = run.summary.baseline
    sparse = [n for n in run.arms if n != base]
    out = {base: "#222222"}
    if len(sparse) == 1:
        return {**out, sparse[0]: "#d9601a"}
    for i, name in enumerate(sparse):
        out[name] = to_hex(cmap(0.12 + 0.68 * i / max(1, len(sparse) - 1)))
    return out


def _integer_epochs(*axes) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


# ------------------------------------------------------------------------------------------ per-run figures


def accuracy_loss(run: Run) -> FigureData:
    """Validation accuracy and training/validation loss per epoch, mean over repeats with min-max bands.

    A generation run has no accuracy: one panel, the noise-prediction MSE (train, and validation at fixed
    timesteps and noise)."""
    if run.is_generation:
        return _generation_loss(run)
    with matplotlib.rc_context(_RC):
        fig, (ax_acc, ax_loss) = new_figure(3.0, ncols=2)
        colours = _colours(run)
        for name in run.arms:
            df = run.epochs[run.epochs["arm"] == name]
            if df.empty:
                continue
            g = df.groupby("epoch")
            mean, lo, hi = g.mean(numeric_only=True), g.min(numeric_only=True), g.max(numeric_only=True)
            x = mean.index.to_numpy()
            col = colours[name]
            ax_acc.plot(x, 100 * mean["val_accuracy"], color=col, marker="o", ms=3, label=name)
            ax_acc.plot(x, 100 * mean["train_accuracy"], color=col, ls=":", lw=1)
            ax_loss.plot(x, mean["train_loss"], color=col, ls=":", lw=1)
            ax_loss.plot(x, mean["val_loss"], color=col, marker="o", ms=3, label=name)
            if df["repeat"].nunique() > 1:
                ax_acc.fill_between(x, 100 * lo["val_accuracy"], 100 * hi["val_accuracy"], color=col, alpha=0.15)
                ax_loss.fill_between(x, lo["val_loss"], hi["val_loss"], color=col, alpha=0.15)
        ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy (solid: validation, dotted: train)")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss (solid: validation, dotted: train)")
        _integer_epochs(ax_acc, ax_loss)
        _legend(ax_acc)
    reps = int(run.epochs["repeat"].nunique()) if len(run.epochs) else 0
    band = f" Mean of {reps} repeats; shaded: min to max." if reps > 1 else ""
    return render_figure(fig, "accuracy_loss", "Accuracy and loss per epoch", f"From epochs.csv.{band}")


def _generation_loss(run: Run) -> FigureData:
    with matplotlib.rc_context(_RC):
        fig, (ax,) = new_figure(3.0)
        colours = _colours(run)
        for name in run.arms:
            df = run.epochs[run.epochs["arm"] == name]
            if df.empty:
                continue
            g = df.groupby("epoch")
            mean, lo, hi = g.mean(numeric_only=True), g.min(numeric_only=True), g.max(numeric_only=True)
            x = mean.index.to_numpy()
            ax.plot(x, mean["train_loss"], color=colours[name], ls=":", lw=1)
            ax.plot(x, mean["val_loss"], color=colours[name], marker="o", ms=3, label=name)
            if df["repeat"].nunique() > 1:
                ax.fill_between(x, lo["val_loss"], hi["val_loss"], color=colours[name], alpha=0.15)
        ax.set(xlabel="epoch", ylabel="noise MSE",
               title="Noise-prediction loss (solid: validation, fixed timesteps and noise; dotted: train)")
        _integer_epochs(ax)
        _legend(ax)
    reps = int(run.epochs["repeat"].nunique()) if len(run.epochs) else 0
    band = f" Mean of {reps} repeats; shaded: min to max." if reps > 1 else ""
    return render_figure(fig, "accuracy_loss", "Loss per epoch (noise-prediction MSE)", f"From epochs.csv.{band}")


def drop_rate(run: Run) -> FigureData:
    """The drop-rate schedule each arm actually ran, per epoch."""
    with matplotlib.rc_context(_RC):
        fig, (ax,) = new_figure(2.4)
        colours = _colours(run)
        n = max(1, len(run.arms))
        for i, (name, arm) in enumerate(run.arms.items()):
            if not arm.epochs:
                continue
            x = [e.epoch for e in arm.epochs]
            y = [e.drop_rate for e in arm.epochs]
            # A small vertical offset keeps overlapping schedules (e.g. dense at 0) visible.
            offset = (i - (n - 1) / 2) * 0.008
            ax.step(x, [v + offset for v in y], where="mid", color=colours[name], lw=1.6, label=name)
        ax.set(xlabel="epoch", ylabel="drop rate", ylim=(-0.05, 1.0), title="Drop rate per epoch (the schedule)")
        _integer_epochs(ax)
        _legend(ax)
    return render_figure(fig, "drop_rate", "Drop rate per epoch", "Drop rate of each epoch as recorded in summary.json.")


def energy_per_epoch(run: Run) -> FigureData:
    """Training energy per epoch and cumulative, per arm (means over repeats)."""
    with matplotlib.rc_context(_RC):
        fig, (ax_e, ax_c) = new_figure(3.0, ncols=2)
        colours = _colours(run)
        for name, arm in run.arms.items():
            if not arm.epochs:
                continue
            x = [e.epoch for e in arm.epochs]
            y = [e.energy_j for e in arm.epochs]
            cum = [sum(y[: i + 1]) for i in range(len(y))]
            ax_e.plot(x, y, color=colours[name], marker="o", ms=3, label=name)
            ax_c.plot(x, cum, color=colours[name], marker="o", ms=3, label=name)
        ax_e.set(xlabel="epoch", ylabel="energy (J)", title="Energy per epoch")
        ax_c.set(xlabel="epoch", ylabel="energy (J)", title="Cumulative energy")
        ax_e.set_ylim(bottom=0)
        ax_c.set_ylim(bottom=0)
        _integer_epochs(ax_e, ax_c)
        _legend(ax_c)
    return render_figure(fig, "energy_per_epoch", "Energy per epoch", provenance_line(run))


def power_trace(run: Run) -> FigureData | None:
    """Power per component over time for repeat 0 of each arm, with the recorded phases shaded."""
    trace = run.trace
    if trace is None or trace.empty:
        return None
    arms = [a for a in run.arms if (trace["arm"] == a).any()][:MAX_TRACE_ARMS]
    phases = [p for p in dict.fromkeys(trace["phase"]) if p]
    phase_col = {p: PHASE_COLOURS[i % len(PHASE_COLOURS)] for i, p in enumerate(phases)}
    components = list(dict.fromkeys(trace["component"]))
    comp_col = {c: PHASE_COLOURS[i % len(PHASE_COLOURS)] for i, c in enumerate(components)}
    legend: dict[str, object] = {}
    with matplotlib.rc_context(_RC):
        fig, axes = new_figure(1.7 * len(arms) + 0.6, nrows=len(arms), sharex=True)
        for ax, name in zip(axes, arms):
            df = trace[trace["arm"] == name]
            df = df[df["repeat"] == df["repeat"].iloc[0]].sort_values("t_s", kind="stable")
            for comp, part in df.groupby("component", sort=False):
                label = f"{comp} ({part['source'].iloc[0]})"
                (line,) = ax.plot(part["t_s"], part["power_w"], lw=0.9, color=comp_col[comp])
                legend.setdefault(label, line)
            _shade_phases(ax, df.drop_duplicates("t_s"), phase_col)
            ax.set_ylabel("power (W)")
            ax.set_title(f"{name}", loc="left", fontsize=9)
            ax.set_ylim(bottom=0)
        axes[-1].set_xlabel("time since the arm started (s)")
        for phase, colour in phase_col.items():
            legend[f"phase: {phase}"] = Patch(color=colour, alpha=0.25)
        if legend:
            fig.legend(list(legend.values()), list(legend), loc="outside upper center", ncols=min(4, len(legend)))
    shown = "" if len(arms) == len([a for a in run.arms if (trace["arm"] == a).any()]) else (
        f" First {MAX_TRACE_ARMS} arms shown."
    )
    caption = f"From power_trace.csv, first repeat of each arm.{shown} {provenance_line(run)}"
    return render_figure(fig, "power_trace", "Power trace", caption, fmt="png")


def _shade_phases(ax, df, phase_col: dict[str, str]) -> None:
    """Shade contiguous runs of one phase; each span runs from its first sample to the next span's."""
    if df.empty:
        return
    t = df["t_s"].to_numpy()
    ph = df["phase"].to_numpy()
    start = 0
    for i in range(1, len(t) + 1):
        if i == len(t) or ph[i] != ph[start]:
            end_t = t[i] if i < len(t) else t[-1]
            if ph[start] in phase_col:
                ax.axvspan(t[start], end_t, color=phase_col[ph[start]], alpha=0.18, lw=0)
            start = i


def flops_per_arm(run: Run) -> FigureData:
    """Forward and backward FLOPs (whole run) per arm; conv backward hatched inside backward."""
    with matplotlib.rc_context(_RC):
        names = list(run.arms)
        fig, (ax,) = new_figure(0.45 * len(names) + 1.3)
        y = list(range(len(names)))
        fwd = [run.arms[n].flops_forward for n in names]
        bwd = [run.arms[n].flops_backward for n in names]
        conv = [run.arms[n].flops_backward_conv for n in names]
        ax.barh(y, fwd, color="#8da0cb", label="forward")
        ax.barh(y, bwd, left=fwd, color="#fc8d62", label="backward")
        ax.barh(y, conv, left=fwd, color="none", edgecolor="#7a3b1e", hatch="///", lw=0, label="of which conv backward")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set(xlabel="FLOPs (whole run, training steps)", title="Counted FLOPs per arm")
        ax.legend(loc="lower right")
    return render_figure(fig, "flops", "FLOPs per arm", "Counted at dispatch (summary.json, flops_* fields).")


# ------------------------------------------------------------------------------------------ sweep figures


def _groups(run: Run, comps: list[ArmComparison]) -> dict[str, list[ArmComparison]]:
    """Sparse arms grouped by (schedule, dropout), so each group is one line against drop rate."""
    groups: dict[str, list[ArmComparison]] = {}
    for c in comps:
        arm = run.arms[c.arm]
        label = arm.schedule + (f", dropout {arm.dropout:g}" if arm.dropout else "")
        groups.setdefault(label, []).append(c)
    for label in groups:
        groups[label].sort(key=lambda c: run.arms[c.arm].drop_rate)
    return groups


def sweep_figures(run: Run, comps: list[ArmComparison]) -> list[FigureData]:
    """Drop rate vs energy, CO2 and accuracy, and the energy-accuracy Pareto front (>= 2 sparse arms)."""
    if len(comps) < 2 or run.baseline is None:
        return []
    base = run.baseline
    groups = _groups(run, comps)
    out = []
    quality = base.quality_metric if run.is_generation else None
    panels = [
        ("energy_j", "training energy (J)", 1.0, "energy"),
        ("co2_g", "CO2 (g CO2e)", 1.0, "co2"),
        (quality, f"{quality} (lower is better)", 1.0, "quality") if quality
        else ("test_accuracy", "test accuracy (%)", 100.0, "accuracy"),
    ]
    with matplotlib.rc_context(_RC):
        fig, axes = new_figure(2.8, ncols=3)
        for ax, (metric, label, scale, key) in zip(axes, panels):
            ax.axhline(scale * getattr(base, metric), color="#222222", ls="--", lw=1, label=f"{run.baseline_name}")
            for glabel, cs in groups.items():
                x = [run.arms[c.arm].drop_rate for c in cs]
                y = [scale * getattr(run.arms[c.arm], metric) for c in cs]
                err = _yerr(cs, key, scale)
                ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=glabel)
            ax.set(xlabel="drop rate", ylabel=label)
            if metric != "test_accuracy":
                ax.set_ylim(bottom=0)
        axes[0].set_title("Energy")
        axes[1].set_title("CO2")
        axes[2].set_title("Sample quality" if quality else "Test accuracy")
        _legend(axes[2])
    out.append(
        render_figure(
            fig,
            "sweep_drop_rate",
            "Drop rate vs energy, CO2 and accuracy",
            "Dashed: the dense baseline. Error bars: the paired confidence interval where repeats exist. "
            + provenance_line(run),
        )
    )
    if not quality:  # the energy-accuracy front; a generation sweep's quality is in the panel above
        out.append(pareto(run))
    return out


def _yerr(cs: list[ArmComparison], key: str, scale: float):
    """Asymmetric error bars from the paired intervals (in the metric's unit), or None without them."""
    lows, highs = [], []
    for c in cs:
        if key == "quality":
            q = c.quality
            if q is None or q.ci is None:
                return None
            lows.append(scale * (q.diff - q.ci[0]))
            highs.append(scale * (q.ci[1] - q.diff))
        elif key == "accuracy":
            ci = c.accuracy.ci
            if ci is None:
                return None
            lows.append(scale * (c.accuracy.diff - ci[0]))
            highs.append(scale * (ci[1] - c.accuracy.diff))
        else:
            s = c.energy if key == "energy" else c.co2
            if s.ci_frac is None:
                return None
            # Saving interval (fraction of baseline) -> interval of the sparse arm's value.
            lows.append(scale * s.baseline * (s.ci_frac[1] - s.saved_frac))
            highs.append(scale * s.baseline * (s.saved_frac - s.ci_frac[0]))
    return [[max(0.0, v) for v in lows], [max(0.0, v) for v in highs]]


def pareto(run: Run) -> FigureData:
    """Energy vs test accuracy for every arm, with the Pareto front (less energy, more accuracy) joined."""
    points = [
        (name, arm.energy_j, arm.test_accuracy)
        for name, arm in run.arms.items()
        if math.isfinite(arm.test_accuracy)
    ]
    front = pareto_front(points)
    with matplotlib.rc_context(_RC):
        fig, (ax,) = new_figure(3.2)
        colours = _colours(run)
        for name, e, a in points:
            on = name in front
            ax.scatter(e, 100 * a, color=colours[name], s=40 if on else 22, zorder=3, edgecolor="black" if on else "none")
            ax.annotate(name, (e, 100 * a), xytext=(4, 4), textcoords="offset points", fontsize=7)
        pts = {n: (e, a) for n, e, a in points}
        ax.plot([pts[n][0] for n in front], [100 * pts[n][1] for n in front], color="#c44e52", lw=1.2,
                drawstyle="steps-post", label="Pareto front")
        ax.set(xlabel="training energy (J)", ylabel="test accuracy (%)", title="Energy vs accuracy")
        _legend(ax)
    caption = f"Pareto front (no arm uses less energy with higher accuracy): {', '.join(front)}. " + provenance_line(run)
    return render_figure(fig, "pareto", "Energy-accuracy Pareto front", caption)


def slice_times(run: Run) -> FigureData | None:
    """Training time per batch of every slice of the first (seed, repeat), both arms over the run's clock,
    with the slices that saw foreign load shaded: where the headline's clean pairs come from. None for a
    run without slice records (or with one slice per epoch only, when the epoch figures say it all)."""
    df = run.slices
    if df is None or df.empty or run.summary.interleave != "slice":
        return None
    seed, repeat = min(zip(df["seed"], df["repeat"]))
    first = df[(df["seed"] == seed) & (df["repeat"] == repeat)]
    with matplotlib.rc_context(_RC):
        fig, (ax,) = new_figure(2.6)
        colours = _colours(run)
        busy = first[(first["foreign_cpu_cores_mean"].fillna(0) >= SLICE_CLEAN_MEAN_CORES)
                     | (first["foreign_cpu_cores_max"].fillna(0) >= SLICE_CLEAN_PEAK_CORES)
                     | (first["gpu_foreign_processes_max"].fillna(0) > 0)]
        for _, row in busy.iterrows():
            ax.axvspan(row["t_start_s"], row["t_start_s"] + row["wall_s"], color="#c44e52", alpha=0.18, lw=0)
        for name in run.arms:
            part = first[first["arm"] == name].sort_values("t_start_s")
            if part.empty:
                continue
            per_batch_ms = 1e3 * part["wall_s"] / part["batches"].clip(lower=1)
            ax.plot(part["t_start_s"], per_batch_ms, marker="o", ms=2.5, lw=0.8, color=colours.get(name), label=name)
        handles = ax.get_legend_handles_labels()[0]
        if not busy.empty:
            handles.append(Patch(color="#c44e52", alpha=0.18, label="foreign load (slice not clean)"))
        if handles:
            ax.legend(handles=handles, loc="best")
        ax.set_xlabel("time since the meter started (s)")
        ax.set_ylabel("ms per batch")
        ax.set_ylim(bottom=0)
    caption = ("Each point is one slice (consecutive batches of one arm); the arms took turns slice by slice. "
               "Shaded: slices in which other work loaded the machine; the headline uses only pairs of adjacent "
               "slices with no shading. First run (seed, repeat) shown.")
    return render_figure(fig, "slices", "Time per batch, slice by slice", caption)


def run_figures(run: Run, comps: list[ArmComparison]) -> list[FigureData]:
    """Every figure for one run, in reading order (none when no arm was recorded)."""
    if not run.arms:
        return []
    figs = [accuracy_loss(run), drop_rate(run), energy_per_epoch(run)]
    slices = slice_times(run)
    if slices is not None:
        figs.append(slices)
    trace = power_trace(run)
    if trace is not None:
        figs.append(trace)
    figs.append(flops_per_arm(run))
    figs.extend(sweep_figures(run, comps))
    return figs
