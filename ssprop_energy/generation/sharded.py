"""The generation task on the ranks of a distributed run: the same draws, split like the batch.

A single-process DDPM run draws, per global batch, ``B`` timesteps and ``B`` noise images from the task's
per-epoch generator; validates each image at a fixed timestep and noise (``eval_noise(N)``); and samples
``n`` images from one fixed noise sequence (``sample_seed``). Under DDP each rank holds a contiguous part of
every batch and split (``distributed/sharding.py``), so each rank here:

- training: draws the *whole* global batch's timesteps and noise from the same generator (every rank's
  generator is seeded alike and advances alike) and uses rows ``a:b`` of them, the rows of its own samples.
  With the sample-weighted all-reduce (``distributed/ddp.py``) the step is then the single-process step up to
  float rounding (the UNet has GroupNorm, no batch statistics, and dropout 0 by default);
- validation / test: scores its part of the split with the matching rows of the split's fixed noise, and the
  per-rank means are combined weighted by image count (every image has the same number of elements);
- sampling: generates images ``a:b`` of the fixed noise sequence (:meth:`Diffusion.sample` ``start``/``stop``),
  then every rank receives all shards in rank order (an all-gather), so the ``n`` images are the
  single-process images up to float rounding (and the uint8 rounding of those);
- scoring: rank 0 alone extracts features and computes the Frechet distance; every rank receives its result.

Rank 0's is then the record's figure; the merge (``distributed/merge.py``) sums the ranks' energy.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ssprop_energy.distributed.context import DistContext
from ssprop_energy.distributed.sharding import shard_slice
from ssprop_energy.errors import ConfigError
from ssprop_energy.generation.diffusion import EvalNoise, to_model_range, to_uint8
from ssprop_energy.generation.features import QualityResult
from ssprop_energy.generation.task import GenerationTask


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP's module: evaluation and sampling need no gradient synchronisation (and DDP's forward would
    # expect a backward after it); the weights are the same on every rank
    from ssprop_energy.distributed.ddp import unwrap

    return unwrap(model)


def draw_shard(timesteps: int, x0: Tensor, total: int, start: int, generator: torch.Generator
               ) -> tuple[Tensor, Tensor]:
    """Rows ``start : start + len(x0)`` of the draws :meth:`Diffusion.draw` makes for a batch of ``total``
    images shaped like ``x0``: timesteps (B,) then noise (B, C, H, W), from ``generator`` (advanced by the
    whole batch's draws, as on one process)."""
    stop = start + x0.shape[0]
    if not 0 <= start < stop <= total:
        raise ConfigError(f"rows {start}..{stop} are not inside a batch of {total}")
    t = torch.randint(0, timesteps, (total,), generator=generator)[start:stop]
    noise = torch.randn((total, *x0.shape[1:]), generator=generator, dtype=torch.float32)[start:stop]
    return t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)


