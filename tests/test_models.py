"""Models: parameter counts against published figures and independent arithmetic, output shapes for every
model at every input size the CLI offers, dropout placement, registry errors, and ssProp conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssprop_energy.errors import ConfigError
from ssprop_energy.models import count_parameters, get_model, list_models
from ssprop_energy.sparse import keep_count, set_drop_rate, sparsify, ssprop_layers

ALL_NAMES = [m.name for m in list_models()]
# Classifiers return logits and train with cross-entropy; generation models (ddpm-unet) are tested below.
NAMES = [m.name for m in list_models() if m.task == "classification"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny batches on a shared 2-core machine: one intra-op thread is several times faster than two that
    # spin against other processes' load.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conv_params(c_in: int, c_out: int, k: int, bias: bool = False) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn_params(c: int) -> int:
    return 2 * c  # weight and bias; running statistics are buffers


def cifar_resnet_params(blocks: tuple[int, ...], bottleneck: bool, num_classes: int, in_channels: int) -> int:
    """Parameter count of a CIFAR ResNet from its architecture description (He et al. 2016, Table 1)."""
    expansion = 4 if bottleneck else 1
    total = conv_params(in_channels, 64, 3) + bn_params(64)
    c_in = 64
    for planes, n, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
        for i in range(n):
            s = stride if i == 0 else 1
            c_out = planes * expansion
            if bottleneck:
                total += conv_params(c_in, planes, 1) + conv_params(planes, planes, 3) + conv_params(planes, c_out, 1)
                total += bn_params(planes) * 2 + bn_params(c_out)
            else:
                total += conv_params(c_in, planes, 3) + conv_params(planes, planes, 3) + bn_params(planes) * 2
            if s != 1 or c_in != c_out:
                total += conv_params(c_in, c_out, 1) + bn_params(c_out)
            c_in = c_out
    return total + c_in * num_classes + num_classes


def test_resnet18_matches_the_published_count():
    # CIFAR ResNet-18, 10 classes: 11,173,962 parameters (the "11.17 M" of the paper and kuangliu/pytorch-cifar).
    assert count_parameters(get_model("resnet18")) == 11_173_962


@pytest.mark.parametrize(
    "name, blocks, bottleneck",
    [("resnet18", (2, 2, 2, 2), False), ("resnet34", (3, 4, 6, 3), False), ("resnet50", (3, 4, 6, 3), True)],
)
@pytest.mark.parametrize("num_classes, in_channels", [(10, 3), (100, 3), (10, 1)])
def test_resnet_counts_match_the_architecture(name, blocks, bottleneck, num_classes, in_channels):
    model = get_model(name, num_classes=num_classes, in_channels=in_channels)
    assert count_parameters(model) == cifar_resnet_params(blocks, bottleneck, num_classes, in_channels)


def test_resnet34_and_50_published_counts():
    # Widely reported CIFAR-10 figures for these variants: 21.28 M and 23.52 M.
    assert round(count_parameters(get_model("resnet34")) / 1e6, 2) == 21.28
    assert round(count_parameters(get_model("resnet50")) / 1e6, 2) == 23.52


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_cnn_count(depth):
    expected = conv_params(3, 128, 3, bias=True) + (depth - 1) * conv_params(128, 128, 3, bias=True) + 128 * 10 + 10
    model = get_model("cnn", depth=depth)
    assert count_parameters(model) == expected
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == depth


def test_mlp_count():
    d_in = 1 * 28 * 28
    expected = (d_in * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert count_parameters(get_model("mlp", in_channels=1, image_size=28)) == expected


def test_vit_count():
    dim, depth, mlp_dim, patch, tokens = 192, 6, 384, 4, (32 // 4) ** 2
    block = 2 * (2 * dim) + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp_dim + mlp_dim) + (mlp_dim * dim + dim)
    expected = (3 * dim * patch * patch + dim) + tokens * dim + depth * block + 2 * dim + (dim * 10 + 10)
    assert count_parameters(get_model("vit")) == expected


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("image_size", [16, 28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shapes(name, image_size, in_channels):
    torch.manual_seed(0)
    model = get_model(name, num_classes=7, in_channels=in_channels, image_size=image_size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_vit_rejects_a_size_its_patches_do_not_tile():
    with pytest.raises(ConfigError, match="patch_size"):
        get_model("vit", image_size=30)


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ConfigError) as err:
        get_model("resnet19")
    for name in NAMES:
        assert name in str(err.value)
    assert issubclass(ConfigError, ValueError)


def test_unknown_option_is_refused():
    with pytest.raises(ConfigError, match="depth"):
        get_model("resnet18", depth=3)


@pytest.mark.parametrize("bad", [{"dropout": 1.0}, {"dropout": -0.1}, {"num_classes": 0}, {"in_channels": 0}])
def test_bad_arguments(bad):
    with pytest.raises(ConfigError):
        get_model("cnn", **bad)


def test_dropout_placement_follows_the_paper_and_keeps_the_state_dict():
    dense = get_model("resnet18")
    dropped = get_model("resnet18", dropout=0.3)
    drops = [m for m in dropped.modules() if isinstance(m, nn.Dropout)]
    # stem 1 + two per basic block (8 blocks) + one per projection shortcut (layer2..4) = 20
    assert len(drops) == 20 and all(m.p == 0.3 for m in drops)
    assert not any(isinstance(m, nn.Dropout) for m in dense.modules())
    assert dense.state_dict().keys() == dropped.state_dict().keys()
    r50 = get_model("resnet50", dropout=0.1)
    assert sum(isinstance(m, nn.Dropout) for m in r50.modules()) == 1 + 3 * 16 + 4


@pytest.mark.parametrize("name", ["cnn", "mlp", "vit"])
def test_dropout_acts_in_training_only(name):
    torch.manual_seed(0)
    model = get_model(name, dropout=0.5, image_size=16)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_list_models_describes_every_model():
    infos = list_models()
    assert [i.name for i in infos] == ["resnet18", "resnet34", "resnet50", "cnn", "mlp", "vit", "ddpm-unet"]
    assert all(i.description and i.default_image_size == 32 for i in infos)
    assert [i.task for i in infos] == ["classification"] * 6 + ["generation"]


def _dense_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_sparsify_works_on_every_model(name):
    torch.manual_seed(0)
    dense = get_model(name, image_size=8).eval()  # eval: BatchNorm uses running stats, same in both copies
    sparse = get_model(name, image_size=8).eval()
    sparse.load_state_dict(dense.state_dict())
    n_targets = sum(type(m) in (nn.Conv2d, nn.Linear) for m in dense.modules())
    sparsify(sparse, drop_rate=0.5, layers=("conv", "linear"))
    layers = ssprop_layers(sparse)
    assert len(layers) == n_targets
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])

    # At drop rate 0 the converted model is the dense model, gradients included.
    set_drop_rate(sparse, 0.0)
    ref = _dense_grads(dense, x, y)
    got = _dense_grads(sparse, x, y)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6)

    # At drop rate 0.5 each layer's weight gradient has exactly C_out - k all-zero output rows.
    set_drop_rate(sparse, 0.5)
    _dense_grads(sparse, x, y)
    for layer in layers:
        rows = layer.weight.grad.flatten(1)
        zero_rows = int((rows.abs().sum(dim=1) == 0).sum())
        assert zero_rows == layer.weight.shape[0] - keep_count(0.5, layer.weight.shape[0])


def test_models_command_lists_counts(capsys):
    import json

    from ssprop_energy.cli import main

    assert main(["models", "--json", "--in-channels", "1", "--image-size", "28"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ALL_NAMES
    assert rows["resnet18"]["parameters"] == cifar_resnet_params((2, 2, 2, 2), False, 10, 1)
    assert rows["mlp"]["parameters"] == (784 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert {n: r["default_layers"] for n, r in rows.items() if n in ("cnn", "mlp", "vit")} == {
        "cnn": ["conv"], "mlp": ["linear"], "vit": ["conv", "linear"]}
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "11,173,962" in text
    lines = {line.split()[0]: line for line in text.splitlines()[1:] if line.startswith("  ")}
    assert "ssProp on linear " in lines["mlp"] and "ssProp on conv+linear" in lines["vit"]


# ---- ddpm-unet: the paper's DDPM noise predictor ----------------------------------------------------------


def _unet_params(in_channels: int, base: int = 16) -> int:
    """Parameters of the public code's MNIST UNet, written from its block list (models/unet.py, train_ddpm.py:
    model_channels 16, channel_mult (1, 2, 4), 2 res blocks, num_attention_blocks [0, 0, 2], GroupNorm)."""

    def conv(ci, co, k):
        return ci * co * k * k + co

    def lin(i, o):
        return i * o + o

    def gn(c):
        return 2 * c

    emb = 4 * base

    def res(ci, co):
        skip = conv(ci, co, 1) if ci != co else 0
        return gn(ci) + conv(ci, co, 3) + lin(emb, co) + gn(co) + conv(co, co, 3) + skip

    def attn(c):
        return gn(c) + (c * 3 * c + 3 * c) + (c * c + c)  # 1-D 1x1 qkv and output projections

    b1, b2, b4 = base, 2 * base, 4 * base
    total = lin(base, emb) + lin(emb, emb) + conv(in_channels, b1, 3)
    total += 2 * res(b1, b1) + conv(b1, b1, 3)  # level 0 + downsample
    total += res(b1, b2) + res(b2, b2) + conv(b2, b2, 3)  # level 1 + downsample
    total += res(b2, b4) + attn(b4) + res(b4, b4) + attn(b4)  # level 2, attention after both
    total += 2 * res(b4, b4) + attn(b4)  # middle
    total += res(2 * b4, b4) + attn(b4) + res(2 * b4, b4) + attn(b4) + res(b4 + b2, b4) + conv(b4, b4, 3)
    total += res(b4 + b2, b2) + res(2 * b2, b2) + res(b2 + b1, b2) + conv(b2, b2, 3)
    total += res(b2 + b1, b1) + res(2 * b1, b1) + res(2 * b1, b1)
    return total + gn(b1) + conv(b1, in_channels, 3)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_unet_parameter_count_follows_the_public_architecture(in_channels):
    model = get_model("ddpm-unet", in_channels=in_channels, num_classes=123)  # num_classes is ignored
    assert count_parameters(model) == _unet_params(in_channels)
    assert count_parameters(get_model("ddpm-unet", in_channels=1)) == 972_449
    attn = [m for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    assert len(attn) == 5 and all(a.heads == 8 for a in attn)


@pytest.mark.parametrize("image_size", [8, 16, 28, 32])
def test_unet_maps_images_to_images_and_starts_at_zero(image_size):
    torch.manual_seed(0)
    model = get_model("ddpm-unet", in_channels=1, image_size=image_size)
    x = torch.randn(2, 1, image_size, image_size)
    out = model(x, torch.tensor([0, 199]))
    assert out.shape == x.shape
    # The public code zero-initialises the output convolution: the untrained model predicts no noise.
    assert torch.count_nonzero(out) == 0


def test_unet_depends_on_the_timestep():
    torch.manual_seed(0)
    model = get_model("ddpm-unet", in_channels=1, image_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, 1, 16, 16).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([3, 150]))
    assert not torch.allclose(out[0], out[1])


def test_unet_rejects_sizes_it_cannot_reassemble():
    with pytest.raises(ConfigError, match="divisible by 4"):
        get_model("ddpm-unet", image_size=30)
    with pytest.raises(ConfigError, match="timesteps"):
        get_model("ddpm-unet", in_channels=1, image_size=8)(torch.zeros(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))


def _masked_dense_grads(model: nn.Module, x, t, target, drop_rate: float) -> dict[str, torch.Tensor]:
    """Reference: the dense model with every Conv2d's output gradient masked to the top-k channels by mean
    |grad| (SSPROP.md's rule, written here independently of sparse/functional.py), then dense backward."""
    handles = []

    def hook(module, args, out):
        k = keep_count(drop_rate, out.shape[1])

        def mask(grad):
            score = grad.abs().mean(dim=(0, 2, 3))
            keep = torch.zeros_like(score, dtype=torch.bool)
            keep[score.topk(k).indices] = True
            return grad * keep[None, :, None, None]

        out.register_hook(mask)

    for m in model.modules():
        if type(m) is nn.Conv2d:
            handles.append(m.register_forward_hook(hook))
    model.zero_grad()
    nn.functional.mse_loss(model(x, t), target).backward()
    for h in handles:
        h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_sparsified_unet_gradients_equal_the_masked_dense_reference():
    torch.manual_seed(0)
    dense = get_model("ddpm-unet", in_channels=1, image_size=8).double()
    with torch.no_grad():  # leave the zero init: with zero output convs most gradients would be zero
        for p in dense.parameters():
            p.normal_(0, 0.2)
    sparse = get_model("ddpm-unet", in_channels=1, image_size=8).double()
    sparse.load_state_dict(dense.state_dict())
    sparsify(sparse, drop_rate=0.5, layers=("conv",))
    layers = ssprop_layers(sparse)
    # stem 1, 17 residual blocks x 2, 11 channel-changing skips, 2 down, 2 up, output 1
    assert len(layers) == sum(type(m) is nn.Conv2d for m in dense.modules()) == 51
    # attention projections are Conv1d and stay dense, as in the public code
    assert all(type(m) is nn.Conv1d for n, m in sparse.named_modules() if n.endswith(("qkv", "proj_out")))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t, target = torch.tensor([1, 50, 190]), torch.randn(3, 1, 8, 8, dtype=torch.float64)

    ref = _masked_dense_grads(dense, x, t, target, 0.5)
    sparse.zero_grad()
    nn.functional.mse_loss(sparse(x, t), target).backward()
    for name, p in sparse.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-9, atol=1e-12, msg=name)
    # and the sparsity is real: C_out - k zero rows in each multi-channel conv's weight gradient
    for layer in layers:
        rows = layer.weight.grad.flatten(1).abs().sum(dim=1)
        c_out = layer.weight.shape[0]
        assert int((rows == 0).sum()) == c_out - keep_count(0.5, c_out)
