"""``ssprop-energy flops``: text and JSON output, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from ssprop_energy.cli import main
from ssprop_energy.flops import count_step
from ssprop_energy.flops import formulas as fm
from ssprop_energy.models import get_model

ARGS = ["flops", "--model", "cnn", "--input-shape", "1,6,6", "--num-classes", "3"]


def test_json_output_matches_a_direct_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--drop-rate", "0.8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = get_model("cnn", num_classes=3, in_channels=1, image_size=6)
    dense = count_step(model, (1, 6, 6), 3)
    assert info["params"] == dense.params
    assert info["convention"] == "conv_linear" and "2 x multiply-adds" in info["convention_description"]
    assert info["dense"]["forward"] == dense.forward and info["dense"]["backward"] == dense.backward
    assert info["step"]["forward"] == dense.forward
    assert info["step"]["macs_backward"] * 2 == info["step"]["backward"]
    # every 128-channel conv keeps floor(0.2 x 128) = 25 channels in backward
    convs = [layer for layer in info["step"]["layers"] if layer["type"] == "SSPropConv2d"]
    dense_bwd = {layer.name: layer.backward for layer in dense.layers}
    assert convs and all(c["backward"] * 128 == dense_bwd[c["name"]] * fm.kept_channels(128, 0.8) for c in convs)
    assert info["saving"]["forward"] == 0.0 and 0.5 < info["saving"]["backward_conv"] < 0.81
    assert "aten.topk" in info["step"]["uncounted_ops"]


def test_text_output_names_params_convention_layers_and_uncounted_ops(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(ARGS) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in get_model("cnn", num_classes=3, in_channels=1, image_size=6).parameters())
    assert f"{params:,} parameters" in out
    assert "convention: conv_linear" in out and "dense" in out
    assert "per layer, per sample:" in out and "Conv2d" in out
    assert "ran but not counted" in out and "aten.relu" in out
    assert "dense FLOPs" not in out  # drop rate 0: nothing to compare with


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input-shape", "3,x"], "--input-shape"),
        (["--input-shape", "3,32"], "--input-shape"),
        (["--drop-rate", "1.5"], "drop rate"),
        (["--model", "nosuchnet"], "unknown model"),
        (["--num-classes", "0"], "num-classes"),
        (["--drop-rate", "0.5", "--layers", "attention"], "layer kind"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("ssprop-energy flops: error:")
