"""This process's place in a distributed run, the process group, and the harness's few collectives.

``torchrun`` (and ``--nproc-per-node``, which launches through the same API) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK`` (the node's index) for every worker; a process
without them is a single-process run (:data:`SINGLE`), for which every collective here is the identity, so
the single-process path runs exactly as before.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass, replace
from typing import Any

from ssprop_energy.errors import ConfigError

log = logging.getLogger(__name__)

# A peer that died leaves the others blocked in a collective until this timeout (the launcher usually kills
# them sooner); long enough for a slow epoch's evaluation on one rank while others wait at the barrier.
TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0 .. world_size - 1; rank 0 prints and writes every record.
        world_size: processes in the job.
        local_rank: rank within its node (selects the GPU ``cuda:<local_rank>``).
        local_world_size: processes on this node.
        node: the node's index (torchrun's ``GROUP_RANK``).
        nodes: nodes in the job (known once the group is up; 1 before).
        hostname: this node's host name.
        backend: the process group's backend once initialised (``cpu:gloo,cuda:nccl`` where CUDA exists:
            NCCL moves CUDA gradients, gloo the CPU-side collectives; ``gloo`` otherwise); None for a
            single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node: int = 0
    nodes: int = 1
    hostname: str = ""
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True under a launcher (even with one process): collectives and DDP are in use."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only process that prints, writes records and appends to the ledger."""
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """Local rank 0: the process that meters the node's shared CPU / DRAM counters."""
        return self.local_rank == 0

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "local_rank": self.local_rank, "node": self.node, "hostname": self.hostname}

    # ------------------------------------------------------------------------------------------ collectives

    def _device(self) -> Any:
        import torch

        # the harness's own collectives are a few numbers per epoch (and the stop flag per step): gloo on the CPU
        return torch.device("cpu")

    def all_sum(self, values: Any) -> Any:
        """Element-wise sum over ranks of a float64 tensor (returned on the tensor's own device)."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        buf = values.to(self._device())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(values.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (the agreed stop flag)."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        buf = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device())
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return bool(buf.item())

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = DistContext(hostname=socket.gethostname())
_current: DistContext = SINGLE


def current() -> DistContext:
    """The context set up by :func:`init` (``SINGLE`` when none)."""
    return _current


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"distributed launch: environment variable {name} is missing")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"distributed launch: {name}={value!r} is not an integer") from None


def from_env() -> DistContext | None:
    """The launcher's view of this process, or None when no launcher started it (no ``RANK``/``WORLD_SIZE``)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    ctx = DistContext(
        rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK", rank), local_world_size=local_world,
        node=_env_int("GROUP_RANK", rank // max(local_world, 1)), hostname=socket.gethostname(),
    )
    if not (0 <= ctx.rank < world and 0 <= ctx.local_rank < local_world):
        raise ConfigError(f"distributed launch: inconsistent RANK={rank} WORLD_SIZE={world} LOCAL_RANK={ctx.local_rank}")
    return ctx


def init() -> DistContext:
    """Join the process group when a launcher started this process (once; later calls return the same
    context); otherwise return :data:`SINGLE`.

    Where CUDA exists the group has NCCL for CUDA tensors (DDP's gradients, each rank on
    ``cuda:<local_rank>``) and gloo for CPU tensors; elsewhere gloo. The number of nodes is counted from
    every rank's node index once the group is up.
    """
    global _current
    if _current.distributed:
        return _current
    ctx = from_env()
    if ctx is None:
        return SINGLE
    import torch
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available() and ctx.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(ctx.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    ctx = replace(ctx, backend=backend)
    nodes = len({n for n in ctx.all_gather(ctx.node)})
    _current = replace(ctx, nodes=nodes)
    log.info("rank %d of %d (node %d of %d, local rank %d), backend %s", ctx.rank, ctx.world_size, ctx.node,
             nodes, ctx.local_rank, backend)
    return _current


def check_cuda(ctx: DistContext) -> None:
    """Training on CUDA needs one visible GPU per process of the node.

    Raises:
        ConfigError: fewer visible GPUs than processes on this node.
    """
    import torch

    if ctx.distributed and torch.cuda.device_count() < ctx.local_world_size:
        raise ConfigError(f"{ctx.local_world_size} processes on this node but {torch.cuda.device_count()} visible "
                          "GPU(s): a distributed CUDA run needs one GPU per process", field="device")


def is_peer_failure(exc: BaseException) -> bool:
    """True for the error a collective raises when another rank died or left (the run is then resumable)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe", "peer"))


def decide_on_main(ctx: DistContext, decide: Any) -> Any:
    """Run ``decide()`` on rank 0 and give its result (or its :class:`ConfigError`-like user error) to every
    rank, so that a check only rank 0 can make (the run directory lives on its node) stops every rank alike."""
    from ssprop_energy.errors import SSPropEnergyError

    outcome: tuple[str, Any] = ("ok", None)
    if ctx.is_main:
        try:
            outcome = ("ok", decide())
        except SSPropEnergyError as exc:
            outcome = ("error", exc)
    outcome = ctx.broadcast(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def shutdown() -> None:
    """Leave the process group (after a final barrier, so no rank exits while another still talks)."""
    global _current
    if _current.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _current = SINGLE
