"""count_step: exact counts on tiny nets, ResNet-18 reference figures, fvcore cross-check, ssProp backward."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssprop_energy.errors import ConfigError
from ssprop_energy.flops import CONVENTION, count_step
from ssprop_energy.flops import formulas as fm
from ssprop_energy.models import get_model
from ssprop_energy.sparse import SSPropConv2d, SSPropLinear, sparsify


class TinyNet(nn.Module):
    """conv(3->4, 3x3, pad 1) -> relu -> conv(4->6, 3x3, stride 2) -> relu -> flatten -> linear(24->5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv2(F.relu(self.conv1(x)))), 1))


# Per sample, by hand for a 3x6x6 input. conv1: 4 out x 36 positions x 3 in x 9 taps = 3888 MACs;
# conv2: output 2x2 ((6 - 3) // 2 + 1), 6 x 4 x 4 x 9 = 864; fc: 24 x 5 = 120.
TINY_FORWARD_FLOPS = 2 * (3888 + 864 + 120)
# Backward: conv1 has no grad_input (the image needs none), only grad_weight (3888); conv2 and fc both.
TINY_BACKWARD_FLOPS = 2 * (3888 + 2 * 864 + 2 * 120)


@pytest.fixture(scope="module")
def resnet18_dense() -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=10)
    return model, count_step(model, (3, 32, 32), 10)


def test_tiny_net_exact_counts() -> None:
    sf = count_step(TinyNet(), (3, 6, 6), num_classes=5, batch_size=3)
    assert sf.forward == TINY_FORWARD_FLOPS
    assert sf.backward == TINY_BACKWARD_FLOPS
    assert sf.total == TINY_FORWARD_FLOPS + TINY_BACKWARD_FLOPS
    assert sf.macs_forward == TINY_FORWARD_FLOPS / 2 and sf.macs_backward == TINY_BACKWARD_FLOPS / 2
    layers = {layer.name: layer for layer in sf.layers}
    assert [layer.name for layer in sf.layers] == ["conv1", "conv2", "fc"]
    assert (layers["conv1"].forward, layers["conv1"].backward) == (2 * 3888, 2 * 3888)
    assert (layers["conv2"].forward, layers["conv2"].backward) == (2 * 864, 4 * 864)
    assert (layers["fc"].type, layers["fc"].forward, layers["fc"].backward) == ("Linear", 240, 480)
    assert sf.backward_conv == 2 * (3888 + 2 * 864) and sf.forward_conv == 2 * (3888 + 864)
    assert sf.ops["aten.convolution"] == {"forward": 2 * (3888 + 864), "backward": 0}
    assert sf.ops["aten.convolution_backward"] == {"forward": 0, "backward": 2 * (3888 + 2 * 864)}
    assert sf.params == sum(p.numel() for p in TinyNet().parameters()) and sf.convention == CONVENTION


def test_counts_are_per_sample_whatever_the_batch() -> None:
    net = TinyNet()
    one, four = count_step(net, (3, 6, 6), 5, batch_size=1), count_step(net, (3, 6, 6), 5, batch_size=4)
    assert (one.forward, one.backward) == (four.forward, four.backward) == (TINY_FORWARD_FLOPS, TINY_BACKWARD_FLOPS)


def test_uncounted_ops_are_listed_and_data_movement_is_not() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    sf = count_step(net, (3, 6, 6), 5)
    assert {"aten.relu", "aten.threshold_backward", "aten.nll_loss_forward", "aten._log_softmax"} <= set(
        sf.uncounted_ops
    )
    assert any("batch_norm" in op for op in sf.uncounted_ops)
    assert not {"aten.view", "aten.t", "aten.detach", "aten._unsafe_view"} & set(sf.uncounted_ops)
    assert set(sf.ops) == {"aten.convolution", "aten.convolution_backward", "aten.addmm", "aten.mm"}


def test_model_is_left_as_found() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 5))
    net.eval()
    marker = torch.full_like(net[0].weight, 7.0)
    net[0].weight.grad = marker
    state = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    count_step(net, (3, 6, 6), 5)
    assert not net.training and net[0].weight.grad is marker and net[4].weight.grad is None
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm running stats and counter restored
    assert torch.equal(torch.get_rng_state(), rng)
    net.train()
    count_step(net, (3, 6, 6), 5)
    assert net.training


