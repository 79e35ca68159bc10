"""How samples are split over the ranks of a distributed run (pure arithmetic, no torch).

``--batch-size`` is the *global* batch: every optimizer step consumes the same ``batch_size`` samples, in
the same order, as a single-process run, and rank ``r`` of ``W`` takes the ``r``-th of ``W`` contiguous,
near-equal parts of it (``numpy.array_split`` / ``torch.tensor_split`` sizes: the first ``size % W`` parts
hold one sample more). The union over ranks of every batch is therefore exactly the single-process batch,
and counted FLOPs summed over ranks equal the single-process count.
"""

from __future__ import annotations

from ssprop_energy.errors import ConfigError


def shard_slice(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s part of ``size`` consecutive items split over ``world_size``."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def global_batch_sizes(n_samples: int, batch_size: int, drop_last: bool = False) -> list[int]:
    """Samples in each global batch of an epoch (the last one partial unless ``drop_last``)."""
    sizes = [batch_size] * (n_samples // batch_size)
    if n_samples % batch_size and not drop_last:
        sizes.append(n_samples % batch_size)
    return sizes


def local_batch_sizes(n_samples: int, batch_size: int, world_size: int, rank: int) -> list[int]:
    """Samples rank ``rank`` sees in each batch of an epoch."""
    return [b - a for a, b in (shard_slice(s, world_size, rank) for s in global_batch_sizes(n_samples, batch_size))]


def validate_sharding(n_samples: int, batch_size: int, world_size: int) -> None:
    """Refuse a global batch that cannot give every rank at least one sample per step.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of the world size, or the epoch's last, partial
            batch has fewer samples than there are ranks (a rank with an empty batch would corrupt
            BatchNorm statistics).
    """
    if world_size <= 1:
        return
    if batch_size % world_size:
        raise ConfigError(
            f"batch size {batch_size} is the global batch and must be a multiple of the {world_size} processes "
            f"(per-process batch = global / processes); try {max(world_size, batch_size // world_size * world_size)}",
            field="batch_size",
        )
    last = n_samples % batch_size
    if 0 < last < world_size:
        raise ConfigError(
            f"the last batch of each epoch holds {last} of {n_samples} training samples, fewer than the "
            f"{world_size} processes; pick a batch size that leaves 0 or at least {world_size} samples over",
            field="batch_size",
        )
