"""The generation task (DDPM UNet) through every command: compare, sweep, report, the ledger row, flops,
models and --resume, on tiny settings (8x8 images, 5 diffusion steps, 4 samples, the fake meter).

The values checked are the ones a wiring mistake would get wrong: the quality figure recomputed from the
sample grid written to disk, sampling energy kept out of the training energy, the paired difference's sign,
counted FLOPs against an independent count of the diffusion step and an analytic conv formula, and a resumed
run ending bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from ssprop_energy.cli import main
from ssprop_energy.data import load_dataset
from ssprop_energy.errors import RunInterrupted
from ssprop_energy.experiment.config import ExperimentConfig
from ssprop_energy.experiment.runner import Experiment, ExperimentHooks, load_run_config, prepare_run_dir
from ssprop_energy.flops import count_step
from ssprop_energy.generation import Diffusion, frechet_distance_of
from ssprop_energy.generation.features import classifier_extractor
from ssprop_energy.generation.grid import GRID_PADDING_PX
from ssprop_energy.models import get_model
from ssprop_energy.records import ArmRun, load_summary, read_csv_rows, read_json

DATASET = "synthetic:1x8x8:4:128"  # 128 random 1x8x8 images: the mechanics, not learning
TINY = ["--model", "ddpm-unet", "--dataset", DATASET, "--image-size", "8", "--epochs", "2", "--batch-size", "32",
        "--samples", "4", "--timesteps", "5", "--meter", "fake", "--sample-period", "0.05", "--slice-batches", "2",
        "--quiet"]
GRID_SCALE = 2  # GenerationConfig's default


def _isolate(mp: pytest.MonkeyPatch, home: Path, cache: Path) -> None:
    mp.setenv("SSPROP_ENERGY_LEDGER", str(home / "ledger.sqlite"))
    mp.setenv("SSPROP_ENERGY_DATA", str(home / "data"))
    mp.setenv("XDG_DATA_HOME", str(home / "share"))
    mp.setenv("XDG_CACHE_HOME", str(cache))  # the FID classifier is trained once for the module
    mp.delenv("SSPROP_ENERGY_INCEPTION_WEIGHTS", raising=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _shared_cache(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir))
    monkeypatch.delenv("SSPROP_ENERGY_INCEPTION_WEIGHTS", raising=False)


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[tuple[Path, str, Path]]:
    """One CLI compare (module-scoped: the run is the expensive part); yields (run dir, stdout, home)."""
    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("gen") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, home, cache_dir)
        import contextlib

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["compare", *TINY, "--out", str(out)])
        assert rc == 0, buf.getvalue()
        yield out, buf.getvalue(), home


def _arm_run(run_dir: Path, arm: str) -> ArmRun:
    path = run_dir / "runs" / f"{arm}__s0__r0.json"
    return ArmRun.from_dict(read_json(path), str(path))


def _tiles(png: bytes, n: int, side: int) -> torch.Tensor:
    """Cut ``n`` samples back out of a grid PNG (one row, ``padding`` gutters, pixels repeated GRID_SCALE x)."""
    grid = np.asarray(Image.open(io.BytesIO(png)))
    tile = side * GRID_SCALE
    out = []
    for i in range(n):
        left = GRID_PADDING_PX + i * (tile + GRID_PADDING_PX)
        block = grid[GRID_PADDING_PX:GRID_PADDING_PX + tile, left:left + tile]
        out.append(block[::GRID_SCALE, ::GRID_SCALE])
    return torch.from_numpy(np.stack(out)[:, None].copy())


def test_compare_records_both_arms_with_quality_figures_and_grids(compare_run) -> None:
    run_dir, stdout, _ = compare_run
    summary = load_summary(run_dir)
    assert summary.status == "complete" and summary.task == "generation"
    assert summary.generation["diffusion"]["timesteps"] == 5
    assert summary.generation["image_shape"] == [1, 8, 8]
    assert summary.config["optimizer"] == "adamw" and summary.config["lr"] == 1e-3  # the task's defaults
    for name in ("dense", "ssprop"):
        arm = summary.arms[name]
        assert arm.task == "generation" and arm.quality_metric == "fid_classifier" and arm.fid is None
        assert math.isfinite(arm.fid_classifier) and arm.fid_classifier >= 0
        assert math.isnan(arm.test_accuracy)  # no accuracy, never the MSE under that name
        assert all(math.isnan(e.val_accuracy) and math.isnan(e.train_accuracy) for e in arm.epochs)
        assert arm.quality["extractor"] == "classifier-cnn-v1" and arm.quality["n_generated"] == 4
        assert "NOT comparable" in arm.quality["note"]
        assert 0.0 <= arm.quality["extractor_info"]["test_accuracy"] <= 1.0
        assert arm.sampling["n_samples"] == 4 and arm.sampling["seed"] == 0
        assert (run_dir / f"samples_{name}__s0__r0.png").read_bytes().startswith(b"\x89PNG")
    # the JSON says null, not NaN, and epochs.csv carries no accuracy figure
    raw = read_json(run_dir / "runs" / "dense__s0__r0.json")
    assert raw["test_accuracy"] is None and raw["epochs"][0]["val_accuracy"] is None
    assert {r["val_accuracy"] for r in read_csv_rows(run_dir / "epochs.csv")} == {"nan"}
    # the CLI table shows the quality figure where classification shows accuracy
    assert "fid_classifier" in stdout and "test acc ┃" not in stdout and "(lower = better)" in stdout
    assert "sampling 4 images x 5 steps" in stdout


def test_quality_figure_is_the_distance_of_the_samples_on_disk(compare_run) -> None:
    """Recompute the Frechet distance from the grid PNG and the cached extractor: the grid, the figure and
    the real images must all be the same ones."""
    run_dir, _, _ = compare_run
    data = load_dataset(DATASET, image_size=8, seed=0)
    extractor = classifier_extractor(data)  # the cached classifier the run used
    assert extractor.info["cached"] is True
    for name in ("dense", "ssprop"):
        run = _arm_run(run_dir, name)
        samples = _tiles((run_dir / run.sampling["grid_file"]).read_bytes(), 4, 8)
        expected = frechet_distance_of(extractor.features(samples), extractor.features(data.test.images))
        assert run.fid_classifier == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert run.quality["n_real"] == len(data.test)


def test_sampling_energy_is_metered_apart_from_training(compare_run) -> None:
    run_dir, _, _ = compare_run
    for name in ("dense", "ssprop"):
        run = _arm_run(run_dir, name)
        # training energy = the epochs' training windows only: sampling and scoring are not in it
        assert run.energy_j == pytest.approx(sum(e.energy_j for e in run.epochs), rel=1e-9)
        assert run.sample_energy_j is not None and run.sample_energy_j > 0
        assert {c.source for c in run.sample_energy_components} == {"fake"}
        assert run.sample_wall_s > 0 and "sample" not in run.phases
        assert run.sampling["interference"]["foreign_cpu_cores_mean"] >= 0  # the machine beside the window
    summary = load_summary(run_dir)
    dense = summary.arms["dense"]
    assert dense.sample_energy_source == "fake" and dense.sample_energy_j == pytest.approx(
        _arm_run(run_dir, "dense").sample_energy_j)


def test_paired_quality_difference_has_the_arm_minus_dense_sign(compare_run) -> None:
    run_dir, _, _ = compare_run
    summary = load_summary(run_dir)
    dense, sparse = summary.arms["dense"], summary.arms["ssprop"]
    stat = sparse.paired["fid_classifier"]
    assert stat.delta_mean == pytest.approx(sparse.fid_classifier - dense.fid_classifier, rel=1e-12, abs=1e-12)
    assert stat.saving_fraction == pytest.approx(1 - sparse.fid_classifier / dense.fid_classifier, rel=1e-9)
    assert "test_accuracy" not in sparse.paired
    assert {"test_loss", "sample_wall_s", "sample_energy_j", "energy_j", "flops_backward"} <= set(sparse.paired)


def test_counted_flops_cover_the_whole_diffusion_step(compare_run) -> None:
    run_dir, _, _ = compare_run
    summary = load_summary(run_dir)
    data = load_dataset(DATASET, image_size=8, seed=0)
    torch.manual_seed(0)
    model = get_model("ddpm-unet", in_channels=1, image_size=8)
    step = count_step(model, (1, 8, 8), 4, step_fn=Diffusion(5).training_loss)
    dense = summary.arms["dense"]
    assert dense.flops_forward == pytest.approx(step.forward * len(data.train) * 2, rel=1e-12)
    assert dense.flops_backward == pytest.approx(step.backward * len(data.train) * 2, rel=1e-12)
    layers = {row["layer"] for row in read_csv_rows(run_dir / "layers.csv")}
    assert {"time_embed.0", "time_embed.2"} <= layers  # the time-embedding MLP is counted


def test_ledger_row_charges_training_sampling_and_the_extractor(compare_run) -> None:
    from ssprop_energy.ledger import load_entries

    run_dir, _, home = compare_run
    rows = load_entries(home / "ledger.sqlite")
    matching = rows[rows["run_dir"] == str(run_dir.resolve())]
    assert len(matching) == 1
    row = matching.iloc[0]
    assert row["status"] == "complete" and row["energy_source"] == "fake"
    summary = load_summary(run_dir)
    arms = sum(a.energy_j + a.eval_energy_j + a.sample_energy_j for a in summary.arms.values())
    assert row["energy_j"] >= arms + summary.generation["extractor_setup"]["energy_j"] - 1e-6


def test_report_shows_grids_and_the_quality_figure(compare_run, tmp_path: Path) -> None:
    run_dir, _, _ = compare_run
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'data-section="samples"' in page
    for name in ("dense", "ssprop"):
        assert f'data-samples="{name}"' in page
    summary = load_summary(run_dir)
    delta = summary.arms["ssprop"].paired["fid_classifier"].delta_mean
    assert f'data-metric="quality_diff" data-arm="ssprop" data-value="{delta!r}"' in page
    assert "Test accuracy difference" not in page and "NOT comparable" in page
    assert "Loss per epoch (noise-prediction MSE)" in page
    assert main(["report", str(run_dir), "--format", "md", "--out", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "Sample quality (fid_classifier, lower is better)" in md


def test_sweep_pairs_every_arm_on_the_quality_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    args = [a for a in TINY]
    args[args.index("--epochs") + 1] = "1"
    # constant: one epoch is a whole schedule (bar alternates dense and sparse epochs, so it needs two)
    assert main(["sweep", *args, "--schedules", "constant", "--drop-rates", "0.5,0.8", "--out", str(out)]) == 0
    summary = load_summary(out)
    assert set(summary.arms) == {"dense", "constant-d0.5", "constant-d0.8"}
    for name in ("constant-d0.5", "constant-d0.8"):
        arm = summary.arms[name]
        assert arm.paired["fid_classifier"].delta_mean == pytest.approx(
            arm.fid_classifier - summary.arms["dense"].fid_classifier, abs=1e-12)
        assert (out / f"samples_{name}__s0__r0.png").exists()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "fid_classifier difference (lower = better)" in page and "Energy-quality Pareto front" in page


class _StopAfter:
    def __init__(self, polls: int) -> None:
        self.left = polls

    def __call__(self) -> bool:
        self.left -= 1
        return self.left < 0


def _cfg(out: Path, **overrides: object) -> ExperimentConfig:
    cfg = ExperimentConfig(model="ddpm-unet", dataset=DATASET, batch_size=32, samples=4, timesteps=5,
                           meter="fake", sample_period_s=0.05, out=str(out), slice_batches=2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.apply_task_defaults("generation")
    cfg.image_size, cfg.epochs = 8, 2
    cfg.validate()
    return cfg


def test_resume_ends_where_an_uninterrupted_run_does(tmp_path: Path, compare_run) -> None:
    straight_dir, _, _ = compare_run  # the same settings through the CLI
    out = tmp_path / "b"
    exp = Experiment(_cfg(out), out, ExperimentHooks(stop_requested=_StopAfter(3 * 3 + 1), monitor=None))
    prepare_run_dir(out)
    with pytest.raises(RunInterrupted):  # 3 batches an epoch: stopped in the interleaved 4th epoch-window
        exp.run()
    assert load_summary(out).status == "interrupted"
    resumed = Experiment(load_run_config(out), out, ExperimentHooks(monitor=None)).run()
    straight = load_summary(straight_dir)
    assert resumed.status == "complete"
    for name in ("dense", "ssprop"):
        a, b = straight.arms[name], resumed.arms[name]
        assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
        assert [e.val_loss for e in a.epochs] == [e.val_loss for e in b.epochs]
        assert a.fid_classifier == b.fid_classifier and a.test_loss == b.test_loss
        assert (straight_dir / f"samples_{name}__s0__r0.png").read_bytes() == (
            out / f"samples_{name}__s0__r0.png").read_bytes()


def test_time_sliced_arms_train_what_sequential_arms_train(tmp_path: Path, compare_run) -> None:
    """Slices of 2 batches (the arms taking turns inside each epoch, the diffusion task's own draws and the
    global RNG saved per slice) give the floats and the samples of one arm-run after the other."""
    sliced_dir, _, _ = compare_run
    out = tmp_path / "seq"
    prepare_run_dir(out)
    seq = Experiment(_cfg(out, interleave="none"), out, ExperimentHooks(monitor=None, ledger=False)).run()
    sliced = load_summary(sliced_dir)
    assert sliced.interleave == "slice" and sliced.measurement.slice_batches == 2 and seq.interleave == "none"
    slices = _arm_run(sliced_dir, "ssprop").slices
    first = [s for s in slices if s.epoch == 0]
    assert len(first) >= 2 and all(s.batches == 2 for s in first[:-1]) and 1 <= first[-1].batches <= 2
    for name in ("dense", "ssprop"):
        a, b = sliced.arms[name], seq.arms[name]
        assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
        assert [e.val_loss for e in a.epochs] == [e.val_loss for e in b.epochs]
        assert a.fid_classifier == b.fid_classifier and a.test_loss == b.test_loss
        assert a.flops_backward == b.flops_backward
        assert (sliced_dir / f"samples_{name}__s0__r0.png").read_bytes() == (
            out / f"samples_{name}__s0__r0.png").read_bytes()


def test_flops_cli_counts_the_ddpm_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--model", "ddpm-unet", "--input-shape", "1,8,8", "--drop-rate", "0.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == "generation"
    layers = {row["name"]: row for row in info["dense"]["layers"]}
    # the stem: 3x3 conv, 1 -> 16 channels, 8x8 output: 2 x 16 x 1 x 9 x 64 FLOPs per sample
    assert layers["stem"]["forward"] == 2 * 16 * 1 * 9 * 64
    # the time-embedding MLP (16 -> 64 -> 64) and the attention products are in the count
    assert layers["time_embed.0"]["forward"] == 2 * 16 * 64
    assert layers["time_embed.2"]["forward"] == 2 * 64 * 64
    assert any("attn" in n or "attention" in n for n in layers)
    assert info["step"]["backward"] < info["dense"]["backward"]
    assert sum(r["forward"] for r in info["dense"]["layers"]) == pytest.approx(info["dense"]["forward"])


def test_models_cli_marks_a_model_that_refuses_the_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--image-size", "30", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["ddpm-unet"]["parameters"] is None and "divisible by 4" in rows["ddpm-unet"]["unavailable"]
    assert rows["resnet18"]["parameters"] > 0 and rows["ddpm-unet"]["task"] == "generation"


def test_eval_noise_with_a_generation_model_is_a_clean_error(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["compare", *TINY, "--eval-noise", "0.1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--eval-noise" in err and "Traceback" not in err and not out.exists()


def test_a_missing_inception_weights_file_is_a_clean_error(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    missing = tmp_path / "nope.pth"
    assert main(["compare", *TINY, "--inception-weights", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err and not out.exists()


def _parsed_config(*args: str) -> ExperimentConfig:
    from ssprop_energy.cli import build_parser
    from ssprop_energy.cli._experiment import config_from_args

    return config_from_args(build_parser().parse_args(["compare", *args]), "compare")


def test_generation_defaults_then_preset_then_flags() -> None:
    cfg = _parsed_config("--model", "ddpm-unet")
    assert (cfg.optimizer, cfg.lr, cfg.epochs, cfg.image_size, cfg.batch_size) == ("adamw", 1e-3, 2, 32, 32)
    cfg = _parsed_config("--model", "ddpm-unet", "--preset", "paper")
    assert cfg.optimizer == "adamw" and cfg.batch_size == 128  # the DDPM script's optimizer survives the preset
    cfg = _parsed_config("--model", "ddpm-unet", "--optimizer", "adam", "--epochs", "3", "--image-size", "16")
    assert (cfg.optimizer, cfg.epochs, cfg.image_size) == ("adam", 3, 16)  # explicit flags win
    cfg = _parsed_config("--model", "resnet18")
    assert (cfg.optimizer, cfg.epochs, cfg.image_size, cfg.batch_size) == ("adam", 4, None, 64)  # untouched


def test_load_runs_carries_the_generation_figures(compare_run) -> None:
    from ssprop_energy.runs import load_runs

    run_dir, _, _ = compare_run
    frame = load_runs(run_dir).set_index("arm")
    for name in ("dense", "ssprop"):
        run = _arm_run(run_dir, name)
        assert frame.loc[name, "task"] == "generation"
        assert frame.loc[name, "fid_classifier"] == run.fid_classifier
        assert frame.loc[name, "sample_energy_j"] == pytest.approx(run.sample_energy_j)
        assert math.isnan(frame.loc[name, "test_accuracy"]) and math.isnan(frame.loc[name, "fid"])


def _comparison(diff: float, ci: tuple[float, float] | None, n: int):
    from ssprop_energy.report.savings import AccuracyDiff, ArmComparison, QualityDiff, saving

    s = saving("energy_j", 10.0, 8.0, None, "fake")
    q = QualityDiff("fid_classifier", 100.0, 100.0 + diff, diff, ci, n, 0.95, "classifier-cnn-v1", 32, "note")
    return ArmComparison("ssprop", "dense", s, s, s, s, s, s, AccuracyDiff(math.nan, math.nan, math.nan, None, 0, 0.95),
                         0.4, quality=q)


@pytest.mark.parametrize(("diff", "ci", "n", "words"), [
    (-5.0, None, 1, "fell (better) 100 -> 95 in a single pair of runs"),
    (5.0, None, 1, "rose (worse) 100 -> 105 in a single pair"),
    (-5.0, (-8.0, -2.0), 3, "fell (better) 100 -> 95 (95% CI of the difference -8 to -2, 3 pairs)"),
    (-5.0, (-8.0, 2.0), 3, "difference (100 -> 95, 95% CI of the difference -8 to 2, 3 pairs) is not distinguishable"),
    (-5.0, (-5.0, -5.0), 3, "identically in all 3 pairs"),
])
def test_quality_verdict_says_lower_is_better(diff: float, ci, n: int, words: str) -> None:
    from ssprop_energy.report import text as report_text

    c = _comparison(diff, ci, n)
    assert words in report_text.quality_clause(c)
    assert "accuracy" not in report_text.verdict(c, 0.0).lower()
