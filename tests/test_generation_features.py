"""Feature extractors: the cached classifier (deterministic, cached, accuracy recorded, a Frechet distance that
ranks real above noise) and the Inception path through a fake torch-fidelity module (never the network)."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ssprop_energy.data import load_dataset
from ssprop_energy.errors import ConfigError, DataError
from ssprop_energy.generation import features as F
from ssprop_energy.generation.features import (
    ENV_INCEPTION_WEIGHTS,
    classifier_extractor,
    inception_extractor,
    measure_quality,
    select_extractor,
)

SAMPLES = 2000  # enough for ~70% test accuracy on 8x8 digits in ~2 s


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", image_size=8)


def test_classifier_is_trained_once_cached_and_deterministic(digits8, tmp_path):
    first = classifier_extractor(digits8, cache_dir=tmp_path / "a", train_samples=SAMPLES)
    assert first.info["cached"] is False and first.metric == "fid_classifier"
    assert first.info["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert first.info["epochs"] == 2  # ceil(2000 / 1078 train images)
    files = list((tmp_path / "a").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("digits-8px-1ch-10cls-v1-n2000-s0-")

    again = classifier_extractor(digits8, cache_dir=tmp_path / "a", train_samples=SAMPLES)
    assert again.info["cached"] is True
    assert again.info["test_accuracy"] == first.info["test_accuracy"]
    imgs = digits8.test.images[:20]
    assert np.array_equal(again.features(imgs), first.features(imgs))

    # the same recipe elsewhere trains the same network: the extractor does not depend on who trains it
    other = classifier_extractor(digits8, cache_dir=tmp_path / "b", train_samples=SAMPLES)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[key]), key


def test_cache_defaults_to_the_user_cache_dir(digits8, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ex = classifier_extractor(digits8, train_samples=100)
    assert Path(ex.info["cache_file"]).parent == tmp_path / "xdg" / "ssprop-energy" / "fid-classifier"


def test_a_corrupt_cache_entry_is_named(digits8, tmp_path):
    ex = classifier_extractor(digits8, cache_dir=tmp_path, train_samples=100)
    Path(ex.info["cache_file"]).write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="delete the file"):
        classifier_extractor(digits8, cache_dir=tmp_path, train_samples=100)


def test_classifier_frechet_ranks_real_images_above_noise(digits8, tmp_path):
    ex = classifier_extractor(digits8, cache_dir=tmp_path, train_samples=SAMPLES)
    real = measure_quality(ex, digits8.val.images, digits8.test.images)
    noise = (torch.rand(digits8.val.images.shape, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    bad = measure_quality(ex, noise, digits8.test.images)
    assert 0 < real.value < bad.value / 5
    assert measure_quality(ex, digits8.test.images, digits8.test.images).value == pytest.approx(0.0, abs=1e-6)
    d = real.to_dict()
    assert d["metric"] == "fid_classifier" and d["extractor"] == "classifier-cnn-v1"
    assert d["n_generated"] == len(digits8.val) and d["n_real"] == len(digits8.test)
    assert "NOT comparable" in d["note"] and d["extractor_info"]["test_accuracy"] == ex.info["test_accuracy"]
    with pytest.raises(ConfigError):
        measure_quality(ex, digits8.val.images.float(), digits8.test.images)


class _FakeInception(torch.nn.Module):
    """Stands in for torch_fidelity's FeatureExtractorInceptionV3: records its arguments and inputs."""

    calls: list = []
    dim = 2048  # the real pool-feature width

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__()
        type(self).calls.append((name, list(features_list), feature_extractor_weights_path))
        self.inputs = []

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.inputs.append(x)
        brightness = x.double().mean(dim=(1, 2, 3))[:, None]
        return (brightness * torch.linspace(0, 1, self.dim, dtype=torch.float64)[None],)


@pytest.fixture
def fake_fidelity(monkeypatch):
    pkg = types.ModuleType("torch_fidelity")
    pkg.__version__ = "0.0-fake"
    sub = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    sub.FeatureExtractorInceptionV3 = _FakeInception
    pkg.feature_extractor_inceptionv3 = sub
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", sub)
    _FakeInception.calls = []
    return pkg


def test_inception_path_uses_the_local_file_and_rgb_uint8(fake_fidelity, tmp_path, digits8):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"fake weights")
    ex = inception_extractor(weights)
    assert _FakeInception.calls == [("inception-v3-compat", ["2048"], str(weights))]
    feats = ex.features(digits8.test.images[:70])  # two batches of at most 64
    assert feats.shape == (70, 2048)
    assert [x.shape[0] for x in ex.module.inputs] == [64, 6]
    assert torch.equal(ex.module.inputs[0][:, 0], ex.module.inputs[0][:, 2])  # grey repeated into RGB
    ex.module.dim = 16  # a Frechet distance in 2048 dimensions costs seconds of eigendecomposition
    q = measure_quality(ex, digits8.val.images[:30], digits8.test.images)
    assert q.metric == "fid" and q.extractor == "inception-v3" and "30 generated" in q.note
    assert q.extractor_info["weights_md5"] == hashlib.md5(b"fake weights").hexdigest()
    assert q.extractor_info["library"] == "torch-fidelity 0.0-fake"


def test_select_extractor_follows_the_environment(fake_fidelity, tmp_path, monkeypatch, digits8):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv(ENV_INCEPTION_WEIGHTS, str(weights))
    assert select_extractor(digits8).metric == "fid"
    monkeypatch.setenv(ENV_INCEPTION_WEIGHTS, str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="not found"):
        select_extractor(digits8)
    monkeypatch.delenv(ENV_INCEPTION_WEIGHTS)
    assert select_extractor(digits8, cache_dir=tmp_path / "c", train_samples=100).metric == "fid_classifier"


def test_inception_without_the_library_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"ssprop-energy\[fid\]"):
        inception_extractor(weights)
    assert F.NOTE_CLASSIFIER.startswith("Frechet distance")
