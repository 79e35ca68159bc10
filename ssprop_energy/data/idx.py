"""MNIST and Fashion-MNIST: the IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/), gzipped.

IDX layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian uint32 sizes,
then the values in big-endian C order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ssprop_energy.data.base import DatasetSplits, make_splits, official_split
from ssprop_energy.data.download import RemoteFile, ensure_file
from ssprop_energy.errors import DataError

# IDX type code -> numpy dtype (big-endian where multi-byte)
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_BASES = (
    # torchvision's mirror list (torchvision/datasets/mnist.py, MNIST.mirrors), the S3 copy first because
    # yann.lecun.com has often refused anonymous downloads.
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_BASES = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

# Published MD5s, as torchvision lists them (torchvision/datasets/mnist.py: MNIST.resources and
# FashionMNIST.resources); the same values appear on the datasets' pages.
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

# dataset -> (train images, train labels, test images, test labels)
IDX_DATASETS: dict[str, tuple[RemoteFile, RemoteFile, RemoteFile, RemoteFile]] = {
    name: tuple(  # type: ignore[misc]
        RemoteFile(fname, md5s[fname], tuple(base + fname for base in bases))
        for fname in (
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        )
    )
    for name, md5s, bases in (("mnist", _MNIST_MD5, _MNIST_BASES), ("fashion-mnist", _FASHION_MD5, _FASHION_BASES))
}

# torchvision's folder for each dataset under its root (torchvision/datasets/mnist.py: MNIST.raw_folder is
# ROOT/<class name>/raw), where it keeps the same published .gz files.
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

# Normalisation the paper's public code uses (train_classifier.py, transforms.Normalize), per channel on the
# [0, 1] scale; kept so that reproductions see the paper's inputs.
IDX_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode one uncompressed IDX file. ``source`` names the file in error messages.

    Raises:
        DataError: bad magic, unknown type code, or a body shorter or longer than the header says.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{source}: not an IDX file (bad magic)")
    code, ndim = data[2], data[3]
    dtype = IDX_DTYPES.get(code)
    if dtype is None:
        raise DataError(f"{source}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{source}: IDX body has {len(data) - header} bytes, header {shape} says {expected} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_gz(path: str | Path) -> np.ndarray:
    """Read a gzipped IDX file; a damaged archive is a :class:`DataError` naming the path."""
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable gzip ({exc})") from exc
    return parse_idx(data, str(path))


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from an IDX image file and its label file."""
    images = read_idx_gz(images_path)
    labels = read_idx_gz(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: {labels.shape} labels for {images.shape[0]} images in {images_path}")
    return images[:, None, :, :], labels.astype(np.int64)


def load_idx_dataset(
    name: str,
    data_dir: Path,
    image_size: int | None = None,
    seed: int = 0,
    mirror: str | None = None,
    download: bool = True,
) -> DatasetSplits:
    """MNIST or Fashion-MNIST: fetched and verified if needed, train split 80/20 into train/val with
    ``seed`` as the paper does, the official test set as test, normalised with the paper's constants."""
    remotes = IDX_DATASETS[name]
    raw = Path(data_dir) / TORCHVISION_FOLDERS[name] / "raw"
    paths = [
        ensure_file(name, r, data_dir, mirror=mirror, download=download, elsewhere=[raw / r.filename])
        for r in remotes
    ]
    train_x, train_y = read_idx_pair(paths[0], paths[1])
    test_x, test_y = read_idx_pair(paths[2], paths[3])
    for path, labels in ((paths[1], train_y), (paths[3], test_y)):
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"{path}: labels outside 0..9")
    parts, split_info = official_split(train_x, train_y, test_x, test_y, seed)
    info = {
        "source": remotes[0].urls[0].rsplit("/", 1)[0] + "/",
        "files": [{"name": r.filename, "md5": r.md5, "path": str(p)} for r, p in zip(remotes, paths)],
        "split": split_info,
    }
    size = int(train_x.shape[-1]) if image_size is None else int(image_size)
    return make_splits(name, parts, 10, size, IDX_NORMALIZATION[name], info, "paper's public code (train_classifier.py)")
