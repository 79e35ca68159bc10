"""Choosing power sources: ``open_meter(kind)`` and ``available_sources()``.

``auto`` measures everything it can: the GPUs through NVML when there are any, and the CPU through RAPL,
or through the estimate when RAPL cannot be read. Each fallback is logged as a warning and recorded in
``meter.describe()["unavailable"]``; a GPU box then reports a ``mixed`` total (GPU ``counter`` + CPU
``estimated``), which is what it is. Asking for one kind that cannot be used raises
:class:`MeterUnavailableError` whose message names the fix.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ssprop_energy.energy.base import PowerSource
from ssprop_energy.energy.fake import FakeChannel, FakeSource
from ssprop_energy.energy.meter import EnergyMeter, SyncArg
from ssprop_energy.errors import ConfigError, MeterUnavailableError

logger = logging.getLogger(__name__)

KINDS = ("auto", "nvml", "rapl", "estimate", "fake")


@dataclass(frozen=True)
class MeterChoice:
    """The sources a run measures with, decided once (:func:`resolve_meter`) and reused for every meter of
    the run, so that the fallback chain runs, and warns, once.

    Attributes:
        kind: what was asked for (``auto``, ``nvml``, ...).
        sources: the source kinds to open, e.g. ``("nvml", "estimate")``.
        unavailable: ``{kind: reason}`` of the sources tried and not used.
    """

    kind: str
    sources: tuple[str, ...]
    unavailable: dict[str, str] = field(default_factory=dict)
    estimate: dict[str, Any] | None = None  # the estimate source's resolved figures (``describe()``)


def resolve_meter(
    kind: str = "auto", sysfs_root: str | os.PathLike[str] | None = None, *, gpus: Sequence[int] | None = None,
    **kwargs: Any,
) -> MeterChoice:
    """Run the fallback chain of ``kind`` once (warnings included) and return the decision.

    Raises:
        ConfigError, MeterUnavailableError: as :func:`open_meter`.
    """
    meter = open_meter(kind, sysfs_root=sysfs_root, gpus=gpus, **kwargs)
    try:
        estimate = next((d for d in meter.describe()["sources"] if d.get("kind") == "estimate"), None)
        return MeterChoice(kind, meter.source_kinds, dict(meter.unavailable), estimate)
    finally:
        meter.close()


def _open_nvml(gpus: Sequence[int] | None) -> PowerSource:
    from ssprop_energy.energy.nvml import NvmlSource

    return NvmlSource(gpus=gpus)


def _open_rapl(sysfs_root: str | os.PathLike[str] | None) -> PowerSource:
    from ssprop_energy.energy.rapl import RaplSource

    return RaplSource(sysfs_root=sysfs_root)


def _open_estimate(options: dict[str, Any]) -> PowerSource:
    from ssprop_energy.energy.estimate import EstimateSource

    return EstimateSource(**options)


def open_meter(
    kind: str = "auto",
    sample_period_s: float = 0.1,
    sysfs_root: str | os.PathLike[str] | None = None,
    *,
    gpus: Sequence[int] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    background: bool = True,
    sync: SyncArg = "auto",
    fake_channels: list[FakeChannel] | None = None,
    estimate_options: dict[str, Any] | None = None,
    choice: MeterChoice | None = None,
) -> EnergyMeter:
    """Open an :class:`EnergyMeter` on the sources of ``kind``.

    Args:
        kind: ``auto``, ``nvml``, ``rapl``, ``estimate`` or ``fake``.
        sample_period_s: power sampling period (s).
        sysfs_root: filesystem root holding ``sys/class/powercap`` for RAPL (``/`` by default).
        gpus: NVML GPU indices; default: those in ``CUDA_VISIBLE_DEVICES``, else all.
        clock: monotonic clock (s); injectable for tests, with ``sleep``.
        sleep: sleep function used by ``measure_idle``.
        background: run the sampling thread (tests may drive samples by hand).
        sync: called at window edges: a callable, None, or ``"auto"`` (CUDA synchronise when measuring GPUs).
        fake_channels: components of the ``fake`` source; a GPU with a counter and a sampled CPU by default.
        estimate_options: keyword arguments of :class:`~ssprop_energy.energy.estimate.EstimateSource`
            (``cpu_model``, ``cpu_tdp_w``, ``ram_power_w``, ...).
        choice: a decision from :func:`resolve_meter`: open exactly its sources, with no fallback (and so no
            repeated warning); ``kind`` is then ignored.

    Raises:
        ConfigError: unknown kind.
        MeterUnavailableError: a specific kind cannot be used here; the message names the fix.
    """
    if choice is not None:
        kind = choice.kind
    if kind not in KINDS:
        raise ConfigError(f"unknown meter {kind!r}; choose one of {', '.join(KINDS)}")
    est = dict(estimate_options or {})
    sources: list[PowerSource] = []
    unavailable: dict[str, str] = {}
    if choice is not None:
        openers: dict[str, Callable[[], PowerSource]] = {
            "nvml": lambda: _open_nvml(gpus), "rapl": lambda: _open_rapl(sysfs_root),
            "estimate": lambda: _open_estimate({**est, "resolved": choice.estimate} if choice.estimate else est),
            "fake": lambda: FakeSource(fake_channels, clock),
        }
        unavailable = dict(choice.unavailable)
        try:
            for name in choice.sources:
                sources.append(openers[name]())
        except BaseException:
            for src in sources:
                src.close()
            raise
    elif kind == "nvml":
        sources.append(_open_nvml(gpus))
    elif kind == "rapl":
        sources.append(_open_rapl(sysfs_root))
    elif kind == "estimate":
        sources.append(_open_estimate(est))
    elif kind == "fake":
        sources.append(FakeSource(fake_channels, clock))
    else:
        try:
            sources.append(_open_nvml(gpus))
        except MeterUnavailableError as exc:
            unavailable["nvml"] = str(exc)
            logger.warning("no GPU energy: %s; trying RAPL for the CPU", exc)
        try:
            sources.append(_open_rapl(sysfs_root))
        except MeterUnavailableError as exc:
            unavailable["rapl"] = str(exc)
            logger.warning("no RAPL counters: %s; falling back to the CPU/RAM estimate", exc)
            sources.append(_open_estimate(est))
    try:
        return EnergyMeter(
            sources,
            kind=kind,
            sample_period_s=sample_period_s,
            clock=clock,
            sleep=sleep,
            background=background,
            sync=sync,
            unavailable=unavailable,
        )
    except BaseException:
        for src in sources:
            src.close()
        raise


def available_sources(
    sysfs_root: str | os.PathLike[str] | None = None, gpus: Sequence[int] | None = None
) -> dict[str, dict[str, Any]]:
    """Which real sources work here: ``{kind: {"available", "reason", "description"}}``.

    ``description`` is the source's own ``describe()`` (GPU names, CPU model, TDP and its origin) when
    available; ``reason`` says why not otherwise. Each source is opened and closed again.
    """
    openers: dict[str, Callable[[], PowerSource]] = {
        "nvml": lambda: _open_nvml(gpus),
        "rapl": lambda: _open_rapl(sysfs_root),
        "estimate": lambda: _open_estimate({}),
    }
    out: dict[str, dict[str, Any]] = {}
    for kind, opener in openers.items():
        try:
            src = opener()
        except MeterUnavailableError as exc:
            out[kind] = {"available": False, "reason": str(exc), "description": None}
            continue
        try:
            out[kind] = {"available": True, "reason": None, "description": src.describe()}
        finally:
            src.close()
    return out
