"""The self-contained HTML report: inline CSS, figures as ``data:`` URIs, no script, no external request.

A Content-Security-Policy meta tag forbids every network load, so a report that tried to reach a CDN
would show it as a console error instead of silently working online only. Headline values carry
``data-metric``/``data-value`` attributes with the full-precision number, so tests (and scripts) can
check what the page says against the record.
"""

from __future__ import annotations

import base64
import html
import math
from importlib import resources
from typing import Any, Callable, Iterable

import pandas as pd

from ssprop_energy import __version__
from ssprop_energy.records import CONFIG_FILE, EPOCHS_FILE, LAYERS_FILE, SUMMARY_FILE, TRACE_FILE
from ssprop_energy.report import distributed as report_distributed
from ssprop_energy.report import text as report_text
from ssprop_energy.report.figures import FigureData, run_figures
from ssprop_energy.report.load import Run, arm_table, repeat_count
from ssprop_energy.report.savings import ArmComparison, Saving, comparisons, estimated_fraction, pareto_front

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
PAPER = {
    "setting": "drop 0.8 on alternate epochs (average drop 0.4)",
    "conv_backward_frac": 0.40,
    "whole_step_frac": 0.27,
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _css() -> str:
    return resources.files("ssprop_energy.report").joinpath("style.css").read_text(encoding="utf-8")


def _attr_num(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


# ------------------------------------------------------------------------------------------ headline


def _card(label: str, value: str, detail: str, cls: str, metric: str, number: float,
          ci: tuple[float, float] | None, arm: str) -> str:
    ci_attrs = f' data-ci-low="{_attr_num(ci[0])}" data-ci-high="{_attr_num(ci[1])}"' if ci else ""
    return (
        f'<div class="card"><div class="label">{_e(label)}</div>'
        f'<div class="value {cls}" data-metric="{metric}" data-arm="{_e(arm)}" data-value="{_attr_num(number)}"'
        f"{ci_attrs}>{_e(value)}</div><div class=\"detail\">{detail}</div></div>"
    )


def _saving_class(s: Saving) -> str:
    if s.inconclusive:
        return "noise"
    if not math.isfinite(s.saved_frac) or s.ci_frac is None:
        return ""
    if s.ci_spans_zero:
        return "noise"
    return "good" if s.saved_frac > 0 else "bad"


def _ci_detail(s: Saving) -> str:
    if s.headline is not None:
        return report_text.headline_detail(s)
    if s.ci_frac is not None:
        note = " (includes 0: noise)" if s.ci_spans_zero else ""
        return f"{report_text.fmt_ci_pct(s.ci_frac, s.ci_level)}{note}, {s.n_pairs} pairs"
    if s.source == "counted":
        return "counted, exact"
    return "single pair: no interval"


def _saving_card(label: str, s: Saving, fmt: Callable[[float], str], metric: str, arm: str,
                 extra: str = "") -> str:
    totals = "raw totals " if s.headline is not None else ""
    detail = f"{totals}{_e(fmt(s.baseline))} &rarr; {_e(fmt(s.value))}<br>{_e(_ci_detail(s))}"
    if s.source not in ("counted", "measured"):
        detail += f"<br>source: <b>{_e(s.source)}</b>"
    detail += extra
    value = "inconclusive" if s.inconclusive else report_text.less_or_more(s.saved_frac)
    verdict = f' data-verdict-{metric.removesuffix("_saved_frac")}="{_e(s.headline.verdict)}"' if s.headline else ""
    return _card(label, value, detail, _saving_class(s), metric, s.saved_frac, s.ci_frac, arm).replace(
        '<div class="card">', f'<div class="card"{verdict}>', 1)


def _accuracy_card(c: ArmComparison) -> str:
    a = c.accuracy
    if a.ci is None:
        cls, ci_text = "", "single pair: no interval" if a.n_pairs < 2 else "no interval recorded"
    elif a.ci[0] == a.ci[1]:
        cls, ci_text = "", f"identical in all {a.n_pairs} pairs (one seed): no interval"
    else:
        cls = "noise" if a.ci_spans_zero else ("good" if a.diff > 0 else "bad")
        ci_text = f"{report_text.fmt_ci_pp(a.ci, a.ci_level, 2)}{' (includes 0: noise)' if a.ci_spans_zero else ''}, {a.n_pairs} pairs"
    detail = f"{_e(report_text.fmt_pct(a.baseline, 2))} &rarr; {_e(report_text.fmt_pct(a.value, 2))}<br>{_e(ci_text)}"
    return _card("Test accuracy difference", report_text.fmt_pp(a.diff, 2), detail, cls, "accuracy_diff", a.diff, a.ci, c.arm)


def _quality_card(c: ArmComparison) -> str:
    """A generation arm's Frechet distance against the baseline's (lower is better), with its extractor."""
    q = c.quality
    assert q is not None
    if q.ci is None:
        cls, ci_text = "", "single pair: no interval" if q.n_pairs < 2 else "no interval recorded"
    elif q.ci[0] == q.ci[1]:
        cls, ci_text = "", f"identical in all {q.n_pairs} pairs (one seed): no interval"
    else:
        cls = "noise" if q.ci_spans_zero else ("good" if q.diff < 0 else "bad")
        ci_text = (f"{q.ci_level:.0%} CI of the difference [{report_text.fmt_number(q.ci[0])}, {report_text.fmt_number(q.ci[1])}]"
                   f"{' (includes 0: noise)' if q.ci_spans_zero else ''}, {q.n_pairs} pairs")
    rel = f" ({report_text.fmt_pct(q.rel_change)})" if math.isfinite(q.rel_change) else ""
    detail = (f"{_e(f'{q.baseline:.4g}')} &rarr; {_e(f'{q.value:.4g}')} (lower is better)<br>{_e(ci_text)}<br>"
              f"extractor: <b>{_e(q.extractor)}</b>, {_e(q.n_generated)} samples")
    return _card(f"Sample quality: {q.metric} difference", f"{q.diff:+.4g}{rel}", detail, cls, "quality_diff",
                 q.diff, q.ci, c.arm)


def _measured_extra(run: Run, c: ArmComparison, metric: str | None) -> str:
    """What sits beside a measured (time, energy) figure: the single-run interval and the busy-machine badge."""
    out = ""
    arm = run.arms.get(c.arm)
    # a clean-pair headline carries its own interval: the epoch interval beside it would be a second one
    if metric is not None and arm is not None and metric not in arm.headline:
        text = report_text.epoch_interval_text(arm, metric)
        if text:
            out += f'<br><span class="within-run" data-interval="{metric}">{_e(text)}</span>'
    epochs = ", ".join(report_text.affected_epochs(run, [n for n in (run.baseline_name, c.arm) if n]))
    if epochs:
        out += (f'<br><span class="badge interference" data-interference="{_e(epochs)}" title="other processes used '
                f'CPU (or the GPU) during these epochs; see the warning above">busy machine: {_e(epochs)}</span>')
    return out


def _cards(c: ArmComparison, run: Run) -> str:
    flops = lambda v: report_text.fmt_si(v, "FLOP")  # noqa: E731 - a formatter, named for reading
    return '<div class="cards">' + "".join([
        _saving_card("Energy saved", c.energy, report_text.fmt_energy, "energy_saved_frac", c.arm,
                     _measured_extra(run, c, "energy_j")),
        _saving_card("CO2 saved", c.co2, report_text.fmt_co2, "co2_saved_frac", c.arm, _measured_extra(run, c, None)),
        _saving_card("Time saved", c.time, report_text.fmt_seconds, "time_saved_frac", c.arm,
                     _measured_extra(run, c, "wall_s")),
        _saving_card("Backward FLOPs saved", c.flops_backward, flops, "flops_backward_saved_frac", c.arm),
        _quality_card(c) if c.quality is not None else _accuracy_card(c),
    ]) + "</div>"


def _cell(text: str, metric: str, arm: str, number: float, cls: str = "") -> str:
    return (f'<td class="{cls}" data-metric="{metric}" data-arm="{_e(arm)}" '
            f'data-value="{_attr_num(number)}">{_e(text)}</td>')


def _with_ci(s: Saving) -> str:
    if s.inconclusive:
        return "inconclusive"
    text = report_text.less_or_more(s.saved_frac)
    if s.ci_frac is not None:
        text += f" [{report_text.fmt_pct(s.ci_frac[0])}, {report_text.fmt_pct(s.ci_frac[1])}]"
    return text


def _sweep_table(run: Run, comps: list[ArmComparison]) -> str:
    quality = next((c.quality.metric for c in comps if c.quality is not None), None)
    last = f"{quality} difference (lower = better)" if quality else "test accuracy"
    head = ("<tr><th>arm</th><th>drop rate</th><th>avg drop</th><th>energy</th><th>CO2</th><th>time</th>"
            f"<th>backward FLOPs</th><th>{_e(last)}</th></tr>")
    rows = []
    for c in comps:
        arm = run.arms[c.arm]
        acc = report_text.fmt_pp(c.accuracy.diff, 2)
        if c.accuracy.ci is not None:
            acc += f" [{report_text.fmt_pp(c.accuracy.ci[0], 2)}, {report_text.fmt_pp(c.accuracy.ci[1], 2)}]"
        metric, number = "accuracy_diff", c.accuracy.diff
        if c.quality is not None:
            q = c.quality
            acc = f"{q.diff:+.4g}" + (f" [{q.ci[0]:+.4g}, {q.ci[1]:+.4g}]" if q.ci is not None else "")
            metric, number = "quality_diff", q.diff
        rows.append(
            f'<tr><td class="name">{_e(c.arm)}</td><td>{arm.drop_rate:g} ({_e(arm.schedule)})</td><td>{c.average_drop_rate:.2f}</td>'
            + _cell(_with_ci(c.energy), "energy_saved_frac", c.arm, c.energy.saved_frac, _saving_class(c.energy))
            + _cell(_with_ci(c.co2), "co2_saved_frac", c.arm, c.co2.saved_frac, _saving_class(c.co2))
            + _cell(_with_ci(c.time), "time_saved_frac", c.arm, c.time.saved_frac, _saving_class(c.time))
            + _cell(report_text.less_or_more(c.flops_backward.saved_frac), "flops_backward_saved_frac", c.arm,
                    c.flops_backward.saved_frac)
            + _cell(acc, metric, c.arm, number)
            + "</tr>"
        )
    ci_note = ""
    if any(c.energy.ci_frac for c in comps):
        ci_note = f" Brackets: {comps[0].energy.ci_level:.0%} paired confidence interval."
    return (f'<p class="sub">Savings against {_e(run.baseline_name)} (less = saved; accuracy in percentage '
            f"points).{ci_note}</p><table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>")


def _headline(run: Run, comps: list[ArmComparison]) -> str:
    if not comps:
        return ('<p class="note">No comparison: the run has no baseline arm '
                f"({_e(run.summary.baseline)!s}) or no sparse arm.</p>")
    est = estimated_fraction(run.arms)
    if len(comps) == 1:
        c = comps[0]
        return (_cards(c, run) + f'<p class="verdict" data-verdict="{_e(c.arm)}">{_e(report_text.verdict(c, est))}</p>'
                + _few_pairs(comps))
    verdicts = "".join(
        f'<li data-verdict="{_e(c.arm)}">{_e(report_text.verdict(c, est))}</li>' for c in comps
    )
    if run.is_generation:
        # lower Frechet distance is better: negated, it ranks like an accuracy
        points = [(n, a.energy_j, -a.quality_value) for n, a in run.arms.items() if a.quality_value is not None]
        words = "Energy-quality Pareto front (no other arm has less energy and a lower Frechet distance)"
    else:
        points = [(n, a.energy_j, a.test_accuracy) for n, a in run.arms.items() if math.isfinite(a.test_accuracy)]
        words = "Energy-accuracy Pareto front (no other arm has less energy and higher accuracy)"
    front = pareto_front(points)
    return (
        _sweep_table(run, comps)
        + f'<p class="verdict">{words}: '
        f"<b>{_e(', '.join(front))}</b>.</p><ul class=\"verdicts\">{verdicts}</ul>" + _few_pairs(comps)
    )


def _few_pairs(comps: list[ArmComparison]) -> str:
    note = report_text.few_pairs_note(comps)
    return f'<p class="note">{_e(note)}</p>' if note else ""


# ------------------------------------------------------------------------------------------ paper claim


def _paper_table(run: Run, comps: list[ArmComparison]) -> str:
    head = ("<tr><th>setting</th><th>average drop</th><th>conv-backward FLOPs saved</th>"
            "<th>whole-step FLOPs saved</th><th>wall time saved</th><th>energy saved</th></tr>")
    rows = [
        f'<tr class="paper"><td>Paper headline: {_e(PAPER["setting"])}</td><td>0.40</td>'
        f'<td>~{PAPER["conv_backward_frac"]:.0%} (FLOP model)</td><td>~{PAPER["whole_step_frac"]:.0%} (FLOP model)</td>'
        "<td>not reported</td><td>not reported</td></tr>"
    ]
    for c in comps:
        rows.append(
            f'<tr class="paper"><td>Paper\'s FLOP model for {_e(c.arm)}</td><td>{c.average_drop_rate:.2f}</td>'
            f"<td>{report_text.fmt_pct(c.paper_conv_backward_frac)}</td><td>{report_text.fmt_pct(c.paper_whole_step_frac)}</td>"
            "<td>&ndash;</td><td>&ndash;</td></tr>"
        )
        rows.append(
            f"<tr><td><b>This run: {_e(c.arm)}</b></td><td>{c.average_drop_rate:.2f}</td>"
            + _cell(report_text.fmt_pct(c.flops_backward_conv.saved_frac) + " (counted)", "conv_backward_saved_frac", c.arm,
                    c.flops_backward_conv.saved_frac)
            + _cell(report_text.fmt_pct(c.flops_total.saved_frac) + " (counted)", "whole_step_saved_frac", c.arm,
                    c.flops_total.saved_frac)
            + _cell(_with_ci(c.time) + " (measured)", "time_saved_frac", c.arm, c.time.saved_frac)
            + _cell(f"{_with_ci(c.energy)} ({c.energy.source})", "energy_saved_frac", c.arm, c.energy.saved_frac)
            + "</tr>"
        )
    return (
        '<p class="sub">The paper (arXiv 2408.12561) reports FLOP savings from a model in which conv backward costs '
        "twice the forward and only conv backward is sparsified: conv backward falls by the average drop rate d, "
        "the whole step by 2d/3. It reports no measured time or energy. This run's FLOPs are counted at dispatch "
        "(BatchNorm, activations, the linear head are not sparsified), its time and energy are measured.</p>"
        f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"
    )


# ------------------------------------------------------------------------------------------ tables


def _fmt_float(digits: int) -> Callable[[Any], str]:
    def fmt(v: Any) -> str:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{v:.{digits}g}" if math.isfinite(v) else "n/a"
        return str(v)
    return fmt


def _pct_fmt(v: Any) -> str:
    return report_text.fmt_pct(v, 2) if isinstance(v, float) else str(v)


def _table(df: pd.DataFrame, pct: Iterable[str] = (), scroll: bool = False, digits: int = 4) -> str:
    """An HTML table from a DataFrame: numbers right-aligned with ``digits`` significant digits, text left,
    ``pct`` columns (fractions) as percentages."""
    pct = set(pct)
    fmt = _fmt_float(digits)
    text_cols = {c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])}
    head = "".join(f'<th class="{"text" if c in text_cols else ""}">{_e(c)}</th>' for c in df.columns)
    rows = []
    for values in df.itertuples(index=False, name=None):
        cells = []
        for col, v in zip(df.columns, values):
            shown = _pct_fmt(v) if col in pct else fmt(v)
            cells.append(f'<td class="{"text" if col in text_cols else ""}">{_e(shown)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="{"scroll" if scroll else "wide"}">{table}</div>'


def _arm_summary_table(run: Run) -> str:
    """Fields as rows, arms as columns: a sweep's arms fit side by side and each field reads across."""
    if not run.arms:
        return '<p class="note">No arm recorded.</p>'
    df = arm_table(run).set_index("arm")
    pct = {"test_accuracy", "best_val_accuracy", "sparsified_backward_share",
           *[c for c in df.columns if c.startswith("noise_accuracy_")]}
    fmt = _fmt_float(4)
    cells = {col: [(_pct_fmt(v) if col in pct else fmt(v)) for v in df[col]] for col in df.columns}
    wide = pd.DataFrame(cells, index=list(df.index)).T
    head = '<th class="text">field</th>' + "".join(f"<th>{_e(a)}</th>" for a in wide.columns)
    rows = "".join(
        f'<tr><td class="text">{_e(field)}</td>' + "".join(f"<td>{_e(v)}</td>" for v in vals) + "</tr>"
        for field, vals in wide.iterrows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _epoch_table(run: Run) -> str:
    rows = [{"arm": name, **e.__dict__} for name, arm in run.arms.items() for e in arm.epochs]
    if not rows:
        return '<p class="note">No completed epoch recorded.</p>'
    df = pd.DataFrame(rows)
    reps = run.epochs["repeat"].nunique() if len(run.epochs) else 1
    note = f'<p class="sub">Means over {reps} runs per arm (summary.json); every run is in {EPOCHS_FILE}.</p>' if reps > 1 else ""
    if run.is_generation:  # losses are the noise MSE; there is no accuracy to show
        df = df.drop(columns=["train_accuracy", "val_accuracy"])
    return note + _table(df, pct=["train_accuracy", "val_accuracy"], scroll=len(df) > 14)


def _layer_table(run: Run) -> str:
    if run.layers is None:
        return f'<p class="note">{LAYERS_FILE} is absent: no per-layer FLOPs recorded.</p>'
    lay = run.layers
    base = run.summary.baseline
    wide = lay.pivot_table(index=["layer", "type"], columns="arm", values=["flops_forward", "flops_backward"],
                           aggfunc="sum", sort=False)
    out = pd.DataFrame(index=wide.index)
    arms = [a for a in run.arms if a in set(lay["arm"])]
    if base in arms:
        out[f"forward ({base})"] = wide[("flops_forward", base)]
    for arm in arms:
        out[f"backward ({arm})"] = wide[("flops_backward", arm)]
    if base in arms:
        for arm in arms:
            if arm != base:
                b = wide[("flops_backward", base)]
                out[f"backward saved ({arm})"] = (b - wide[("flops_backward", arm)]) / b.where(b > 0)
    out = out.reset_index()
    pct = [c for c in out.columns if str(c).startswith("backward saved")]
    return (f'<p class="sub">FLOPs as recorded in {LAYERS_FILE}: the harness records one training step per sample '
            "at the arm's nominal drop rate, so &ldquo;backward saved&rdquo; is the saving of a sparse step, not of the "
            "whole schedule. Layers of type SSPropConv2d / SSPropLinear are the ones ssProp replaced.</p>"
            + _table(out, pct=pct, scroll=len(out) > 14))


def _phase_table(run: Run) -> str:
    rows = []
    for name, arm in run.arms.items():
        total = arm.energy_j
        for phase, vals in arm.phases.items():
            e = vals.get("energy_j", math.nan)
            rows.append({"arm": name, "phase": phase, "energy_j": e, "wall_s": vals.get("wall_s", math.nan),
                         "count": vals.get("count", math.nan), "share": e / total if total > 0 else math.nan})
        if arm.phases or arm.unattributed_energy_j:
            rows.append({"arm": name, "phase": "(unattributed)", "energy_j": arm.unattributed_energy_j,
                         "wall_s": math.nan, "count": math.nan,
                         "share": arm.unattributed_energy_j / total if total > 0 else math.nan})
        # evaluation energy is the "eval" window; a record whose phases lack it is shown from eval_energy_j
        if arm.eval_energy_j and "eval" not in arm.phases:
            rows.append({"arm": name, "phase": "evaluation (not in training energy)", "energy_j": arm.eval_energy_j,
                         "wall_s": math.nan, "count": math.nan, "share": math.nan})
    if not rows:
        return '<p class="note">No per-phase energy recorded.</p>'
    return ('<p class="sub">Phases are the meter\'s named windows; share = phase energy / the arm\'s training '
            "energy. <code>train</code> holds each epoch's training (so 100%), with <code>data</code>, "
            "<code>forward</code>, <code>backward</code> and <code>optimizer</code> nested in it and "
            "(unattributed) the rest of it; <code>eval</code> (validation and test) is outside training.</p>"
            + _table(pd.DataFrame(rows), pct=["share"], scroll=len(rows) > 14))


def _distributed_section(run: Run) -> str:
    """Energy per rank and per node, and the communication share (distributed runs only)."""
    if not report_distributed.is_distributed(run.summary):
        return ""
    table = _table(pd.DataFrame(report_distributed.energy_rows(run.summary)), pct=["share"])
    comm = report_distributed.comm_text(run.summary)
    return (f'<h3>Per process and per node</h3><p class="sub">{_e(report_distributed.header_text(run.summary))}</p>{table}'
            + (f'<p class="sub" data-metric="comm_share">{_e(comm)}</p>' if comm else ""))


def _components_table(run: Run) -> str:
    rows = []
    dist = report_distributed.is_distributed(run.summary)
    for name, arm in run.arms.items():
        for c in arm.energy_components:
            agree = (c.sampled_energy_j / c.energy_j - 1.0) if c.sampled_energy_j is not None and c.energy_j > 0 else math.nan
            labels = {"rank": "" if c.rank is None else c.rank, "node": "" if c.node is None else c.node} if dist else {}
            rows.append({"arm": name, "component": c.component, **labels, "device": c.device or "unnamed", "source": c.source,
                         "energy_j": c.energy_j, "sampled_energy_j": c.sampled_energy_j if c.sampled_energy_j is not None else math.nan,
                         "sampled vs counter": agree, "idle_power_w": arm.idle_power_w.get(c.component, math.nan)})
    if not rows:
        return '<p class="note">No energy components recorded.</p>'
    return _table(pd.DataFrame(rows), pct=["sampled vs counter"])


def _kv(data: dict[str, Any]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_plain(v))}</dd>" for k, v in data.items())
    return f'<dl class="kv">{items}</dl>'


def _plain(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_plain(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_plain(x) for x in v)
    return str(v)


# ------------------------------------------------------------------------------------------ generation


def _samples_section(run: Run) -> str:
    """The arms' sample grids side by side (PNG files of the run, embedded), then the quality figure's and the
    sampling windows' provenance."""
    figures = []
    for name, arm in run.arms.items():
        for label, png in run.samples.get(name, {}).items():
            per_run = (arm.quality.get("per_run") or {}).get(label)
            metric = arm.quality_metric or "quality"
            value = f"{metric} {per_run:.4g}" if isinstance(per_run, (int, float)) else ""
            uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            figures.append(
                f'<figure data-samples="{_e(name)}" data-repeat="{_e(label)}"><img src="{uri}" '
                f'alt="samples of {_e(name)} {_e(label)}"><figcaption><b>{_e(name)}</b> ({_e(label)}) {_e(value)}'
                "</figcaption></figure>"
            )
    grids = (f'<div class="samples">{"".join(figures)}</div>' if figures
             else '<p class="note">No sample grid found in the run directory.</p>')
    first = next(iter(run.arms.values()), None)
    q = first.quality if first is not None else {}
    info = q.get("extractor_info") or {}
    sampling = first.sampling if first is not None else {}
    facts: dict[str, Any] = {
        "quality figure": f"{q.get('metric')} (Frechet distance; lower is better)",
        "feature extractor": q.get("extractor"),
        "extractor's own test accuracy": report_text.fmt_pct(info["test_accuracy"], 1) if "test_accuracy" in info else "n/a",
        "generated / real images": f"{q.get('n_generated')} / {q.get('n_real')} (real: the test split)",
        "comparability": q.get("note"),
        "sampler": f"{sampling.get('sampler')}, {sampling.get('timesteps')} steps, noise seed {sampling.get('seed')} "
                   "(identical for every arm)",
        "weights sampled": sampling.get("weights", "n/a"),
    }
    setup = (run.summary.generation or {}).get("extractor_setup")
    if setup:
        facts["extractor setup"] = (f"{report_text.fmt_seconds(setup['wall_s'])}, {report_text.fmt_energy(setup['energy_j'])} "
                                    f"({setup['energy_source']}): {setup['note']}")
    rows = [{"arm": name, str(a.quality_metric or "quality"): a.quality_value if a.quality_value is not None else math.nan,
             "sampling wall_s": a.sample_wall_s if a.sample_wall_s is not None else math.nan,
             "sampling energy_j": a.sample_energy_j if a.sample_energy_j is not None else math.nan,
             "sampling energy source": a.sample_energy_source or "n/a",
             "sampling foreign CPU cores": max(
                 [(r or {}).get("foreign_cpu_cores_mean") or 0.0 for r in (a.sampling.get("interference") or {}).values()
                  if r] or [math.nan]),
             "test noise MSE": a.test_loss}
            for name, a in run.arms.items()]
    return (
        '<p class="sub">Every arm samples the same images from the same noise seed at the end of its run, with '
        "the weights of its best validation epoch. Sampling is metered in its own window: its time and energy are "
        "not in the training figures.</p>"
        + grids + _kv(facts) + _table(pd.DataFrame(rows))
    )


# ------------------------------------------------------------------------------------------ page


def _figure(fig: FigureData) -> str:
    return (
        f'<figure data-figure="{_e(fig.key)}"><img src="{fig.uri}" alt="{_e(fig.title)}" '
        f'width="{fig.width_px}" height="{fig.height_px}">'
        f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)}</figcaption></figure>"
    )


