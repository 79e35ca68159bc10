"""Analytic FLOP formulas: pure shape arithmetic, no torch.

Convention: one multiply-add (MAC) is 2 FLOPs, and only the multiply-adds of convolutions and matrix
products are counted (bias additions, normalisation and activations are not). This is the convention of
``torch.utils.flop_counter`` (``conv_flop_count``: ``prod(out_spatial) * prod(kernel) * B * C_out * C_in * 2``;
``mm_flop``: ``m * n * k * 2``) and of the ssProp paper's "0.5554 G MACs" for CIFAR ResNet18, so these
formulas are an independent oracle for what the dispatch-level counter reports.

The backward formulas follow the decomposition in ``torch/utils/flop_counter.py`` (``conv_backward_flop``):
grad_input is a transposed convolution of grad_output with the weight, grad_weight a convolution of the
input with grad_output; each costs as many MACs as the forward convolution restricted to the output
channels that take part. ssProp keeps ``k`` of ``C_out`` output channels (SSPROP.md: ``k = max(1,
int(keep * C_out))``), so both products shrink by ``k / C_out``; each is executed only when needed (the
first layer of a network has no grad_input because the image does not require grad).
"""

from __future__ import annotations

from fractions import Fraction
from math import floor, prod
from typing import Sequence

FLOPS_PER_MAC = 2


def kept_channels(c_out: int, drop_rate: float) -> int:
    """Output channels (or features) ssProp keeps: ``max(1, floor((1 - drop_rate) * c_out))`` (SSPROP.md).

    Computed on the decimal the user wrote (``repr`` of the float, as a fraction), because in binary
    floating point ``(1 - 0.8) * 10`` is ``1.9999999999999996`` and would lose a channel.
    """
    keep = 1 - Fraction(repr(float(drop_rate)))
    return max(1, floor(keep * c_out))


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Spatial output length of a convolution along one axis (PyTorch ``Conv2d`` docs, shape section)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_macs(
    x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int], transposed: bool = False
) -> int:
    """MACs of an N-d convolution from tensor shapes: ``B * prod(w_shape) * prod(spatial)``.

    ``prod(w_shape)`` is ``C_out * (C_in / groups) * prod(kernel)`` (for a transposed convolution
    ``C_in * (C_out / groups) * prod(kernel)``), so groups are accounted for; ``spatial`` is the output's
    spatial size for a convolution and the input's for a transposed one. Equal to
    ``torch.utils.flop_counter.conv_flop_count`` / 2.
    """
    spatial = (x_shape if transposed else out_shape)[2:]
    return x_shape[0] * prod(w_shape) * prod(spatial)


def conv_backward_macs(
    grad_out_shape: Sequence[int],
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    transposed: bool,
    output_mask: Sequence[bool],
) -> int:
    """MACs of ``aten.convolution_backward``: the forward MACs once per computed grad_input / grad_weight.

    Every multiply-add of the forward pairs one input element with one weight element for one output
    element; grad_input and grad_weight each redo exactly those pairings with grad_output in place of the
    output. (torch's stock ``conv_backward_flop`` computes grad_weight as a dense convolution over all
    ``C_in`` channels and so overcounts grouped convolutions by the factor ``groups``; this formula does not.)
    """
    one = conv_macs(x_shape, w_shape, grad_out_shape, transposed)
    return one * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def conv2d_forward_macs(
    batch: int, c_in: int, c_out: int, out_hw: Sequence[int], kernel_hw: Sequence[int], groups: int = 1
) -> int:
    """MACs of a 2-D convolution forward: ``B * C_out * H' * W' * (C_in / groups) * kh * kw``."""
    return batch * c_out * prod(out_hw) * (c_in // groups) * prod(kernel_hw)


def conv2d_backward_macs(
    batch: int,
    c_in: int,
    c_out_kept: int,
    out_hw: Sequence[int],
    kernel_hw: Sequence[int],
    groups: int = 1,
    grad_input: bool = True,
    grad_weight: bool = True,
) -> int:
    """MACs of a 2-D convolution backward on ``c_out_kept`` output channels.

    Each of grad_input and grad_weight costs the forward MACs restricted to the kept channels, and is
    counted only when it is computed. The bias gradient is a sum, not a multiply-add, and is not counted.
    """
    one = conv2d_forward_macs(batch, c_in, c_out_kept, out_hw, kernel_hw, groups)
    return one * (int(grad_input) + int(grad_weight))


def linear_forward_macs(rows: int, in_features: int, out_features: int) -> int:
    """MACs of ``y = x W^T + b`` with ``rows`` = product of the leading dims of x: ``rows * in * out``."""
    return rows * in_features * out_features


def linear_backward_macs(
    rows: int, in_features: int, out_kept: int, grad_input: bool = True, grad_weight: bool = True
) -> int:
    """MACs of a linear backward on ``out_kept`` output features: ``rows * in * k`` per computed gradient."""
    return rows * in_features * out_kept * (int(grad_input) + int(grad_weight))


def macs_to_flops(macs: int | float) -> int | float:
    """FLOPs from multiply-adds under this package's convention (2 FLOPs per MAC)."""
    return macs * FLOPS_PER_MAC
