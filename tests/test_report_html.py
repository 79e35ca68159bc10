"""The HTML and Markdown reports: headline numbers equal the record's, the verdict claims no more than the
numbers, provenance and status are in view, the file is self-contained and written atomically."""

from __future__ import annotations

import base64
import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import report_fixtures as fx

from ssprop_energy.cli import main
from ssprop_energy.errors import ConfigError, RecordError
from ssprop_energy.records import EnergyComponent
from ssprop_energy.report import MAX_REPORT_BYTES, render_report


class _Collector(HTMLParser):
    """Collects elements carrying ``data-metric`` (with their text), figures' images and every URL."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, str]] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.scripts = 0
        self._open: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        if "data-metric" in a:
            a["_text"] = ""
            self.metrics.append(a)
            self._open.append(a)

    def handle_data(self, data: str) -> None:
        for a in self._open:
            a["_text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("div", "td") and self._open:
            self._open.pop()


def _parse(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    return c


def _metric(c: _Collector, metric: str, arm: str) -> dict[str, str]:
    found = [m for m in c.metrics if m["data-metric"] == metric and m["data-arm"] == arm]
    assert found, f"no {metric} for {arm}"
    return found[0]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, make in [("compare", fx.compare_run), ("sweep", fx.sweep_run), ("interrupted", fx.interrupted_run),
                       ("mixed", fx.mixed_source_run)]:
        out[name] = root / name
        make(out[name])
    out["estimated"] = root / "estimated"
    fx.mixed_source_run(out["estimated"], cpu_share=0.7)
    out["noisy"] = root / "noisy"
    fx.make_run(out["noisy"], [fx.ArmSpec("dense", 0.0), fx.ArmSpec("ssprop", 0.2)], repeats=3, noise=0.25, seed=3)
    return out


@pytest.fixture(scope="module")
def rendered(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """HTML of a fixture run, rendered once per module (figures make rendering the slow part)."""
    out_dir = tmp_path_factory.mktemp("out")
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = render_report([runs[name]], out_dir / f"{name}.html").read_text(encoding="utf-8")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def compare_html(rendered) -> str:
    return rendered("compare")


def test_headline_numbers_equal_the_record(runs: dict[str, Path], compare_html: str) -> None:
    s = _summary(runs["compare"])
    dense, sp = s["arms"]["dense"], s["arms"]["ssprop"]
    c = _parse(compare_html)
    for metric, key in [("energy_saved_frac", "energy_j"), ("co2_saved_frac", "co2_g"), ("time_saved_frac", "wall_s")]:
        m = _metric(c, metric, "ssprop")
        # the harness's saving_fraction is 1 - mean(arm)/mean(dense): the arm records' own ratio
        expected = 1 - sp[key] / dense[key]
        assert float(m["data-value"]) == pytest.approx(expected, rel=1e-9)
        assert float(m["data-value"]) == pytest.approx(sp["paired"][key]["saving_fraction"], rel=1e-12)
        lo, hi = sp["paired"][key]["saving_ci"]
        assert (float(m["data-ci-low"]), float(m["data-ci-high"])) == pytest.approx((lo, hi))
        assert f"{100 * expected:.1f}% less" in m["_text"]
    flops = _metric(c, "flops_backward_saved_frac", "ssprop")
    assert float(flops["data-value"]) == pytest.approx(1 - sp["flops_backward"] / dense["flops_backward"])
    acc = _metric(c, "accuracy_diff", "ssprop")
    assert float(acc["data-value"]) == pytest.approx(sp["test_accuracy"] - dense["test_accuracy"], abs=1e-12)
    assert (float(acc["data-ci-low"]), float(acc["data-ci-high"])) == pytest.approx(
        tuple(sp["paired"]["test_accuracy"]["delta_ci"]))
    shown = 100 * (sp["test_accuracy"] - dense["test_accuracy"])
    assert f"{abs(shown):.2f} pp" in acc["_text"] and acc["_text"].startswith("\u2212" if shown < 0 else "+")


def test_paper_claim_beside_counted_savings(compare_html: str) -> None:
    c = _parse(compare_html)
    # Analytic reference from the fixture's layer table: drop 0.8 on 3 of 6 epochs.
    fwd, bwd0, conv0 = fx.step_flops(0.0)
    _, bwd8, conv8 = fx.step_flops(0.8)
    conv_saving = 1 - (conv0 + conv8) / (2 * conv0)
    step_saving = 1 - (2 * fwd + bwd0 + bwd8) / (2 * (fwd + bwd0))
    assert conv_saving == pytest.approx(0.4)
    assert float(_metric(c, "conv_backward_saved_frac", "ssprop")["data-value"]) == pytest.approx(conv_saving)
    assert float(_metric(c, "whole_step_saved_frac", "ssprop")["data-value"]) == pytest.approx(step_saving)
    assert "~40% (FLOP model)" in compare_html and "~27% (FLOP model)" in compare_html
    # the paper's model applied to this schedule: 2d/3 of the step at average drop 0.4
    assert "26.7%" in compare_html


def test_verdict_and_provenance(compare_html: str) -> None:
    verdict = re.search(r'<p class="verdict" data-verdict="ssprop">(.*?)</p>', compare_html).group(1)
    assert "executed 40.0% fewer backward FLOPs than dense (counted" in verdict
    assert "Energy fell by 11." in verdict and "3 pairs" in verdict
    assert "not distinguishable" not in verdict
    assert "only 3 pairs" in compare_html  # few pairs: the interval is called rough
    assert "cpu:package-0 (Intel Xeon Gold 6338): counter" in compare_html
    assert "380 g CO2e/kWh (Ember 2024 annual average, DE); PUE 1.2" in compare_html
    assert 'data-warning="estimated"' not in compare_html and 'data-status' in compare_html
    assert 'class="banner status"' not in compare_html


def test_noise_is_called_noise(runs: dict[str, Path], rendered, tmp_path: Path) -> None:
    s = _summary(runs["noisy"])
    lo, hi = s["arms"]["ssprop"]["paired"]["energy_j"]["saving_ci"]
    assert lo < 0 < hi, "fixture precondition: the energy saving's interval spans 0"
    text = rendered("noisy")
    verdict = re.search(r'data-verdict="ssprop">(.*?)</p>', text).group(1)
    assert "The energy difference is not distinguishable from noise" in verdict
    assert "Energy fell by" not in verdict
    assert 'class="value noise" data-metric="energy_saved_frac"' in text
    md = render_report([runs["noisy"]], tmp_path / "r.md", fmt="md").read_text()
    assert "The energy difference is not distinguishable from noise" in md


def test_estimated_energy_warns_at_the_top(rendered) -> None:
    text = html.unescape(rendered("estimated"))
    warn = text.index('data-warning="estimated"')
    assert warn < text.index('id="run0-headline"')
    assert "70% of this run's energy is estimated" in text
    assert "Energy (mostly estimated) fell by" in text
    mixed = rendered("mixed")
    assert 'data-warning="estimated"' not in mixed  # 30% estimated: noted, not a headline warning
    assert "cpu (AMD EPYC 7R13 (TDP 280 W x load)): estimated" in mixed
    assert "gpu:0 (NVIDIA H100 80GB HBM3): counter" in mixed
    assert "source: <b>mixed (counter + estimated)</b>" in mixed
    assert "Energy (partly estimated) fell by" in mixed


def test_measured_mixed_sources_are_not_called_estimated(tmp_path: Path) -> None:
    """Counter + sampled components sum to a 'mixed' total that is still entirely measured."""

    def comps(energy_j: float) -> list[EnergyComponent]:
        return [EnergyComponent("gpu:0", 0.8 * energy_j, "counter", "NVIDIA A100"),
                EnergyComponent("cpu", 0.2 * energy_j, "sampled", "Intel Xeon")]

    fx.make_run(tmp_path / "run", [fx.ArmSpec("dense", 0.0), fx.ArmSpec("ssprop", 0.8)], repeats=2, epochs=2,
                components=comps, write_trace=False)
    md = render_report([tmp_path / "run"], tmp_path / "r.md", fmt="md").read_text()
    assert "| mixed (counter + sampled) |" in md
    assert "estimated" not in md.replace("estimated share of energy 0.0%", "")
    assert "Energy fell by" in md


def test_interrupted_run_is_labelled(runs: dict[str, Path], rendered, tmp_path: Path) -> None:
    text = html.unescape(rendered("interrupted"))
    banner = re.search(r'<div class="banner status" data-status="interrupted">(.*?)</div>', text).group(1)
    assert "Interrupted run" in banner and "3 of 8 epochs" in banner
    assert text.index("banner status") < text.index('id="run0-headline"')
    # the paper's model uses the drop rate of the epochs that ran (0, 0.8, 0), not the planned 8 epochs' 0.4
    assert "Paper's FLOP model for ssprop</td><td>0.27</td>" in text
    assert "single pair of runs (no repeats, so no interval: this may be noise)" in text
    md = render_report([runs["interrupted"]], tmp_path / "i.md", fmt="md").read_text()
    assert "Interrupted run" in md


def test_sweep_report(runs: dict[str, Path], rendered) -> None:
    s = _summary(runs["sweep"])
    text = rendered("sweep")
    assert len(text.encode("utf-8")) < MAX_REPORT_BYTES
    c = _parse(text)
    dense = s["arms"]["dense"]
    for d in ("0.2", "0.4", "0.6", "0.8"):
        arm = f"ssprop-d{d}-bar"
        value = float(_metric(c, "energy_saved_frac", arm)["data-value"])
        assert value == pytest.approx(1 - s["arms"][arm]["energy_j"] / dense["energy_j"])
        acc = float(_metric(c, "accuracy_diff", arm)["data-value"])
        assert acc == pytest.approx(s["arms"][arm]["test_accuracy"] - dense["test_accuracy"])
    for key in ("sweep_drop_rate", "pareto", "accuracy_loss", "drop_rate", "energy_per_epoch", "power_trace", "flops"):
        assert f'data-figure="{key}"' in text
    # Independent Pareto front: brute force over the record's arms.
    pts = {n: (a["energy_j"], a["test_accuracy"]) for n, a in s["arms"].items()}
    front = sorted(
        (n for n, (e, acc) in pts.items()
         if not any(e2 <= e and a2 >= acc and (e2, a2) != (e, acc) for e2, a2 in pts.values())),
        key=lambda n: pts[n][0],
    )
    assert f"<b>{', '.join(front)}</b>" in text


def test_self_contained_and_no_scripts(compare_html: str) -> None:
    c = _parse(compare_html)
    assert c.scripts == 0
    assert all(u.startswith(("data:image/", "#")) for u in c.urls), [u[:40] for u in c.urls if not u.startswith("data:")]
    assert len(c.images) == 5
    for uri in c.images:
        head, payload = uri.split(",", 1)
        data = base64.b64decode(payload)
        assert data.startswith(b"\x89PNG") if "png" in head else b"<svg" in data[:400]
    assert "default-src 'none'" in compare_html
    assert "@media print" in compare_html


def test_multiple_runs_in_one_report(runs: dict[str, Path], tmp_path: Path) -> None:
    text = render_report([runs["compare"], runs["interrupted"]], tmp_path / "m.html").read_text()
    assert text.count('<article class="run"') == 2
    assert 'href="#run0"' in text and 'href="#run1"' in text and "interrupted" in text


def test_markdown_has_the_same_numbers(runs: dict[str, Path], tmp_path: Path) -> None:
    s = _summary(runs["compare"])
    sp, dense = s["arms"]["ssprop"], s["arms"]["dense"]
    md = render_report([runs["compare"]], tmp_path / "r.md", fmt="md").read_text()
    energy = 1 - sp["energy_j"] / dense["energy_j"]
    lo, hi = sp["paired"]["energy_j"]["saving_ci"]
    assert f"| Energy saved | {100 * energy:.1f}% less (95% CI {100 * lo:.1f}% to {100 * hi:.1f}%)" in md
    assert "| Backward FLOPs saved | 40.0% less |" in md
    assert "**Verdict.**" in md and "<" not in md.replace("->", "")


def test_atomic_write_keeps_old_file_on_error(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("previous report")
    with pytest.raises(RecordError):
        render_report([tmp_path / "missing"], out)
    assert out.read_text() == "previous report"
    with pytest.raises(ConfigError):
        render_report([runs["compare"]], out, fmt="pdf")
    render_report([runs["compare"]], out, fmt="md")
    assert out.read_text().startswith("# ssProp energy report")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left behind


def test_cli(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x" / "notes.md"
    assert main(["report", str(runs["compare"]), "-o", str(out)]) == 0
    assert out.read_text().startswith("# ssProp energy report")  # format inferred from the suffix
    assert f"wrote {out}" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad / 'summary.json'}: file not found" in err
    assert main(["report", str(runs["compare"]), "--format", "pdf"]) == 2
    assert "invalid choice: 'pdf'" in capsys.readouterr().err


def test_failed_run_without_arms(tmp_path: Path) -> None:
    from ssprop_energy.records import (
        CONFIG_FILE,
        EPOCH_COLUMNS,
        EPOCHS_FILE,
        RunSummary,
        write_csv_atomic,
        write_json_atomic,
        write_summary,
    )

    run_dir = tmp_path / "run"
    write_summary(run_dir, RunSummary(kind="compare", status="failed", created_at="2026-11-25T15:00:00+00:00",
                                      config={"model": "cnn", "dataset": "digits", "epochs": 3}, environment={},
                                      carbon={}, arms={}, failure_reason="CUDA out of memory"))
    write_json_atomic(run_dir / CONFIG_FILE, {"model": "cnn"})
    write_csv_atomic(run_dir / EPOCHS_FILE, [], EPOCH_COLUMNS)
    text = html.unescape(render_report([run_dir], tmp_path / "r.html").read_text())
    assert "Failed run (CUDA out of memory): numbers cover 0 of 3 epochs" in text
    assert "No arm recorded: nothing to plot." in text and "<img" not in text
    md = render_report([run_dir], tmp_path / "r.md", fmt="md").read_text()
    assert "Carbon intensity not recorded; PUE not recorded" in md
    assert "no energy or carbon to state" in md


def test_figures_are_deterministic(runs: dict[str, Path]) -> None:
    """Same records, same bytes: reports can be diffed and committed."""
    from ssprop_energy.report import figures
    from ssprop_energy.report.load import load_run

    run = load_run(runs["interrupted"])
    assert figures.drop_rate(run).uri == figures.drop_rate(run).uri
    trace = figures.power_trace(run)
    assert trace is not None and trace.mime == "image/png" and trace.uri == figures.power_trace(run).uri