def _provenance(run: Run) -> str:
    ci = report_text.carbon_info(run)
    carbon = {
        "carbon intensity": f"{report_text.fmt_number(ci['g_per_kwh'])} g CO2e/kWh",
        "intensity source": ci["source"] + (f" ({ci['region']})" if ci["region"] else ""),
        "PUE": report_text.fmt_number(ci["pue"]),
        "PUE source": ci["pue_source"],
        "estimated share of energy": report_text.fmt_pct(estimated_fraction(run.arms)),
    }
    files = {
        name: ("present" if name not in run.missing else "absent")
        for name in (SUMMARY_FILE, CONFIG_FILE, EPOCHS_FILE, TRACE_FILE, LAYERS_FILE)
    }
    return (
        f"<h3>Energy components</h3>{_components_table(run)}"
        f"<h3>Carbon</h3>{_kv(carbon)}"
        f"<h3>Environment</h3>{_kv(run.summary.environment)}"
        f"<h3>Configuration</h3>{_kv(run.summary.config or run.config)}"
        f"<h3>Record files</h3>{_kv({'run directory': str(run.path), **files})}"
    )


def _coverage(run: Run) -> str:
    """The layers ssProp replaced and their share of the backward FLOPs, with the share as a data attribute."""
    text = report_text.layer_coverage_text(run)
    if text is None:
        return ""
    shares = {a.layer_coverage.share for a in run.arms.values() if a.layer_coverage is not None}
    attr = f' data-coverage-share="{_attr_num(shares.pop())}"' if len(shares) == 1 else ""
    return f'<p class="sub" data-coverage{attr}>{_e(text)}</p>'