@pytest.mark.parametrize(
    ("shape", "classes", "batch"),
    [((3, 0, 6), 5, 2), ((), 5, 2), (("a", 6), 5, 2), ((3, 6, 6), 0, 2), ((3, 6, 6), 5, 0)],
)
def test_bad_configuration_is_a_config_error(shape: Any, classes: int, batch: int) -> None:
    with pytest.raises(ConfigError):
        count_step(TinyNet(), shape, classes, batch_size=batch)


def test_input_that_does_not_fit_the_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="input shape"):
        count_step(TinyNet(), (3, 8, 8), 5)


def test_resnet18_reference_figures(resnet18_dense: tuple[nn.Module, Any]) -> None:
    _, sf = resnet18_dense
    # SSPROP.md: 11.17 M parameters, 0.5554 G multiply-adds (convs + linear) per 32x32 image, forward.
    assert round(sf.params / 1e6, 2) == 11.17
    assert f"{sf.macs_forward / 1e9:.4g}" == "0.5554"
    assert sf.forward == 2 * 555_422_720  # convs 555,417,600 + linear 512 x 10
    assert len([layer for layer in sf.layers if layer.type == "Conv2d"]) == 20


def test_resnet18_per_layer_attribution_through_residual_branches(resnet18_dense: tuple[nn.Module, Any]) -> None:
    model, sf = resnet18_dense
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, (tuple(i[0].shape), tuple(o.shape))))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    layers = {layer.name: layer for layer in sf.layers}
    assert set(layers) == set(shapes)
    for name, (x_shape, y_shape) in shapes.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            macs = fm.conv2d_forward_macs(1, m.in_channels, m.out_channels, y_shape[2:], m.kernel_size, m.groups)
            bwd = fm.conv2d_backward_macs(1, m.in_channels, m.out_channels, y_shape[2:], m.kernel_size, m.groups,
                                          grad_input=name != "conv1")
        else:
            macs = fm.linear_forward_macs(1, m.in_features, m.out_features)
            bwd = fm.linear_backward_macs(1, m.in_features, m.out_features)
        assert layers[name].forward == 2 * macs, name
        assert layers[name].backward == 2 * bwd, name
    assert sum(layer.forward for layer in sf.layers) == sf.forward
    assert sum(layer.backward for layer in sf.layers) == sf.backward
    assert sf.backward_conv == sf.backward - layers["linear"].backward


def _fvcore(model: nn.Module, shape: tuple[int, ...], batch: int) -> dict[str, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import and jit trace warn about torch.jit deprecations
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, torch.randn(batch, *shape))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return dict(analysis.by_operator())


def test_forward_matches_fvcore_on_conv_and_linear() -> None:
    net = TinyNet()
    by_op = _fvcore(net, (3, 6, 6), 2)
    assert 2 * (by_op["conv"] + by_op["linear"]) / 2 == count_step(net, (3, 6, 6), 5).forward


def test_resnet18_forward_matches_fvcore_and_the_conventions_differ_by_bn_and_pooling(
    resnet18_dense: tuple[nn.Module, Any],
) -> None:
    model, sf = resnet18_dense
    model.train()  # fvcore counts BatchNorm as 5 ops per element in training mode
    by_op = _fvcore(model, (3, 32, 32), 2)
    model.eval()
    conv_linear_macs = (by_op["conv"] + by_op["linear"]) / 2
    assert 2 * conv_linear_macs == sf.forward
    # fvcore's total (0.5585 G) = ours + BatchNorm (5 x 614,400 activations) + the global average pool.
    fvcore_total = sum(by_op.values()) / 2
    assert f"{fvcore_total / 1e9:.4g}" == "0.5585"
    assert by_op["batch_norm"] / 2 == 5 * 614_400
    assert fvcore_total - sf.macs_forward == (by_op["batch_norm"] + by_op["adaptive_avg_pool2d"]) / 2


# ----------------------------------------------------------------------------------- ssProp layers


class SparseNet(nn.Module):
    """Two ssProp convs and an ssProp linear on a 3x8x8 input (10 and 12 output channels, 5 features)."""

    def __init__(self, drop_rate: float) -> None:
        super().__init__()
        self.conv1 = SSPropConv2d(3, 10, 3, padding=1, drop_rate=drop_rate)
        self.conv2 = SSPropConv2d(10, 12, 3, stride=2, padding=1, drop_rate=drop_rate)
        self.fc = SSPropLinear(12 * 16, 5, drop_rate=drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 1))


