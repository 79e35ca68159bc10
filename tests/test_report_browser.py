"""The HTML report in a real browser: headless Chromium loads it without console errors and every figure
has a non-zero rendered size.

The page is copied with a small probe script injected at the top of <head> (and ``script-src`` added to
the report's Content-Security-Policy so the probe may run); the probe records script errors, failed
resource loads and CSP violations, then writes what it saw into the DOM, which ``--dump-dom`` returns.
Chromium's own console log (``--enable-logging=stderr``) must stay silent as well. A negative control
proves the probe catches a broken page.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import report_fixtures as fx

from ssprop_energy.report import render_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"
)

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  __errors.push(e.message || ('resource failed: ' + (e.target && (e.target.src || e.target.href))));
}, true);
document.addEventListener('securitypolicyviolation', function (e) { __errors.push('CSP: ' + e.blockedURI); });
window.addEventListener('load', function () {
  var imgs = [].slice.call(document.querySelectorAll('figure img'));
  var out = {errors: __errors, title: document.title, figures: imgs.map(function (i) {
    var r = i.getBoundingClientRect();
    return {key: i.parentNode.getAttribute('data-figure'), natural: [i.naturalWidth, i.naturalHeight],
            box: [r.width, r.height], complete: i.complete};
  })};
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _probe_page(report: Path, dst: Path, extra: str = "") -> Path:
    text = report.read_text(encoding="utf-8")
    assert "default-src 'none';" in text
    text = text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    text = text.replace("<head>", "<head>" + PROBE, 1).replace("</body>", extra + "</body>", 1)
    dst.write_text(text, encoding="utf-8")
    return dst


def _load(page: Path, profile: Path) -> tuple[dict, list[str]]:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1280,900",
        "--virtual-time-budget=5000", "--dump-dom", page.as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert found, "the probe did not run: " + res.stderr[-2000:]
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")), console


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    fx.compare_run(root / "run")
    return render_report([root / "run"], root / "report.html")


def test_report_loads_cleanly_with_visible_figures(report: Path, tmp_path: Path) -> None:
    result, console = _load(_probe_page(report, tmp_path / "page.html"), tmp_path / "profile")
    assert result["errors"] == []
    assert console == []
    assert result["title"] == "ssProp energy report: resnet18 on digits"
    keys = [f["key"] for f in result["figures"]]
    assert keys == ["accuracy_loss", "drop_rate", "energy_per_epoch", "power_trace", "flops"]
    for fig in result["figures"]:
        assert fig["complete"], fig
        assert min(fig["natural"]) > 0 and min(fig["box"]) > 50, fig


def test_probe_catches_a_broken_page(report: Path, tmp_path: Path) -> None:
    """Negative control: an external image (blocked by the CSP) and a script error must be reported."""
    broken = "<img src='https://example.invalid/x.png'><script>undefinedFunction();</script>"
    result, console = _load(_probe_page(report, tmp_path / "page.html", extra=broken), tmp_path / "profile")
    assert any("CSP" in e for e in result["errors"])
    assert any("undefinedFunction" in e for e in result["errors"])
    assert console


@pytest.fixture(scope="module")
def generation_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) DDPM compare: 8x8 synthetic images, 5 diffusion steps, 4 samples, the fake meter."""
    from ssprop_energy.experiment.config import ExperimentConfig
    from ssprop_energy.experiment.runner import Experiment, ExperimentHooks

    root = tmp_path_factory.mktemp("browser-gen")
    with pytest.MonkeyPatch.context() as mp:  # module scope: keep the cache and ledger out of the real home
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        mp.setenv("SSPROP_ENERGY_LEDGER", str(root / "ledger.sqlite"))
        mp.delenv("SSPROP_ENERGY_INCEPTION_WEIGHTS", raising=False)
        cfg = ExperimentConfig(model="ddpm-unet", dataset="synthetic:1x8x8:4:128", batch_size=32, samples=4,
                               timesteps=5, meter="fake", sample_period_s=0.05)
        cfg.apply_task_defaults("generation")
        cfg.image_size, cfg.epochs = 8, 2
        cfg.validate()
        Experiment(cfg, root / "run", ExperimentHooks(monitor=None, ledger=False)).run()
    return render_report([root / "run"], root / "report.html")


def test_generation_report_loads_cleanly_with_sample_grids(generation_report: Path, tmp_path: Path) -> None:
    result, console = _load(_probe_page(generation_report, tmp_path / "page.html"), tmp_path / "profile")
    assert result["errors"] == []
    assert console == []
    assert result["title"] == "ssProp energy report: ddpm-unet on synthetic:1x8x8:4:128"
    figures = {f["key"]: f for f in result["figures"]}
    assert {"accuracy_loss", "drop_rate", "flops"} <= set(figures)
    for fig in result["figures"]:
        assert fig["complete"], fig
        assert min(fig["natural"]) > 0 and min(fig["box"]) > 10, fig
    # the two arms' sample grids are the figures without a data-figure key, side by side
    grids = [f for f in result["figures"] if f["key"] is None]
    assert len(grids) == 2
    # 4 tiles of 8 px x 2 in one row with 2 px gutters: 5 x 2 + 4 x 16 = 74 px wide, 2 x 2 + 16 = 20 px high
    assert all(g["natural"] == [74, 20] for g in grids)
    assert all(g["box"][0] >= 256 for g in grids)  # enlarged for reading (pixelated, not smoothed)
