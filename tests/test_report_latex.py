"""``report --format latex``: a standalone document whose booktabs table carries the records' numbers.

No TeX engine is installed on this machine or in CI (not measured yet), so the test parses the table
structure instead of compiling it.
"""

import re

import report_fixtures as fx

from ssprop_energy.cli import main
from ssprop_energy.report import text as T
from ssprop_energy.report.latex import tex_escape
from ssprop_energy.report.load import load_run


def test_latex_document_table_matches_records(tmp_path):
    run_dir = tmp_path / "run"
    fx.compare_run(run_dir)
    out = tmp_path / "appendix.tex"
    assert main(["report", str(run_dir), "-o", str(out)]) == 0  # format inferred from .tex
    doc = out.read_text()
    assert doc.startswith(r"\documentclass{article}") and doc.rstrip().endswith(r"\end{document}")
    assert r"\usepackage{booktabs}" in doc and r"\paragraph{Methods.}" in doc
    table = doc[doc.index(r"\midrule") + len(r"\midrule"):doc.index(r"\bottomrule")]
    rows = [r.strip() for r in table.split(r"\\") if r.strip()]
    spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", doc).group(1)
    run = load_run(run_dir)
    assert len(rows) == len(run.arms)
    for row, (name, arm) in zip(rows, run.arms.items()):
        cells = [c.strip() for c in re.split(r"(?<!\\)&", row)]
        assert len(cells) == len(spec)
        assert cells[0] == tex_escape(name)
        assert cells[7] == tex_escape(T.fmt_energy(arm.energy_j))
        assert cells[9] == tex_escape(T.fmt_co2(arm.co2_g))
    assert all(ord(ch) < 128 for ch in doc)  # Unicode signs from the text helpers are mapped to TeX
    # braces balance (an unescaped record string would break the document)
    assert doc.count("{") - doc.count(r"\{") == doc.count("}") - doc.count(r"\}")


def test_tex_escape():
    assert tex_escape("a_b & 50% #1") == r"a\_b \& 50\% \#1"
