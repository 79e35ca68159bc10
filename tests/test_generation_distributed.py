"""The DDPM compare on two processes (torchrun, gloo, CPU) against the same compare on one process.

The values checked are the ones a sharding mistake would get wrong: training draws taken per rank instead of
as rows of the global batch's draws (the losses drift), validation noise drawn per shard (the validation
loss differs), sampling noise restarted per rank (the samples differ), a Frechet distance of rank 0's shard
only (its ``n_generated`` and value), and sampling energy of rank 0 alone in the merged record. The draw and
sampling shards are also checked in process against the unsharded calls.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ssprop_energy.data import load_dataset
from ssprop_energy.distributed.sharding import shard_slice
from ssprop_energy.generation import Diffusion, frechet_distance_of
from ssprop_energy.generation.features import classifier_extractor
from ssprop_energy.generation.grid import GRID_PADDING_PX
from ssprop_energy.generation.sharded import draw_shard
from ssprop_energy.models import get_model
from ssprop_energy.records import ArmRun, load_summary, read_json

ROOT = Path(__file__).resolve().parents[1]
# 151 training images in batches of 32: the last batch (23) splits 12 + 11 over two ranks, the 37 validation
# and test images 19 + 18, the 5 samples 3 + 2. AdamW (the task default) on the weighted mean gradient.
DATASET = "synthetic:1x8x8:4:151"
N_SAMPLES = 5
TINY = ["compare", "--model", "ddpm-unet", "--dataset", DATASET, "--image-size", "8", "--epochs", "2",
        "--batch-size", "32", "--samples", str(N_SAMPLES), "--timesteps", "5", "--sample-period", "0.05",
        "--slice-batches", "2", "--quiet"]
TIMEOUT_S = 240
# Two ranks sum the gradient in another order than one process: the weights, and so every loss, agree to
# float32 rounding amplified by a few AdamW steps (measured: <= 3e-8 relative); 1e-5 leaves a margin and is far
# below what per-rank draws give (measured: train loss 1e-2, validation loss 6e-2 relative off).
REL_LOSS = 1e-5
# The samples agree to float rounding before the uint8 rounding, which can move a value lying at a rounding
# edge by one level (measured: identical pixels and FID); per-rank draws move pixels by up to 69 levels and
# the FID by 7e-3 relative.
REL_FID = 1e-3
GRID_SCALE = 2  # GenerationConfig's default


def _env(home: Path, cache: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSPROP_ENERGY_LEDGER": str(home / "ledger.sqlite"),
           "SSPROP_ENERGY_DATA": str(home / "data"), "XDG_DATA_HOME": str(home / "share"),
           "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("SSPROP_ENERGY_INCEPTION_WEIGHTS", None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compare on one process (in this process; it trains the FID classifier into the shared cache),
    then under ``torchrun --nproc-per-node 2`` with the CPU estimate (one CPU component per rank)."""
    home = tmp_path_factory.mktemp("gen-dist")
    cache = home / "cache"
    env = _env(home, cache)
    single = home / "single"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SSPROP_ENERGY_LEDGER", "SSPROP_ENERGY_DATA", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
            mp.setenv(name, env[name])
        mp.delenv("SSPROP_ENERGY_INCEPTION_WEIGHTS", raising=False)
        from ssprop_energy.cli import main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main([*TINY, "--meter", "fake", "--out", str(single)]) == 0, buf.getvalue()
    out = home / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "ssprop_energy", *TINY, "--meter", "estimate", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    return {"single": single, "dist": out, "cache": cache}


def _tiles(run_dir: Path, arm: str) -> torch.Tensor:
    """The ``N_SAMPLES`` 8x8 samples cut back out of an arm's grid PNG (one row: fewer than 8 columns)."""
    grid = np.asarray(Image.open(run_dir / f"samples_{arm}__s0__r0.png"))
    tile = 8 * GRID_SCALE
    out = []
    for i in range(N_SAMPLES):
        left = GRID_PADDING_PX + i * (tile + GRID_PADDING_PX)
        out.append(grid[GRID_PADDING_PX:GRID_PADDING_PX + tile, left:left + tile][::GRID_SCALE, ::GRID_SCALE])
    return torch.from_numpy(np.stack(out)[:, None].copy())


