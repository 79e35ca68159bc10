"""The clean-pair headline estimate (experiment/headline.py) against hand-computed values, its verdicts, its
record round trip, the merge of ranks' slices, and a real run interrupted mid-slice and resumed."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ssprop_energy.distributed.merge import merge_runs
from ssprop_energy.errors import RecordError, RunInterrupted
from ssprop_energy.experiment import headline as H
from ssprop_energy.experiment.config import ExperimentConfig
from ssprop_energy.experiment.runner import Experiment, ExperimentHooks, load_run_config, prepare_run_dir
from ssprop_energy.records import ArmRun, Headline, SliceRecord, load_summary, read_csv_rows


def _slice(epoch: int, index: int, wall_s: float, drop: float = 0.0, foreign: float | None = 0.0,
           peak: float | None = None, samples: int = 64, energy_j: float | None = None, order: int = 0) -> SliceRecord:
    return SliceRecord(seed=0, repeat=0, epoch=epoch, index=index, order=order, first_batch=index, batches=1,
                       samples=samples, drop_rate=drop, t_start_s=0.0, wall_s=wall_s,
                       energy_j=10.0 * wall_s if energy_j is None else energy_j, energy_source="estimated",
                       foreign_cpu_cores_mean=foreign, foreign_cpu_cores_max=foreign if peak is None else peak)


def _run(arm: str, slices: list[SliceRecord]) -> ArmRun:
    return ArmRun(arm=arm, seed=0, repeat=0, test_accuracy=0.5, test_loss=1.0, best_epoch=0, best_val_accuracy=0.5,
                  wall_s=sum(s.wall_s for s in slices), eval_wall_s=0.0, flops_forward=0.0, flops_backward=0.0,
                  flops_backward_conv=0.0, average_drop_rate=0.0, energy_components=[], epochs=[], slices=slices)


def _bar_pair(n: int, dense_s: float, sparse_s: float, arm_dense_s: float, hog: set[int] = frozenset(),
              hog_factor: float = 3.0) -> tuple[ArmRun, ArmRun]:
    """Epoch 0 dense, epoch 1 drop 0.8, ``n`` slices each; slices whose order is in ``hog`` ran ``hog_factor``
    times slower in the ssProp arm only, with the foreign load the monitor would see."""
    base, arm = [], []
    for epoch, drop, b, a in ((0, 0.0, dense_s, arm_dense_s), (1, 0.8, dense_s, sparse_s)):
        for i in range(n):
            order = epoch * n + i
            busy = order in hog
            base.append(_slice(epoch, i, b, order=order))
            arm.append(_slice(epoch, i, a * (hog_factor if busy else 1.0), drop=drop, foreign=1.5 if busy else 0.01,
                              order=order))
    return _run("dense", base), _run("ssprop", arm)


def test_clean_pairs_rebuild_the_run_with_its_phase_mix() -> None:
    # dense phase: both arms 1.0 s a slice; sparse phase: ssProp 0.5 s against 1.0 s
    base, arm = _bar_pair(6, 1.0, 0.5, 1.0)
    h = H.estimate([base], [arm], "wall_s", sliced=True)
    assert h.change == pytest.approx((6 * 1.0 + 6 * 0.5) / 12.0 - 1.0)  # -25%
    assert h.verdict == "measured" and h.clean_share == 1.0 and h.pairs == h.pairs_total == 12
    assert h.ci == pytest.approx((h.change, h.change))  # no noise: every resample gives the same total
    assert h.phases == {"0.0": 6, "0.8": 6} and "slice pairs" in h.method


def test_a_hog_on_one_arm_moves_the_raw_totals_but_not_the_headline() -> None:
    # three sparse-phase slices of the ssProp arm ran beside a hog, 3x slower
    base, arm = _bar_pair(6, 1.0, 0.5, 1.0, hog={7, 8, 9})
    raw = arm.wall_s / base.wall_s - 1.0
    assert raw == pytest.approx((6 + 3 * 0.5 + 3 * 1.5) / 12 - 1.0)  # +0%: the hog hides the whole saving
    h = H.estimate([base], [arm], "wall_s", sliced=True)
    # the clean sparse pairs alone give the phase's cost; weighted by the run's mix (6 + 6 slices): -25%
    assert h.change == pytest.approx(-0.25) and h.verdict == "measured"
    assert h.pairs == 9 and h.pairs_total == 12 and h.clean_share == pytest.approx(0.75)


def test_a_short_peak_inside_a_slice_makes_it_unclean() -> None:
    s = _slice(0, 0, 1.0, foreign=0.1, peak=0.6)
    assert not s.clean
    assert _slice(0, 0, 1.0, foreign=0.1, peak=0.3).clean
    assert _slice(0, 0, 1.0, foreign=None).clean  # no monitor: nothing to judge by
    assert not replace(_slice(0, 0, 1.0), gpu_foreign_processes_max=1).clean


def test_too_few_clean_pairs_are_inconclusive() -> None:
    base, arm = _bar_pair(6, 1.0, 0.5, 1.0, hog=set(range(1, 12)) - {6})
    h = H.estimate([base], [arm], "wall_s", sliced=True)
    assert h.clean_share == pytest.approx(2 / 12) and h.verdict == "inconclusive"
    assert "clean" in h.reason and math.isfinite(h.change)


def test_a_phase_without_a_clean_pair_is_inconclusive() -> None:
    base, arm = _bar_pair(4, 1.0, 0.5, 1.0, hog={4, 5, 6, 7})  # every sparse-phase slice was busy
    h = H.estimate([base], [arm], "wall_s", sliced=True)
    assert h.verdict == "inconclusive" and "phase(s) drop 0.8" in h.reason and math.isnan(h.change)


def test_an_interval_wider_than_the_effect_is_inconclusive_and_a_narrow_one_measured() -> None:
    # A/A pairs whose ratio swings +/-20-35% around 0 in runs (the moving-block bootstrap keeps neighbours
    # together, so strictly alternating noise would average out inside a block): the change is 0, its interval
    # is not small
    ratios = [1.3, 1.25, 0.8, 0.7, 1.2, 0.75, 1.35, 0.65]
    base = _run("dense", [_slice(0, i, 1.0, order=i) for i in range(8)])
    noisy = _run("dense-aa", [_slice(0, i, r, order=i) for i, r in enumerate(ratios)])
    h = H.estimate([base], [noisy], "wall_s", sliced=True)
    assert h.ci[0] < h.change < h.ci[1] and h.verdict == "inconclusive" and "wider" in h.reason
    # the same A/A within +/-1%: measured, with |change| under the 3-point resolution
    quiet = _run("dense-aa", [_slice(0, i, 1.0 + (0.01 if i % 2 else -0.01), order=i) for i in range(8)])
    h = H.estimate([base], [quiet], "wall_s", sliced=True)
    assert h.verdict == "measured" and abs(h.change) < H.RESOLUTION
    assert (h.ci[1] - h.ci[0]) / 2 <= H.RESOLUTION


def test_energy_headline_uses_slice_energy_and_unpaired_slices_are_left_out() -> None:
    base = _run("dense", [_slice(0, i, 1.0, energy_j=20.0, order=i) for i in range(4)])
    arm = _run("ssprop", [_slice(0, i, 1.0, energy_j=15.0, order=i) for i in range(4)]
               + [_slice(0, 9, 1.0, energy_j=1.0)])  # no partner (a resumed epoch run alone)
    h = H.estimate([base], [arm], "energy_j", sliced=True)
    assert h.pairs_total == 4 and h.change == pytest.approx(-0.25)
    assert H.estimate([base], [_run("ssprop", [])], "wall_s", sliced=True) is None


def test_headline_round_trips_and_rejects_an_unknown_verdict() -> None:
    h = Headline(change=-0.2, ci=(-0.25, -0.15), clean_share=0.8, pairs=8, method="m", verdict="measured",
                 pairs_total=10, phases={"0.0": 4})
    again = Headline.from_dict(json.loads(json.dumps(h.to_dict())))
    assert again == h
    with pytest.raises(RecordError, match="unknown verdict"):
        Headline.from_dict({**h.to_dict(), "verdict": "saved"})


def test_merged_slices_sum_the_ranks_energy_on_rank_zeros_clock() -> None:
    r0 = _run("dense", [_slice(0, 0, 1.0, energy_j=5.0), _slice(0, 1, 2.0, energy_j=7.0)])
    r1 = _run("dense", [_slice(0, 0, 1.5, energy_j=6.0, foreign=None), _slice(0, 1, 2.5, energy_j=8.0, foreign=None)])
    info = {"rank": 0, "local_rank": 0, "node": 0}
    merged = merge_runs([r0, r1], [info, {**info, "rank": 1, "local_rank": 1}], nodes=1)
    assert [s.energy_j for s in merged.slices] == [11.0, 15.0]
    assert [s.wall_s for s in merged.slices] == [1.0, 2.0] and merged.slices[0].foreign_cpu_cores_mean == 0.0


# ------------------------------------------------------------------------------------------ a real run


class _StopAfter:
    def __init__(self, polls: int) -> None:
        self.left = polls

    def __call__(self) -> bool:
        self.left -= 1
        return self.left < 0


def _cfg(out: Path, **overrides: Any) -> ExperimentConfig:
    cfg = ExperimentConfig(kind="compare", model="cnn", dataset="synthetic:1x8x8:4:256", epochs=2, batch_size=16,
                           meter="fake", sample_period_s=0.05, out=str(out), slice_batches=3,
                           selection="random", dropouts=[0.2])
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def test_sigterm_mid_slice_and_resume_end_where_an_uninterrupted_run_does(tmp_path: Path) -> None:
    straight_dir = tmp_path / "straight"
    prepare_run_dir(straight_dir)
    straight = Experiment(_cfg(straight_dir), straight_dir, ExperimentHooks(monitor=None, ledger=False)).run()
    out = tmp_path / "stopped"
    prepare_run_dir(out)
    # 10 batches an epoch in slices of 3: the stop after poll 14 lands inside a slice of the second epoch
    exp = Experiment(_cfg(out), out, ExperimentHooks(stop_requested=_StopAfter(13), monitor=None, ledger=False))
    with pytest.raises(RunInterrupted):
        exp.run()
    assert load_summary(out).status == "interrupted"
    resumed = Experiment(load_run_config(out), out, ExperimentHooks(monitor=None, ledger=False)).run()
    assert resumed.status == "complete"
    for name in ("dense", "ssprop"):
        a, b = straight.arms[name], resumed.arms[name]
        assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
        assert [e.val_accuracy for e in a.epochs] == [e.val_accuracy for e in b.epochs]
        assert a.test_loss == b.test_loss and a.flops_backward == b.flops_backward
    # the resumed record holds each finished slice once: the interrupted epoch's slices were run again
    rows = read_csv_rows(out / "slices.csv")
    keys = [(r["arm"], r["epoch"], r["index"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(read_csv_rows(straight_dir / "slices.csv"))
    assert resumed.arms["ssprop"].headline["wall_s"].pairs_total == len(keys) // 2


def test_aa_runs_the_baseline_twice_and_reports_its_noise_floor(tmp_path: Path) -> None:
    out = tmp_path / "aa"
    prepare_run_dir(out)
    summary = Experiment(_cfg(out, aa=True), out, ExperimentHooks(monitor=None, ledger=False)).run()
    assert set(summary.arms) == {"dense", "dense-aa"}
    a, b = summary.arms["dense"], summary.arms["dense-aa"]
    # the same layers, seed and data: the same floats; only the machine can make the two differ
    assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs] and a.flops_backward == b.flops_backward
    assert b.layer_coverage is None and set(b.headline) == {"wall_s", "energy_j"}
    assert summary.paired == b.paired and "wall_s" in summary.paired
