"""Issue 13's "done when": every registered classification model, a torchvision model and a model from a
user's file run `ssprop-energy compare` out of the box (no --layers) with a real backward saving.

Each run is tiny (8x8 synthetic images, 64 samples, one epoch at a constant drop rate of 0.8, the fake
meter), so the saving of the whole run is the saving of one sparse step. The expected saving is ssProp's own
arithmetic, computed here from the dense arm's per-layer backward FLOPs (``layers.csv``) and each layer's
output width: a sparsified layer with ``C`` output channels keeps ``k = max(1, floor(0.2 C))`` of them, and
its whole backward (grad input and grad weight) shrinks to ``k / C``; every other layer's stays dense.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path

import pytest
from torch import nn

from ssprop_energy.cli import main
from ssprop_energy.layer_coverage import LOW_SHARE
from ssprop_energy.models import get_model, list_models
from ssprop_energy.records import load_summary

DROP = 0.8
TINY = ["--dataset", "synthetic:3x8x8:4:64", "--epochs", "1", "--batch-size", "32", "--schedule", "constant",
        "--drop-rate", str(DROP), "--meter", "fake", "--sample-period", "0.05", "--quiet"]

FACTORY = textwrap.dedent('''
    from torch import nn

    def build(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(16 * image_size * image_size, num_classes))
''')

REGISTERED = [info for info in list_models() if info.task == "classification"]


def _torchvision_or_skip() -> None:
    from ssprop_energy.models.external import _torchvision_without_ops

    try:
        _torchvision_without_ops()  # what get_model does before importing torchvision
        import torchvision  # noqa: F401
    except ImportError:
        pytest.skip("torchvision (the 'vision' extra) is not installed")


def _compare(model: str, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(["compare", "--model", model, *TINY, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def _expected_saving(out: Path, model: str) -> float:
    """1 - (sparse step backward) / (dense step backward) by the keep rule, from the dense arm's counted
    per-layer backward and the built model's output widths."""
    with (out / "layers.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    dense = {r["layer"]: float(r["flops_backward"]) for r in rows if r["arm"] == "dense"}
    sparsified = {r["layer"] for r in rows if r["arm"] == "ssprop" and r["type"].startswith("SSProp")}
    modules = dict(get_model(model, num_classes=4, in_channels=3, image_size=8).named_modules())
    saved = 0.0
    for name in sparsified:
        layer = modules[name]
        width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        saved += dense[name] * (1 - max(1, math.floor(round((1 - DROP) * width, 9))) / width)
    return saved / sum(dense.values())


def _assert_real_saving(out: Path, kinds: tuple[str, ...], model: str) -> None:
    summary = load_summary(out)
    assert tuple(summary.layer_kinds) == kinds
    assert json.loads((out / "config.json").read_text())["layers"] is None  # the default, recorded as such
    dense, sparse = summary.arms["dense"], summary.arms["ssprop"]
    cov = sparse.layer_coverage
    assert cov is not None and dense.layer_coverage is None
    assert set(cov.kinds) == set(kinds) and all(c.layers >= 1 for c in cov.kinds.values())
    assert cov.share >= LOW_SHARE and cov.warning is None
    saving = sparse.paired["flops_backward"].saving_fraction
    assert saving == pytest.approx(1 - sparse.flops_backward / dense.flops_backward)
    assert saving == pytest.approx(_expected_saving(out, model), rel=1e-9)
    assert saving > 0.5 * DROP * cov.share  # a real saving: most of what the sparsified layers hold
    assert sparse.flops_forward == pytest.approx(dense.flops_forward)  # ssProp leaves the forward alone


@pytest.mark.parametrize("info", REGISTERED, ids=[i.name for i in REGISTERED])
def test_every_registered_model_compares_out_of_the_box(info, tmp_path, capsys):
    out = tmp_path / "run"
    header = _compare(info.name, out, capsys)
    _assert_real_saving(out, info.default_layers, info.name)
    assert f"layers={','.join(info.default_layers)} (the model's default)" in header
    assert "ssProp layers: " in header and "of backward FLOPs (dense step)" in header


def test_a_torchvision_model_compares_out_of_the_box(tmp_path, capsys):
    _torchvision_or_skip()
    out = tmp_path / "run"
    _compare("torchvision:resnet18", out, capsys)
    _assert_real_saving(out, ("conv", "linear"), "torchvision:resnet18")
    cov = load_summary(out).arms["ssprop"].layer_coverage
    assert cov.kinds["conv"].layers == 20 and cov.kinds["linear"].layers == 1  # every conv (downsamples too), the fc


def test_a_model_from_a_users_file_compares_out_of_the_box(tmp_path, capsys):
    path = tmp_path / "my_net.py"
    path.write_text(FACTORY)
    out = tmp_path / "run"
    _compare(f"{path}:build", out, capsys)
    _assert_real_saving(out, ("conv", "linear"), f"{path}:build")
    cov = load_summary(out).arms["ssprop"].layer_coverage
    assert (cov.kinds["conv"].layers, cov.kinds["linear"].layers) == (2, 1)
    # Every layer with a backward is sparsified: their share is the whole counted backward but the ReLUs'.
    assert cov.share > 0.9


def test_layers_flag_overrides_the_default_and_a_low_share_is_warned(tmp_path, capsys):
    """`--model vit --layers conv` sparsifies only the patch embedding: the header, the end of the output,
    the record and both reports say how little that is."""
    out = tmp_path / "run"
    rc = main(["compare", "--model", "vit", *TINY, "--layers", "conv", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = load_summary(out)
    assert summary.layer_kinds == ["conv"]
    cov = summary.arms["ssprop"].layer_coverage
    assert set(cov.kinds) == {"conv"} and cov.kinds["conv"].layers == 1 and cov.share < LOW_SHARE
    assert "layers=conv" in captured.out and "the model's default" not in captured.out
    # once on stderr before the run (logging), once at the end of the results
    assert "the sparsified layers hold only" in captured.err
    assert f"warning: ssprop: the sparsified layers hold only {cov.share:.1%}" in " ".join(captured.out.split())
    html = (out / "report.html").read_text()
    assert 'data-warning="coverage"' in html
    assert f'data-coverage-share="{cov.share!r}"' in html
    assert main(["report", str(out), "-o", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "> **Warning:** ssprop: the sparsified layers hold only" in md
    assert "ssProp layers (conv): 1 conv" in md