def test_two_ranks_train_the_single_process_ddpm(runs: dict[str, Any]) -> None:
    # The UNet has GroupNorm and no dropout: with the global batch's draws split by rows and the weighted
    # all-reduce, two ranks take the single-process steps; the sharded fixed-noise validation and test MSE
    # are the single-process ones. (The ssProp arm's sparse epoch may differ: each rank ranks the channels
    # of its own part; its first, dense epoch under `bar` does not.)
    dist, single = load_summary(runs["dist"]), load_summary(runs["single"])
    assert dist.status == "complete" and dist.world_size == 2 and single.world_size == 1
    d, s = dist.arms["dense"], single.arms["dense"]
    assert [e.train_loss for e in d.epochs] == pytest.approx([e.train_loss for e in s.epochs], rel=REL_LOSS)
    assert [e.val_loss for e in d.epochs] == pytest.approx([e.val_loss for e in s.epochs], rel=REL_LOSS)
    assert d.test_loss == pytest.approx(s.test_loss, rel=REL_LOSS)
    assert d.best_epoch == s.best_epoch
    sd, ss = dist.arms["ssprop"].epochs[0], single.arms["ssprop"].epochs[0]
    assert sd.drop_rate == ss.drop_rate == 0.0
    assert sd.train_loss == pytest.approx(ss.train_loss, rel=REL_LOSS)
    assert d.flops_backward == pytest.approx(s.flops_backward, rel=1e-12)


def test_sharded_samples_and_fid_are_the_single_process_ones(runs: dict[str, Any]) -> None:
    got, want = _tiles(runs["dist"], "dense").to(torch.int16), _tiles(runs["single"], "dense").to(torch.int16)
    diff = (got - want).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, diff
    assert float(got.float().std()) > 1.0  # real images, not a blank grid that would match any other
    dist, single = ArmRun_of(runs["dist"], "dense"), ArmRun_of(runs["single"], "dense")
    assert dist.quality["n_generated"] == N_SAMPLES  # rank 0 scored every rank's samples, not its shard
    assert dist.fid_classifier == pytest.approx(single.fid_classifier, rel=REL_FID)
    # the figure is the distance of the gathered samples on disk (the cached classifier both runs used)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(runs["cache"]))
        data = load_dataset(DATASET, image_size=8, seed=0)
        extractor = classifier_extractor(data)
    assert extractor.info["cached"] is True
    expected = frechet_distance_of(extractor.features(got.to(torch.uint8)), extractor.features(data.test.images))
    assert dist.fid_classifier == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_merged_record_holds_every_ranks_sampling_energy(runs: dict[str, Any]) -> None:
    for arm in ("dense", "ssprop"):
        run = ArmRun_of(runs["dist"], arm)
        labels = {(c.component, c.rank, c.node) for c in run.sample_energy_components}
        # each rank's own process CPU while it sampled its shard, the node's RAM once (local rank 0)
        assert labels == {("cpu", 0, 0), ("cpu", 1, 0), ("ram", None, 0)}, labels
        assert all(c.energy_j > 0 and c.source == "estimated" for c in run.sample_energy_components)
        assert run.sample_energy_j == pytest.approx(sum(c.energy_j for c in run.sample_energy_components))
        assert run.sampling["ranks"] == 2 and run.sampling["shards"] == [[0, 3], [3, 5]]
        # sampling stays out of the training energy: the training components are the train windows' own
        assert run.energy_j == pytest.approx(sum(c.energy_j for c in run.energy_components))
    assert "ranks" not in ArmRun_of(runs["single"], "dense").sampling


def ArmRun_of(run_dir: Path, arm: str) -> ArmRun:  # noqa: N802 (reads as the type it returns)
    path = run_dir / "runs" / f"{arm}__s0__r0.json"
    return ArmRun.from_dict(read_json(path), str(path))


def test_draw_shard_rows_are_the_global_batch_draws() -> None:
    diffusion = Diffusion(7)
    x0 = torch.zeros(11, 1, 4, 4)
    whole = torch.Generator().manual_seed(3)
    t, noise = diffusion.draw(x0, whole)
    for rank in range(3):
        a, b = shard_slice(11, 3, rank)
        gen = torch.Generator().manual_seed(3)
        ts, ns = draw_shard(7, x0[a:b], 11, a, gen)
        assert torch.equal(ts, t[a:b]) and torch.equal(ns, noise[a:b])
        # the generator advanced by the whole batch's draws, as on one process: the next batch agrees too
        assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=whole.clone_state()))


def test_sample_range_is_rows_of_the_whole_sample() -> None:
    torch.manual_seed(0)
    model = get_model("ddpm-unet", num_classes=1, in_channels=1, image_size=8).eval()
    diffusion = Diffusion(3)
    whole = diffusion.sample(model, 5, (1, 8, 8), seed=4, batch_size=2)
    parts = [diffusion.sample(model, 5, (1, 8, 8), seed=4, batch_size=2, start=a, stop=b)
             for a, b in (shard_slice(5, 2, r) for r in range(2))]
    assert [p.shape[0] for p in parts] == [3, 2]
    # other batch compositions (rows 0-1, 2 | 3-4 instead of 0-1, 2-3, 4): equal up to float rounding
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-5)
    assert float(whole.std()) > 0.1
