"""Drop-rate schedules against tables of expected rates, and their analytic averages."""

from __future__ import annotations

import math

import pytest
from torch import nn

from ssprop_energy import DropSchedule, sparsify
from ssprop_energy.errors import ConfigError


def rates_by_epoch(s: DropSchedule, epochs: int) -> list[float]:
    return [round(s.rate(e), 12) for e in range(epochs)]


def test_bar_by_epoch_is_the_papers_interleave() -> None:
    s = DropSchedule.from_name("bar", drop_rate=0.8, total_epochs=6)
    assert rates_by_epoch(s, 6) == [0, 0.8, 0, 0.8, 0, 0.8]
    assert s.average_drop_rate() == pytest.approx(0.4, abs=1e-15)  # the paper's headline "0.4"


def test_warmup_comes_first_then_the_interleave_on_absolute_epochs() -> None:
    s = DropSchedule.from_name("bar", drop_rate=0.5, total_epochs=7, warmup_epochs=2)
    assert rates_by_epoch(s, 7) == [0, 0, 0, 0.5, 0, 0.5, 0]
    assert s.average_drop_rate() == pytest.approx(1.0 / 7, abs=1e-15)


def test_constant_linear_cosine_by_epoch_tables() -> None:
    assert rates_by_epoch(DropSchedule("constant", 0.6, 3), 3) == [0.6, 0.6, 0.6]
    assert rates_by_epoch(DropSchedule("linear", 0.8, 5), 5) == [0, 0.2, 0.4, 0.6, 0.8]
    assert rates_by_epoch(DropSchedule("linear", 0.8, 6, warmup_epochs=1), 7) == [0, 0, 0.2, 0.4, 0.6, 0.8, 0.8]
    half = 0.8 * (1 - math.cos(math.pi / 4)) / 2
    cosine = rates_by_epoch(DropSchedule("cosine", 0.8, 5), 5)
    assert cosine == [0, round(half, 12), 0.4, round(0.8 - half, 12), 0.8]
    assert rates_by_epoch(DropSchedule("linear", 0.8, 1), 1) == [0.8]


def test_by_iteration_tables_with_period_4() -> None:
    def wave(mode: str) -> list[float]:
        s = DropSchedule(mode, 0.6, total_epochs=3, warmup_epochs=1, by="iteration", period=4)
        assert [s.rate(0, i) for i in range(8)] == [0.0] * 8  # warm-up epoch dense
        return [round(s.rate(1, i), 12) for i in range(8)]

    assert wave("bar") == [0, 0, 0.6, 0.6, 0, 0, 0.6, 0.6]
    assert wave("linear") == [0, 0.2, 0.4, 0.6, 0, 0.2, 0.4, 0.6]
    assert wave("cosine") == [0, 0.3, 0.6, 0.3, 0, 0.3, 0.6, 0.3]
    assert wave("constant") == [0.6] * 8
    odd = DropSchedule("bar", 0.6, 2, by="iteration", period=5)
    assert [odd.rate(0, i) for i in range(5)] == [0, 0, 0, 0.6, 0.6]  # dense while 2 * phase < T


@pytest.mark.parametrize("mode", ["constant", "linear", "cosine", "bar"])
@pytest.mark.parametrize(
    ("by", "warmup", "iters"), [("epoch", 0, 3), ("epoch", 2, 1), ("iteration", 1, 7), ("iteration", 0, 20)]
)
def test_average_equals_the_mean_of_what_step_applies(mode: str, by: str, warmup: int, iters: int) -> None:
    s = DropSchedule(mode, 0.7, total_epochs=6, warmup_epochs=warmup, by=by, period=4)
    model = sparsify(nn.Sequential(nn.Conv2d(1, 2, 1)), 0.0)
    applied = []
    for e in range(6):
        for i in range(iters):
            applied.append(s.step(model, e, i))
            assert model[0].drop_rate == applied[-1]
    assert s.average_drop_rate(6, iters) == pytest.approx(sum(applied) / len(applied), rel=1e-12, abs=1e-15)


def test_analytic_averages() -> None:
    # linear over E epochs averages D/2; bar by iteration with even T averages D/2 per epoch.
    assert DropSchedule("linear", 0.8, 11).average_drop_rate() == pytest.approx(0.4)
    assert DropSchedule("bar", 0.8, 4, by="iteration", period=10).average_drop_rate(4, 100) == pytest.approx(0.4)
    # a partial last period counts only the iterations that run: 12 iterations, T=10 -> phases 5..9 sparse
    partial = DropSchedule("bar", 0.8, 1, by="iteration", period=10)
    assert partial.average_drop_rate(1, 12) == pytest.approx(0.8 * 5 / 12)


def test_keep_fraction_conversion() -> None:
    s = DropSchedule.from_keep("bar", keep=0.2, total_epochs=4)
    assert s.drop_rate == 0.8 and s.mode == "bar"
    with pytest.raises(ConfigError, match="keep fraction"):
        DropSchedule.from_keep("constant", keep=0.0, total_epochs=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "step"}, r"'step'.*allowed: constant, linear, cosine, bar"),
        ({"drop_rate": 1.0}, r"\[0, 1\)"),
        ({"by": "batch"}, r"'batch'.*allowed: epoch, iteration"),
        ({"period": 1}, "period must be an integer >= 2"),
        ({"total_epochs": 0}, "total_epochs"),
        ({"warmup_epochs": 5}, "warmup_epochs"),
    ],
)
def test_invalid_schedules_are_config_errors(kwargs: dict, message: str) -> None:
    args = {"mode": "bar", "drop_rate": 0.8, "total_epochs": 5} | kwargs
    with pytest.raises(ConfigError, match=message):
        DropSchedule(**args)


def test_step_on_a_model_without_ssprop_layers_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no ssProp layer"):
        DropSchedule("constant", 0.5, 2).step(nn.Sequential(nn.Conv2d(1, 1, 1)), 0)
