"""Analytic FLOP formulas against hand arithmetic and against the ssProp layers' own keep rule."""

from __future__ import annotations

import pytest

from ssprop_energy.flops import formulas as fm
from ssprop_energy.sparse import keep_count


def test_conv_forward_macs_by_hand() -> None:
    # 3 -> 4 channels, 3x3 kernel, 6x6 output: 4 * 36 * 3 * 9 = 3888 MACs per sample.
    assert fm.conv2d_forward_macs(1, 3, 4, (6, 6), (3, 3)) == 3888
    assert fm.conv2d_forward_macs(2, 3, 4, (6, 6), (3, 3)) == 7776
    # depthwise 8 channels: each output channel sees 1 input channel.
    assert fm.conv2d_forward_macs(1, 8, 8, (4, 4), (3, 3), groups=8) == 8 * 16 * 9


def test_conv_backward_macs_counts_each_gradient_only_when_needed() -> None:
    one = fm.conv2d_forward_macs(2, 3, 2, (5, 5), (3, 3))
    assert fm.conv2d_backward_macs(2, 3, 2, (5, 5), (3, 3)) == 2 * one
    assert fm.conv2d_backward_macs(2, 3, 2, (5, 5), (3, 3), grad_input=False) == one
    assert fm.conv2d_backward_macs(2, 3, 2, (5, 5), (3, 3), grad_input=False, grad_weight=False) == 0


def test_linear_macs_by_hand() -> None:
    assert fm.linear_forward_macs(rows=6, in_features=8, out_features=5) == 240
    assert fm.linear_backward_macs(6, 8, 2) == 2 * 6 * 8 * 2
    assert fm.linear_backward_macs(6, 8, 2, grad_input=False) == 6 * 8 * 2


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "expected"),
    [(32, 3, 1, 1, 32), (32, 3, 2, 1, 16), (6, 3, 2, 0, 2), (32, 1, 2, 0, 16)],
)
def test_conv_output_size(size: int, kernel: int, stride: int, padding: int, expected: int) -> None:
    assert fm.conv_output_size(size, kernel, stride, padding) == expected


@pytest.mark.parametrize(
    ("channels", "drop_rate", "kept"),
    [(10, 0.8, 2), (10, 0.0, 10), (64, 0.8, 12), (12, 0.8, 2), (5, 0.8, 1), (3, 0.9, 1), (10, 0.7, 3), (100, 0.29, 71)],
)
def test_kept_channels_floors_the_decimal_value(channels: int, drop_rate: float, kept: int) -> None:
    # (1 - 0.8) * 10 is 1.9999999999999996 in binary floating point: the rule means 2.
    assert fm.kept_channels(channels, drop_rate) == kept


def test_kept_channels_agrees_with_the_layers_rule() -> None:
    # On drop rates written as decimals; the two rules differ only within 1e-9 of a channel boundary.
    for channels in (1, 3, 10, 12, 64, 100, 128, 512):
        for hundredth in range(0, 100, 5):
            for drop_rate in (hundredth / 100, 1 / 3):
                assert fm.kept_channels(channels, drop_rate) == keep_count(drop_rate, channels), (channels, drop_rate)


def test_flops_are_two_per_mac() -> None:
    assert fm.macs_to_flops(555_422_720) == 1_110_845_440


def test_conv_macs_from_shapes() -> None:
    assert fm.conv_macs([2, 3, 6, 6], [4, 3, 3, 3], [2, 4, 6, 6]) == 2 * 3888
    # transposed: weight (C_in, C_out / groups, kh, kw), work scales with the input positions
    assert fm.conv_macs([1, 8, 4, 4], [8, 2, 3, 3], [1, 2, 9, 9], transposed=True) == 8 * 16 * 2 * 9
    assert fm.conv_backward_macs([1, 4, 6, 6], [1, 3, 6, 6], [4, 3, 3, 3], False, [False, True, False]) == 3888
