"""Fake hardware for the energy tests: a manual clock, a fake ``pynvml`` module and a fake RAPL sysfs tree."""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import Callable


class FakeClock:
    """A clock that only moves when told to; ``sleep`` advances it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    sleep = advance


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {3: "Not Supported", 9: "Driver Not Loaded", 12: "NVML Shared Library Not Found", 15: "GPU is lost",
                18: "RM has detected an NVML/RM version mismatch"}.get(self.value, "Unknown")


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's spelling
    def __init__(self) -> None:
        super().__init__(3)


class FakeGpu:
    """One GPU: board power ``power_w(t)`` and, when ``counter``, a total-energy counter (mJ, integer like
    NVML's) that is the exact integral ``energy_j(t)`` plus an arbitrary since-boot offset."""

    def __init__(self, name: str, power_w: Callable[[float], float], energy_j: Callable[[float], float] | None,
                 offset_j: float = 123456.0) -> None:
        self.name = name
        self.power_w = power_w
        self.energy_j = energy_j
        self.offset_j = offset_j
        self.lost = False
        # For the interference monitor: processes on the device, temperature, clock event reasons, and
        # NVML errors to raise per function name (e.g. {"nvmlDeviceGetTemperature": 3}).
        # A list, or a callable giving the list at call time (the shared-GPU tests list the wrapped command).
        self.compute_pids: list[int] | Callable[[], list[int]] = []
        self.graphics_pids: list[int] = []
        self.temperature_c = 40
        self.throttle_mask = 0
        self.errors: dict[str, int] = {}
        # Per-process SM utilisation samples as (pid, sm_percent), read at call time; None: not supported.
        self.process_utilisation: Callable[[], list[tuple[int, int]]] | None = None
        # MIG mode (current, pending) as nvmlDeviceGetMigMode returns it; None: a GPU without MIG (Not Supported).
        self.mig_mode: tuple[int, int] | None = None


def make_pynvml(clock: FakeClock, gpus: list[FakeGpu], init_error: int | None = None) -> types.ModuleType:
    """A module with the pynvml functions the NVML source calls, driven by ``clock``."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = NVMLError
    mod.NVMLError_NotSupported = NVMLError_NotSupported
    mod.NVML_ERROR_NOT_SUPPORTED = 3
    mod.calls = {"init": 0, "shutdown": 0}
    t0 = clock()

    def nvmlInit() -> None:
        if init_error is not None:
            raise NVMLError(init_error)
        mod.calls["init"] += 1

    def nvmlShutdown() -> None:
        mod.calls["shutdown"] += 1

    def nvmlSystemGetDriverVersion() -> str:
        return "550.54.15"

    def nvmlDeviceGetCount() -> int:
        return len(gpus)

    def nvmlDeviceGetHandleByIndex(i: int) -> FakeGpu:
        return gpus[i]

    def nvmlDeviceGetName(h: FakeGpu) -> bytes:
        return h.name.encode()  # old pynvml returns bytes; the source must decode

    def nvmlDeviceGetPowerUsage(h: FakeGpu) -> int:
        if h.lost:
            raise NVMLError(15)
        return int(round(h.power_w(clock() - t0) * 1000))

    def nvmlDeviceGetTotalEnergyConsumption(h: FakeGpu) -> int:
        if h.energy_j is None:
            raise NVMLError_NotSupported()
        if h.lost:
            raise NVMLError(15)
        return int(round((h.offset_j + h.energy_j(clock() - t0)) * 1000))

    def _fail(h: FakeGpu, name: str) -> None:
        if name in h.errors:
            raise NVMLError_NotSupported() if h.errors[name] == 3 else NVMLError(h.errors[name])
        if h.lost:
            raise NVMLError(15)

    def nvmlDeviceGetComputeRunningProcesses(h: FakeGpu) -> list[types.SimpleNamespace]:
        _fail(h, "nvmlDeviceGetComputeRunningProcesses")
        pids = h.compute_pids() if callable(h.compute_pids) else h.compute_pids
        return [types.SimpleNamespace(pid=p, usedGpuMemory=1 << 30) for p in pids]

    def nvmlDeviceGetGraphicsRunningProcesses(h: FakeGpu) -> list[types.SimpleNamespace]:
        _fail(h, "nvmlDeviceGetGraphicsRunningProcesses")
        return [types.SimpleNamespace(pid=p, usedGpuMemory=None) for p in h.graphics_pids]

    def nvmlDeviceGetTemperature(h: FakeGpu, sensor: int) -> int:
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        _fail(h, "nvmlDeviceGetTemperature")
        return h.temperature_c

    def nvmlDeviceGetCurrentClocksEventReasons(h: FakeGpu) -> int:
        _fail(h, "nvmlDeviceGetCurrentClocksEventReasons")
        return h.throttle_mask

    def nvmlDeviceGetProcessUtilization(h: FakeGpu, last_seen_ts: int) -> list[types.SimpleNamespace]:
        # Like NVML: samples newer than last_seen_ts (microseconds), NVMLError(6) "Not Found" when none.
        if h.process_utilisation is None:
            raise NVMLError_NotSupported()
        _fail(h, "nvmlDeviceGetProcessUtilization")
        ts = int(clock() * 1e6)
        if ts <= last_seen_ts:
            raise NVMLError(6)
        return [types.SimpleNamespace(pid=pid, timeStamp=ts, smUtil=sm, memUtil=0, encUtil=0, decUtil=0)
                for pid, sm in h.process_utilisation()]

    def nvmlDeviceGetMigMode(h: FakeGpu) -> tuple[int, int]:
        if h.mig_mode is None:
            raise NVMLError_NotSupported()
        return h.mig_mode

    mod.NVML_TEMPERATURE_GPU = 0
    for fn in (nvmlInit, nvmlShutdown, nvmlSystemGetDriverVersion, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex,
               nvmlDeviceGetName, nvmlDeviceGetPowerUsage, nvmlDeviceGetTotalEnergyConsumption,
               nvmlDeviceGetComputeRunningProcesses, nvmlDeviceGetGraphicsRunningProcesses, nvmlDeviceGetTemperature,
               nvmlDeviceGetCurrentClocksEventReasons, nvmlDeviceGetProcessUtilization, nvmlDeviceGetMigMode):
        setattr(mod, fn.__name__, fn)
    return mod


def sine(mean: float, amp: float, period: float) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """A sine power trace and its analytic integral."""
    w = 2 * math.pi / period
    return (lambda t: mean + amp * math.sin(w * t)), (lambda t: mean * t + amp * (1 - math.cos(w * t)) / w)


class RaplTree:
    """A fake ``sys/class/powercap`` under ``root``: write counters with :meth:`set_uj`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / "sys" / "class" / "powercap"
        self.base.mkdir(parents=True)

    def domain(self, dirname: str, name: str, energy_uj: int, max_uj: int = 262143328850) -> Path:
        d = self.base / dirname
        d.mkdir()
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(f"{energy_uj}\n")
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
        return d

    def set_uj(self, dirname: str, energy_uj: int) -> None:
        # Rewriting in place keeps the inode, as the kernel's sysfs file does.
        (self.base / dirname / "energy_uj").write_text(f"{energy_uj}\n")
