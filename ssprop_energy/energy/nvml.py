"""NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml`` only when used).

Per GPU: the total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver
loaded; Volta and later) where the GPU has one, and the board power (``nvmlDeviceGetPowerUsage``,
milliwatts) for the sampled trace. On recent drivers and GPUs the board power NVML returns is itself an
average over about a second, so the sampled integral lags the counter at the edges of a run; over a
run of many seconds the two should agree within a few percent, and the record keeps both.

NVML errors become :class:`MeterError` (or :class:`MeterUnavailableError` when NVML or the GPU cannot be
used at all) here, at the boundary.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from ssprop_energy.energy.base import ComponentSpec, PowerSource
from ssprop_energy.errors import MeterError, MeterUnavailableError

logger = logging.getLogger(__name__)

INSTALL_FIX = "install the NVIDIA driver and `pip install nvidia-ml-py`, or use --meter rapl / --meter estimate"


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        raise MeterUnavailableError(f"NVML: the pynvml module is not installed; {INSTALL_FIX}") from None
    return pynvml


def _not_supported(pynvml: Any, exc: BaseException) -> bool:
    cls = getattr(pynvml, "NVMLError_NotSupported", None)
    if cls is not None and isinstance(exc, cls):
        return True
    return getattr(exc, "value", None) == getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", 3)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def visible_gpu_indices(count: int) -> list[int]:
    """NVML indices of the GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when it lists integers,
    else all ``count`` GPUs (UUID or MIG entries cannot be mapped without more NVML calls; all are measured,
    with a warning)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or env.strip() == "":
        return list(range(count))
    parts = [p.strip() for p in env.split(",") if p.strip()]
    try:
        indices = [int(p) for p in parts]
    except ValueError:
        logger.warning("CUDA_VISIBLE_DEVICES=%s is not a list of indices; measuring all %d GPUs", env, count)
        return list(range(count))
    # CUDA stops at the first invalid entry; so do we.
    out: list[int] = []
    for i in indices:
        if not 0 <= i < count:
            break
        out.append(i)
    return out


class NvmlSource(PowerSource):
    """Energy of NVIDIA GPUs: counter where supported (``counter``), else sampled power (``sampled``).

    Args:
        gpus: NVML indices to measure; default :func:`visible_gpu_indices`.

    Raises:
        MeterUnavailableError: pynvml missing, no driver, or no GPU.
    """

    kind = "nvml"

    def __init__(self, gpus: Sequence[int] | None = None) -> None:
        self._nvml = pynvml = _import_pynvml()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise MeterUnavailableError(f"NVML: cannot initialise ({_text(exc)}); {INSTALL_FIX}") from None
        self._open = True
        try:
            self._driver = self._call(pynvml.nvmlSystemGetDriverVersion, unavailable=True)
            count = int(self._call(pynvml.nvmlDeviceGetCount, unavailable=True))
            indices = list(gpus) if gpus is not None else visible_gpu_indices(count)
            if not indices:
                raise MeterUnavailableError(f"NVML: no GPU visible to this process; {INSTALL_FIX}")
            self._gpus: list[tuple[int, Any, str, bool]] = []
            for index in indices:
                if not 0 <= index < count:
                    raise MeterUnavailableError(f"NVML: GPU {index} does not exist (this machine has {count})")
                handle = self._call(pynvml.nvmlDeviceGetHandleByIndex, index, unavailable=True)
                name = _text(self._call(pynvml.nvmlDeviceGetName, handle, unavailable=True))
                has_counter = self._probe_counter(handle)
                self._call(pynvml.nvmlDeviceGetPowerUsage, handle, unavailable=True)
                self._gpus.append((index, handle, name, has_counter))
                if not has_counter:
                    logger.info("GPU %d (%s) has no energy counter; its energy is sampled power", index, name)
        except BaseException:
            self.close()
            raise

    def _call(self, fn: Any, *args: Any, unavailable: bool = False) -> Any:
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            cls = MeterUnavailableError if unavailable else MeterError
            raise cls(f"NVML: {fn.__name__} failed ({_text(exc)})") from None

    def _probe_counter(self, handle: Any) -> bool:
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except self._nvml.NVMLError as exc:
            if _not_supported(self._nvml, exc):
                return False
            raise MeterUnavailableError(f"NVML: nvmlDeviceGetTotalEnergyConsumption failed ({_text(exc)})") from None
        return True

    def components(self) -> list[ComponentSpec]:
        return [
            ComponentSpec(f"gpu:{index}", "counter" if has_counter else "sampled", name, has_counter, True)
            for index, _, name, has_counter in self._gpus
        ]

    def read_energy_j(self) -> dict[str, float]:
        get = self._nvml.nvmlDeviceGetTotalEnergyConsumption
        return {
            f"gpu:{index}": self._call(get, handle) * 1e-3 for index, handle, _, has in self._gpus if has
        }

    def read_power_w(self) -> dict[str, float]:
        get = self._nvml.nvmlDeviceGetPowerUsage
        return {f"gpu:{index}": self._call(get, handle) * 1e-3 for index, handle, _, _ in self._gpus}

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                logger.debug("nvmlShutdown failed: %s", _text(exc))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "driver": _text(self._driver),
            "gpus": [
                {"component": f"gpu:{i}", "name": name, "energy_counter": has}
                for i, _, name, has in self._gpus
            ],
        }
