"""ssProp autograd functions: a normal forward, a backward that keeps only the strongest output channels.

Backward at drop rate ``d`` (the rule of the paper's public code, "unified" mode):

1. score every output channel ``c`` by ``mean(|grad_output[:, c]|)`` over the batch and all other positions
   (ranked on the per-channel sums, which order the channels exactly as the means do);
2. keep ``k = max(1, floor((1 - d) * C_out))`` channels (see :func:`keep_count` for the float guard; the
   public Linear layer has no floor at 1 and can keep 0 features, this one keeps at least 1);
3. gather the kept channels of ``grad_output`` (and of the weight) into smaller contiguous tensors and run
   the convolution / matmul backward on them, so the executed FLOPs really shrink by ``k / C_out``;
4. scatter the kept rows of ``grad_weight`` / ``grad_bias`` into zeros. ``grad_input`` needs no scatter: it is
   a sum over output channels, and the dropped ones contribute exactly zero.

Pointwise (1x1, unpadded, ungrouped) convolutions on NCHW inputs skip the convolution kernels: their backward is
two matrix products on the gathered gradient (``grad_weight = dy_k @ x^T``, ``grad_input = W_k^T @ dy_k``, the
latter written to the strided positions of a zero ``grad_input``), which executes the same multiply-adds
without oneDNN's layout conversions of the full-size input and ``grad_input``; those conversions made the
gathered 1x1 stride-2 shortcut backward of a ResNet barely faster than the dense one.

The result equals the dense backward with ``grad_output`` zeroed outside the kept channels (the tests check
this against ``nn.Conv2d``), while executing only the kept part.

Grouped convolutions (``groups > 1``) cannot drop channels freely: the backward runs per group, so the kept
set must keep the group structure. Two exact rules, chosen by the number of output channels per group ``m``:

- ``m == 1`` (depthwise, and any conv with one output channel per group): each kept channel is a whole
  group. Channels are chosen globally (top-k over all ``C_out``), and the backward runs as a grouped conv
  with ``groups = k`` on the kept groups' input channels; ``grad_input`` of the dropped groups is exactly 0.
- ``m > 1``: the top ``k_g = max(1, floor((1 - d) * m))`` channels are kept *within each group*, so every
  group keeps the same count and the backward stays a ``groups``-grouped conv. The kept set is then the
  per-group top-k, not the global one (documented deviation; the paper's code has no grouped case).

Selections: ``"topk"`` (the paper), ``"random"`` (the paper's ablation, drawn from torch's global RNG, so
``torch.manual_seed`` makes it reproducible) and ``"quantile"`` (sort-free: the threshold is the k-th largest
score found by ``torch.kthvalue``, a selection algorithm, then every channel above it is kept; ties at the
threshold are broken by lowest channel index, so exactly ``k`` channels are kept, always the same set as
``"topk"`` up to tie-breaking).

Under autocast the inputs are cast to the autocast dtype *outside* the custom function (differentiable
casts) and the function runs with autocast off, so forward and backward see one dtype.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssprop_energy.errors import ConfigError

logger = logging.getLogger(__name__)

from ssprop_energy.sparse.vocab import SELECTIONS  # noqa: E402 - the name list has one torch-free owner

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class KeptRecord:
    """Holds the channel indices kept by the last backward (set by the backward, read for inspection).

    Storing the index tensor costs no device sync; reading it (``.tolist()``) does, so only tests and
    diagnostics read it.
    """

    __slots__ = ("kept",)

    def __init__(self) -> None:
        self.kept: Tensor | None = None


def validate_drop_rate(drop_rate: float) -> float:
    """Return ``drop_rate`` as a float, or raise :class:`ConfigError` if it is outside [0, 1)."""
    try:
        value = float(drop_rate)
    except (TypeError, ValueError):
        raise ConfigError(f"drop rate must be a number in [0, 1), got {drop_rate!r}") from None
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ConfigError(f"drop rate must be in [0, 1) (0 = dense backward), got {drop_rate!r}")
    return value


def validate_selection(selection: str) -> str:
    """Return ``selection`` or raise :class:`ConfigError` naming the allowed strategies."""
    if selection not in SELECTIONS:
        raise ConfigError(f"unknown selection {selection!r}; allowed: {', '.join(SELECTIONS)}")
    return selection


def keep_count(drop_rate: float, channels: int) -> int:
    """Number of channels kept: ``max(1, floor((1 - drop_rate) * channels))``, the paper code's conv rule.

    The product is rounded to 9 decimals before flooring because binary floating point would otherwise
    lose a channel: ``(1 - 0.8) * 10`` is ``1.9999999999999996``, which must keep 2 channels, not 1.

    Deliberate differences from the public code (``EfficientLayers.py``), both kept here:

    - its Linear layer keeps ``int(percentage * out_features)`` with no floor at 1, so keep 0.1 of 5
      outputs keeps 0 features and gives an all-zero gradient; this rule (used for Linear too) keeps 1.
      Its conv layer has the floor, so convolutions agree.
    - it floors the keep fraction it was given without the 9-decimal rounding; where its own product falls
      just below an integer (keep 0.57 of 100 channels is ``56.99999999999999``, so 56) this keeps one more.
    """
    return max(1, int(round((1.0 - drop_rate) * channels, 9)))


# Elements of |grad_output| materialised at a time while scoring: 1 MiB of float32, so the temporary stays in
# cache and never raises peak memory.
_SCORE_CHUNK_ELEMS = 1 << 18


def channel_l1(grad_output: Tensor, channel_dim: int = 1) -> Tensor:
    """Sum of ``|grad_output|`` per channel over every other dimension (float32 at least for half types).

    The backward selects on these sums: they rank channels exactly as the means do (every channel has the
    same element count), without a division per layer.
    """
    acc = torch.float32 if grad_output.dtype in _LOW_PRECISION else None
    channels = grad_output.shape[channel_dim]
    if channel_dim == 1 and grad_output.dim() >= 3 and grad_output.is_contiguous():
        # (B, C, positions): reduce each contiguous (sample, channel) run, then the samples.
        rows = grad_output.reshape(grad_output.shape[0], channels, -1)

        def reduce(part: Tensor) -> Tensor:
            return part.abs().sum(dim=2, dtype=acc).sum(dim=0)
    elif channel_dim == grad_output.dim() - 1 or (
        channel_dim == 1 and grad_output.dim() == 4 and grad_output.is_contiguous(memory_format=torch.channels_last)
    ):
        # Channels innermost in memory (a linear layer's (N, F), or channels_last): one row per position.
        rows = grad_output.movedim(channel_dim, -1).reshape(-1, channels)

        def reduce(part: Tensor) -> Tensor:
            return part.abs().sum(dim=0, dtype=acc)
    else:
        dims = tuple(d for d in range(grad_output.dim()) if d != channel_dim)
        return grad_output.abs().sum(dim=dims, dtype=acc)
    # abs + sum over cache-sized chunks: 2.5-3.5x faster on CPU than one L1 vector_norm over dims (0, 2, 3),
    # whose strided reduction is not vectorised, and 1.1-1.7x faster than one abs().sum() with a full-size
    # temporary (ResNet-18 gradient shapes at batch 64, torch 2.13, 1 thread).
    step = max(1, _SCORE_CHUNK_ELEMS // max(1, rows[0].numel()))
    total = torch.zeros(channels, dtype=acc or grad_output.dtype, device=grad_output.device)
    for part in rows.split(step):
        total += reduce(part)
    return total


def channel_scores(grad_output: Tensor, channel_dim: int = 1) -> Tensor:
    """Mean ``|grad_output|`` per channel over every other dimension (float32 at least for half types)."""
    count = grad_output.numel() // max(1, grad_output.shape[channel_dim])
    return channel_l1(grad_output, channel_dim) / max(1, count)


def select_channels(scores: Tensor, k: int, selection: str) -> Tensor:
    """Pick ``k`` channels per row of ``scores`` (shape ``(groups, m)``).

    Returns:
        Flat channel indices ``row * m + column``, ascending (sorted within each row and rows in order),
        ``groups * k`` of them.
    """
    groups, m = scores.shape
    if selection == "topk":
        cols = torch.topk(scores, k, dim=1, sorted=False).indices
    elif selection == "random":
        cols = torch.topk(torch.rand(groups, m, device=scores.device), k, dim=1, sorted=False).indices
    elif selection == "quantile":
        threshold = torch.kthvalue(scores, m - k + 1, dim=1, keepdim=True).values
        above = scores > threshold
        tied = scores == threshold
        missing = k - above.sum(dim=1, keepdim=True)
        mask = above | (tied & (tied.cumsum(dim=1) <= missing))
        # Exactly groups*k entries are set, so the static size avoids a device sync on accelerators.
        return torch.nonzero_static(mask.reshape(-1), size=groups * k).reshape(-1)
    else:
        raise ConfigError(f"unknown selection {selection!r}; allowed: {', '.join(SELECTIONS)}")
    cols = cols.sort(dim=1).values
    offsets = torch.arange(groups, device=scores.device).unsqueeze(1) * m
    return (cols + offsets).reshape(-1)


def _gather(t: Tensor, dim: int, index: Tensor) -> Tensor:
    """``t.index_select(dim, index)`` that keeps a channels_last tensor channels_last.

    A plain ``index_select`` returns NCHW-contiguous output; feeding that next to channels_last operands
    would make the convolution backward convert layouts (an extra full copy). Selecting on the permuted
    NHWC view allocates the result directly in channels_last order.
    """
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        nhwc_dim = (0, 3, 1, 2)[dim]
        return t.permute(0, 2, 3, 1).index_select(nhwc_dim, index).permute(0, 3, 1, 2)
    return t.index_select(dim, index)


def _pair(value: int | Sequence[int]) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    return [int(v) for v in value]


def _resolve_padding(
    input: Tensor, weight: Tensor, padding: str | int | Sequence[int], dilation: list[int]
) -> tuple[Tensor, list[int]]:
    """Turn 'valid'/'same' into explicit symmetric padding, padding the input first where asymmetric.

    'same' with an odd total padding puts the extra row/column at the end, as ATen does.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return input, [0, 0]
        if padding != "same":
            raise ConfigError(f"unknown padding {padding!r}; allowed: 'valid', 'same', int, (int, int)")
        totals = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
        left = [t // 2 for t in totals]
        extra = [t - 2 * lo for t, lo in zip(totals, left)]
        if any(extra):
            input = F.pad(input, (0, extra[1], 0, extra[0]))
        return input, left
    return input, _pair(padding)


def _autocast_args(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...] | None:
    """Cast floating tensors to the autocast dtype if autocast is on for ``device_type``, else None."""
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _is_pointwise(input: Tensor, weight: Tensor, padding: list[int], groups: int) -> bool:
    """True for a 1x1, unpadded, ungrouped convolution on an NCHW-contiguous input (the matmul backward)."""
    return (
        groups == 1 and weight.shape[2:] == (1, 1) and padding == [0, 0] and input.dim() == 4
        and input.is_contiguous()
    )


def _pointwise_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    kept: Tensor,
    stride: list[int],
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Exact kept-channel gradients of a 1x1 convolution as two matrix products.

    With ``x_s`` the input sampled at the output positions (every ``stride``-th row and column) and ``dy_k``
    the kept channels of ``grad_output``: ``grad_weight[kept] = dy_k @ x_s^T`` over all (sample, position)
    pairs, one GEMM; ``grad_input`` at the sampled positions is ``W_k^T @ dy_k`` per sample and exactly 0
    elsewhere. The multiply-adds are the convolution backward's own (``2 * k * C_in * B * H_out * W_out``).
    """
    batch, c_in = input.shape[:2]
    n_kept = kept.numel()
    # Gathering on the (C, B, H, W) view gives the kept rows as one contiguous (k, B*H_out*W_out) matrix.
    dy_k = grad_output.transpose(0, 1).index_select(0, kept)
    h_out, w_out = dy_k.shape[2:]
    dy_rows = dy_k.reshape(n_kept, -1)
    grad_input = grad_weight = grad_bias = None
    if need_weight:
        x_rows = input[:, :, :: stride[0], :: stride[1]].transpose(0, 1).reshape(c_in, -1)
        grad_w_k = (dy_rows @ x_rows.t()).reshape(n_kept, c_in, 1, 1)
        grad_weight = torch.zeros_like(weight).index_copy_(0, kept, grad_w_k)
    if need_input:
        w_t = weight.reshape(weight.shape[0], c_in).index_select(0, kept).t()
        # (C_in, k) @ (B, k, P) -> (B, C_in, P): NCHW directly; the (B, k, P) view of dy_k needs no copy.
        grad_sampled = torch.matmul(w_t, dy_k.transpose(0, 1).reshape(batch, n_kept, -1))
        grad_sampled = grad_sampled.reshape(batch, c_in, h_out, w_out)
        if stride == [1, 1]:
            grad_input = grad_sampled
        else:
            grad_input = torch.zeros_like(input, memory_format=torch.contiguous_format)
            grad_input[:, :, :: stride[0], :: stride[1]] = grad_sampled
    if need_bias:
        grad_bias = torch.zeros(weight.shape[0], dtype=dy_rows.dtype, device=dy_rows.device).index_copy_(
            0, kept, dy_rows.sum(dim=1)
        )
    return grad_input, grad_weight, grad_bias


class _SparseConv2dFn(torch.autograd.Function):
    """conv2d forward; channel-sparse backward. Non-tensor arguments are resolved by :func:`ssprop_conv2d`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        drop_rate: float,
        selection: str,
        kept: Tensor | None,
        record: KeptRecord | None,
    ) -> Tensor:
        ctx.save_for_backward(input, weight)
        ctx.conf = (stride, padding, dilation, groups, drop_rate, selection, kept, record, bias is not None)
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups, drop_rate, selection, kept, record, has_bias = ctx.conf
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        c_out = weight.shape[0]
        m = c_out // groups
        depthwise = groups > 1 and m == 1
        # Selection runs over all channels (one row) or within each group (one row per group).
        per_row = c_out if (groups == 1 or depthwise) else m
        k = keep_count(drop_rate, per_row)
        if kept is None and k < per_row:
            kept = select_channels(channel_l1(grad_output).reshape(-1, per_row), k, selection)
        if record is not None:
            record.kept = kept
        tail = (None,) * 8
        if kept is None:
            grads = torch.ops.aten.convolution_backward(
                grad_output, input, weight, [c_out] if has_bias else None, stride, padding, dilation,
                False, [0, 0], groups, [need_input, need_weight, need_bias and has_bias],
            )
            return (grads[0], grads[1], grads[2] if has_bias else None, *tail)

        if not depthwise and _is_pointwise(input, weight, padding, groups):
            return (*_pointwise_backward(grad_output, input, weight, kept, stride, need_input, need_weight,
                                         need_bias and has_bias), *tail)
        grad_out_k = _gather(grad_output, 1, kept)
        weight_k = _gather(weight, 0, kept)
        n_kept = kept.numel()
        if depthwise:
            per_group = input.shape[1] // groups
            in_idx = (kept.unsqueeze(1) * per_group + torch.arange(per_group, device=kept.device)).reshape(-1)
            input_k = _gather(input, 1, in_idx)
            groups_k = n_kept
        else:
            input_k = input
            groups_k = groups
        grad_in_k, grad_w_k, grad_b_k = torch.ops.aten.convolution_backward(
            grad_out_k, input_k, weight_k, [n_kept] if has_bias else None, stride, padding, dilation,
            False, [0, 0], groups_k, [need_input, need_weight, need_bias and has_bias],
        )
        grad_input = grad_in_k
        if need_input and depthwise:
            grad_input = torch.zeros_like(input).index_copy_(1, in_idx, grad_in_k)
        grad_weight = torch.zeros_like(weight).index_copy_(0, kept, grad_w_k) if need_weight else None
        grad_bias = None
        if need_bias and has_bias:
            grad_bias = torch.zeros(c_out, dtype=grad_b_k.dtype, device=grad_b_k.device).index_copy_(0, kept, grad_b_k)
        return (grad_input if need_input else None, grad_weight, grad_bias, *tail)


