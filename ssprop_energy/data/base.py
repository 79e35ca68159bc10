"""The in-memory dataset types and the helpers every reader shares: resize, split, statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssprop_energy.errors import DataError

# Images processed per chunk when resizing or summing: bounds the working copy (4096 x 3 x 32 x 32 x 8 B = 100 MB).
_CHUNK = 4096


@dataclass(frozen=True)
class TensorSplit:
    """One split held whole in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W), pixel values 0..255.
        labels: int64 tensor (N,), class indices 0..num_classes-1.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"labels must be int64 (N,) with N={self.images.shape[0]}, got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class DatasetSplits:
    """Train/validation/test splits plus what a model and a run record need to know about them.

    ``mean`` and ``std`` are per channel, in units of the [0, 1] pixel scale (pixel / 255), as
    ``torchvision.transforms.Normalize`` takes them. ``info`` is JSON-able and goes into the run record.
    """

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict)


def resize_uint8(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinearly resize uint8 (N, C, H, W) images to (N, C, image_size, image_size), rounded back to uint8.

    Antialiasing is on so that shrinking averages pixels instead of skipping them (it has no effect when
    enlarging). Returns the input unchanged when it already has the size.
    """
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    if images.shape[-2:] == (image_size, image_size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], image_size, image_size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].float()
        resized = F.interpolate(chunk, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def resize_info(native: tuple[int, int], image_size: int) -> dict[str, Any] | None:
    """The record entry describing a resize, or None when the images keep their native size."""
    if tuple(native) == (image_size, image_size):
        return None
    return {"from": list(native), "to": [image_size, image_size], "method": "bilinear", "antialias": True}


def random_split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` at random into parts of the given fractions (the last takes the remainder).

    Uses numpy's PCG64 generator seeded with ``seed``: the same indices on every platform and version of
    this package. Each part is returned sorted.
    """
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([int(n * f) for f in fractions[:-1]])
    return [np.sort(part) for part in np.split(perm, bounds)]


def stratified_split_indices(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices class by class so every part keeps the class proportions (up to rounding).

    Each class's indices are permuted with a generator seeded from ``(seed, class)`` and cut by
    ``round(count * fraction)`` for every part but the first, which takes the rest.
    """
    labels = np.asarray(labels)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        perm = idx[np.random.default_rng([seed, int(cls)]).permutation(idx.size)]
        sizes = [int(round(idx.size * f)) for f in fractions[1:]]
        first = idx.size - sum(sizes)
        bounds = np.cumsum([first, *sizes])[:-1]
        for part, chunk in zip(parts, np.split(perm, bounds)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images on the [0, 1] scale (population std).

    Exact integer sums of pixels and squared pixels (int64, chunk by chunk, so 50 000 CIFAR images never
    need a float copy), then mean = S / n and var = Q / n - mean^2 in float64.
    """
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.int64)
    total_sq = torch.zeros(channels, dtype=torch.int64)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].to(torch.int64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += (chunk * chunk).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean_raw = total.to(torch.float64) / n
    var_raw = (total_sq.to(torch.float64) / n - mean_raw * mean_raw).clamp_min(0.0)
    mean = mean_raw / 255.0
    std = (var_raw.sqrt() / 255.0).clamp_min(1e-12)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def take(images: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> TensorSplit:
    """The split made of rows ``index`` (copied, contiguous)."""
    idx = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
    return TensorSplit(images[idx].contiguous(), labels[idx].contiguous())


def make_splits(
    name: str,
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    image_size: int,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None,
    info: dict[str, Any],
    normalization_source: str = "",
) -> DatasetSplits:
    """Resize the ``train``/``val``/``test`` parts, fix the normalisation and complete ``info``.

    Args:
        parts: split name -> (uint8 images (N, C, H, W), int64 labels (N,)), all at the same native size.
        normalization: (mean, std) per channel to use as given, or None to measure them on the train split
            after resizing.
        normalization_source: where a given normalisation comes from, for the record.
    """
    native = tuple(int(v) for v in parts["train"][0].shape[-2:])
    splits = {key: TensorSplit(resize_uint8(imgs, image_size), lbls) for key, (imgs, lbls) in parts.items()}
    if normalization is None:
        mean, std = channel_stats(splits["train"].images)
        normalization_source = "measured on the train split after resizing"
    else:
        mean, std = normalization
    in_channels = int(splits["train"].images.shape[1])
    if len(mean) != in_channels or len(std) != in_channels:
        raise DataError(f"{name}: normalisation for {len(mean)} channels, images have {in_channels}")
    info = dict(info)
    # A reader that resized image by image (folder: mixed sizes) has described it already.
    info.setdefault("native_size", list(native))
    info.setdefault("resize", resize_info(native, image_size))
    info.update(
        {
            "name": name,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "image_size": image_size,
            "split_sizes": {key: len(split) for key, split in splits.items()},
            "normalization": {"mean": list(mean), "std": list(std), "source": normalization_source},
        }
    )
    return DatasetSplits(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=tuple(mean),
        std=tuple(std),
        info=info,
    )


# The paper's public code splits the official training set 80/20 into train/validation.
TRAIN_VAL_SPLIT = (0.8, 0.2)


def official_split(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Seeded 80/20 train/validation split of an official training set, the official test set as test.

    Returns:
        ``(parts, split_info)``: ``{"train"|"val"|"test": (images, labels)}`` and the split's description
        for the run record.
    """
    train_idx, val_idx = random_split_indices(train_x.shape[0], TRAIN_VAL_SPLIT, seed)
    tx, ty = torch.from_numpy(train_x), torch.from_numpy(train_y)
    train, val = take(tx, ty, train_idx), take(tx, ty, val_idx)
    parts = {
        "train": (train.images, train.labels),
        "val": (val.images, val.labels),
        "test": (torch.from_numpy(np.ascontiguousarray(test_x)), torch.from_numpy(test_y)),
    }
    info = {"method": "random", "train_val_fractions": list(TRAIN_VAL_SPLIT), "seed": seed, "test": "official"}
    return parts, info
