"""The report as Markdown: the same numbers and words as the HTML, without figures, for notes and PRs."""

from __future__ import annotations

import math
from typing import Any, Sequence

from ssprop_energy.report import distributed as report_distributed
from ssprop_energy.report import text as report_text
from ssprop_energy.report.load import Run, repeat_count
from ssprop_energy.report.savings import ArmComparison, Saving, comparisons, estimated_fraction, pareto_front

PAPER_SETTING = "drop 0.8 on alternate epochs (average drop 0.4)"


def _md_escape(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _saving_text(s: Saving) -> str:
    if s.inconclusive:
        return "inconclusive"
    text = report_text.less_or_more(s.saved_frac)
    if s.ci_frac is not None:
        text += f" ({report_text.fmt_ci_pct(s.ci_frac, s.ci_level)}{', includes 0: noise' if s.ci_spans_zero else ''})"
    return text


def _bracketed(s: Saving) -> str:
    if s.inconclusive:
        return "inconclusive"
    text = report_text.less_or_more(s.saved_frac)
    if s.ci_frac is not None:
        text += f" [{report_text.fmt_pct(s.ci_frac[0])}, {report_text.fmt_pct(s.ci_frac[1])}]"
    return text


def _acc_text(c: ArmComparison) -> str:
    if c.quality is not None:  # generation: the Frechet-distance difference (lower is better)
        q = c.quality
        text = f"{q.metric} {q.diff:+.4g}"
        if q.ci is not None:
            text += f" ({q.ci_level:.0%} CI {q.ci[0]:+.4g} to {q.ci[1]:+.4g}{', includes 0: noise' if q.ci_spans_zero else ''})"
        return text
    a = c.accuracy
    text = report_text.fmt_pp(a.diff, 2)
    if a.ci is not None:
        text += f" ({report_text.fmt_ci_pp(a.ci, a.ci_level, 2)}{', includes 0: noise' if a.ci_spans_zero else ''})"
    return text


def _headline(run: Run, comps: list[ArmComparison]) -> list[str]:
    if not comps:
        return [f"No comparison: the run has no baseline arm ({run.summary.baseline}) or no sparse arm."]
    est = estimated_fraction(run.arms)
    out = []
    if len(comps) == 1:
        c = comps[0]
        rows = [
            ["Energy saved", _saving_text(c.energy), f"{report_text.fmt_energy(c.energy.baseline)} -> {report_text.fmt_energy(c.energy.value)}", c.energy.source],
            ["CO2 saved", _saving_text(c.co2), f"{report_text.fmt_co2(c.co2.baseline)} -> {report_text.fmt_co2(c.co2.value)}", c.co2.source],
            ["Time saved", _saving_text(c.time), f"{report_text.fmt_seconds(c.time.baseline)} -> {report_text.fmt_seconds(c.time.value)}", "measured"],
            ["Backward FLOPs saved", _saving_text(c.flops_backward),
             f"{report_text.fmt_si(c.flops_backward.baseline, 'FLOP')} -> {report_text.fmt_si(c.flops_backward.value, 'FLOP')}", "counted"],
            ["Test accuracy difference", _acc_text(c),
             f"{report_text.fmt_pct(c.accuracy.baseline, 2)} -> {report_text.fmt_pct(c.accuracy.value, 2)}", "measured"]
            if c.quality is None else
            [f"Sample quality ({c.quality.metric}, lower is better)", _acc_text(c),
             f"{c.quality.baseline:.4g} -> {c.quality.value:.4g}",
             f"{c.quality.extractor} features, {c.quality.n_generated} samples"],
        ]
        out.append(md_table(["", f"{c.arm} vs {c.baseline_arm}", "values", "source"], rows))
        out.append(f"**Verdict.** {report_text.verdict(c, est)}")
        return out + _few_pairs(comps)
    rows = []
    for c in comps:
        arm = run.arms[c.arm]
        rows.append([c.arm, f"{arm.drop_rate:g} ({arm.schedule})", f"{c.average_drop_rate:.2f}", _saving_text(c.energy),
                     _saving_text(c.co2), _saving_text(c.time), report_text.less_or_more(c.flops_backward.saved_frac), _acc_text(c)])
    last = "quality (lower = better)" if run.is_generation else "test accuracy"
    out.append(md_table(["arm", "drop rate", "avg drop", "energy", "CO2", "time", "backward FLOPs", last], rows))
    if run.is_generation:
        points = [(n, a.energy_j, -a.quality_value) for n, a in run.arms.items() if a.quality_value is not None]
        out.append(f"Energy-quality Pareto front (less energy, lower Frechet distance): **{', '.join(pareto_front(points))}**.")
    else:
        points = [(n, a.energy_j, a.test_accuracy) for n, a in run.arms.items() if math.isfinite(a.test_accuracy)]
        out.append(f"Energy-accuracy Pareto front: **{', '.join(pareto_front(points))}**.")
    out.append("\n".join(f"- {report_text.verdict(c, est)}" for c in comps))
    return out + _few_pairs(comps)


def _few_pairs(comps: list[ArmComparison]) -> list[str]:
    note = report_text.few_pairs_note(comps)
    return [f"_{note}_"] if note else []


def _paper(comps: list[ArmComparison]) -> str:
    rows: list[list[Any]] = [[f"Paper headline: {PAPER_SETTING}", "0.40", "~40% (FLOP model)", "~27% (FLOP model)",
                              "not reported", "not reported"]]
    for c in comps:
        rows.append([f"Paper's FLOP model for {c.arm}", f"{c.average_drop_rate:.2f}", report_text.fmt_pct(c.paper_conv_backward_frac),
                     report_text.fmt_pct(c.paper_whole_step_frac), "-", "-"])
        rows.append([f"**This run: {c.arm}**", f"{c.average_drop_rate:.2f}",
                     report_text.fmt_pct(c.flops_backward_conv.saved_frac) + " (counted)",
                     report_text.fmt_pct(c.flops_total.saved_frac) + " (counted)", _bracketed(c.time) + " (measured)",
                     f"{_bracketed(c.energy)} ({c.energy.source})"])
    return md_table(["setting", "average drop", "conv-backward FLOPs saved", "whole-step FLOPs saved",
                     "wall time saved", "energy saved"], rows)


def _arms(run: Run) -> str:
    if not run.arms:
        return "No arm recorded."
    rows = []
    for name, a in run.arms.items():
        quality = report_text.fmt_pct(a.test_accuracy, 2) if a.quality_value is None else f"{a.quality_metric} {a.quality_value:.4g}"
        rows.append([name, f"{a.drop_rate:g}", a.schedule, f"{a.average_drop_rate:.2f}", quality,
                     report_text.fmt_seconds(a.wall_s), report_text.fmt_si(a.flops_forward, "FLOP"), report_text.fmt_si(a.flops_backward, "FLOP"),
                     report_text.fmt_energy(a.energy_j), a.energy_source, report_text.fmt_co2(a.co2_g), repeat_count(a), a.status])
    return md_table(["arm", "drop rate", "schedule", "avg drop", "test acc / quality", "wall", "fwd FLOPs", "bwd FLOPs", "energy",
                     "source", "CO2", "repeats", "status"], rows)


def _samples(run: Run) -> str:
    """A generation run: the grid files (relative links, next to the records), the quality figure's provenance
    and the sampling windows' time and energy."""
    lines = []
    for name, a in run.arms.items():
        for label, file in (a.sampling.get("grid_files") or {}).items():
            lines.append(f"![{name} {label}]({file})")
    first = next(iter(run.arms.values()), None)
    q = first.quality if first is not None else {}
    acc = (q.get("extractor_info") or {}).get("test_accuracy")
    lines.append(
        f"Quality figure: {q.get('metric')} (Frechet distance, lower is better) of {q.get('n_generated')} samples "
        f"against {q.get('n_real')} test images, in the features of {q.get('extractor')}"
        + (f" (its own test accuracy {report_text.fmt_pct(acc, 1)})" if acc is not None else "") + f". {q.get('note', '')}."
    )
    rows = [[name, f"{a.quality_value:.4g}" if a.quality_value is not None else "n/a",
             report_text.fmt_seconds(a.sample_wall_s) if a.sample_wall_s is not None else "n/a",
             report_text.fmt_energy(a.sample_energy_j) if a.sample_energy_j is not None else "n/a",
             a.sample_energy_source or "n/a"] for name, a in run.arms.items()]
    lines.append(md_table(["arm", str(q.get("metric")), "sampling time", "sampling energy", "source"], rows))
    lines.append("Sampling is metered in its own window: its time and energy are not in the training figures.")
    return "\n\n".join(lines)


def _components(run: Run) -> str:
    if report_distributed.is_distributed(run.summary):
        rows = [[name, c.component, "" if c.rank is None else c.rank, "" if c.node is None else c.node,
                 c.device or "unnamed", c.source, report_text.fmt_energy(c.energy_j)]
                for name, a in run.arms.items() for c in a.energy_components]
        return md_table(["arm", "component", "rank", "node", "device", "source", "energy"], rows)
    rows = [[name, c.component, c.device or "unnamed", c.source, report_text.fmt_energy(c.energy_j)]
            for name, a in run.arms.items() for c in a.energy_components]
    if not rows:
        return "No energy components recorded."
    return md_table(["arm", "component", "device", "source", "energy"], rows)


def _distributed(run: Run) -> list[str]:
    """The per-rank / per-node energy table and the communication share (distributed runs only)."""
    if not report_distributed.is_distributed(run.summary):
        return []
    rows = [[r["arm"], r["scope"], r["host"], report_text.fmt_energy(r["energy_j"]), r["source"], report_text.fmt_pct(r["share"])]
            for r in report_distributed.energy_rows(run.summary)]
    parts = [report_distributed.header_text(run.summary), md_table(["arm", "scope", "host", "energy", "source", "share of arm"], rows)]
    comm = report_distributed.comm_text(run.summary)
    return parts + ([comm] if comm else [])


def _phases(run: Run) -> str:
    rows = []
    for name, a in run.arms.items():
        for phase, vals in a.phases.items():
            e = vals.get("energy_j", math.nan)
            rows.append([name, phase, report_text.fmt_energy(e), report_text.fmt_pct(e / a.energy_j if a.energy_j > 0 else math.nan)])
    if not rows:
        return "No per-phase energy recorded."
    return md_table(["arm", "phase", "energy", "share of training energy"], rows)


def _run_md(run: Run, multi: bool) -> str:
    comps = comparisons(run)
    s = run.summary
    h, h2 = ("##", "###") if multi else ("#", "##")
    reps = max((repeat_count(a) for a in run.arms.values()), default=1)
    parts = [f"{h} ssProp energy report: {run.title}",
             f"{s.kind} run, {len(run.arms)} arms, {reps} repeat{'s' if reps != 1 else ''}, status **{s.status}**; "
             f"created {s.created_at}; `{run.path}`"]
    status = report_text.status_banner(run)
    if status:
        parts.append(f"> **{status}**")
    for kind, text in report_text.run_warnings(run):
        parts.append(f"> **Warning:** {text}" + ("." if kind == "interference" else ""))
    parts += [f"{h2} Headline", *_headline(run, comps), report_text.provenance_line(run)]
    coverage = report_text.layer_coverage_text(run)
    if coverage:
        parts.append(coverage)
    for c in comps:
        arm = run.arms.get(c.arm)
        lines = [report_text.epoch_interval_text(arm, m) for m in ("wall_s", "energy_j")] if arm is not None else []
        for label, line in zip(("Time", "Energy"), lines):
            if line:
                parts.append(f"{label} ({c.arm}): {line}.")
    if run.is_generation:
        parts += [f"{h2} Samples and quality", _samples(run)]
    if comps:
        parts += [f"{h2} The paper's claim and this run", _paper(comps)]
    parts += [
        f"{h2} Per arm", _arms(run),
        f"{h2} Per phase energy", _phases(run),
        *([f"{h2} Per process and per node"] + _distributed(run) if report_distributed.is_distributed(run.summary) else []),
        f"{h2} Provenance", _components(run),
        f"{report_text.intensity_text(run)}; "
        f"estimated share of energy {report_text.fmt_pct(estimated_fraction(run.arms))}.",
        f"{h2} Carbon statement", "> " + report_text.carbon_statement(run, comps),
        "Figures, per-epoch and per-layer tables: see the HTML report (`ssprop-energy report RUN_DIR`).",
    ]
    return "\n\n".join(parts)


def render_markdown(runs: list[Run]) -> str:
    """The Markdown document for one or more loaded runs."""
    multi = len(runs) > 1
    head = [f"# ssProp energy report ({len(runs)} runs)"] if multi else []
    return "\n\n".join(head + [_run_md(r, multi) for r in runs]) + "\n"