def _check_fixed_kept(kept: Tensor, channels: int, groups: int) -> Tensor:
    """Validate a caller-fixed kept set (tests, gradcheck): ascending, in range, group structure intact."""
    kept = torch.as_tensor(kept, dtype=torch.long).reshape(-1)
    if kept.numel() == 0 or kept.min() < 0 or kept.max() >= channels or not bool((kept.diff() > 0).all()):
        raise ConfigError(
            f"kept must hold ascending, distinct channel indices in [0, {channels}), got {kept.tolist()}"
        )
    m = channels // groups
    if groups > 1 and m > 1:
        counts = torch.bincount(kept // m, minlength=groups)
        if not bool((counts == counts[0]).all()):
            raise ConfigError(f"kept must keep the same number of channels in each of the {groups} groups")
    return kept


def ssprop_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    drop_rate: float = 0.0,
    selection: str = "topk",
    kept: Tensor | None = None,
    record: KeptRecord | None = None,
) -> Tensor:
    """``F.conv2d`` whose backward keeps only ``keep_count(drop_rate, ·)`` output channels.

    Args:
        input, weight, bias, stride, padding, dilation, groups: as :func:`torch.nn.functional.conv2d`
            (zero padding; other padding modes pad the input first, as ``nn.Conv2d`` does).
        drop_rate: fraction of output channels whose gradient is dropped, in [0, 1). At 0 this is exactly
            ``F.conv2d`` (no custom function at all).
        selection: ``"topk"``, ``"random"`` or ``"quantile"``.
        kept: fix the kept channel indices instead of selecting them (ascending; tests and gradcheck).
        record: receives the kept indices of each backward.

    Returns:
        The convolution output, as ``F.conv2d``.
    """
    drop_rate = validate_drop_rate(drop_rate)
    validate_selection(selection)
    if drop_rate == 0.0 and kept is None:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    dilation_l = _pair(dilation)
    input, padding_l = _resolve_padding(input, weight, padding, dilation_l)
    if kept is not None:
        kept = _check_fixed_kept(kept, weight.shape[0], groups).to(weight.device)
    cast = _autocast_args(input.device.type, input, weight, bias)
    args = (_pair(stride), padding_l, dilation_l, groups, drop_rate, selection, kept, record)
    if cast is None:
        return _SparseConv2dFn.apply(input, weight, bias, *args)
    with torch.autocast(input.device.type, enabled=False):
        return _SparseConv2dFn.apply(*cast, *args)


