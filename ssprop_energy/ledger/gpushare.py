"""Charging a process tree its share of a GPU that other processes use at the same time.

NVML's energy counter and board power belong to the whole device. When ``audit run``'s command shares a GPU
with other jobs, it is charged

- ``nvml utilisation``: the tree's fraction of the SM utilisation that NVML attributes to processes,
  ``sum(smUtil of the tree's pids) / sum(smUtil of all pids)`` over the per-process samples of
  ``nvmlDeviceGetProcessUtilization`` taken during the run; or, where the driver gives no such samples
  (not supported, or none with any utilisation),
- ``compute processes``: the tree's fraction of the compute processes seen on the device
  (``nvmlDeviceGetComputeRunningProcesses``), summed over the samples.

A device on which no process at all was seen keeps its whole energy with no share (nothing to divide by:
the job had the device to itself, idle or not). The whole device's energy stays in the row beside the
charged part (``machine_energy_j``), as for the CPU-time share, and each component names its method.

The tree is the command's pid and every descendant seen while sampling (a pid once seen stays in the tree,
so samples read after a process ended still count). NVML reports host pids: inside a container with its
own pid namespace the tree is not recognised and the shares come out as 0, with a warning.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import psutil

logger = logging.getLogger(__name__)

NVML_UTILISATION = "nvml utilisation"
COMPUTE_PROCESSES = "compute processes"
_NVML_ERROR_NOT_FOUND = 6  # no samples since the given timestamp


@dataclass
class DeviceTally:
    """Sums over one device's samples: SM utilisation (percent-samples) and compute-process counts."""

    tree_sm: float = 0.0
    all_sm: float = 0.0
    utilisation_supported: bool = True
    tree_procs: int = 0
    all_procs: int = 0
    last_ts: int = 0

    def share(self) -> tuple[float, str] | None:
        """``(share, method)``, or None when no process was seen on the device."""
        if self.utilisation_supported and self.all_sm > 0:
            return min(1.0, self.tree_sm / self.all_sm), NVML_UTILISATION
        if self.all_procs > 0:
            return min(1.0, self.tree_procs / self.all_procs), COMPUTE_PROCESSES
        return None


@dataclass(frozen=True)
class GpuAttribution:
    """The GPU shares of one run: per component (``gpu:N``), and the row's overall figure.

    Attributes:
        per_device: component -> (share, method).
        share: charged GPU energy / whole-device GPU energy over the shared devices (set by :func:`attribute_gpus`).
        method: the methods used, comma-separated.
    """

    per_device: dict[str, tuple[float, str]]
    share: float = 1.0
    method: str = ""