def _run_article(run: Run, idx: int, multi: bool) -> str:
    comps = comparisons(run)
    s = run.summary
    anchor = f"run{idx}"
    tag = "h2" if multi else "h1"
    banners = []
    status = report_text.status_banner(run)
    if status:
        banners.append(f'<div class="banner status" data-status="{_e(s.status)}">{_e(status)}</div>')
    banners += [f'<div class="banner" data-warning="{kind}">{_e(text)}</div>' for kind, text in report_text.run_warnings(run)]
    reps = max((repeat_count(a) for a in run.arms.values()), default=1)
    seeds = len(s.config.get("seeds") or [0])
    runs_per_arm = f"{reps} run{'s' if reps != 1 else ''} per arm" + (f" ({seeds} seeds)" if seeds > 1 else "")
    order = ("arms interleaved epoch by epoch (ABBA)" if s.interleave == "epoch"
             else "arms run one after the other")
    sub = (f"{_e(s.kind)} run, {len(run.arms)} arms, {_e(runs_per_arm)}, {order}, status "
           f"<b>{_e(s.status)}</b>; created {_e(s.created_at)}; {_e(str(run.path))}")
    figs = "".join(_figure(f) for f in run_figures(run, comps)) or '<p class="note">No arm recorded: nothing to plot.</p>'
    sec = lambda name: f"{anchor}-{name}"  # noqa: E731
    h = "h3" if multi else "h2"
    toc = "".join(f'<a href="#{sec(k)}">{t}</a>' for k, t in (
        ("headline", "Headline"), *((("samples", "Samples and quality"),) if run.is_generation else ()),
        ("paper", "Paper vs this run"), ("figures", "Figures"), ("tables", "Tables"),
        ("provenance", "Provenance"), ("statement", "Carbon statement")))
    body = [
        f'<article class="run" id="{anchor}" data-run="{_e(str(run.path))}" data-status="{_e(s.status)}">',
        f"<{tag}>ssProp energy report: {_e(run.title)}</{tag}>",
        f'<p class="sub">{sub}</p>',
        *banners,
        f'<nav class="toc">{toc}</nav>',
        f'<section id="{sec("headline")}"><{h}>Headline</{h}>{_headline(run, comps)}',
        f'<p class="sub">{_e(report_text.provenance_line(run))}</p>{_coverage(run)}</section>',
    ]
    if run.is_generation:
        body.append(f'<section id="{sec("samples")}" data-section="samples"><{h}>Samples and quality</{h}>'
                    f"{_samples_section(run)}</section>")
    if comps:
        body.append(f'<section id="{sec("paper")}"><{h}>The paper\'s claim and this run</{h}>{_paper_table(run, comps)}</section>')
    body += [
        f'<section id="{sec("figures")}"><{h}>Figures</{h}>{figs}</section>',
        f'<section id="{sec("tables")}"><{h}>Tables</{h}>',
        f"<h3>Per arm</h3>{_arm_summary_table(run)}",
        f"<h3>Per epoch</h3>{_epoch_table(run)}",
        f"<h3>Per layer FLOPs</h3>{_layer_table(run)}",
        f"<h3>Per phase energy</h3>{_phase_table(run)}{_distributed_section(run)}</section>",
        f'<section id="{sec("provenance")}"><{h}>Provenance</{h}>{_provenance(run)}</section>',
        f'<section id="{sec("statement")}"><{h}>Carbon statement</{h}>',
        '<p class="sub">A paragraph to paste into a paper\'s compute and carbon statement.</p>',
        f'<blockquote class="statement">{_e(report_text.carbon_statement(run, comps))}</blockquote></section>',
        "</article>",
    ]
    return "\n".join(body)