class _SparseLinearFn(torch.autograd.Function):
    """linear forward; output-feature-sparse backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        drop_rate: float,
        selection: str,
        kept: Tensor | None,
        record: KeptRecord | None,
    ) -> Tensor:
        ctx.save_for_backward(input, weight)
        ctx.conf = (drop_rate, selection, kept, record, bias is not None)
        return F.linear(input, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        drop_rate, selection, kept, record, has_bias = ctx.conf
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        out_features, in_features = weight.shape
        grad_2d = grad_output.reshape(-1, out_features)
        k = keep_count(drop_rate, out_features)
        if kept is None and k < out_features:
            kept = select_channels(channel_l1(grad_2d).reshape(1, out_features), k, selection)
        if record is not None:
            record.kept = kept
        input_2d = input.reshape(-1, in_features)
        if kept is None:
            grad_input = (grad_2d @ weight).reshape(input.shape) if need_input else None
            grad_weight = grad_2d.t() @ input_2d if need_weight else None
            grad_bias = grad_2d.sum(0) if need_bias and has_bias else None
            return grad_input, grad_weight, grad_bias, None, None, None, None
        grad_k = grad_2d.index_select(1, kept)
        grad_input = (grad_k @ weight.index_select(0, kept)).reshape(input.shape) if need_input else None
        grad_weight = torch.zeros_like(weight).index_copy_(0, kept, grad_k.t() @ input_2d) if need_weight else None
        grad_bias = None
        if need_bias and has_bias:
            grad_bias = torch.zeros(out_features, dtype=grad_k.dtype, device=grad_k.device).index_copy_(
                0, kept, grad_k.sum(0)
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None


def ssprop_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    drop_rate: float = 0.0,
    selection: str = "topk",
    kept: Tensor | None = None,
    record: KeptRecord | None = None,
) -> Tensor:
    """``F.linear`` whose backward keeps only ``keep_count(drop_rate, out_features)`` output features.

    The score of a feature is the mean ``|grad_output|`` over all leading dimensions. At drop rate 0 this
    is exactly ``F.linear``. Arguments as :func:`ssprop_conv2d`.
    """
    drop_rate = validate_drop_rate(drop_rate)
    validate_selection(selection)
    if drop_rate == 0.0 and kept is None:
        return F.linear(input, weight, bias)
    if kept is not None:
        kept = _check_fixed_kept(kept, weight.shape[0], 1).to(weight.device)
    cast = _autocast_args(input.device.type, input, weight, bias)
    if cast is None:
        return _SparseLinearFn.apply(input, weight, bias, drop_rate, selection, kept, record)
    with torch.autocast(input.device.type, enabled=False):
        return _SparseLinearFn.apply(*cast, drop_rate, selection, kept, record)
