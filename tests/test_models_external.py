"""External models (torchvision:, timm:, file.py:factory, module:factory), per-model default layer kinds and
the sparsified-layer coverage summary.

The adapter logic is tested against a fake ``torchvision`` module that mimics ``torchvision.models``'
``get_model`` / ``list_models`` API; the real torchvision and timm are tested too when installed (the
``vision`` extra), else those tests skip with the reason."""

from __future__ import annotations

import sys
import textwrap
import types

import pytest
import torch
from torch import nn

from ssprop_energy.errors import ConfigError
from ssprop_energy.flops import count_step
from ssprop_energy.layer_coverage import LOW_SHARE, layer_coverage
from ssprop_energy.models import default_layers_for, get_model, layer_kinds_present, list_models
from ssprop_energy.sparse import sparsify, ssprop_layers


class TinyNet(nn.Module):
    """A torchvision-style classifier: 3-channel stem, 1000-class head unless told otherwise."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv1(x))).flatten(1))


@pytest.fixture
def fake_torchvision(monkeypatch):
    calls: list[dict] = []
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    def get_model(name, **kwargs):
        calls.append({"name": name, **kwargs})
        if name != "tinynet":
            raise ValueError(f"Unknown model {name}")
        weights = kwargs.pop("weights", None)
        if "image_size" in kwargs:
            raise TypeError("TinyNet.__init__() got an unexpected keyword argument 'image_size'")
        net = TinyNet(**kwargs)
        if weights is not None:
            net.loaded_weights = weights
        return net

    models.get_model = get_model
    models.list_models = lambda module=None: ["tinynet"]
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


def test_torchvision_model_gets_classes_no_weights_and_adapted_stem(fake_torchvision):
    model = get_model("torchvision:tinynet", num_classes=7, in_channels=1, image_size=16)
    assert fake_torchvision[0] == {"name": "tinynet", "weights": None, "num_classes": 7, "image_size": 16}
    assert "image_size" not in fake_torchvision[-1]  # retried without the argument the builder lacks
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 8 and model.conv1.kernel_size == (3, 3)
    assert model.fc.out_features == 7
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 7)
    assert not hasattr(model, "loaded_weights")


def test_torchvision_pretrained_replaces_the_1000_class_head(fake_torchvision):
    model = get_model("torchvision:tinynet", num_classes=5, pretrained=True)
    assert model.loaded_weights == "DEFAULT"
    assert "num_classes" not in fake_torchvision[0]
    assert model.fc.out_features == 5 and model.fc.in_features == 8


def test_unknown_torchvision_model(fake_torchvision):
    with pytest.raises(ConfigError, match="unknown torchvision model 'nonet'.*tinynet"):
        get_model("torchvision:nonet")


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'ssprop-energy\[vision\]'"):
        get_model("timm:resnet18")


FACTORY = textwrap.dedent('''
    from torch import nn

    def build(num_classes, in_channels, image_size, width=4):
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(width * image_size * image_size, num_classes))

    def fixed():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000))

    def not_a_model(num_classes):
        return 42

    def broken(**kwargs):
        raise RuntimeError("boom")
''')


def test_file_factory_receives_what_it_accepts(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    model = get_model(f"{path}:build", num_classes=3, in_channels=2, image_size=8, width=6)
    assert model[0].in_channels == 2 and model[0].out_channels == 6
    assert model[3].in_features == 6 * 8 * 8 and model[3].out_features == 3
    assert default_layers_for(f"{path}:build", model) == ("conv", "linear")
    # A factory without arguments is adapted at both ends.
    fixed = get_model(f"{path}:fixed", num_classes=4, in_channels=1, image_size=12)
    assert fixed[0].in_channels == 1 and fixed[3].out_features == 4


@pytest.mark.parametrize("suffix, message", [
    (":not_a_model", "not a torch.nn.Module"),
    (":broken", "RuntimeError: boom"),
    (":absent", "no callable 'absent'"),
])
def test_file_factory_errors_are_one_line(tmp_path, suffix, message):
    path = tmp_path / "m.py"
    path.write_text(FACTORY)
    with pytest.raises(ConfigError, match=message):
        get_model(f"{path}{suffix}")
    with pytest.raises(ConfigError, match="no such file"):
        get_model(f"{tmp_path}/missing.py:build")
    with pytest.raises(ConfigError, match="takes no option"):
        get_model(f"{path}:fixed", depth=3)


def test_module_factory(tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = get_model("userpkg.nets:build", num_classes=2, in_channels=3, image_size=4)
    assert model(torch.zeros(1, 3, 4, 4)).shape == (1, 2)
    with pytest.raises(ConfigError, match="no module 'nosuchpkg'"):
        get_model("nosuchpkg.nets:build")


def test_wrong_output_shape_is_caught(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from torch import nn\ndef f(num_classes):\n    return nn.Flatten()\n")
    with pytest.raises(ConfigError, match=r"expected logits \(2, 10\)"):
        get_model(f"{path}:f")


def test_default_layers_per_model():
    expected = {"resnet18": ("conv",), "resnet34": ("conv",), "resnet50": ("conv",), "cnn": ("conv",),
                "mlp": ("linear",), "vit": ("conv", "linear"), "ddpm-unet": ("conv",)}
    assert {m.name: m.default_layers for m in list_models()} == expected
    assert default_layers_for("MLP") == ("linear",)
    with pytest.raises(ConfigError, match="pass it"):
        default_layers_for("torchvision:resnet18")
    assert layer_kinds_present(nn.Sequential(nn.Linear(2, 2))) == ("linear",)


@pytest.mark.parametrize("name", [m.name for m in list_models() if m.task == "classification"])
def test_every_registered_model_default_layers_hold_most_of_the_backward(name):
    torch.manual_seed(0)
    model = get_model(name, image_size=16)
    sparsify(model, 0.0, layers=default_layers_for(name))
    cov = layer_coverage(count_step(model, (3, 16, 16), 10, batch_size=2).layers)
    assert cov.layers == len(ssprop_layers(model))
    assert cov.share > 0.9 and cov.warning is None


def test_coverage_arithmetic_and_warning():
    rows = [{"type": "SSPropConv2d", "flops_backward": 10.0}, {"type": "Linear", "flops_backward": 80.0},
            {"type": "SSPropLinear", "flops_backward": 5.0}, {"type": "SSPropConv2d", "flops_backward": 5.0}]
    cov = layer_coverage(rows)
    assert cov.kinds["conv"].layers == 2 and cov.kinds["conv"].flops_backward == 15.0
    assert cov.kinds["linear"].layers == 1
    assert cov.share == pytest.approx(0.20) and cov.warning is None  # exactly at the threshold: no warning
    low = layer_coverage(rows[:1] + rows[1:2])
    assert low.share == pytest.approx(10 / 90) and low.share < LOW_SHARE
    assert "11.1%" in low.warning
    assert cov.to_dict()["kinds"]["linear"]["share"] == pytest.approx(0.05)
    assert "2 conv (15.0%) + 1 linear (5.0%)" in cov.describe()


def test_vit_with_conv_only_is_warned():
    model = sparsify(get_model("vit", image_size=16), 0.0, layers=("conv",))
    cov = layer_coverage(count_step(model, (3, 16, 16), 10, batch_size=2).layers)
    assert cov.layers == 1 and cov.share < 0.05 and cov.warning is not None


def _import_or_skip(name: str) -> None:
    from ssprop_energy.models.external import _torchvision_without_ops

    try:
        _torchvision_without_ops()  # what get_model does before importing torchvision or timm
        __import__(name)
    except ImportError:
        pytest.skip(f"{name} (the 'vision' extra) is not installed")


def test_real_torchvision_resnet18():
    _import_or_skip("torchvision")
    torch.manual_seed(0)
    model = get_model("torchvision:resnet18", num_classes=10, in_channels=1, image_size=16)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    # torchvision's published 11,689,512 for 1000 classes and 3 channels, less 990 head rows of 512 + 1 and
    # two of the stem's three 64 x 7 x 7 input planes.
    assert sum(p.numel() for p in model.parameters()) == 11_689_512 - (1000 - 10) * 513 - 2 * 64 * 7 * 7
    kinds = default_layers_for("torchvision:resnet18", model)
    assert kinds == ("conv", "linear")
    sparsify(model, 0.8, layers=kinds)
    dense = layer_coverage(count_step(model, (1, 16, 16), 10, batch_size=2, ).layers)
    assert dense.kinds["conv"].layers == 20 and dense.kinds["linear"].layers == 1 and dense.warning is None


def test_real_timm_model():
    _import_or_skip("timm")
    model = get_model("timm:resnet18", num_classes=5, in_channels=2, image_size=16)
    assert model.conv1.in_channels == 2 and model.fc.out_features == 5


def test_flops_command_takes_a_file_model_and_its_default_layers(tmp_path, capsys):
    import json

    from ssprop_energy.cli import main

    path = tmp_path / "net.py"
    path.write_text(FACTORY)
    assert main(["flops", "--model", f"{path}:build", "--input-shape", "1,8,8", "--num-classes", "3",
                 "--drop-rate", "0.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ssprop_layers"] == ["conv", "linear"]
    cov = info["sparsified_layers"]
    assert cov["kinds"]["conv"]["layers"] == 1 and cov["kinds"]["linear"]["layers"] == 1
    # Both layers are sparsified, so they hold the whole counted backward of the dense step.
    assert cov["share"] == pytest.approx(1.0)
    assert cov["flops_backward"] == pytest.approx(info["dense"]["backward"])
    # The linear layer's dense backward: grad_input and grad_weight, 2 x (2 x 4*8*8 x 3) FLOPs per sample;
    # the first conv has no grad_input (the images need none): 2 x (4 x 1 x 9 x 64) for grad_weight.
    assert cov["kinds"]["linear"]["flops_backward"] == pytest.approx(2 * 2 * 256 * 3)
    assert cov["kinds"]["conv"]["flops_backward"] == pytest.approx(2 * 4 * 9 * 64)


def test_flops_command_warns_when_little_is_sparsified(capsys):
    from ssprop_energy.cli import main

    assert main(["flops", "--model", "vit", "--input-shape", "3,16,16", "--drop-rate", "0.8", "--layers", "conv"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the sparsified layers hold only 0." in out


def test_compare_runs_a_model_from_a_users_file(tmp_path):
    """The paired harness builds the model through get_model: a file factory trains in both arms, and the
    sparse arm executes fewer backward FLOPs than the dense one."""
    from ssprop_energy.experiment.config import ExperimentConfig
    from ssprop_energy.experiment.runner import Experiment, prepare_run_dir

    path = tmp_path / "net.py"
    path.write_text(FACTORY)
    out = tmp_path / "run"
    cfg = ExperimentConfig(kind="compare", model=f"{path}:build", dataset="synthetic:1x8x8:4:64", epochs=2,
                           batch_size=32, meter="fake", sample_period_s=0.05, schedules=["constant"],
                           drop_rates=[0.5], out=str(out))
    cfg.validate()
    prepare_run_dir(out)
    summary = Experiment(cfg, out).run()
    dense, sparse = summary.arms["dense"], summary.arms["ssprop"]
    assert sparse.flops_backward < dense.flops_backward
    assert sparse.flops_forward == pytest.approx(dense.flops_forward)


def test_compare_runs_a_torchvision_model_with_a_backward_saving(tmp_path):
    _import_or_skip("torchvision")
    from ssprop_energy.experiment.config import ExperimentConfig
    from ssprop_energy.experiment.runner import Experiment, prepare_run_dir

    out = tmp_path / "run"
    cfg = ExperimentConfig(kind="compare", model="torchvision:resnet18", dataset="synthetic:3x16x16:4:32",
                           epochs=1, batch_size=16, meter="fake", sample_period_s=0.05, schedules=["constant"],
                           drop_rates=[0.8], layers=["conv", "linear"], out=str(out))
    cfg.validate()
    prepare_run_dir(out)
    summary = Experiment(cfg, out).run()
    dense, sparse = summary.arms["dense"], summary.arms["ssprop"]
    # Every conv and the head are sparsified at drop 0.8: the backward keeps about a fifth of the channels.
    assert 0.1 < sparse.flops_backward / dense.flops_backward < 0.35


def test_resolve_layers():
    from ssprop_energy.models import resolve_layers

    both = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten(), nn.Linear(1, 2))
    assert resolve_layers("mlp", both, None) == ("linear",)
    assert resolve_layers("mlp", both, ["conv"]) == ("conv",)
    assert resolve_layers("x.py:f", both, []) == ("conv", "linear")
