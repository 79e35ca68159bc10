"""Feature extractors for a Frechet distance between generated and real images, and the quality figure.

Two extractors, chosen by :func:`select_extractor`:

- **Inception-v3** (the standard FID): torch-fidelity's ``FeatureExtractorInceptionV3`` with its 2048-d pool
  features, loaded from a local weights file named by ``inception_weights=`` or ``$SSPROP_ENERGY_INCEPTION_WEIGHTS``
  (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``). Nothing is downloaded: without a file this
  extractor is not used. torch-fidelity is an optional extra (``pip install 'ssprop-energy[fid]'``); chosen over
  pytorch-fid and clean-fid because it takes an explicit weights path (``feature_extractor_weights_path``),
  so "never download at run time" holds by construction, and it is the most actively maintained of the three.
- **A small classifier** (``fid_classifier``): a CNN trained deterministically once on the same dataset's train
  split, cached in the user cache directory under a key of dataset, image size, channels, a digest of the
  training images and :data:`CLASSIFIER_VERSION`; its test accuracy is recorded. Features: its 128-d
  penultimate layer. Its Frechet distances compare runs that use the same extractor only.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ssprop_energy.data.base import DatasetSplits, TensorSplit
from ssprop_energy.data.loader import BatchLoader
from ssprop_energy.errors import ConfigError, DataError
from ssprop_energy.generation.diffusion import to_model_range
from ssprop_energy.generation.frechet import frechet_distance_of

logger = logging.getLogger(__name__)

ENV_INCEPTION_WEIGHTS = "SSPROP_ENERGY_INCEPTION_WEIGHTS"
# Bump when the classifier's architecture, training recipe or input scaling changes: a new cache entry.
CLASSIFIER_VERSION = 1
CLASSIFIER_FEATURES = 128
# Training length in samples seen (not epochs), so that small sets get several epochs and large ones one.
# 10,000 samples: digits at 32x32 reaches ~97% test accuracy (20,000 gave 97.5%) in about a minute on a busy
# 2-core CPU; the cost is paid once per dataset and cached.
CLASSIFIER_TRAIN_SAMPLES = 10_000
CLASSIFIER_BATCH = 64
CLASSIFIER_LR = 1e-3
FEATURE_BATCH = 256

NOTE_CLASSIFIER = (
    "Frechet distance in the 128-d penultimate features of a small CNN classifier trained on the same dataset "
    "(fid_classifier); NOT comparable to published FID figures, which use Inception-v3 features and 50,000 "
    "samples; compare it only between runs with the same extractor and sample count"
)
NOTE_INCEPTION = (
    "standard FID: Inception-v3 2048-d pool features (torch-fidelity); computed from {n} generated images, "
    "so biased upward against published 50,000-sample figures; compare it only at equal sample counts"
)


class FeatureExtractor(Protocol):
    """Maps uint8 images (N, C, H, W) to feature vectors (N, D)."""

    name: str
    metric: str  # "fid" or "fid_classifier": the record field the figure goes in

    def features(self, images: Tensor) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


# ---- the small classifier ----------------------------------------------------------------------------


class FeatureCNN(nn.Module):
    """conv(C->32, 3x3) ReLU maxpool2, conv(32->64, 3x3) ReLU maxpool2, linear(-> 128) ReLU, linear(-> classes)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        side = image_size // 4
        if side < 1:
            raise ConfigError(f"the FID classifier needs images of at least 4 px, got {image_size}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * side * side, CLASSIFIER_FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(CLASSIFIER_FEATURES, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _uint8_batches(images: Tensor, batch: int) -> Any:
    for start in range(0, images.shape[0], batch):
        yield to_model_range(images[start : start + batch])


def _split_digest(split: TensorSplit) -> str:
    h = hashlib.sha256()
    h.update(split.images.numpy().tobytes())
    h.update(split.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """Per-user cache folder for trained feature extractors (platformdirs ``user_cache_dir``)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("ssprop-energy")) / "fid-classifier"


@dataclass
class ClassifierExtractor:
    """The cached small classifier and what the record says about it."""

    model: FeatureCNN
    info: dict[str, Any] = field(default_factory=dict)
    metric: str = "fid_classifier"

    @property
    def name(self) -> str:
        return f"classifier-cnn-v{CLASSIFIER_VERSION}"

    @torch.no_grad()
    def features(self, images: Tensor) -> np.ndarray:
        self.model.eval()
        out = [self.model.body(x).double().numpy() for x in _uint8_batches(images.cpu(), FEATURE_BATCH)]
        return np.concatenate(out)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.info}


@torch.no_grad()
def _accuracy(model: FeatureCNN, split: TensorSplit) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), FEATURE_BATCH):
        x = to_model_range(split.images[start : start + FEATURE_BATCH])
        correct += int((model(x).argmax(dim=1) == split.labels[start : start + FEATURE_BATCH]).sum())
    return correct / max(1, len(split))


def _train_classifier(ds: DatasetSplits, seed: int, train_samples: int) -> tuple[FeatureCNN, dict[str, Any]]:
    """Deterministic training: seeded init and batch order, Adam, a fixed number of samples."""
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureCNN(ds.in_channels, ds.image_size, ds.num_classes)
        # Normalisation as the features see it: [-1, 1], the diffusion model's range, for real and generated.
        loader = BatchLoader(ds.train, CLASSIFIER_BATCH, shuffle=True, seed=seed,
                             mean=(0.5,) * ds.in_channels, std=(0.5,) * ds.in_channels)
        epochs = max(1, math.ceil(train_samples / len(ds.train)))
        opt = torch.optim.Adam(model.parameters(), lr=CLASSIFIER_LR)
        model.train()
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    info = {
        "epochs": epochs,
        "batch_size": CLASSIFIER_BATCH,
        "optimizer": f"Adam lr {CLASSIFIER_LR}",
        "seed": seed,
        "train_wall_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "test_accuracy": _accuracy(model, ds.test),
        "val_accuracy": _accuracy(model, ds.val),
    }
    return model, info


def classifier_extractor(
    ds: DatasetSplits,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    train_samples: int = CLASSIFIER_TRAIN_SAMPLES,
) -> ClassifierExtractor:
    """The dataset's feature classifier: loaded from the cache, or trained once and cached.

    Args:
        ds: the dataset (its train split trains the classifier; its test split measures its accuracy).
        cache_dir: cache folder (default :func:`default_cache_dir`).
        seed: seed of the initialisation and the batch order.
        train_samples: training length in samples seen (rounded up to whole epochs).

    Raises:
        DataError: a cache file that cannot be read (it is named; delete it to retrain).
    """
    from ssprop_energy.records import write_bytes_atomic

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if train_samples < 1:
        raise ConfigError(f"train_samples must be >= 1, got {train_samples}")
    key = (
        f"{ds.name}-{ds.image_size}px-{ds.in_channels}ch-{ds.num_classes}cls-v{CLASSIFIER_VERSION}"
        f"-n{train_samples}-s{seed}-{_split_digest(ds.train)}"
    )
    path = folder / f"{key.replace(':', '_').replace('/', '_')}.pt"
    model = FeatureCNN(ds.in_channels, ds.image_size, ds.num_classes)
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"])
            info = dict(blob["info"])
        except Exception as exc:  # any unreadable / mismatched cache entry is the same user-facing problem
            raise DataError(f"cannot read the cached FID classifier {path}: {exc}; delete the file to retrain") from None
        info["cached"] = True
    else:
        logger.info("training the FID feature classifier for %s (once; cached at %s)", key, path)
        model, info = _train_classifier(ds, seed, train_samples)
        buf = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "info": info}, buf)
        write_bytes_atomic(path, buf.getvalue())
        info["cached"] = False
    info.update(dataset=ds.name, image_size=ds.image_size, version=CLASSIFIER_VERSION, cache_key=key,
                cache_file=str(path), feature_dim=CLASSIFIER_FEATURES)
    model.eval()
    return ClassifierExtractor(model, info)


# ---- Inception-v3 via torch-fidelity ---------------------------------------------------------------


@dataclass
class InceptionExtractor:
    """torch-fidelity's FID Inception-v3 (2048-d pool features) from a local weights file."""

    module: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    metric: str = "fid"
    name: str = "inception-v3"

    @torch.no_grad()
    def features(self, images: Tensor) -> np.ndarray:
        out = []
        for start in range(0, images.shape[0], 64):
            x = images[start : start + 64].cpu()
            if x.shape[1] == 1:  # grey digits: the standard practice is to repeat them into RGB
                x = x.repeat(1, 3, 1, 1)
            feats = self.module(x)
            out.append((feats[0] if isinstance(feats, (tuple, list)) else feats).double().numpy())
        return np.concatenate(out)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.info}


def inception_extractor(weights_path: str | os.PathLike[str]) -> InceptionExtractor:
    """Inception-v3 for the standard FID from a local weights file; never downloads.

    Raises:
        ConfigError: the file does not exist, or torch-fidelity is not installed.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"Inception weights file not found: {path} (set by --inception-weights or ${ENV_INCEPTION_WEIGHTS})")
    try:
        import torch_fidelity
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ConfigError(
            "the standard FID needs torch-fidelity: pip install 'ssprop-energy[fid]' (or unset "
            f"${ENV_INCEPTION_WEIGHTS} to use the classifier Frechet distance)"
        ) from None
    digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
    module = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    module.eval()
    info = {
        "library": f"torch-fidelity {getattr(torch_fidelity, '__version__', '?')}",
        "weights_file": path.name,
        "weights_md5": digest,
        "feature_dim": 2048,
    }
    return InceptionExtractor(module, info)


def select_extractor(
    ds: DatasetSplits,
    inception_weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    train_samples: int = CLASSIFIER_TRAIN_SAMPLES,
) -> FeatureExtractor:
    """Inception-v3 where a weights file is named (argument, else ``$SSPROP_ENERGY_INCEPTION_WEIGHTS``), else the
    dataset's cached classifier."""
    weights = inception_weights or os.environ.get(ENV_INCEPTION_WEIGHTS) or None
    if weights:
        return inception_extractor(weights)
    return classifier_extractor(ds, cache_dir=cache_dir, train_samples=train_samples)


# ---- the quality figure --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityResult:
    """A Frechet distance between generated and real images, labelled by its extractor.

    Attributes:
        metric: ``"fid"`` (Inception-v3) or ``"fid_classifier"`` (the small classifier): the record field name.
        value: the squared Frechet distance (lower is better).
        extractor: the extractor's name; ``extractor_info`` says which weights / cache entry and its accuracy.
        n_generated / n_real: images on each side.
        note: what the figure may be compared with.
        wall_s: seconds spent extracting features and computing the distance.
    """

    metric: str
    value: float
    extractor: str
    n_generated: int
    n_real: int
    note: str
    extractor_info: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    lower_is_better: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_quality(extractor: FeatureExtractor, generated: Tensor, real: Tensor) -> QualityResult:
    """Frechet distance between the features of ``generated`` and ``real`` uint8 images (N, C, H, W).

    Raises:
        ConfigError: fewer than 2 images on a side, or non-uint8 images.
    """
    for label, images in (("generated", generated), ("real", real)):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] < 2:
            raise ConfigError(f"{label} images must be uint8 (N >= 2, C, H, W), got {images.dtype} {tuple(images.shape)}")
    started = time.perf_counter()
    value = frechet_distance_of(extractor.features(generated), extractor.features(real))
    note = NOTE_CLASSIFIER if extractor.metric == "fid_classifier" else NOTE_INCEPTION.format(n=generated.shape[0])
    return QualityResult(
        metric=extractor.metric,
        value=value,
        extractor=extractor.name,
        n_generated=int(generated.shape[0]),
        n_real=int(real.shape[0]),
        note=note,
        extractor_info=extractor.describe(),
        wall_s=time.perf_counter() - started,
    )
