"""What differs between the processes of a run, in one place: one process, or the ranks of a distributed run.

Rank 0 alone touches the run directory, the ledger, the loggers and the report; every rank trains. The run
code asks a :class:`Ranks` object instead of testing ``is_main`` itself: :class:`SingleProcess` is the no-op
(every call runs here), :class:`RankGroup` the distributed case (rank 0 runs, the others wait for its answer).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from ssprop_energy.distributed import context as distributed

T = TypeVar("T")


class SingleProcess:
    """One process: it is the main process, and every collective is the identity."""

    distributed = False
    is_main = True

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` (the main process's work) and return its result."""
        return fn()

    def decide(self, fn: Callable[[], T]) -> T:
        """Run a check only the main process can make; here, just run it."""
        return fn()

    def share(self, value: T) -> T:
        """Give the main process's ``value`` to every process; here, the value itself."""
        return value

    def gather(self, value: T) -> list[T]:
        """Every process's ``value``, in rank order; here, a list of one."""
        return [value]

    def is_peer_failure(self, exc: BaseException) -> bool:
        """True when ``exc`` says that another process of the run failed; never with one process."""
        return False

    def leave(self) -> None:
        """Leave the process group; nothing to leave with one process."""


class RankGroup(SingleProcess):
    """One rank of a distributed run (a joined process group, :func:`ssprop_energy.distributed.context.init`)."""

    distributed = True

    def __init__(self, ctx: distributed.DistContext) -> None:
        self.ctx = ctx
        self.is_main = ctx.is_main

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; None on the other ranks."""
        return fn() if self.is_main else None

    def decide(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and give its result, or its user error, to every rank."""
        return distributed.decide_on_main(self.ctx, fn)

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (the others' values are ignored)."""
        return self.ctx.broadcast(value)

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order."""
        return self.ctx.all_gather(value)

    def is_peer_failure(self, exc: BaseException) -> bool:
        """True when a collective failed because another rank died."""
        return isinstance(exc, Exception) and distributed.is_peer_failure(exc)

    def leave(self) -> None:
        """Leave the process group (every rank, at the end of the run)."""
        distributed.shutdown()


def ranks_for(ctx: Any) -> SingleProcess:
    """The rank strategy of a process: :class:`RankGroup` in a distributed run, else :class:`SingleProcess`."""
    return RankGroup(ctx) if ctx.distributed else SingleProcess()
