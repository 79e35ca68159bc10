"""A grid of sample images as PNG bytes, and as a data URI to embed in the HTML report."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch
from PIL import Image

from ssprop_energy.errors import ConfigError

GRID_PADDING_PX = 2
GRID_BACKGROUND = 255  # white gutters between tiles


def grid_array(images: torch.Tensor, nrow: int = 8, padding: int = GRID_PADDING_PX, scale: int = 1) -> np.ndarray:
    """Tile uint8 images (N, C, H, W), C = 1 or 3, row by row, ``nrow`` per row, into one uint8 (Hg, Wg[, 3]) array.

    Each tile is enlarged ``scale`` times by pixel repetition (no smoothing: a 32x32 sample stays honest);
    tiles are separated and framed by ``padding`` white pixels; unused cells of the last row stay white.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ConfigError(f"a sample grid needs uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if nrow < 1 or padding < 0 or scale < 1:
        raise ConfigError(f"need nrow >= 1, padding >= 0, scale >= 1; got {nrow}, {padding}, {scale}")
    arr = images.cpu().numpy()
    if scale > 1:
        arr = arr.repeat(scale, axis=2).repeat(scale, axis=3)
    n, c, h, w = arr.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    out = np.full((c, padding + rows * (h + padding), padding + cols * (w + padding)), GRID_BACKGROUND, np.uint8)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        out[:, top : top + h, left : left + w] = arr[i]
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def grid_png(images: torch.Tensor, nrow: int = 8, padding: int = GRID_PADDING_PX, scale: int = 1) -> bytes:
    """The grid of :func:`grid_array` encoded as PNG (greyscale for 1 channel, RGB for 3)."""
    buf = io.BytesIO()
    Image.fromarray(grid_array(images, nrow, padding, scale)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
