"""Checkpoints: written atomically so that a crash mid-save leaves the previous one intact."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ssprop_energy.errors import RecordError
from ssprop_energy.records import write_bytes_atomic


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Serialise ``payload`` with torch.save into ``path`` atomically."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a damaged file is a :class:`RecordError`."""
    try:
        # weights_only=False: the payload holds plain dicts of run state besides tensors, all written by us.
        return torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise RecordError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # torch raises a zoo of types for damaged files
        raise RecordError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
