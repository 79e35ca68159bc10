"""The meter doctor behind ``ssprop-energy env --check``: why each energy source works or not, and the fix.

Each known failure is recognised from what the boundary shows (sysfs files and their modes, NVML error
codes, MIG mode) and paired with the exact command or setting that restores it:

- RAPL ``energy_uj`` readable only by root: since the fix for CVE-2020-8694 (Platypus, November 2020; kernel
  5.10 and the stable backports) the file is mode 0400 root, because fine-grained energy readings leak
  secrets through power side channels. ``chmod o+r`` restores it until reboot; a udev rule makes it stick.
- No ``/sys/class/powercap``: a container or VM that does not expose it (or not Linux).
- powercap present but no ``intel-rapl:N`` domain: the RAPL driver is not loaded.
- NVML: the Python binding missing, ``libnvidia-ml.so`` missing (a container started without the NVIDIA
  runtime), the kernel driver not loaded, or the driver/library version mismatch after a driver upgrade.
- A MIG-enabled GPU: NVML reports energy and power for the whole GPU only, never per MIG instance.
- No energy counter (before Volta): the energy is integrated from sampled board power; on Ampere and later
  the power NVML returns is itself averaged over about 1 s, so windows of a few seconds are biased.

No torch here: the doctor must run on a machine where torch or CUDA is the very thing that is broken.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ssprop_energy.energy.rapl import POWERCAP, find_domains
from ssprop_energy.errors import MeterUnavailableError

RAPL_CHMOD_FIX = "sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj /sys/class/powercap/intel-rapl:*:*/energy_uj"
RAPL_UDEV_RULE = 'ACTION=="add", SUBSYSTEM=="powercap", KERNEL=="intel-rapl:*", RUN+="/bin/chmod o+r /sys%p/energy_uj"'
RAPL_UDEV_FIX = (
    f"to keep it across reboots, put `{RAPL_UDEV_RULE}` in /etc/udev/rules.d/99-rapl-energy.rules, then "
    "`sudo udevadm control --reload && sudo udevadm trigger --subsystem-match=powercap`"
)
CONTAINER_POWERCAP_FIX = (
    "on the host, bind-mount it into the container: `docker run -v /sys/class/powercap:/sys/class/powercap:ro ...` "
    "(and make energy_uj readable on the host), or use --meter estimate"
)
RAPL_MODULE_FIX = "load the RAPL driver: `sudo modprobe intel_rapl_msr` (Intel; AMD Zen needs kernel 5.8 or later)"
NVML_BINDING_FIX = "`pip install nvidia-ml-py` (the official binding, imported as pynvml)"
NVML_LIBRARY_FIX = (
    "install the NVIDIA driver (it ships libnvidia-ml.so.1); in a container start it with the NVIDIA runtime: "
    "`docker run --gpus all ...` (NVIDIA Container Toolkit)"
)
NVML_DRIVER_FIX = "load the kernel driver (`sudo modprobe nvidia`) and check `nvidia-smi` works"
NVML_MISMATCH_FIX = (
    "the kernel module and the user-space driver library differ (a driver upgrade without reboot): reboot, or "
    "unload and reload the module: `sudo rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia && sudo modprobe nvidia`"
)
NVML_PERMISSION_FIX = "this user cannot open /dev/nvidia*: add it to the group owning them (often `video`)"
MIG_FIX = (
    "energy of one MIG instance cannot be measured: the figure is the whole GPU's, shared with every other "
    "instance; for a per-run figure disable MIG (`sudo nvidia-smi -i {index} -mig 0`, then reset the GPU) or "
    "run alone on the GPU"
)
NO_COUNTER_FIX = (
    "no fix in software: this GPU has no energy counter (before Volta), so energy is integrated from sampled "
    "board power; keep windows long (tens of seconds), since on Ampere and later the power NVML returns is "
    "itself a ~1 s average and lags at the edges of a window"
)

# NVML return codes (nvml.h); pynvml raises NVMLError with ``.value`` set to one of these.
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_DEVICE_MIG_ENABLE = 1


@dataclass(frozen=True)
class Finding:
    """One line of the diagnosis.

    Attributes:
        source: ``rapl``, ``nvml`` or ``estimate``.
        level: ``ok`` (works), ``warn`` (works, with a caveat on its figures) or ``fail`` (cannot be used).
        problem: what was found.
        fix: the exact command or setting that restores it; None when nothing needs doing.
    """

    source: str
    level: str
    problem: str
    fix: str | None = None


def check_rapl(sysfs_root: str | os.PathLike[str] | None = None, euid: int | None = None) -> list[Finding]:
    """Diagnose RAPL under ``sysfs_root`` (``/`` by default) for the user ``euid`` (this process's by default).

    Readability is decided from each ``energy_uj``'s mode and owner, and confirmed by opening it, so that a
    root-only file is reported even when the doctor itself runs as root (the training run may not).
    """
    root = Path(sysfs_root) if sysfs_root is not None else Path("/")
    uid = os.geteuid() if euid is None else euid
    base = root / POWERCAP
    if not base.is_dir():
        if not sys.platform.startswith("linux"):
            return [Finding("rapl", "fail", f"not Linux ({sys.platform}): no powercap RAPL", "use --meter estimate")]
        return [Finding("rapl", "fail", f"{base} does not exist (a container or VM that does not expose powercap)",
                        CONTAINER_POWERCAP_FIX)]
    try:
        domains = find_domains(root)
    except MeterUnavailableError:
        return [Finding("rapl", "fail", f"{base} has no intel-rapl package domain", RAPL_MODULE_FIX)]
    root_only: list[str] = []
    for _component, path in domains:
        energy = path / "energy_uj"
        try:
            st = energy.stat()
        except OSError as exc:
            return [Finding("rapl", "fail", f"cannot stat {energy} ({exc.strerror})", RAPL_MODULE_FIX)]
        others_read = bool(st.st_mode & stat.S_IROTH)
        owner_read = bool(st.st_mode & stat.S_IRUSR) and st.st_uid == uid
        if uid != 0 and not others_read and not owner_read:
            return [Finding("rapl", "fail",
                            f"{energy} is readable only by root (mode {stat.S_IMODE(st.st_mode):04o}; the "
                            "CVE-2020-8694 restriction)", f"`{RAPL_CHMOD_FIX}`; {RAPL_UDEV_FIX}")]
        try:
            os.close(os.open(energy, os.O_RDONLY))
        except PermissionError:
            return [Finding("rapl", "fail", f"{energy} is not readable by this user (CVE-2020-8694 restriction)",
                            f"`{RAPL_CHMOD_FIX}`; {RAPL_UDEV_FIX}")]
        except OSError as exc:
            return [Finding("rapl", "fail", f"cannot open {energy} ({exc.strerror})", RAPL_MODULE_FIX)]
        if not others_read:
            root_only.append(str(energy))
    names = ", ".join(c for c, _ in domains)
    out = [Finding("rapl", "ok", f"RAPL counters readable: {names}")]
    if root_only:
        out.append(Finding("rapl", "warn",
                           f"readable here only because this process runs as root: {len(root_only)} energy_uj "
                           "file(s) are root-only (CVE-2020-8694); a run as another user falls back to the estimate",
                           f"`{RAPL_CHMOD_FIX}`; {RAPL_UDEV_FIX}"))
    return out


def _nvml_code(pynvml: Any, exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return int(value) if isinstance(value, int) else None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def check_nvml(gpus: Sequence[int] | None = None) -> list[Finding]:
    """Diagnose NVML: the binding, the library, the driver, and per GPU its MIG mode and energy counter."""
    try:
        import pynvml
    except ImportError:
        return [Finding("nvml", "fail", "the pynvml module is not installed", NVML_BINDING_FIX)]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        code = _nvml_code(pynvml, exc)
        fix = {
            NVML_ERROR_LIBRARY_NOT_FOUND: NVML_LIBRARY_FIX,
            NVML_ERROR_DRIVER_NOT_LOADED: NVML_DRIVER_FIX,
            NVML_ERROR_LIB_RM_VERSION_MISMATCH: NVML_MISMATCH_FIX,
            NVML_ERROR_NO_PERMISSION: NVML_PERMISSION_FIX,
        }.get(code if code is not None else -1, NVML_LIBRARY_FIX)
        return [Finding("nvml", "fail", f"nvmlInit failed: {_text(exc)} (NVML error {code})", fix)]
    try:
        return _check_gpus(pynvml, gpus)
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass  # a shutdown failure changes nothing in the diagnosis


def _check_gpus(pynvml: Any, gpus: Sequence[int] | None) -> list[Finding]:
    from ssprop_energy.energy.nvml import visible_gpu_indices

    count = int(pynvml.nvmlDeviceGetCount())
    indices = list(gpus) if gpus is not None else visible_gpu_indices(count)
    if not indices:
        return [Finding("nvml", "fail", "NVML works but no GPU is visible to this process",
                        "check CUDA_VISIBLE_DEVICES and `nvidia-smi -L`")]
    out: list[Finding] = []
    for index in indices:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(pynvml.nvmlDeviceGetName(handle))
        label = f"GPU {index} ({name})"
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            has_counter = True
        except pynvml.NVMLError as exc:
            if _nvml_code(pynvml, exc) != getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", 3):
                out.append(Finding("nvml", "fail", f"{label}: energy counter read failed ({_text(exc)})",
                                   NVML_DRIVER_FIX))
                continue
            has_counter = False
        mig = _mig_enabled(pynvml, handle)
        if has_counter:
            out.append(Finding("nvml", "ok", f"{label}: energy counter (provenance 'counter')"))
        else:
            out.append(Finding("nvml", "warn", f"{label}: no energy counter; energy is sampled power "
                                               "(provenance 'sampled')", NO_COUNTER_FIX))
        if mig:
            out.append(Finding("nvml", "warn", f"{label}: MIG is enabled; per-instance energy is not supported",
                               MIG_FIX.format(index=index)))
    return out


def _mig_enabled(pynvml: Any, handle: Any) -> bool:
    get = getattr(pynvml, "nvmlDeviceGetMigMode", None)
    if get is None:
        return False  # a binding older than MIG (before CUDA 11): no GPU it can drive has MIG
    try:
        current, _pending = get(handle)
    except pynvml.NVMLError:
        return False  # NOT_SUPPORTED: a GPU without MIG
    return int(current) == NVML_DEVICE_MIG_ENABLE


def check_estimate() -> list[Finding]:
    """The estimate always works; say where its TDP came from, since that decides its accuracy."""
    from ssprop_energy.energy.estimate import EstimateSource

    src = EstimateSource()
    try:
        desc = src.describe()
    finally:
        src.close()
    text = (f"CPU/RAM estimate available: CPU TDP {desc['cpu_tdp_w']:g} W ({desc['cpu_tdp_from']}), "
            f"RAM {desc['ram_power_w']:g} W ({desc['ram_power_from']}); provenance 'estimated'")
    return [Finding("estimate", "ok", text)]


def diagnose(
    meter: str = "auto", sysfs_root: str | os.PathLike[str] | None = None, *, gpus: Sequence[int] | None = None,
    euid: int | None = None,
) -> dict[str, Any]:
    """The whole diagnosis: every source's findings, and whether the meter ``meter`` opens here.

    Returns:
        ``{"meter", "meter_works", "meter_sources", "meter_error", "findings": [Finding as dict]}``.
    """
    from ssprop_energy.energy.select import open_meter

    findings = check_nvml(gpus) + check_rapl(sysfs_root, euid) + check_estimate()
    works, sources, error = True, [], None
    try:
        m = open_meter(meter, sysfs_root=sysfs_root, gpus=gpus, background=False, sync=None)
    except MeterUnavailableError as exc:
        works, error = False, str(exc)
    else:
        sources = list(m.source_kinds)
        m.close()
    return {"meter": meter, "meter_works": works, "meter_sources": sources, "meter_error": error,
            "findings": [asdict(f) for f in findings]}
