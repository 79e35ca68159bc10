"""Drop-rate schedules against the public code's ``DropSchedular`` (lujiazho/ssProp, ``utils.py``).

Two kinds of reference:

- tables derived by hand from reading the public code (each with the arithmetic in a comment);
- ``OfficialTrainer``, a stateful model of how the public ``train()`` drives ``DropSchedular`` (written from
  reading the code: a toggle flipped per call after warm-up, ``step`` ignored for batches other than 0 when
  ``by_epoch``, keep fractions), compared with the pure closed form ``DropSchedule.rate`` over a grid.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
from torch import nn

from ssprop_energy import DropSchedule, sparsify
from ssprop_energy.errors import ConfigError

OFFICIAL = DropSchedule.from_official


class OfficialTrainer:
    """The public training loop's view of its scheduler: the keep fraction the layers hold at each batch.

    State as in the public class: ``dense_next`` starts True; warm-up calls leave it alone; with interleave a
    call that finds it True clears it and returns keep 1, any other post-warm-up call sets it and returns the
    mode's keep. By epoch, only batch 0 calls the scheduler; later batches keep the layers' value.
    Deliberately written in a different shape from the module under test (keep space, a loop, state).
    """

    def __init__(self, mode: str, p: float, pmin: float, epochs: int, interleave: bool, warmup: int,
                 by_epoch: bool, t: int) -> None:
        self.mode, self.p, self.pmin, self.epochs = mode, p, pmin, epochs
        self.interleave, self.warmup, self.by_epoch, self.t = interleave, warmup, by_epoch, t
        self.dense_next = True

    def _epoch_keep(self, e: int) -> float:
        if e < self.warmup:
            return 1.0
        if self.interleave and self.dense_next:
            self.dense_next = False
            return 1.0
        self.dense_next = True
        span = self.p - self.pmin
        if self.mode == "constant":
            return self.p
        if self.mode == "linear":
            return max(self.pmin, self.p - span * e / (self.epochs - 1))
        if self.mode == "cosine":
            return self.pmin + span * (1 + math.cos(e * 3.14159 / (self.epochs - 1))) / 2
        return self.p if 2 * e < self.epochs - self.epochs % 2 else self.pmin  # e < epochs // 2

    def _iteration_keep(self, e: int, i: int) -> float:
        if e < self.warmup:
            return 1.0
        span = self.p - self.pmin
        if self.mode == "linear":
            return max(self.pmin, self.p - span * (i % self.t) / self.t)
        if self.mode == "cosine":
            return self.pmin + span * (1 + math.cos(i * 3.14159 / self.t)) / 2
        if self.mode == "bar":
            return self.p if i % self.t < self.t // 2 else self.pmin
        raise ValueError(self.mode)  # the public code: "Drop mode constant not recognized"

    def drops(self, batches: int) -> list[list[float]]:
        """Drop rate (1 - the layers' keep) at every (epoch, batch) of an uninterrupted run."""
        keep = self.p  # the layers' initial value; batch 0 always overwrites it
        out = []
        for e in range(self.epochs):
            row = []
            for i in range(batches):
                if not self.by_epoch:
                    keep = self._iteration_keep(e, i)
                elif i == 0:
                    keep = self._epoch_keep(e)
                row.append(1.0 - keep)
            out.append(row)
        return out


def drops(s: DropSchedule, epochs: int, batches: int = 1) -> list[float]:
    return [s.rate(e, i) for e in range(epochs) for i in range(batches)]


# ---------------------------------------------------------------------------------------------- the grid

KEEPS = [(1.0, 0.2), (0.6, 0.2), (0.2, 0.6), (0.9, 0.9)]


@pytest.mark.parametrize(("by_epoch", "t"), [(True, 10), (False, 3), (False, 4), (False, 1)])
@pytest.mark.parametrize("mode", ["constant", "linear", "cosine", "bar"])
def test_closed_form_equals_the_stateful_public_scheduler_over_a_grid(mode: str, by_epoch: bool, t: int) -> None:
    batches = 7
    checked = 0
    for (p, pmin), interleave, warmup, epochs in itertools.product(KEEPS, (False, True), range(4), range(1, 13)):
        args = (mode, p, pmin, epochs, interleave, warmup, by_epoch, t)
        official_raises = (not by_epoch and mode == "constant") or (
            by_epoch and mode in ("linear", "cosine") and epochs == 1
        )
        if official_raises:
            with pytest.raises(ConfigError):
                OFFICIAL(*args)
            continue
        expected = OfficialTrainer(*args).drops(batches)
        got = OFFICIAL(*args).rates(epochs, batches)
        for e in range(epochs):
            assert got[e] == pytest.approx(expected[e], abs=1e-12), (args, e)
        checked += 1
    # every (keeps, interleave, warm-up, epochs) case ran, except where the public code raises
    assert checked == (0 if mode == "constant" and not by_epoch else len(KEEPS) * 2 * 4 * (11 if by_epoch and mode in ("linear", "cosine") else 12))


# ---------------------------------------------------------------------------------------------- hand tables


def test_headline_bar_by_epoch_and_its_average() -> None:
    s = DropSchedule.from_name("bar", drop_rate=0.8, total_epochs=6)
    assert drops(s, 6) == [0, 0.8, 0, 0.8, 0, 0.8]
    assert s.average_drop_rate() == pytest.approx(0.4, abs=1e-15)  # the paper's headline "0.4"
    # the public code's headline arguments: constant, keep 0.2, interleave, by epoch
    assert drops(OFFICIAL("constant", 0.2, 0.2, 6, interleave=True), 6) == pytest.approx(drops(s, 6), abs=1e-12)


def test_interleave_restarts_after_an_odd_warmup() -> None:
    # warm-up 1: epoch 0 dense (warm-up); the toggle starts at epoch 1 -> dense, then 0.8, dense, ...
    # (absolute epoch parity, the project's old rule, would differ on every epoch from 1 to 9)
    s = DropSchedule.from_name("bar", drop_rate=0.8, total_epochs=10, warmup_epochs=1)
    assert drops(s, 10) == [0, 0, 0.8, 0, 0.8, 0, 0.8, 0, 0.8, 0]
    even = DropSchedule.from_name("bar", drop_rate=0.5, total_epochs=7, warmup_epochs=2)
    assert drops(even, 7) == [0, 0, 0, 0.5, 0, 0.5, 0]
    assert even.average_drop_rate() == pytest.approx(1.0 / 7, abs=1e-15)


def test_ramps_by_epoch_use_the_absolute_epoch_and_ignore_warmup() -> None:
    # linear keep max(0.2, 1 - 0.8 * e / 4): e = 2, 3, 4 -> 0.6, 0.4, 0.2 (e = 0, 1 are warm-up)
    lin = OFFICIAL("linear", 1.0, 0.2, 5, warmup=2)
    assert drops(lin, 5) == pytest.approx([0, 0, 0.4, 0.6, 0.8], abs=1e-12)
    assert drops(DropSchedule.from_name("linear", 0.8, 5, warmup_epochs=2), 5) == pytest.approx(drops(lin, 5))
    # linear, 6 epochs, warm-up 1: 0.8 * e / 5; past the run the clamp holds at 0.8
    assert drops(DropSchedule.from_name("linear", 0.8, 6, warmup_epochs=1), 7) == pytest.approx(
        [0, 0.16, 0.32, 0.48, 0.64, 0.8, 0.8], abs=1e-12)
    # cosine keep 0.2 + 0.4 * (1 + cos(e * 3.14159 / 4)) -> drop 0.4 * (1 - cos(e * 3.14159 / 4))
    cos = OFFICIAL("cosine", 1.0, 0.2, 5)
    assert drops(cos, 5) == pytest.approx([0, 0.117157100, 0.399999469, 0.682842150, 0.8], abs=1e-6)
    # interleaved linear, warm-up 1: e0 warm-up, e1 dense, e2 = 0.8 * 2 / 4, e3 dense, e4 = 0.8
    inter = OFFICIAL("linear", 1.0, 0.2, 5, interleave=True, warmup=1)
    assert drops(inter, 5) == pytest.approx([0, 0, 0.4, 0, 0.8], abs=1e-12)


def test_start_keep_below_one_and_the_reversed_clamp() -> None:
    # keep 0.6 -> 0.2 linearly over 5 epochs: drop 0.4 + 0.4 * e / 4
    assert drops(OFFICIAL("linear", 0.6, 0.2, 5), 5) == pytest.approx([0.4, 0.5, 0.6, 0.7, 0.8], abs=1e-12)
    assert drops(DropSchedule.from_name("linear", 0.8, 5, start_drop_rate=0.4), 5) == pytest.approx(
        [0.4, 0.5, 0.6, 0.7, 0.8], abs=1e-12)
    # min_percentage above percentage: linear keep max(0.6, 0.2 + 0.4 x) = 0.6 throughout (drop 0.4);
    # cosine goes from keep 0.2 up to 0.6 (drop 0.8 down to 0.4)
    assert drops(OFFICIAL("linear", 0.2, 0.6, 5), 5) == pytest.approx([0.4] * 5, abs=1e-12)
    assert drops(OFFICIAL("cosine", 0.2, 0.6, 3), 3) == pytest.approx([0.8, 0.6, 0.4], abs=1e-6)
    # constant applies `percentage`; min_percentage is unused
    assert drops(OFFICIAL("constant", 0.3, 0.9, 2), 2) == pytest.approx([0.7, 0.7], abs=1e-12)


def test_halves_is_the_public_bar_mode() -> None:
    # drop_mode='bar', 5 epochs: keep p for e < 5 // 2 = 2, then min
    assert drops(OFFICIAL("bar", 1.0, 0.2, 5), 5) == pytest.approx([0, 0, 0.8, 0.8, 0.8], abs=1e-12)
    assert drops(DropSchedule.from_name("halves", 0.8, 5), 5) == pytest.approx([0, 0, 0.8, 0.8, 0.8], abs=1e-12)
    # with interleave and warm-up 1: e0 warm-up, e1 dense (toggle), e2 0.8, e3 dense, e4 0.8
    assert drops(OFFICIAL("bar", 1.0, 0.2, 5, interleave=True, warmup=1), 5) == pytest.approx([0, 0, 0.8, 0, 0.8])


def test_by_iteration_tables() -> None:
    def wave(mode: str, t: int = 4, n: int = 9) -> list[float]:
        s = OFFICIAL(mode, 1.0, 0.4, total_epoch=3, warmup=1, by_epoch=False, T=t)
        assert drops(s, 1, n) == [0.0] * n  # warm-up epoch dense
        return [s.rate(1, i) for i in range(n)]

    # linear sawtooth 0.6 * (i % 4) / 4: never reaches 0.6
    assert wave("linear") == pytest.approx([0, 0.15, 0.3, 0.45, 0, 0.15, 0.3, 0.45, 0], abs=1e-12)
    # cosine 0.3 * (1 - cos(i * 3.14159 / 4)): period 8, no modulo (values computed with 3.14159)
    assert wave("cosine") == pytest.approx(
        [0, 0.087867825, 0.299999602, 0.512131612, 0.6, 0.512132738, 0.300001194, 0.087868951, 0], abs=1e-6)
    # bar square wave: keep p while i % T < T // 2; odd T = 5 -> phases 0, 1 dense, 2, 3, 4 sparse
    assert wave("bar") == pytest.approx([0, 0, 0.6, 0.6, 0, 0, 0.6, 0.6, 0], abs=1e-12)
    assert wave("bar", t=5, n=6) == pytest.approx([0, 0, 0.6, 0.6, 0.6, 0], abs=1e-12)
    # the project's short names by iteration: bar = the halves square wave from dense, constant stays constant
    assert drops(DropSchedule.from_name("bar", 0.6, 2, by="iteration", period=5), 1, 5) == [0, 0, 0.6, 0.6, 0.6]
    assert drops(DropSchedule.from_name("constant", 0.6, 2, by="iteration", period=5), 1, 3) == [0.6] * 3


def test_cosine_reproduces_the_public_codes_pi_literal() -> None:
    # i = 100000, T = 10: the angle 31415.9 is 0.0265 rad short of 10000 pi; with math.pi the drop would be 0
    s = OFFICIAL("cosine", 1.0, 0.2, 2, by_epoch=False, T=10)
    assert s.rate(0, 100000) == pytest.approx(0.4 * (1 - math.cos(0.026535898)), abs=1e-9)
    assert s.rate(0, 100000) > 1e-4


def test_interleave_is_ignored_by_iteration_as_in_the_public_code() -> None:
    a = OFFICIAL("linear", 1.0, 0.2, 3, interleave=True, by_epoch=False, T=4)
    b = OFFICIAL("linear", 1.0, 0.2, 3, interleave=False, by_epoch=False, T=4)
    assert a.rates(3, 8) == b.rates(3, 8) and not a.interleave
    with pytest.raises(ConfigError, match="interleave"):
        DropSchedule("linear", 0.8, 3, by="iteration", interleave=True)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("constant", 0.2, 0.2, 5), {"by_epoch": False}, "constant.*by iteration"),
        (("step", 0.2, 0.2, 5), {}, "unknown drop_mode 'step'"),
        (("linear", 1.0, 0.2, 1), {}, "at least 2 epochs"),
        (("cosine", 1.0, 0.2, 1), {"interleave": True}, "at least 2 epochs"),
        (("bar", 0.0, 0.2, 5), {}, r"percentage.*\(0, 1\]"),
        (("bar", 1.0, 1.5, 5), {}, r"min_percentage.*\(0, 1\]"),
        (("bar", 1.0, 0.2, 5), {"T": 0, "by_epoch": False}, "period must be an integer >= 1"),
    ],
)
def test_from_official_raises_config_errors(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OFFICIAL(*args, **kwargs)


@pytest.mark.parametrize("name", ["bar", "constant", "linear", "cosine", "halves"])
@pytest.mark.parametrize(("by", "warmup"), [("epoch", 0), ("epoch", 3), ("iteration", 1)])
def test_official_args_round_trip(name: str, by: str, warmup: int) -> None:
    if name == "constant" and by == "iteration":
        assert DropSchedule.from_name(name, 0.7, 6, warmup, by, period=3).official_args() is None
        return
    start = 0.3 if name in ("linear", "cosine", "halves") else 0.0
    s = DropSchedule.from_name(name, 0.7, 6, warmup, by, period=3, start_drop_rate=start)
    back = OFFICIAL(**s.official_args())
    assert drops(back, 6, 5) == pytest.approx(drops(s, 6, 5), abs=1e-12)


# ---------------------------------------------------------------------------------------------- averages


@pytest.mark.parametrize("mode", ["constant", "linear", "cosine", "halves"])
@pytest.mark.parametrize(
    ("by", "warmup", "iters", "interleave"),
    [("epoch", 0, 3, False), ("epoch", 1, 2, True), ("iteration", 1, 7, False), ("iteration", 0, 20, False)],
)
def test_average_equals_the_mean_of_what_step_applies(
    mode: str, by: str, warmup: int, iters: int, interleave: bool
) -> None:
    s = DropSchedule(mode, 0.7, total_epochs=6, warmup_epochs=warmup, by=by, period=4, interleave=interleave,
                     start_drop_rate=0.1)
    model = sparsify(nn.Sequential(nn.Conv2d(1, 2, 1)), 0.0)
    applied = []
    for e in range(6):
        for i in range(iters):
            applied.append(s.step(model, e, i))
            assert model[0].drop_rate == applied[-1]
    assert s.average_drop_rate(6, iters) == pytest.approx(sum(applied) / len(applied), rel=1e-12, abs=1e-15)


def test_analytic_averages() -> None:
    # linear over E epochs averages D/2; the halves square wave with even T averages D/2 per epoch.
    assert DropSchedule("linear", 0.8, 11).average_drop_rate() == pytest.approx(0.4)
    assert DropSchedule("halves", 0.8, 4, by="iteration", period=10).average_drop_rate(4, 100) == pytest.approx(0.4)
    # a partial last period counts only the iterations that run: 12 iterations, T=10 -> phases 5..9 sparse
    partial = DropSchedule("halves", 0.8, 1, by="iteration", period=10)
    assert partial.average_drop_rate(1, 12) == pytest.approx(0.8 * 5 / 12)


def test_keep_fraction_conversion() -> None:
    s = DropSchedule.from_keep("bar", keep=0.2, total_epochs=4)
    assert s.drop_rate == 0.8 and s.mode == "constant" and s.interleave and s.name == "bar"
    with pytest.raises(ConfigError, match="keep fraction"):
        DropSchedule.from_keep("constant", keep=0.0, total_epochs=4)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "step"}, r"'step'.*allowed: constant, linear, cosine, halves"),
        ({"mode": "bar"}, "from_name"),
        ({"drop_rate": 1.0}, r"\[0, 1\)"),
        ({"start_drop_rate": -0.1}, r"start drop rate.*\[0, 1\)"),
        ({"by": "batch"}, r"'batch'.*allowed: epoch, iteration"),
        ({"period": 0}, "period must be an integer >= 1"),
        ({"total_epochs": 0}, "total_epochs"),
    ],
)
def test_invalid_schedules_are_config_errors(kwargs: dict, message: str) -> None:
    args = {"mode": "constant", "drop_rate": 0.8, "total_epochs": 5} | kwargs
    with pytest.raises(ConfigError, match=message):
        DropSchedule(**args)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("zigzag", 0.8, 5), {}, r"unknown schedule 'zigzag'.*bar, constant, linear, cosine, halves"),
        (("bar", 0.8, 5), {"interleave": False}, "use the constant schedule"),
        (("constant", 0.8, 5), {"start_drop_rate": 0.2}, "start drop rate is for linear"),
        (("bar", 0.8, 5), {"warmup_epochs": 5}, "warmup_epochs"),
    ],
)
def test_invalid_short_names_are_config_errors(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DropSchedule.from_name(*args, **kwargs)


def test_step_on_a_model_without_ssprop_layers_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no ssProp layer"):
        DropSchedule("constant", 0.5, 2).step(nn.Sequential(nn.Conv2d(1, 1, 1)), 0)


def test_schedules_import_without_torch() -> None:
    code = ("import sys, ssprop_energy.sparse.schedules, ssprop_energy.experiment.config; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_every_lazy_sparse_name_resolves() -> None:
    import ssprop_energy.sparse as sparse_pkg

    for name in sparse_pkg.__all__:
        assert getattr(sparse_pkg, name) is not None, name
    with pytest.raises(AttributeError):
        sparse_pkg.no_such_thing  # noqa: B018
