"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html), "python version".

The tarball holds pickled dicts with ``data`` (N x 3072 uint8, channel-major 32x32 planes) and ``labels``
(CIFAR-10) or ``fine_labels`` (CIFAR-100). The members are read straight from the verified tarball, nothing is
extracted, and the pickles are opened with an unpickler that only admits what a numpy array needs.

A torchvision root works as ``data_dir``: its ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (verified
against the same MD5), or else its extracted ``cifar-10-batches-py/`` / ``cifar-100-python/`` folder (each batch
file verified against torchvision's per-file MD5), is used before the project's own ``DATA_DIR/cifar10/``
layout, and nothing is downloaded.
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
from ssprop_energy.data.download import RemoteFile, ensure_file, verify_file
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

# MD5 of each extracted batch file, as torchvision lists them (torchvision/datasets/cifar.py: CIFAR10.train_list /
# test_list and CIFAR100.train_list / test_list).
CIFAR_MEMBER_MD5: dict[str, dict[str, str]] = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar100": {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
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


def _parse_batch(data: bytes, label_key: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one pickled batch; ``where`` names it in errors."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
        images = np.asarray(_key(batch, "data"))
        labels = np.asarray(_key(batch, label_key), dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{where} is not a CIFAR batch ({type(exc).__name__}: {exc})") from exc
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: data is {images.dtype} {images.shape}, expected uint8 (N, 3072)")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{where}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images.reshape(-1, 3, 32, 32), labels


def _read_batch(
    tar: tarfile.TarFile, member: tarfile.TarInfo, label_key: str, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    fh = tar.extractfile(member)
    if fh is None:
        raise DataError(f"{path}: member {member.name} is not a file")
    return _parse_batch(fh.read(), label_key, f"{path}: member {member.name}")


def _join(
    batches_by_part: list[list[tuple[np.ndarray, np.ndarray]]], num_classes: int, where: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    out: list[np.ndarray] = []
    for batches in batches_by_part:
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{where}: labels outside 0..{num_classes - 1}")
        out += [images, labels]
    return out[0], out[1], out[2], out[3]


def read_cifar_folder(
    folder: str | Path, dataset: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels from an extracted CIFAR folder (torchvision's
    ``cifar-10-batches-py/`` or ``cifar-100-python/``), every batch file checked against its published MD5.

    Raises:
        ChecksumError: a batch file does not match torchvision's MD5.
        DataError: a batch file is missing or malformed, or a label is out of range.
    """
    folder = Path(folder)
    _, train_members, test_members, label_key, num_classes = CIFAR_LAYOUT[dataset]
    missing = [m for m in (*train_members, *test_members) if not (folder / m).is_file()]
    if missing:
        raise DataError(f"{folder}: batch file(s) {', '.join(missing)} missing from the extracted CIFAR folder")
    parts = []
    for members in (train_members, test_members):
        batches = []
        for member in members:
            path = folder / member
            verify_file(path, CIFAR_MEMBER_MD5[dataset][member])
            batches.append(_parse_batch(path.read_bytes(), label_key, str(path)))
        parts.append(batches)
    return _join(parts, num_classes, folder)


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
    return _join(parts, num_classes, path)


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
    root = Path(data_dir)
    torchvision_tarball = root / remote.filename
    extracted = root / CIFAR_LAYOUT[name][0]
    own = root / name / remote.filename
    if not torchvision_tarball.exists() and not own.exists() and extracted.is_dir():
        train_x, train_y, test_x, test_y = read_cifar_folder(extracted, name)
        members = (*CIFAR_LAYOUT[name][1], *CIFAR_LAYOUT[name][2])
        files = [{"name": m, "md5": CIFAR_MEMBER_MD5[name][m], "path": str(extracted / m)} for m in members]
    else:
        path = ensure_file(name, remote, root, mirror=mirror, download=download, elsewhere=[torchvision_tarball])
        train_x, train_y, test_x, test_y = read_cifar_tarball(path, name)
        files = [{"name": remote.filename, "md5": remote.md5, "path": str(path)}]
    parts, split_info = official_split(train_x, train_y, test_x, test_y, seed)
    info = {"source": remote.urls[0], "files": files, "split": split_info}
    size = 32 if image_size is None else int(image_size)
    num_classes = CIFAR_LAYOUT[name][4]
    return make_splits(name, parts, num_classes, size, CIFAR_NORMALIZATION[name], info, "paper's public code (train_classifier.py)")
