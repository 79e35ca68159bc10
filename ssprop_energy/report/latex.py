"""The report as a standalone LaTeX document for a paper appendix: a booktabs table and a methods paragraph.

Every number is read from the typed records (``report.load.Run`` / ``report.savings``) and formatted with
the same helpers as the Markdown/HTML reports; nothing is recomputed here. The document needs only the
``booktabs`` package (texlive-latex-recommended).
"""

from __future__ import annotations

from collections.abc import Sequence

from ssprop_energy.report import text as T
from ssprop_energy.report.load import Run, repeat_count
from ssprop_energy.report.savings import comparisons, estimated_fraction

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            # the text helpers' Unicode signs, which utf8 inputenc does not define
            "\u2212": "$-$", "\u00d7": r"$\times$", "\u2248": r"$\approx$", "\u00b1": r"$\pm$", "\u2192": r"$\to$"}


def tex_escape(value: object) -> str:
    """Text with LaTeX's special characters escaped (so record strings such as ``cifar_10`` typeset)."""
    return "".join(_SPECIAL.get(ch, ch) for ch in str(value))


def _table(run: Run) -> list[str]:
    header = ["arm", "drop rate", "schedule", "avg drop", "test acc.", "wall", "bwd FLOPs", "energy", "source", "CO$_2$"]
    lines = [r"\begin{table}[ht]", r"\centering", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
             r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for name, a in run.arms.items():
        quality = T.fmt_pct(a.test_accuracy, 2) if a.quality_value is None else f"{a.quality_metric} {a.quality_value:.4g}"
        cells = [name, f"{a.drop_rate:g}", a.schedule, f"{a.average_drop_rate:.2f}", quality, T.fmt_seconds(a.wall_s),
                 T.fmt_si(a.flops_backward, "FLOP"), T.fmt_energy(a.energy_j), a.energy_source, T.fmt_co2(a.co2_g)]
        lines.append(" & ".join(tex_escape(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              rf"\caption{{ssProp energy measurement: {tex_escape(run.title)}.}}", r"\end{table}"]
    return lines


def _methods(run: Run) -> str:
    reps = max((repeat_count(a) for a in run.arms.values()), default=1)
    s = run.summary
    text = (f"We trained {len(run.arms)} arms ({s.kind} run, {reps} repeat{'s' if reps != 1 else ''}, "
            f"status {s.status}) with ssprop-energy. Backward FLOPs are counted per layer; wall time is measured; "
            f"energy and CO2 come from the meters named in the table's source column. {T.provenance_line(run)}")
    est = estimated_fraction(run.arms)
    verdicts = " ".join(T.verdict(c, est) for c in comparisons(run))
    return tex_escape(text + (" " + verdicts if verdicts else ""))


def render_latex(runs: Sequence[Run]) -> str:
    """A standalone LaTeX document: per run, a booktabs table of the arms and a methods paragraph."""
    body: list[str] = []
    for run in runs:
        body += [rf"\section*{{{tex_escape(run.title)}}}", *_table(run), "", r"\paragraph{Methods.} " + _methods(run), ""]
    return "\n".join([r"\documentclass{article}", r"\usepackage[T1]{fontenc}", r"\usepackage[utf8]{inputenc}",
                      r"\usepackage{booktabs}", r"\begin{document}", *body, r"\end{document}", ""])
