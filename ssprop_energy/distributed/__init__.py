"""Distributed compare: one experiment over several processes (``torchrun`` or ``--nproc-per-node``).

- ``context.py``: the process's place in the job (rank, local rank, node) from torchrun's environment, the
  process group (NCCL on CUDA, gloo on CPU) and the few collectives the harness needs;
- ``sharding.py``: how a global batch is split over ranks (the union over ranks is the single-process batch);
- ``ddp.py``: the DDP wrapper with a timed, sample-weighted gradient all-reduce, the sharded evaluation,
  and which power sources each rank opens;
- ``merge.py``: the ranks' arm-run records -> one record on rank 0 (torch-free);
- ``launch.py``: ``--nproc-per-node`` through torch's elastic launcher API.
"""

from __future__ import annotations

from ssprop_energy.distributed.context import SINGLE, DistContext, current, from_env
from ssprop_energy.distributed.sharding import local_batch_sizes, shard_slice, validate_sharding

__all__ = ["SINGLE", "DistContext", "current", "from_env", "local_batch_sizes", "shard_slice",
           "validate_sharding"]
