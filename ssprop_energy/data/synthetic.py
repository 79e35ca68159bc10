"""``synthetic:CxHxW[:CLASSES[:N_TRAIN]]``: uniform random pixels and labels, for benchmarks only.

Nothing can be learned from it; it exists to time data movement and training steps at a chosen shape
without a download. It is never a default.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ssprop_energy.data.base import DatasetSplits, make_splits
from ssprop_energy.errors import ConfigError

SYNTHETIC_USAGE = "synthetic:CxHxW[:CLASSES[:N_TRAIN]], e.g. synthetic:3x32x32:10:50000 (H = W)"
_SPEC = re.compile(r"^(\d+)x(\d+)x(\d+)(?::(\d+))?(?::(\d+))?$")
SYNTHETIC_DEFAULT_CLASSES = 10
SYNTHETIC_DEFAULT_TRAIN = 1024


def parse_synthetic(spec: str) -> tuple[int, int, int, int]:
    """``"3x32x32:10:2048"`` -> (channels, size, classes, n_train). Raises ConfigError on a bad spec."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise ConfigError(f"bad synthetic spec {spec!r}; use {SYNTHETIC_USAGE}")
    c, h, w = (int(match.group(i)) for i in (1, 2, 3))
    classes = int(match.group(4) or SYNTHETIC_DEFAULT_CLASSES)
    n_train = int(match.group(5) or SYNTHETIC_DEFAULT_TRAIN)
    if h != w or min(c, h, classes, n_train) < 1:
        raise ConfigError(f"bad synthetic spec {spec!r}; use {SYNTHETIC_USAGE}")
    return c, h, classes, n_train


def make_synthetic(spec: str, image_size: int | None = None, seed: int = 0) -> DatasetSplits:
    """Random uint8 images and labels: ``n_train`` train, ``n_train // 4`` (at least 1) val and test."""
    channels, size, classes, n_train = parse_synthetic(spec)
    n_eval = max(1, n_train // 4)
    rng = np.random.default_rng(seed)
    parts = {}
    for key, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n, dtype=np.int64)
        parts[key] = (torch.from_numpy(images), torch.from_numpy(labels))
    info = {"source": f"synthetic:{spec} (uniform random pixels and labels)", "files": [], "split": {"seed": seed}}
    return make_splits(
        f"synthetic:{spec}", parts, classes, size if image_size is None else int(image_size), None, info
    )
