"""GenerationTask end to end on 8x8 digits with 10 timesteps: the loader-to-[-1, 1] conversion, paired and
resumable training draws, the fixed validation loss (exact value for the zero-initialised model), learning,
and the end-of-run samples, quality figure and grid."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ssprop_energy.data import BatchLoader, load_dataset
from ssprop_energy.errors import ConfigError
from ssprop_energy.generation.diffusion import to_model_range
from ssprop_energy.generation.task import GenerationConfig, GenerationTask
from ssprop_energy.models import get_model
from ssprop_energy.sparse import sparsify

CFG = GenerationConfig(timesteps=10, n_samples=6, sample_batch=4, classifier_train_samples=300, grid_columns=3)


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", image_size=8)


def _unet(seed: int = 0):
    torch.manual_seed(seed)
    return get_model("ddpm-unet", in_channels=1, image_size=8)


def test_loader_batches_are_mapped_to_the_model_range(digits8):
    task = GenerationTask(digits8, CFG)
    loader = BatchLoader(digits8.train, 32, shuffle=False, mean=digits8.mean, std=digits8.std)
    x, _ = next(iter(loader))
    torch.testing.assert_close(task.from_loader(x), to_model_range(digits8.train.images[:32]), rtol=0, atol=2e-6)


def test_training_draws_pair_across_arms_and_follow_the_epoch(digits8):
    x = torch.randn(8, 1, 8, 8)
    model = _unet()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    a, b = GenerationTask(digits8, CFG, seed=3), GenerationTask(digits8, CFG, seed=3)
    for task in (a, b):
        task.set_epoch(2)
    la, sa = a.batch_loss(model, x)
    lb, _ = b.batch_loss(model, x)
    assert torch.equal(la, lb) and float(sa) == pytest.approx(float(la.detach()) * 8)
    assert not torch.equal(a.batch_loss(model, x)[0], la)  # the sequence moves on within an epoch
    a.set_epoch(2)  # resuming at the epoch boundary replays it
    assert torch.equal(a.batch_loss(model, x)[0], la)
    a.set_epoch(5)
    assert not torch.equal(a.batch_loss(model, x)[0], la)
    gen_loss, _ = a.batch_loss(model, x, generator=torch.Generator().manual_seed(0))
    gen_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_validation_loss_is_fixed_and_exact_for_the_untrained_model(digits8):
    task, other = GenerationTask(digits8, CFG), GenerationTask(digits8, CFG, seed=99)
    model = _unet().train()
    loss, metric = task.evaluate(model, digits8.val, digits8, 128, "cpu")
    # the zero-initialised output predicts no noise: the loss is the mean square of the fixed noise
    fixed = task.eval_noise(len(digits8.val))
    assert loss == metric == pytest.approx(float(fixed.noise.double().pow(2).mean()), rel=1e-9)
    assert model.training  # mode restored
    assert other.evaluate(model, digits8.val)[0] == loss  # the run seed does not move the validation noise
    with pytest.raises(ConfigError, match="classification"):
        task.evaluate(model, digits8.val, noise_std=0.1)


def test_a_few_steps_lower_the_validation_loss_dense_and_sparse(digits8):
    for drop_rate in (0.0, 0.5):
        model = _unet()
        if drop_rate:
            sparsify(model, drop_rate=drop_rate)
        task = GenerationTask(digits8, CFG)
        before = task.evaluate(model, digits8.val)[0]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # the paper's optimizer and rate
        loader = BatchLoader(digits8.train, 64, shuffle=True, seed=0, mean=digits8.mean, std=digits8.std)
        task.set_epoch(0)
        for _, (x, _) in zip(range(10), loader):  # 10 batches: enough to move, cheap enough for CI
            opt.zero_grad()
            task.batch_loss(model, x)[0].backward()
            opt.step()
        assert task.evaluate(model, digits8.val)[0] < 0.8 * before


def test_final_samples_score_and_grid(digits8, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = _unet()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    task = GenerationTask(digits8, CFG)
    assert task.quality_metric == "fid_classifier"
    result = task.final(model)
    assert result.samples.dtype == torch.uint8 and result.samples.shape == (6, 1, 8, 8)
    # fixed seed: the same images again, and from another task instance (the other arm)
    assert torch.equal(GenerationTask(digits8, CFG, seed=7).sample(model), result.samples)
    fields = result.record_fields()
    assert fields["fid_classifier"] == result.quality.value > 0
    assert fields["quality"]["n_generated"] == 6 and fields["quality"]["n_real"] == len(digits8.test)
    assert fields["sampling"]["seed"] == 0 and fields["sampling"]["timesteps"] == 10
    grid = np.asarray(Image.open(io.BytesIO(result.grid_png)))
    # 2 rows x 3 columns of 16x16 tiles (scale 2) with 2-pixel gutters
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18)
    assert np.array_equal(grid[2:18, 2:18], result.samples[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1).numpy())
    desc = task.describe()
    assert desc["diffusion"]["timesteps"] == 10 and desc["image_shape"] == [1, 8, 8]


def test_config_is_checked():
    with pytest.raises(ConfigError):
        GenerationConfig(n_samples=1)
    with pytest.raises(ConfigError):
        GenerationConfig(grid_scale=0)