@pytest.mark.parametrize("drop_rate", [0.0, 0.4, 0.8])
def test_ssprop_backward_matches_the_formula(drop_rate: float) -> None:
    torch.manual_seed(0)
    sf = count_step(SparseNet(drop_rate), (3, 8, 8), 5, batch_size=2)
    k1, k2, kf = (fm.kept_channels(c, drop_rate) for c in (10, 12, 5))
    expected = {
        # the first layer: grad_weight only, on k1 of 10 channels
        "conv1": (
            fm.conv2d_forward_macs(1, 3, 10, (8, 8), (3, 3)),
            fm.conv2d_backward_macs(1, 3, k1, (8, 8), (3, 3), grad_input=False),
        ),
        "conv2": (
            fm.conv2d_forward_macs(1, 10, 12, (4, 4), (3, 3)),
            fm.conv2d_backward_macs(1, 10, k2, (4, 4), (3, 3)),
        ),
        "fc": (fm.linear_forward_macs(1, 192, 5), fm.linear_backward_macs(1, 192, kf)),
    }
    layers = {layer.name: layer for layer in sf.layers}
    for name, (fwd, bwd) in expected.items():
        assert (layers[name].forward, layers[name].backward) == (2 * fwd, 2 * bwd), name
    assert sf.backward == 2 * sum(b for _, b in expected.values())
    assert sf.backward_conv == 2 * (expected["conv1"][1] + expected["conv2"][1])
    assert sf.drop_rates == {"conv1": drop_rate, "conv2": drop_rate, "fc": drop_rate}
    if drop_rate:
        assert (k1, k2, kf) == ((6, 7, 3) if drop_rate == 0.4 else (2, 2, 1))
        # the channel scoring that ssProp adds runs, and is listed, not hidden
        assert "aten.topk" in sf.uncounted_ops


def test_ssprop_linear_on_token_inputs_counts_every_row() -> None:
    net = nn.Sequential(SSPropLinear(8, 10, drop_rate=0.8), nn.ReLU(), SSPropLinear(10, 6, drop_rate=0.8),
                        nn.Flatten(), nn.Linear(4 * 6, 3))
    sf = count_step(net, (4, 8), 3)  # 4 tokens of 8 features per sample
    layers = {layer.name: layer for layer in sf.layers}
    first = (2 * 4 * 8 * 10, 2 * fm.linear_backward_macs(4, 8, 2, grad_input=False))  # no grad_input
    assert (layers["0"].forward, layers["0"].backward) == first
    assert (layers["2"].forward, layers["2"].backward) == (2 * 4 * 10 * 6, 2 * fm.linear_backward_macs(4, 10, 1))


def test_ssprop_depthwise_conv_backward_matches_the_formula() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 1), SSPropConv2d(8, 8, 3, padding=1, groups=8, drop_rate=0.5),
                        nn.Flatten(), nn.Linear(8 * 36, 2))
    sf = count_step(net, (3, 6, 6), 2)
    depthwise = {layer.name: layer for layer in sf.layers}["1"]
    # 4 of 8 channels kept, each a whole group of one input channel
    assert depthwise.forward == 2 * fm.conv2d_forward_macs(1, 8, 8, (6, 6), (3, 3), groups=8)
    assert depthwise.backward == 2 * fm.conv2d_backward_macs(1, 4, 4, (6, 6), (3, 3), groups=4)


