"""Datasets held whole in memory as uint8, and a loader that normalises batches on the fly.

``load_dataset(name)`` knows:

- ``digits`` (default): scikit-learn's UCI handwritten digits, offline, resized to 16x16 by default;
- ``mnist``, ``fashion-mnist``: IDX files; ``cifar10``, ``cifar100``: the python pickle tarballs. Fetched
  from their canonical URLs (or ``$SSPROP_ENERGY_MIRROR/NAME/FILE``) into the data directory and verified
  against their published MD5s before every use;
- ``folder:PATH``: one subfolder per class;
- ``synthetic:CxHxW[:CLASSES[:N_TRAIN]]``: random tensors for benchmarks.
"""

from __future__ import annotations

from pathlib import Path

from ssprop_energy.data.base import DatasetSplits, TensorSplit
from ssprop_energy.data.cifar import CIFAR_DATASETS, load_cifar_dataset
from ssprop_energy.data.digits import DIGITS_DEFAULT_IMAGE_SIZE, load_digits_splits
from ssprop_energy.data.download import ENV_DATA_DIR, ENV_MIRROR, default_data_dir
from ssprop_energy.data.folder import load_folder_splits
from ssprop_energy.data.idx import IDX_DATASETS, load_idx_dataset
from ssprop_energy.data.loader import BatchLoader
from ssprop_energy.data.synthetic import SYNTHETIC_USAGE, make_synthetic
from ssprop_energy.errors import ConfigError

__all__ = [
    "BatchLoader",
    "DatasetSplits",
    "TensorSplit",
    "DEFAULT_DATASET",
    "DIGITS_DEFAULT_IMAGE_SIZE",
    "ENV_DATA_DIR",
    "ENV_MIRROR",
    "default_data_dir",
    "list_datasets",
    "load_dataset",
]

DEFAULT_DATASET = "digits"


def list_datasets() -> list[str]:
    """Names ``load_dataset`` accepts (``folder:`` and ``synthetic:`` take a suffix)."""
    return ["digits", *IDX_DATASETS, *CIFAR_DATASETS, "folder:PATH", SYNTHETIC_USAGE.split(",")[0]]


def load_dataset(
    name: str = DEFAULT_DATASET,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    *,
    mirror: str | None = None,
    download: bool = True,
) -> DatasetSplits:
    """Load a dataset whole into memory, split into train/val/test.

    Args:
        name: see the module docstring; case-insensitive except for a folder path.
        data_dir: where downloaded files live (default: ``$SSPROP_ENERGY_DATA``, else the user cache dir).
        image_size: side in pixels to resize to (bilinear, once, at load); None keeps the dataset's own size
            (digits: :data:`DIGITS_DEFAULT_IMAGE_SIZE`).
        seed: seed of the train/validation split (and of synthetic data).
        mirror: base URL replacing the canonical download locations (default ``$SSPROP_ENERGY_MIRROR``).
        download: fetch missing files; False makes a missing file an error.

    Raises:
        ConfigError: unknown name or bad argument.
        DataError: missing, corrupt or unreadable data (ChecksumError, DownloadError are subclasses).
    """
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    prefix, sep, rest = name.partition(":")
    key = prefix.strip().lower()
    if sep and key == "folder":
        return load_folder_splits(rest, image_size=image_size, seed=seed)
    if key == "synthetic":
        if not sep:
            raise ConfigError(f"synthetic needs a shape: {SYNTHETIC_USAGE}")
        return make_synthetic(rest, image_size=image_size, seed=seed)
    if sep:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    if key == "digits":
        return load_digits_splits(image_size=image_size, seed=seed)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if key in IDX_DATASETS:
        return load_idx_dataset(key, root, image_size=image_size, seed=seed, mirror=mirror, download=download)
    if key in CIFAR_DATASETS:
        return load_cifar_dataset(key, root, image_size=image_size, seed=seed, mirror=mirror, download=download)
    raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
