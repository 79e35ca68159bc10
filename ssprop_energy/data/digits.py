"""The embedded offline default: UCI handwritten digits as scikit-learn ships them.

1797 grey 8x8 images of the digits 0-9 (Alpaydin & Kaynak, UCI ML repository), installed with scikit-learn, so
``compare`` runs on a fresh machine with no network. Pixels hold counts 0..16, scaled here to 0..255.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ssprop_energy.data.base import DatasetSplits, make_splits, stratified_split_indices, take

# 16x16, not the CIFAR 32x32: the harness's default run trains ResNet-18 on a 2-core CPU and must finish in
# minutes. Convolution cost scales with pixel count, so 16x16 is 4x cheaper than 32x32, and at 2x the native
# 8x8 the resize invents no detail that matters; the network still reaches its last stage at 2x2.
DIGITS_DEFAULT_IMAGE_SIZE = 16

# train / val / test fractions, stratified by class
DIGITS_SPLIT = (0.6, 0.2, 0.2)

_DIGITS_MAX = 16  # load_digits pixel values are integer counts 0..16


def load_digits_splits(image_size: int | None = None, seed: int = 0) -> DatasetSplits:
    """The digits dataset, resized to ``image_size`` (default :data:`DIGITS_DEFAULT_IMAGE_SIZE`) and split
    60/20/20, stratified by class, with ``seed``; normalised by statistics of its train split."""
    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.asarray(bunch.images)
    images = np.rint(raw * (255.0 / _DIGITS_MAX)).astype(np.uint8)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    parts_idx = stratified_split_indices(labels, DIGITS_SPLIT, seed)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    parts = {}
    for key, idx in zip(("train", "val", "test"), parts_idx):
        split = take(images_t, labels_t, idx)
        parts[key] = (split.images, split.labels)
    size = DIGITS_DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    info = {
        "source": "sklearn.datasets.load_digits (UCI ML hand-written digits, 1797 images, 8x8)",
        "sklearn_version": sklearn.__version__,
        "files": [
            {
                "name": "load_digits images (uint8 0..255) + targets",
                "md5": hashlib.md5(images.tobytes() + labels.tobytes(), usedforsecurity=False).hexdigest(),
            }
        ],
        "split": {"method": "stratified", "fractions": list(DIGITS_SPLIT), "seed": seed},
        "pixel_scaling": "value * 255 / 16, rounded",
    }
    return make_splits("digits", parts, 10, size, None, info)