def _overview(runs: list[Run]) -> str:
    rows = []
    for i, run in enumerate(runs):
        comps = comparisons(run)
        best = max(comps, key=lambda c: c.energy.saved_frac, default=None)
        rows.append(
            f'<tr><td><a href="#run{i}">{_e(run.title)}</a></td><td>{_e(run.summary.kind)}</td>'
            f"<td>{_e(run.summary.status)}</td><td>{len(run.arms)}</td>"
            f"<td>{_e(report_text.less_or_more(best.energy.saved_frac) + ' (' + best.arm + ')') if best else 'n/a'}</td>"
            f"<td>{_e(_effect_text(best)) if best else 'n/a'}</td></tr>"
        )
    return ("<h1>ssProp energy report</h1><p class=\"sub\">" + str(len(runs)) + " runs. Largest energy saving per run "
            "and that arm's accuracy (or sample-quality) difference; details in each run's section.</p>"
            "<table><thead><tr><th>run</th><th>kind</th><th>status</th><th>arms</th><th>largest energy saving</th>"
            f"<th>its accuracy difference</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _effect_text(c: ArmComparison) -> str:
    """Accuracy difference, or a generation arm's Frechet-distance difference (lower is better)."""
    if c.quality is not None:
        return f"{c.quality.metric} {c.quality.diff:+.4g} (lower = better)"
    return report_text.fmt_pp(c.accuracy.diff, 2)


def render_html(runs: list[Run]) -> str:
    """The complete HTML document for one or more loaded runs."""
    multi = len(runs) > 1
    title = "ssProp energy report" + ("" if multi else f": {runs[0].title}")
    articles = "\n".join(_run_article(r, i, multi) for i, r in enumerate(runs))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_css()}</style></head><body>\n"
        + (_overview(runs) if multi else "")
        + articles
        + f'\n<footer>Generated by ssprop-energy {_e(__version__)} from run records only. ssProp: Zhong, Huang, Shi, '
        "arXiv 2408.12561.</footer></body></html>\n"
    )
