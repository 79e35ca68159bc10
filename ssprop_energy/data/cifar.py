"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html), "python version".

The tarball holds pickled dicts with ``data`` (N x 3072 uint8, channel-major 32x32 planes) and ``labels``
(CIFAR-10) or ``fine_labels`` (CIFAR-100). The members are read straight from the verified tarball, nothing is
extracted, and the pickles are opened with an unpickler that only admits what a numpy array needs.
"""

from __future__ import annotations

import importlib
import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ssprop_energy.data.base import DatasetSplits, make_splits, official_split
from ssprop_energy.data.download import RemoteFile, ensure_file
from ssprop_energy.errors import DataError

# URLs and published MD5s of the tarballs, as torchvision lists them (torchvision/datasets/cifar.py:
# CIFAR10.url / tgz_md5 and CIFAR100.url / tgz_md5).
CIFAR_DATASETS: dict[str, RemoteFile] = {
    "cifar10": RemoteFile(
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    ),
    "cifar100": RemoteFile(
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
    ),
}

# dataset -> (folder inside the tarball, train members, test members, label key, number of classes)
CIFAR_LAYOUT: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, int]] = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", 100),
}

# Normalisation of the paper's public code (train_classifier.py), on the [0, 1] scale.
CIFAR_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),  # pickles written by numpy 1.x (the published files)
    ("numpy._core.multiarray", "_reconstruct"),  # pickles written by numpy 2.x
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 stores bytes at pickle protocol 2
}


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers, nothing that could run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if name == "_reconstruct":
            try:
                return importlib.import_module("numpy._core.multiarray")._reconstruct
            except ImportError:  # numpy < 2
                return importlib.import_module("numpy.core.multiarray")._reconstruct
        return super().find_class(module, name)


def _key(batch: dict[Any, Any], key: str) -> Any:
    # Python 2 pickles (the published files) decode to str keys with encoding="latin1"; a batch written by
    # Python 3 with bytes keys keeps them as bytes.
    if key in batch:
        return batch[key]
    if key.encode() in batch:
        return batch[key.encode()]
    raise KeyError(key)


def _read_batch(
    tar: tarfile.TarFile, member: tarfile.TarInfo, label_key: str, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    fh = tar.extractfile(member)
    if fh is None:
        raise DataError(f"{path}: member {member.name} is not a file")
    try:
        batch = _ArrayUnpickler(io.BytesIO(fh.read()), encoding="latin1").load()
        data = np.asarray(_key(batch, "data"))
        labels = np.asarray(_key(batch, label_key), dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: member {member.name} is not a CIFAR batch ({type(exc).__name__}: {exc})") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: member {member.name}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: member {member.name}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_tarball(
    path: str | Path, dataset: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels from a CIFAR python tarball.

    Images are uint8 (N, 3, 32, 32); labels int64 (N,).

    Raises:
        DataError: unreadable tarball, missing member, malformed batch or a label out of range.
    """
    path = Path(path)
    folder, train_members, test_members, label_key, num_classes = CIFAR_LAYOUT[dataset]
    wanted = {f"{folder}/{m}" for m in (*train_members, *test_members)}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            # One pass in archive order, whatever order the archive keeps the batches in: asking a gzip
            # stream for an earlier member would decompress it again from the start.
            for info in tar:
                if info.name in wanted:
                    found[info.name] = _read_batch(tar, info, label_key, path)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable tarball ({exc})") from exc
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"{path}: member(s) {', '.join(missing)} missing from the tarball")
    parts = [[found[f"{folder}/{m}"] for m in members] for members in (train_members, test_members)]
    out: list[np.ndarray] = []
    for batches in parts:
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
        out += [images, labels]
    return out[0], out[1], out[2], out[3]


def load_cifar_dataset(
    name: str,
    data_dir: Path,
    image_size: int | None = None,
    seed: int = 0,
    mirror: str | None = None,
    download: bool = True,
) -> DatasetSplits:
    """CIFAR-10 or CIFAR-100: the tarball fetched and verified if needed, train split 80/20 into train/val
    with ``seed``, the official test set as test, normalised with the paper's constants."""
    remote = CIFAR_DATASETS[name]
    path = ensure_file(name, remote, data_dir, mirror=mirror, download=download)
    train_x, train_y, test_x, test_y = read_cifar_tarball(path, name)
    parts, split_info = official_split(train_x, train_y, test_x, test_y, seed)
    info = {
        "source": remote.urls[0],
        "files": [{"name": remote.filename, "md5": remote.md5, "path": str(path)}],
        "split": split_info,
    }
    size = 32 if image_size is None else int(image_size)
    num_classes = CIFAR_LAYOUT[name][4]
    return make_splits(name, parts, num_classes, size, CIFAR_NORMALIZATION[name], info, "paper's public code (train_classifier.py)")
