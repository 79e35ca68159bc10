"""A background thread that calls a function at a fixed period, without drift.

Deadlines are ``start + k x period``: a slow tick does not shift later ticks, and deadlines missed while a
tick ran long are skipped rather than run in a burst (a burst would put several samples at almost the same
instant, adding nothing to the trace). The first error a tick raises stops the thread and is kept for the
owner to re-raise: a sampler that silently died would leave a trace with a hole that the trapezoid rule
would bridge with a straight line.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)


class Sampler:
    """Run ``tick()`` every ``period_s`` seconds on a daemon thread.

    Args:
        tick: the function to call; it must be thread-safe with respect to its owner.
        period_s: the period in seconds (> 0).
        clock: monotonic clock for the deadlines (seconds); injectable for tests.
        wait: ``wait(timeout_s) -> bool`` that blocks up to ``timeout_s`` and returns True when the sampler
            should stop. Defaults to the stop event's ``wait``; tests inject one that advances a fake clock.
    """

    def __init__(
        self,
        tick: Callable[[], None],
        period_s: float,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"sample period must be positive, got {period_s}")
        self._tick = tick
        self.period_s = float(period_s)
        self._clock = clock
        self._stop = threading.Event()
        self._wait = wait if wait is not None else self._stop.wait
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.ticks = 0

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._thread = threading.Thread(target=self._run, name="ssprop-energy-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to stop and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("power sampler thread did not stop within %.1f s", timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        deadline = self._clock() + self.period_s
        while not self._stop.is_set():
            if self._wait(max(0.0, deadline - self._clock())):
                return
            try:
                self._tick()
            except BaseException as exc:  # noqa: BLE001 - kept and re-raised by the owner
                logger.debug("power sampler stopped by %r", exc)
                self.error = exc
                return
            self.ticks += 1
            now = self._clock()
            deadline += self.period_s
            if deadline <= now:
                missed = int((now - deadline) // self.period_s) + 1
                deadline += missed * self.period_s
