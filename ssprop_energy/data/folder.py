"""``folder:PATH``: an image folder with one subfolder per class (the torchvision ``ImageFolder`` layout).

Class indices follow the sorted subfolder names. Images are read with Pillow, as grey ("L") when every image
is grey and as RGB otherwise, and split 60/20/20 stratified by class.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ssprop_energy.data.base import DatasetSplits, make_splits, stratified_split_indices, take
from ssprop_energy.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
FOLDER_SPLIT = (0.6, 0.2, 0.2)
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def load_folder_splits(root: str | Path, image_size: int | None = None, seed: int = 0) -> DatasetSplits:
    """Read every image under ``root/CLASS/``; resize to ``image_size`` (Pillow bilinear) when given or
    when sizes differ.

    Raises:
        DataError: no such folder, no class subfolders, an empty class, an unreadable image, or images of
            different sizes with no ``image_size``.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected {root}/CLASS/image.png)")
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"{root / cls}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += [(p, label) for p in found]

    modes, sizes = set(), set()
    for path, _ in files:
        try:
            with Image.open(path) as img:
                modes.add(img.mode)
                sizes.add(img.size)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: unreadable image ({exc})") from exc
    mode = "L" if modes <= _GREY_MODES else "RGB"
    if image_size is None:
        if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
            raise DataError(f"{root}: images are not all one square size ({sorted(sizes)[:4]}...); give image_size")
        image_size = next(iter(sizes))[0]
    target = (int(image_size), int(image_size))

    arrays = []
    digest = hashlib.md5(usedforsecurity=False)
    for path, _ in files:
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if img.size != target:
                    img = img.resize(target, Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"{path}: unreadable image ({exc})") from exc
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        digest.update(path.read_bytes())
    images = torch.from_numpy(np.stack(arrays))
    labels_np = np.array([label for _, label in files], dtype=np.int64)
    labels = torch.from_numpy(labels_np)
    parts = {}
    for key, idx in zip(("train", "val", "test"), stratified_split_indices(labels_np, FOLDER_SPLIT, seed)):
        split = take(images, labels, idx)
        parts[key] = (split.images, split.labels)
    resized = sizes != {target}
    info = {
        "source": str(root),
        "classes": classes,
        "files": [{"name": f"{len(files)} image files", "md5": digest.hexdigest()}],
        "split": {"method": "stratified", "fractions": list(FOLDER_SPLIT), "seed": seed},
        "native_size": [[h, w] for w, h in sorted(sizes)][0] if len(sizes) == 1 else "mixed",
        "native_sizes": [[h, w] for w, h in sorted(sizes)],
        "resize": {"to": list(target), "method": "PIL bilinear"} if resized else None,
    }
    return make_splits(f"folder:{root}", parts, len(classes), int(image_size), None, info)