class ShardedGenerationTask:
    """A :class:`GenerationTask` on one rank: training draws, validation and sampling sharded as the batch.

    Args:
        task: the arm-run's task (the same seeds on every rank).
        ctx: this rank's place in the run.
        batch_samples: ``(this rank's samples, the global batch's samples)`` of the batch the loader served
            last (``BatchLoader.last_batch_samples``).
    """

    def __init__(self, task: GenerationTask, ctx: DistContext,
                 batch_samples: Callable[[], tuple[int, int]]) -> None:
        self.task = task
        self.ctx = ctx
        self.batch_samples = batch_samples

    def __getattr__(self, name: str) -> Any:  # metric, higher_is_better, set_epoch, config, ...
        return getattr(self.task, name)

    def _shard(self, n: int) -> tuple[int, int]:
        return shard_slice(n, self.ctx.world_size, self.ctx.rank)

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(mean noise MSE of this rank's part, that x its sample count)`` with this part's rows of the
        global batch's draws."""
        local, total = self.batch_samples()
        if self.ctx.world_size == 1 or total == 0:
            local, total = x.shape[0], x.shape[0]  # one process: the loader leaves its counts unset
        start, stop = self._shard(total)
        if stop - start != x.shape[0] or local != x.shape[0]:
            raise ConfigError(f"rank {self.ctx.rank}: a part of {x.shape[0]} samples, but its share of the "
                              f"global batch of {total} is {stop - start}")
        task = self.task
        x0 = task.from_loader(x)
        t, noise = draw_shard(task.diffusion.timesteps, x0, total, start, task.train_generator)
        loss = task.diffusion.loss_at(model, x0, t, noise)
        return loss, loss.detach() * x.shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Any, data: Any = None, batch_size: int | None = None,
                 device: torch.device | str | None = None, noise_std: float = 0.0) -> tuple[float, float]:
        """``(loss, metric)`` of the whole split, both the fixed-noise MSE: this rank's images with their rows
        of the split's fixed noise, the ranks' means combined weighted by image count (a collective)."""
        if noise_std:
            raise ConfigError("input-noise evaluation (noise_std) applies to classification, not to generation")
        task = self.task
        inner = _unwrap(model)
        for buf in inner.buffers():  # rank 0's buffers, as DDP broadcasts them (the UNet has none today)
            torch.distributed.broadcast(buf, src=0)
        n = len(split)
        start, stop = self._shard(n)
        loss = 0.0
        if stop > start:
            fixed = task.eval_noise(n)
            part = EvalNoise(t=fixed.t[start:stop], noise=fixed.noise[start:stop], seed=fixed.seed)
            dev = torch.device(device) if device is not None else next(inner.parameters()).device
            was_training = inner.training
            inner.eval()
            try:
                x0 = to_model_range(split.images[start:stop]).to(dev)
                loss = task.diffusion.fixed_loss(inner, x0, part, task.config.eval_batch)
            finally:
                inner.train(was_training)
        sums = self.ctx.all_sum(torch.tensor([loss * (stop - start), float(stop - start)], dtype=torch.float64))
        mean = float(sums[0]) / max(float(sums[1]), 1.0)
        return mean, mean


@torch.no_grad()
def sample_sharded(task: GenerationTask, model: nn.Module, device: torch.device, ctx: DistContext) -> Tensor:
    """The task's ``n_samples`` fixed-noise images, uint8 (n, C, H, W), on every rank: each rank generates
    its contiguous shard of the fixed noise sequence, then all shards are gathered in rank order (a
    collective; the wall time is the slowest rank's)."""
    cfg = task.config
    start, stop = shard_slice(cfg.n_samples, ctx.world_size, ctx.rank)
    part = torch.empty((0, *task.image_shape), dtype=torch.uint8)
    if stop > start:
        inner = _unwrap(model)
        was_training = inner.training
        inner.eval()
        try:
            images = task.diffusion.sample(inner, cfg.n_samples, task.image_shape, cfg.sample_seed, device,
                                           cfg.sample_batch, start=start, stop=stop)
        finally:
            inner.train(was_training)
        part = to_uint8(images)
    return torch.cat(ctx.all_gather(part))


def score_on_main(task: GenerationTask, samples: Tensor, ctx: DistContext) -> QualityResult:
    """The Frechet distance of ``samples`` (every rank holds all of them), computed on rank 0 with its
    extractor and given to every rank (a collective)."""
    quality = task.score(samples) if ctx.is_main else None
    result = ctx.broadcast(quality)
    assert isinstance(result, QualityResult)
    return result


def sharding_info(ctx: DistContext, n_samples: int) -> dict[str, Any]:
    """How the sampling was split, for the record."""
    return {"ranks": ctx.world_size,
            "shards": [list(shard_slice(n_samples, ctx.world_size, r)) for r in range(ctx.world_size)],
            "sharding": "rank r generates images [a, b) of the one fixed noise sequence; rank 0 scores all"}


__all__ = ["ShardedGenerationTask", "draw_shard", "sample_sharded", "score_on_main", "sharding_info"]