class _MaskedThenDenseConv(torch.autograd.Function):
    """A zero-mask "ssProp": grad_output zeroed outside the top-k channels, then the dense backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.k = k
        return F.conv2d(x, w, padding=1)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, w = ctx.saved_tensors
        kept = dy.abs().mean(dim=(0, 2, 3)).topk(ctx.k).indices
        mask = torch.zeros(dy.shape[1], dtype=dy.dtype).index_fill_(0, kept, 1.0).view(1, -1, 1, 1)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dy * mask, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [ctx.needs_input_grad[0], True, False]
        )
        return gx, gw, None


class _MaskedLayer(nn.Conv2d):
    def __init__(self, k: int) -> None:
        super().__init__(10, 12, 3, padding=1, bias=False)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskedThenDenseConv.apply(x, self.weight, self.k)


def test_a_zero_mask_implementation_would_be_caught() -> None:
    k = fm.kept_channels(12, 0.8)
    sparse_bwd = 2 * fm.conv2d_backward_macs(1, 10, k, (8, 8), (3, 3))
    dense_bwd = 2 * fm.conv2d_backward_macs(1, 10, 12, (8, 8), (3, 3))
    real = nn.Sequential(nn.Conv2d(3, 10, 1), SSPropConv2d(10, 12, 3, padding=1, bias=False, drop_rate=0.8),
                         nn.Flatten(), nn.Linear(12 * 64, 2))
    masked = nn.Sequential(nn.Conv2d(3, 10, 1), _MaskedLayer(k), nn.Flatten(), nn.Linear(12 * 64, 2))
    real_bwd = {layer.name: layer.backward for layer in count_step(real, (3, 8, 8), 2).layers}["1"]
    masked_bwd = {layer.name: layer.backward for layer in count_step(masked, (3, 8, 8), 2).layers}["1"]
    assert real_bwd == sparse_bwd
    assert masked_bwd == dense_bwd != sparse_bwd  # the same gradients, the full dense cost: the check fails it


def test_sparsified_resnet18_backward_shrinks_by_kept_fraction(resnet18_dense: tuple[nn.Module, Any]) -> None:
    model, dense = resnet18_dense
    sparse_model = sparsify(copy.deepcopy(model), drop_rate=0.8)
    sf = count_step(sparse_model, (3, 32, 32), 10)
    dense_layers = {layer.name: layer for layer in dense.layers}
    for layer in sf.layers:
        assert layer.forward == dense_layers[layer.name].forward
        if layer.type == "SSPropConv2d":
            c_out = sparse_model.get_submodule(layer.name).out_channels
            # convolution FLOPs are linear in the output channels taking part
            assert layer.backward * c_out == dense_layers[layer.name].backward * fm.kept_channels(c_out, 0.8)
    assert sf.forward == dense.forward
    assert 0.80 < 1 - sf.backward_conv / dense.backward_conv < 0.82  # 12/64, 25/128, 51/256, 102/512 kept


def test_grouped_and_transposed_convolutions_by_hand() -> None:
    # grouped 8 -> 8 in 2 groups (4 in-channels per output channel), 3x3, 4x4 output: 8 x 16 x 4 x 9 = 4608;
    # transposed 8 -> 2, 3x3, stride 2 on 4x4: every input element meets 2 x 9 weights: 8 x 16 x 2 x 9 = 2304.
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                        nn.ConvTranspose2d(8, 2, 3, stride=2), nn.Flatten(), nn.Linear(2 * 81, 2))
    layers = {layer.name: layer for layer in count_step(net, (3, 4, 4), 2).layers}
    assert (layers["1"].forward, layers["1"].backward) == (2 * 4608, 4 * 4608)
    assert (layers["2"].forward, layers["2"].backward) == (2 * 2304, 4 * 2304)


def test_stock_torch_formula_overcounts_grouped_conv_backward_and_ours_does_not() -> None:
    from torch.utils.flop_counter import flop_registry

    # depthwise 8 channels, 3x3, 6x6, batch 2; both gradients
    grad_out, x, w = [2, 8, 6, 6], [2, 8, 6, 6], [8, 1, 3, 3]
    true_macs = 2 * 8 * 36 * 9 * 2
    stock = flop_registry[torch.ops.aten.convolution_backward](
        torch.empty(grad_out), torch.empty(x), torch.empty(w), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 8,
        [True, True, False], out_val=(torch.empty(x), torch.empty(w), None),
    )
    assert fm.conv_backward_macs(grad_out, x, w, False, [True, True, False]) == true_macs
    assert stock == 2 * (true_macs // 2 + 8 * true_macs // 2)  # grad_weight counted 8 (= groups) times
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(288, 2))
    assert {layer.name: layer for layer in count_step(net, (3, 6, 6), 2).layers}["1"].backward == true_macs


def test_totals_equal_the_stock_flop_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = SparseNet(0.8)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    with FlopCounterMode(display=False) as stock:
        loss = F.cross_entropy(net(x), y)
        forward = stock.get_total_flops()
        loss.backward()
    sf = count_step(net, (3, 8, 8), 5, batch_size=2)
    assert (2 * sf.forward, 2 * sf.backward) == (forward, stock.get_total_flops() - forward)
