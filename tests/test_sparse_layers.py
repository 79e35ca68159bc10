"""SSPropConv2d / SSPropLinear as drop-in layers: constructor, state_dict, repr, validation, dense path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssprop_energy import SSPropConv2d, SSPropLinear
from ssprop_energy.errors import ConfigError


def test_conv_has_the_same_parameters_and_state_dict_keys_as_nn_conv2d() -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1, bias=True)
    sparse = SSPropConv2d(3, 8, 3, stride=2, padding=1, bias=True, drop_rate=0.5)
    assert isinstance(sparse, nn.Conv2d)
    assert list(sparse.state_dict()) == list(dense.state_dict()) == ["weight", "bias"]
    sparse.load_state_dict(dense.state_dict())
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(sparse(x), dense(x))
    no_bias = SSPropConv2d(3, 8, 3, bias=False)
    assert list(no_bias.state_dict()) == ["weight"] and no_bias.bias is None


def test_linear_has_the_same_state_dict_keys_as_nn_linear() -> None:
    dense = nn.Linear(4, 5)
    sparse = SSPropLinear(4, 5, drop_rate=0.3, selection="quantile")
    sparse.load_state_dict(dense.state_dict())
    assert list(sparse.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 4)
    assert torch.equal(sparse(x), dense(x))


def test_extra_repr_shows_drop_rate_and_selection() -> None:
    conv = SSPropConv2d(3, 8, 3, drop_rate=0.8)
    assert repr(conv) == (
        "SSPropConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), drop_rate=0.8, selection='topk')"
    )
    lin = SSPropLinear(4, 5, drop_rate=0.25, selection="random")
    assert repr(lin) == "SSPropLinear(in_features=4, out_features=5, bias=True, drop_rate=0.25, selection='random')"


@pytest.mark.parametrize("layer", [SSPropConv2d(2, 4, 3), SSPropLinear(2, 4)], ids=["conv", "linear"])
def test_drop_zero_records_the_plain_autograd_node(layer: nn.Module) -> None:
    x = torch.randn(1, 2, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(3, 2)
    out = layer(x.requires_grad_())
    assert type(out.grad_fn).__name__ in ("ConvolutionBackward0", "AddmmBackward0")
    out.sum().backward()
    assert layer.kept_channels is None
    layer.drop_rate = 0.5
    out = layer(x)
    assert type(out.grad_fn).__name__.startswith("_Sparse")


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "high", None])
def test_bad_drop_rates_are_config_errors_naming_the_value(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"\[0, 1\)") as info:
        SSPropConv2d(2, 4, 3, drop_rate=bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)
    assert isinstance(info.value, ValueError)
    layer = SSPropLinear(2, 3)
    with pytest.raises(ConfigError):
        layer.drop_rate = bad  # type: ignore[assignment]
    assert layer.drop_rate == 0.0


def test_unknown_selection_is_a_config_error_listing_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"'sorted'.*allowed: topk, random, quantile"):
        SSPropConv2d(2, 4, 3, selection="sorted")
    layer = SSPropConv2d(2, 4, 3)
    with pytest.raises(ConfigError):
        layer.selection = "top"
    assert layer.selection == "topk"


def test_kept_channels_follow_the_last_backward() -> None:
    torch.manual_seed(0)
    layer = SSPropConv2d(2, 10, 1, bias=False, drop_rate=0.8)
    x = torch.randn(1, 2, 3, 3)
    out = layer(x)
    dy = torch.zeros_like(out)
    dy[:, 7] = 5.0
    dy[:, 2] = -3.0  # the score is the mean absolute value, so a negative gradient counts
    dy[:, 4] = 1.0
    out.backward(dy)
    assert layer.kept_channels.tolist() == [2, 7]
    assert torch.count_nonzero(layer.weight.grad.reshape(10, -1).abs().sum(1)).item() == 2


def test_kept_rows_equal_the_dense_gradient_rows() -> None:
    # drop 0.05 of 10 channels keeps floor(9.5) = 9: one channel dropped, the other rows are dense rows.
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 10, 3)
    sparse = SSPropConv2d(3, 10, 3, drop_rate=0.05)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 6, 6)
    dense(x).square().sum().backward()
    sparse(x).square().sum().backward()
    kept = sparse.kept_channels
    assert kept.numel() == 9
    assert torch.allclose(sparse.weight.grad[kept], dense.weight.grad[kept], rtol=1e-5, atol=1e-6)