class GpuShareSampler:
    """Samples NVML's per-process figures for the GPUs in a thread while the command runs.

    Args:
        pynvml: the NVML module (tests pass a fake); imported when None, and the sampler is inert when NVML
            cannot be used.
        period_s: sampling period in seconds.
        indices: NVML indices of the devices to watch (default: those ``CUDA_VISIBLE_DEVICES`` lets us see).
    """

    def __init__(self, pynvml: Any = None, period_s: float = 0.5, indices: Sequence[int] | None = None) -> None:
        self.period_s = period_s
        self._nvml = None
        self._handles: dict[int, Any] = {}
        self.tallies: dict[int, DeviceTally] = {}
        self._tree: set[int] = set()
        self._root: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            if pynvml is None:
                import pynvml  # type: ignore[no-redef]
            pynvml.nvmlInit()
            from ssprop_energy.energy.nvml import visible_gpu_indices

            count = int(pynvml.nvmlDeviceGetCount())
            for i in (visible_gpu_indices(count) if indices is None else indices):
                self._handles[i] = pynvml.nvmlDeviceGetHandleByIndex(i)
                self.tallies[i] = DeviceTally()
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 - no NVML here: GPUs (if any) are charged whole
            logger.debug("GPU sharing not measured: %s", exc)

    @property
    def active(self) -> bool:
        return self._nvml is not None and bool(self._handles)

    def start(self, root_pid: int) -> None:
        """Start sampling the tree rooted at ``root_pid``."""
        if not self.active:
            return
        self._root = root_pid
        self._tree = {root_pid}
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="ssprop-gpu-share", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def _refresh_tree(self) -> None:
        try:
            children = psutil.Process(self._root).children(recursive=True) if self._root else []
        except psutil.Error:
            return
        self._tree.update(p.pid for p in children)

    def sample(self) -> None:
        """One sample of every watched device (also called once at start and at stop)."""
        nvml = self._nvml
        if nvml is None:
            return
        self._refresh_tree()
        for i, handle in self._handles.items():
            tally = self.tallies[i]
            if tally.utilisation_supported:
                try:
                    samples = nvml.nvmlDeviceGetProcessUtilization(handle, tally.last_ts)
                except Exception as exc:  # noqa: BLE001 - mapped below
                    if getattr(exc, "value", None) != _NVML_ERROR_NOT_FOUND:
                        logger.info("GPU %d: no per-process utilisation (%s); using compute processes", i, exc)
                        tally.utilisation_supported = False
                    samples = []
                for s in samples:
                    sm = float(getattr(s, "smUtil", 0) or 0)
                    tally.all_sm += sm
                    if s.pid in self._tree:
                        tally.tree_sm += sm
                    tally.last_ts = max(tally.last_ts, int(getattr(s, "timeStamp", 0) or 0))
            try:
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception as exc:  # noqa: BLE001 - older drivers / fakes without it
                logger.debug("GPU %d: compute processes unavailable (%s)", i, exc)
                procs = []
            tally.all_procs += len(procs)
            tally.tree_procs += sum(1 for p in procs if p.pid in self._tree)

    def current(self) -> GpuAttribution | None:
        """The shares so far, without stopping (for the running row's heartbeat)."""
        if not self.active:
            return None
        per_device = {f"gpu:{i}": t.share() for i, t in self.tallies.items()}
        found = {k: v for k, v in per_device.items() if v is not None}
        return GpuAttribution(found) if found else None

    def stop(self) -> GpuAttribution | None:
        """Stop sampling; the per-device shares, or None when nothing could be sampled."""
        if not self.active:
            return None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.period_s + 1)
        self.sample()
        try:
            self._nvml.nvmlShutdown()  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001
            logger.debug("nvmlShutdown failed: %s", exc)
        per_device = {}
        for i, tally in self.tallies.items():
            found = tally.share()
            if found is not None:
                per_device[f"gpu:{i}"] = found
        if per_device and all(s == 0.0 for s, _ in per_device.values()):
            logger.warning("the command was never seen on its GPUs (another pid namespace?); GPU share is 0")
        return GpuAttribution(per_device) if per_device else None


def attribute_gpus(components: Sequence[Any], gpu: GpuAttribution | None) -> tuple[list[Any], GpuAttribution | None]:
    """Charge ``gpu:N`` components by their device's share.

    Args:
        components: :class:`attribution.AttributedComponent` items (GPU ones still whole).
        gpu: the sampled shares; None leaves every GPU whole.

    Returns:
        The components (GPU ones replaced where a share exists) and the attribution with its overall share
        and methods filled in, or None when no GPU component was shared.
    """
    from ssprop_energy.ledger.attribution import AttributedComponent
    from ssprop_energy.records import EnergyComponent

    if gpu is None:
        return list(components), None
    out, whole, charged, methods = [], 0.0, 0.0, []
    for a in components:
        name = a.component.component
        if name not in gpu.per_device:
            out.append(a)
            continue
        share, method = gpu.per_device[name]
        c = a.component
        out.append(AttributedComponent(
            EnergyComponent(c.component, c.energy_j * share, c.source, c.device,
                            None if c.sampled_energy_j is None else c.sampled_energy_j * share),
            machine_energy_j=c.energy_j, share=share, method=method))
        whole += c.energy_j
        charged += c.energy_j * share
        if method not in methods:
            methods.append(method)
    if not methods:
        return out, None
    return out, GpuAttribution(gpu.per_device, share=charged / whole if whole > 0 else 0.0,
                               method=", ".join(methods))


__all__ = ["COMPUTE_PROCESSES", "NVML_UTILISATION", "DeviceTally", "GpuAttribution", "GpuShareSampler",
           "attribute_gpus"]
