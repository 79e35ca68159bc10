"""``BatchLoader``: batches straight from an in-memory uint8 split, normalised on the fly.

No worker processes and no per-sample Python: one ``index_select`` and one fused scale-and-shift per batch.
On a GPU the whole uint8 split is moved to the device once, so a batch never crosses the bus.
The order of an epoch depends only on ``(seed, epoch)``, so a resumed run and the two arms of a paired
comparison see the same batches in the same order. In a distributed run each rank serves its contiguous
part of every batch (``rank``, ``world_size``; see ``distributed/sharding.py``), so the union over ranks of
each batch is exactly the single-process batch.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from ssprop_energy.data.base import TensorSplit
from ssprop_energy.distributed.sharding import shard_slice
from ssprop_energy.errors import ConfigError


class BatchLoader:
    """Iterate over ``(images float32 (B, C, H, W), labels int64 (B,))`` batches of a :class:`TensorSplit`.

    Images come out as ``(pixel / 255 - mean) / std`` per channel, as ``ToTensor`` + ``Normalize`` would give.

    Args:
        split: the split to serve (uint8 images in memory).
        batch_size: samples per batch; the last batch is smaller unless ``drop_last``.
        shuffle: a fresh permutation per epoch (seeded by ``(seed, epoch)``); False serves the stored order.
        seed: non-negative seed of the permutations.
        mean, std: per-channel normalisation on the [0, 1] scale; None leaves pixels at pixel / 255.
        device: where the data lives and the batches are made.
        drop_last: drop the final incomplete batch.
        rank, world_size: serve only part ``rank`` of ``world_size`` of every batch (``batch_size`` is then the
            global batch); ``last_batch_samples`` holds ``(samples served, samples in the global batch)`` of
            the batch served last.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        channels = int(split.images.shape[1])
        mean_t = torch.zeros(channels, dtype=torch.float64) if mean is None else torch.tensor(mean, dtype=torch.float64)
        std_t = torch.ones(channels, dtype=torch.float64) if std is None else torch.tensor(std, dtype=torch.float64)
        if mean_t.shape != (channels,) or std_t.shape != (channels,):
            raise ConfigError(f"mean/std need {channels} values (one per channel), got {list(mean_t)} / {list(std_t)}")
        if bool((std_t <= 0).any()):
            raise ConfigError(f"std must be positive, got {list(std_t)}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.last_batch_samples = (0, 0)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        # (x / 255 - mean) / std == x * scale - shift, folded in float64 then stored as float32
        self._scale = (1.0 / (255.0 * std_t)).to(torch.float32).view(1, channels, 1, 1).to(self.device)
        self._shift = (mean_t / std_t).to(torch.float32).view(1, channels, 1, 1).to(self.device)

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return int(self.images.shape[0])

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration serves."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """Sample indices of ``epoch`` (default: the current one) in serving order, int64 on the CPU.

        A permutation from numpy's PCG64 seeded with the sequence ``[seed, epoch]``: independent of any global
        random state and identical across platforms.
        """
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples, dtype=torch.int64)
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_samples)
        return torch.from_numpy(perm.astype(np.int64))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images on this loader's device -> normalised float32."""
        return images.to(torch.float32).mul_(self._scale).sub_(self._shift)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order().to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.world_size > 1:
                start, stop = shard_slice(len(idx), self.world_size, self.rank)
                self.last_batch_samples = (stop - start, len(idx))
                idx = idx[start:stop]
            yield self.normalize(self.images.index_select(0, idx)), self.labels.index_select(0, idx)
