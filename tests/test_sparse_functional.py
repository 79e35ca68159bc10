"""ssProp backward vs an independent reference: dense nn.Conv2d / nn.Linear with grad_output masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ssprop_energy.errors import ConfigError
from ssprop_energy.sparse.functional import (
    KeptRecord,
    channel_l1,
    channel_scores,
    keep_count,
    select_channels,
    ssprop_conv2d,
    ssprop_linear,
)
from ssprop_energy.sparse.layers import SSPropConv2d, SSPropLinear

F64 = torch.float64


def reference_conv_grads(
    layer: nn.Conv2d, x: torch.Tensor, dy: torch.Tensor, kept: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Dense nn.Conv2d gradients with grad_output zeroed outside ``kept`` (None: no masking)."""
    ref = nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
        layer.groups, layer.bias is not None, layer.padding_mode, dtype=layer.weight.dtype,
    )
    ref.load_state_dict(layer.state_dict())
    xr = x.detach().clone().requires_grad_(x.requires_grad)
    mask = torch.zeros(layer.out_channels, dtype=dy.dtype)
    if kept is None:
        mask += 1
    else:
        mask[kept] = 1
    ref(xr).backward(dy * mask.view(1, -1, 1, 1))
    return xr.grad, ref.weight.grad, None if ref.bias is None else ref.bias.grad


def true_topk(dy: torch.Tensor, groups: int, k_per_row: int) -> list[int]:
    """Top-k channels by mean |dy| (globally for groups=1/depthwise, per group otherwise), by sorting."""
    scores = dy.abs().mean(dim=(0, 2, 3))
    c = scores.numel()
    rows = 1 if groups == 1 or groups == c else groups
    m = c // rows
    kept = []
    for r in range(rows):
        order = torch.argsort(scores[r * m:(r + 1) * m], descending=True)[:k_per_row]
        kept += sorted((order + r * m).tolist())
    return kept


# (in, out, kernel, stride, padding, dilation, groups, bias, padding_mode)
CONV_GRID = [
    (4, 10, 3, 1, 1, 1, 1, True, "zeros"),
    (3, 8, 3, 2, 1, 1, 1, False, "zeros"),
    (3, 7, (3, 2), (2, 1), (1, 0), (1, 2), 1, True, "zeros"),
    (4, 6, 3, 1, "same", 2, 1, True, "zeros"),
    (4, 6, 2, 1, "same", 1, 1, True, "zeros"),  # asymmetric 'same'
    (4, 6, 3, 1, "valid", 1, 1, False, "zeros"),
    (4, 8, 3, 1, 1, 1, 2, True, "zeros"),  # grouped, 4 outputs per group
    (6, 12, 3, 2, 1, 1, 3, True, "zeros"),
    (6, 6, 3, 1, 1, 1, 6, True, "zeros"),  # depthwise
    (5, 10, 3, 1, 1, 1, 5, False, "zeros"),  # depthwise with multiplier 2 (2 outputs per group)
    (6, 3, 3, 1, 1, 1, 3, True, "zeros"),  # one output per group, 2 inputs per group
    (4, 10, 3, 1, 2, 1, 1, True, "reflect"),
    (4, 10, 3, 1, 1, 1, 1, True, "replicate"),
    (4, 10, 3, 1, 1, 1, 1, True, "circular"),
    (4, 10, 1, 1, 0, 1, 1, True, "zeros"),  # pointwise: the matmul backward
    (4, 10, 1, 2, 0, 1, 1, False, "zeros"),  # pointwise stride 2 on odd sizes: grad_input zero off the grid
    (5, 8, 1, (3, 2), 0, 2, 1, True, "zeros"),  # pointwise, uneven strides, dilation (no effect at 1x1)
    (4, 10, 1, 2, 1, 1, 1, True, "zeros"),  # 1x1 with padding: not pointwise, convolution backward
    (4, 10, 1, 1, 1, 1, 1, True, "reflect"),  # padded by the layer first, then a pointwise conv
    (4, 1, 3, 1, 1, 1, 1, True, "zeros"),  # one output channel: k = max(1, ...) = 1 keeps it, dense path
]


