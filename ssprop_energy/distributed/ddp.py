"""DDP for the harness: the wrapped model with a timed, sample-weighted all-reduce, sharded evaluation, and
which power sources each rank opens.

ssProp keeps its channel selection local: each rank ranks the channels of its own part of the batch, and the
all-reduce then moves the (dense-shaped) gradients as it would for any model. The all-reduce is the comm hook
below, so its time is measured where it happens.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ssprop_energy.distributed.context import DistContext
from ssprop_energy.distributed.sharding import shard_slice
from ssprop_energy.energy.select import MeterChoice


class CommTimer:
    """DDP comm hook state: weights each rank's gradient by its share of the global batch and times the
    all-reduce.

    DDP's default hook divides by the world size, which is the right mean only when every rank holds the same
    number of samples. Here each rank's mean-loss gradient is scaled by ``n_rank / n_batch`` before a sum
    all-reduce, so the result is the single-process mean gradient of the whole batch, also for an uneven last
    batch; with equal parts the scale is the same division by the world size as DDP's own hook.

    The time is the union of the intervals from a bucket's launch to its completion (so overlapping buckets
    are counted once); :meth:`take` returns and clears it.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.fraction: Callable[[], tuple[int, int]] = lambda: (1, world_size)  # (local, global) samples
        self._lock = threading.Lock()
        self._spans: list[tuple[float, float]] = []

    def _done(self, t0: float) -> None:
        with self._lock:
            self._spans.append((t0, time.perf_counter()))

    def take(self) -> float:
        """Seconds with at least one all-reduce in flight since the last call."""
        with self._lock:
            spans, self._spans = sorted(self._spans), []
        total = 0.0
        end = float("-inf")
        for a, b in spans:
            if a > end:
                total += b - a
                end = b
            elif b > end:
                total += b - end
                end = b
        return total


def _weighted_allreduce(state, bucket):  # type: ignore[no-untyped-def]
    # (state: CommTimer, bucket: dist.GradBucket) -> Future[Tensor]; no annotations, because DDP checks them
    # by identity and this module's postponed annotations would be strings
    buf = bucket.buffer()
    local, total = state.fraction()
    if local * state.world_size == total:
        buf.div_(state.world_size)  # equal parts: exactly DDP's default hook
    else:
        buf.mul_(local / total)
    t0 = time.perf_counter()
    fut = dist.all_reduce(buf, async_op=True).get_future()

    def finished(f: torch.futures.Future[Any]) -> torch.Tensor:
        state._done(t0)
        return f.value()[0]

    return fut.then(finished)


def wrap(model: nn.Module, device: torch.device, ctx: DistContext) -> tuple[nn.Module, CommTimer]:
    """``model`` (already on ``device``) in DDP with the weighted, timed all-reduce."""
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    timer = CommTimer(ctx.world_size)
    ddp.register_comm_hook(timer, _weighted_allreduce)
    return ddp, timer


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


class ShardedTask:
    """A task whose evaluation runs on this rank's part of the split and is reduced over ranks.

    Each rank evaluates ``len(split) / W`` contiguous samples on the unwrapped model (no collective per
    batch), with rank 0's BatchNorm buffers (the ones DDP broadcasts and rank 0 checkpoints); the means are
    combined weighted by sample count, so they equal the single-process means up to float rounding.
    Training steps are the wrapped task's own.
    """

    def __init__(self, task: Any, ctx: DistContext) -> None:
        self.task = task
        self.ctx = ctx

    def __getattr__(self, name: str) -> Any:  # metric, higher_is_better and anything a task adds
        return getattr(self.task, name)

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.batch_loss(model, x, y)

    def evaluate(self, model: nn.Module, split: Any, data: Any, batch_size: int, device: torch.device,
                 noise_std: float = 0.0) -> tuple[float, float]:
        inner = unwrap(model)
        for buf in inner.buffers():
            dist.broadcast(buf, src=0)
        a, b = shard_slice(len(split), self.ctx.world_size, self.ctx.rank)
        part = replace(split, images=split.images[a:b], labels=split.labels[a:b])
        loss, metric = self.task.evaluate(inner, part, data, batch_size, device, noise_std) if b > a else (0.0, 0.0)
        n = b - a
        sums = self.ctx.all_sum(torch.tensor([loss * n, metric * n, float(n)], dtype=torch.float64))
        count = max(float(sums[2]), 1.0)
        return float(sums[0]) / count, float(sums[1]) / count


def nvml_index(local_rank: int) -> int:
    """NVML index of this rank's GPU: ``CUDA_VISIBLE_DEVICES[local_rank]`` when it lists indices."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if local_rank < len(visible) and visible[local_rank].isdigit():
        return int(visible[local_rank])
    return local_rank


NODE_RAM_NOTE = "RAM estimated once per node, by local rank 0"


def rank_meter_choice(choice: MeterChoice, ctx: DistContext) -> MeterChoice:
    """The sources this rank opens: its own GPU (NVML) and its own process's CPU estimate; the node-wide
    RAPL counters and the node's RAM estimate on local rank 0 only, so no joule is counted twice."""
    if not ctx.distributed or ctx.is_node_main:
        return choice
    sources = tuple(s for s in choice.sources if s != "rapl")
    unavailable = dict(choice.unavailable)
    if "rapl" in choice.sources:
        unavailable["rapl"] = "node-wide counters read by local rank 0 of this node"
    estimate = choice.estimate
    if estimate is not None:
        estimate = {**estimate, "ram_power_w": 0.0, "ram_power_from": NODE_RAM_NOTE}
    return MeterChoice(choice.kind, sources, unavailable, estimate)
