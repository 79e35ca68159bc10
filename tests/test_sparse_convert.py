"""sparsify / densify / set_drop_rate: in-place swaps that keep the very same Parameter objects."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ssprop_energy import SSPropConv2d, SSPropLinear, densify, set_drop_rate, sparsify
from ssprop_energy.errors import ConfigError
from ssprop_energy.sparse import ssprop_layers


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


def test_sparsify_swaps_convs_in_place_with_the_same_parameters() -> None:
    model = Tiny()
    before = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert sparsify(model, drop_rate=0.5) is model
    assert type(model.stem) is SSPropConv2d and type(model.block[0]) is SSPropConv2d
    assert type(model.head) is nn.Linear
    assert model.stem.drop_rate == 0.5 and model.block[0].groups == 2 and model.stem.padding == (1, 1)
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[n] is before[n] for n in before)
    assert list(model.state_dict()) == keys


def test_an_optimizer_built_before_sparsify_still_updates_the_weights() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model, drop_rate=0.5, layers=("conv", "linear"))
    w0 = model.stem.weight.detach().clone()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    changed_rows = (model.stem.weight.detach() != w0).reshape(8, -1).any(dim=1)
    assert changed_rows.sum().item() == 4  # exactly the 4 kept filters moved
    assert changed_rows.nonzero().reshape(-1).tolist() == model.stem.kept_channels.tolist()


def test_linear_kind_exclude_and_densify_round_trip() -> None:
    model = Tiny()
    params = list(model.parameters())
    sparsify(model, 0.3, layers=("conv", "linear"), selection="random", exclude=("block",))
    assert type(model.stem) is SSPropConv2d and type(model.head) is SSPropLinear
    assert type(model.block[0]) is nn.Conv2d
    assert model.head.selection == "random"
    assert set_drop_rate(model, 0.6) == 2
    assert [m.drop_rate for m in ssprop_layers(model)] == [0.6, 0.6]
    assert densify(model) is model
    assert type(model.stem) is nn.Conv2d and type(model.head) is nn.Linear
    assert not hasattr(model.stem, "drop_rate")
    assert all(a is b for a, b in zip(model.parameters(), params))


def test_sparsify_again_updates_existing_ssprop_layers() -> None:
    model = Tiny()
    sparsify(model, 0.5)
    stem = model.stem
    sparsify(model, 0.2, selection="quantile")
    assert model.stem is stem and stem.drop_rate == 0.2 and stem.selection == "quantile"


def test_forward_hooks_survive_the_swap() -> None:
    model = Tiny()
    seen: list[tuple[int, ...]] = []
    model.stem.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    sparsify(model, 0.5)
    model(torch.randn(1, 3, 4, 4))
    assert seen == [(1, 8, 4, 4)]


def test_subclassed_convs_are_left_dense_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class WeightStdConv(nn.Conv2d):
        pass

    model = nn.Sequential(WeightStdConv(3, 4, 3), nn.Conv2d(4, 4, 3))
    with caplog.at_level(logging.WARNING, logger="ssprop_energy"):
        sparsify(model, 0.5)
    assert type(model[0]) is WeightStdConv and type(model[1]) is SSPropConv2d
    assert "0 (WeightStdConv)" in caplog.text


def test_validation_errors_name_the_bad_value_and_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        sparsify(Tiny(), drop_rate=1.2)
    with pytest.raises(ConfigError, match=r"'attention'.*allowed: conv, linear"):
        sparsify(Tiny(), layers=("attention",))
    with pytest.raises(ConfigError, match="allowed: topk, random, quantile"):
        sparsify(Tiny(), selection="best")
    with pytest.raises(ConfigError, match=r"no layer to sparsify.*Conv2d"):
        sparsify(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match=r"exclude names not found.*'stme'"):
        sparsify(Tiny(), exclude=("stme",))
    with pytest.raises(ConfigError, match="not the model itself"):
        sparsify(nn.Conv2d(1, 1, 1))
    with pytest.raises(ConfigError, match="no ssProp layer"):
        set_drop_rate(Tiny(), 0.5)
    model = sparsify(Tiny(), 0.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        set_drop_rate(model, -0.5)
    assert model.stem.drop_rate == 0.5