# torch warns that an asymmetric 'same' pads a copy of the input; that copy is the expected behaviour here.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("config", CONV_GRID, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("drop_rate", [0.0, 0.5, 0.8])
def test_conv_matches_masked_dense_reference_float64(config: tuple, drop_rate: float) -> None:
    torch.manual_seed(0)
    c_in, c_out, k, s, p, d, g, bias, mode = config
    layer = SSPropConv2d(c_in, c_out, k, s, p, d, g, bias, mode, dtype=F64, drop_rate=drop_rate)
    x = torch.randn(3, c_in, 9, 8, dtype=F64, requires_grad=True)
    out = layer(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    kept = layer.kept_channels
    m = c_out // g
    per_row = c_out if g == 1 or g == c_out else m
    rows_k = keep_count(drop_rate, per_row)
    if rows_k == per_row:  # nothing to drop (drop 0, or a single channel): the dense backward ran
        assert kept is None
    else:
        assert kept.tolist() == true_topk(dy, g, rows_k)
    gx, gw, gb = reference_conv_grads(layer, x, dy, kept)
    assert torch.allclose(x.grad, gx, rtol=1e-10, atol=1e-12)
    assert torch.allclose(layer.weight.grad, gw, rtol=1e-10, atol=1e-12)
    if bias:
        assert torch.allclose(layer.bias.grad, gb, rtol=1e-10, atol=1e-12)
    if kept is not None:
        dropped = torch.ones(c_out, dtype=torch.bool)
        dropped[kept] = False
        assert bool((layer.weight.grad[dropped] == 0).all())
        if bias:
            assert bool((layer.bias.grad[dropped] == 0).all())


class _ConvBackwardShapes(TorchDispatchMode):
    """Records (grad_output channels, output_mask) of every aten.convolution_backward that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, list[bool]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.convolution_backward.default:
            self.calls.append((args[0].shape[1], list(args[-1])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "expected_channels"),
    [(4, 10, 1, 2), (4, 20, 2, 4), (10, 10, 10, 2)],  # global 2 of 10; 2 of 10 per group; depthwise 2 of 10
)
def test_backward_really_runs_on_the_kept_channels_only(
    c_in: int, c_out: int, groups: int, expected_channels: int
) -> None:
    layer = SSPropConv2d(c_in, c_out, 3, padding=1, groups=groups, drop_rate=0.8)
    x = torch.randn(2, c_in, 6, 6, requires_grad=True)
    out = layer(x)
    with _ConvBackwardShapes() as mode:
        out.backward(torch.randn_like(out))
    assert mode.calls == [(expected_channels, [True, True, True])]


def test_grad_input_and_frozen_weight_are_skipped() -> None:
    layer = SSPropConv2d(3, 10, 3, drop_rate=0.5)
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)  # an input batch needs no gradient
    out = layer(x)
    with _ConvBackwardShapes() as mode:
        out.backward(torch.randn_like(out))
    assert mode.calls == [(5, [False, False, True])]
    assert layer.weight.grad is None and layer.bias.grad is not None


@pytest.mark.parametrize(("drop_rate", "channels", "expected"), [
    (0.8, 10, 2), (0.8, 64, 12), (0.4, 64, 38), (0.0, 7, 7), (0.99, 10, 1), (0.7, 10, 3), (0.9, 10, 1),
    (0.5, 1, 1), (0.8, 512, 102),
])
def test_keep_count_floors_without_losing_a_channel_to_float_error(
    drop_rate: float, channels: int, expected: int
) -> None:
    # (1 - 0.8) * 10 == 1.9999999999999996 and (1 - 0.7) * 10 == 3.0000000000000004 in binary floating point.
    assert keep_count(drop_rate, channels) == expected


def test_channel_scores_are_mean_abs_over_batch_and_space() -> None:
    dy = torch.randn(3, 5, 4, 2, dtype=F64).to(memory_format=torch.channels_last)
    assert torch.allclose(channel_scores(dy), dy.abs().mean(dim=(0, 2, 3)), rtol=1e-12)
    lin = torch.randn(2, 3, 6, dtype=F64)
    assert torch.allclose(channel_scores(lin.reshape(-1, 6)), lin.abs().mean(dim=(0, 1)), rtol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided", "linear", "3d"])
def test_channel_l1_is_the_per_channel_abs_sum_in_every_layout(layout: str) -> None:
    torch.manual_seed(0)
    base = torch.randn(3, 5, 4, 6, dtype=F64)
    if layout == "nchw":
        dy, dims = base, (0, 2, 3)
    elif layout == "channels_last":
        dy, dims = base.to(memory_format=torch.channels_last), (0, 2, 3)
    elif layout == "strided":
        dy, dims = base[:, :, ::2, 1:], (0, 2, 3)
    elif layout == "linear":
        dy, dims = base.reshape(-1, 8), (0,)
    else:
        dy, dims = base.reshape(3, 5, 24), (0, 2)
    expected = dy.abs().sum(dim=dims)
    assert torch.allclose(channel_l1(dy), expected, rtol=1e-12)
    # Large enough to be scored in several cache-sized chunks (2^18 elements each), the last one partial.
    big = torch.randn(70, 2, 48, 48, dtype=F64)
    if layout == "channels_last":
        big = big.to(memory_format=torch.channels_last)
    if layout in ("nchw", "channels_last"):
        assert torch.allclose(channel_l1(big), big.abs().sum(dim=(0, 2, 3)), rtol=1e-12)
    # The mean is the sum over the same element count.
    assert torch.allclose(channel_scores(dy), expected / (dy.numel() // dy.shape[1]), rtol=1e-12)


def test_channel_l1_accumulates_half_types_in_float32() -> None:
    dy = torch.full((64, 2, 16, 16), 1.0, dtype=torch.bfloat16)
    # 16384 ones: a bfloat16 accumulator would stall at 256.
    assert channel_l1(dy).dtype == torch.float32
    assert channel_l1(dy).tolist() == [16384.0, 16384.0]


@pytest.mark.parametrize("stride", [1, 2, (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("need_input", "need_weight"), [(True, True), (False, True), (True, False)])
def test_pointwise_matmul_backward_matches_reference(
    stride: int | tuple[int, int], bias: bool, need_input: bool, need_weight: bool
) -> None:
    torch.manual_seed(4)
    layer = SSPropConv2d(6, 20, 1, stride=stride, bias=bias, dtype=F64, drop_rate=0.75)
    layer.weight.requires_grad_(need_weight)
    x = torch.randn(3, 6, 7, 9, dtype=F64, requires_grad=need_input)
    out = layer(x)
    dy = torch.randn_like(out)
    with _ConvBackwardShapes() as mode:
        out.backward(dy)
    assert mode.calls == []  # the two matmuls ran, not the convolution kernels
    kept = layer.kept_channels
    assert kept.tolist() == true_topk(dy, 1, 5)
    gx, gw, gb = reference_conv_grads(layer, x, dy, kept)
    if need_input:
        assert x.grad.is_contiguous()
        assert torch.allclose(x.grad, gx, rtol=1e-10, atol=1e-12)
    else:
        assert x.grad is None
    if need_weight:
        assert torch.allclose(layer.weight.grad, gw, rtol=1e-10, atol=1e-12)
    else:
        assert layer.weight.grad is None
    if bias:
        assert torch.allclose(layer.bias.grad, gb, rtol=1e-10, atol=1e-12)


def test_pointwise_on_channels_last_input_uses_the_convolution_backward() -> None:
    torch.manual_seed(5)
    layer = SSPropConv2d(6, 10, 1, stride=2, dtype=F64, drop_rate=0.8).to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 5, 5, dtype=F64).to(memory_format=torch.channels_last).requires_grad_()
    out = layer(x)
    dy = torch.randn_like(out)
    with _ConvBackwardShapes() as mode:
        out.backward(dy)
    assert mode.calls == [(2, [True, True, True])]
    gx, gw, gb = reference_conv_grads(layer, x, dy, layer.kept_channels)
    assert torch.allclose(x.grad, gx, rtol=1e-10) and torch.allclose(layer.weight.grad, gw, rtol=1e-10)
    assert torch.allclose(layer.bias.grad, gb, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pointwise_half_precision_matches_float64_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    layer = SSPropConv2d(8, 16, 1, stride=2, dtype=dtype, drop_rate=0.5)
    x = torch.randn(4, 8, 6, 6, dtype=dtype, requires_grad=True)
    out = layer(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == dtype and layer.bias.grad.dtype == dtype
    ref = SSPropConv2d(8, 16, 1, stride=2, dtype=F64)
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    gx, gw, gb = reference_conv_grads(ref, x.detach().double().requires_grad_(), dy.double(), layer.kept_channels)
    assert _scaled_error(x.grad, gx) < 2e-2
    assert _scaled_error(layer.weight.grad, gw) < 2e-2
    assert _scaled_error(layer.bias.grad, gb) < 2e-2


def test_quantile_selection_keeps_exactly_k_and_breaks_ties_by_lowest_index() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5, 0.7]])
    # top-3: 0.9 (1), 0.7 (5), then one of the three tied 0.5 -> the lowest index, 0.
    assert select_channels(scores, 3, "quantile").tolist() == [0, 1, 5]
    assert select_channels(scores, 4, "quantile").tolist() == [0, 1, 2, 5]
    grouped = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    assert select_channels(grouped, 2, "quantile").tolist() == [0, 2, 4, 5]
    assert select_channels(grouped, 2, "topk").tolist() == [0, 2, 4, 5]


@pytest.mark.parametrize("selection", ["topk", "quantile"])
def test_sort_free_and_topk_selections_agree_on_random_scores(selection: str) -> None:
    torch.manual_seed(3)
    scores = torch.rand(4, 50, dtype=F64)
    expected = [sorted((torch.argsort(row, descending=True)[:13] + 50 * r).tolist()) for r, row in enumerate(scores)]
    assert select_channels(scores, 13, selection).tolist() == sum(expected, [])


def test_random_selection_follows_torch_seed_and_is_not_topk() -> None:
    scores = torch.arange(100, dtype=F64).reshape(1, 100)
    torch.manual_seed(7)
    a = select_channels(scores, 10, "random")
    torch.manual_seed(7)
    b = select_channels(scores, 10, "random")
    assert a.tolist() == b.tolist()
    assert len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist())
    assert a.tolist() != list(range(90, 100))


@pytest.mark.parametrize("selection", ["random", "quantile"])
def test_other_selections_match_the_reference_for_their_own_kept_set(selection: str) -> None:
    torch.manual_seed(1)
    layer = SSPropConv2d(3, 12, 3, padding=1, groups=3, dtype=F64, drop_rate=0.5, selection=selection)
    x = torch.randn(2, 3, 5, 5, dtype=F64, requires_grad=True)
    out = layer(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    kept = layer.kept_channels
    assert kept.numel() == 6 and torch.bincount(kept // 4, minlength=3).tolist() == [2, 2, 2]
    gx, gw, gb = reference_conv_grads(layer, x, dy, kept)
    assert torch.allclose(x.grad, gx, rtol=1e-10) and torch.allclose(layer.weight.grad, gw, rtol=1e-10)
    assert torch.allclose(layer.bias.grad, gb, rtol=1e-10)


def test_gradcheck_conv_with_fixed_selection() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4, dtype=F64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=F64, requires_grad=True)
    b = torch.randn(6, dtype=F64, requires_grad=True)
    kept = torch.tensor([0, 2, 3, 5])  # two of the three channels in each of the 2 groups
    mask = torch.zeros(6, dtype=F64)
    mask[kept] = 1

    # The sparse backward is the exact gradient of the output masked to the kept channels.
    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = ssprop_conv2d(x, w, b, stride=2, padding=1, groups=2, drop_rate=0.5, kept=kept)
        return out * mask.view(1, -1, 1, 1)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_gradcheck_depthwise_and_linear_with_fixed_selection() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 5, 3, 3, dtype=F64, requires_grad=True)
    w = torch.randn(5, 1, 3, 3, dtype=F64, requires_grad=True)
    kept = torch.tensor([1, 4])
    mask = torch.zeros(5, dtype=F64)
    mask[kept] = 1
    assert torch.autograd.gradcheck(
        lambda x, w: ssprop_conv2d(x, w, None, padding=1, groups=5, kept=kept) * mask.view(1, -1, 1, 1), (x, w)
    )
    xl = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    wl = torch.randn(5, 4, dtype=F64, requires_grad=True)
    bl = torch.randn(5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ssprop_linear(x, w, b, kept=kept) * mask, (xl, wl, bl))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_masked_dense_reference(bias: bool) -> None:
    torch.manual_seed(2)
    layer = SSPropLinear(6, 10, bias=bias, dtype=F64, drop_rate=0.7)
    x = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    out = layer(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    scores = dy.abs().mean(dim=(0, 1))
    expected = sorted(torch.argsort(scores, descending=True)[:3].tolist())
    assert layer.kept_channels.tolist() == expected
    mask = torch.zeros(10, dtype=F64)
    mask[expected] = 1
    ref = nn.Linear(6, 10, bias=bias, dtype=F64)
    ref.load_state_dict(layer.state_dict())
    xr = x.detach().clone().requires_grad_()
    ref(xr).backward(dy * mask)
    assert torch.allclose(x.grad, xr.grad, rtol=1e-12)
    assert torch.allclose(layer.weight.grad, ref.weight.grad, rtol=1e-12)
    if bias:
        assert torch.allclose(layer.bias.grad, ref.bias.grad, rtol=1e-12)


def _scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float64_reference_on_the_same_values(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = SSPropConv2d(4, 8, 3, padding=1, dtype=dtype, drop_rate=0.5)
    x = torch.randn(2, 4, 6, 6, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == dtype
    dy = torch.randn_like(out)
    out.backward(dy)
    assert layer.weight.grad.dtype == dtype and x.grad.dtype == dtype
    ref = SSPropConv2d(4, 8, 3, padding=1, dtype=F64)
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    gx, gw, gb = reference_conv_grads(ref, x64, dy.double(), layer.kept_channels)
    assert _scaled_error(x.grad, gx) < 2e-2
    assert _scaled_error(layer.weight.grad, gw) < 2e-2
    assert _scaled_error(layer.bias.grad, gb) < 2e-2


def test_cpu_autocast_bfloat16_runs_forward_and_backward_in_bfloat16() -> None:
    torch.manual_seed(0)
    layer = SSPropConv2d(4, 8, 3, padding=1, drop_rate=0.5)
    ref = nn.Conv2d(4, 8, 3, padding=1)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out_ref = ref(xr)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, out_ref)
    dy = torch.randn_like(out)
    out.backward(dy)
    mask = torch.zeros(8, dtype=torch.bfloat16)
    mask[layer.kept_channels] = 1
    out_ref.backward(dy * mask.view(1, -1, 1, 1))
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    # Same bfloat16 kernels on the same values: equal up to bf16 rounding of the reductions.
    assert _scaled_error(layer.weight.grad, ref.weight.grad) < 1e-2
    assert _scaled_error(x.grad, xr.grad) < 1e-2
    assert _scaled_error(layer.bias.grad, ref.bias.grad) < 1e-2


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_memory_layouts_match_reference(layout: str) -> None:
    torch.manual_seed(0)
    layer = SSPropConv2d(4, 10, 3, stride=2, padding=1, dtype=F64, drop_rate=0.6)
    if layout == "channels_last":
        layer = layer.to(memory_format=torch.channels_last)
        x = torch.randn(2, 4, 7, 7, dtype=F64).to(memory_format=torch.channels_last).requires_grad_()
    else:
        base = torch.randn(2, 7, 14, 4, dtype=F64)
        x = base.permute(0, 3, 1, 2)[:, :, :, ::2].detach().requires_grad_()
        assert not x.is_contiguous()
    out = layer(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    gx, gw, gb = reference_conv_grads(layer, x, dy, layer.kept_channels)
    assert torch.allclose(x.grad, gx, rtol=1e-10) and torch.allclose(layer.weight.grad, gw, rtol=1e-10)
    assert torch.allclose(layer.bias.grad, gb, rtol=1e-10)


def test_functional_drop_zero_is_plain_conv_and_validates_arguments() -> None:
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    out = ssprop_conv2d(x, w, drop_rate=0.0)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"
    assert torch.equal(out, F.conv2d(x, w))
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        ssprop_conv2d(x, w, drop_rate=1.0)
    with pytest.raises(ConfigError, match="allowed: topk, random, quantile"):
        ssprop_conv2d(x, w, drop_rate=0.5, selection="sorted")
    with pytest.raises(ConfigError, match="ascending"):
        ssprop_conv2d(x, w, kept=torch.tensor([2, 0]))
    record = KeptRecord()
    ssprop_conv2d(x, w, drop_rate=0.5, record=record).sum().backward()
    assert record.kept is not None and record.kept.numel() == 1
