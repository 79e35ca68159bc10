"""Intel/AMD RAPL energy counters through Linux powercap sysfs.

Layout (``/sys/class/powercap``): ``intel-rapl:N`` is CPU package N (``name`` = ``package-N``), its
subdomains ``intel-rapl:N:M`` are ``core``, ``uncore`` and ``dram``; some servers put ``dram`` at the top
level instead. We report each package as ``cpu:package-N`` and each DRAM domain as ``dram:package-N``:
package energy includes core and uncore (so those are not added again) but not DRAM. ``psys`` (the whole
platform) overlaps everything else and is skipped; so are ``intel-rapl-mmio`` mirrors of the same counters.

``energy_uj`` wraps at ``max_energy_range_uj``; the counter is read at every sample (100 ms by default),
far more often than the fastest wrap (minutes at the highest package powers), so at most one wrap falls
between two reads and adding the range once recovers it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssprop_energy.energy.base import ComponentSpec, PowerSource
from ssprop_energy.errors import MeterError, MeterUnavailableError

POWERCAP = Path("sys/class/powercap")
PERMISSION_FIX = "sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj /sys/class/powercap/intel-rapl:*:*/energy_uj"
_DOMAIN_RE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")


@dataclass
class _Domain:
    component: str
    path: Path
    max_range_uj: int
    fd: int = -1
    last_uj: int = 0
    total_uj: int = 0


def _read_small(path: Path) -> str:
    with open(path, encoding="ascii") as fh:
        return fh.read().strip()


def _cpu_model(root: Path) -> str:
    try:
        for line in (root / "proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def find_domains(sysfs_root: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """The RAPL domains to read: ``[(component, directory)]``, packages first.

    Raises:
        MeterUnavailableError: no powercap RAPL domain exists under the root.
    """
    root = Path(sysfs_root) if sysfs_root is not None else Path("/")
    base = root / POWERCAP
    try:
        entries = sorted(base.iterdir())
    except OSError:
        raise MeterUnavailableError(
            f"RAPL: {base} does not exist (not Linux, or a VM/container without powercap); "
            "use --meter estimate"
        ) from None
    found: list[tuple[str, Path]] = []
    for entry in entries:
        match = _DOMAIN_RE.match(entry.name)
        if match is None:
            continue
        try:
            name = _read_small(entry / "name")
        except OSError:
            continue
        package = match.group(1)
        if match.group(2) is None:
            if name.startswith("package"):
                found.append((f"cpu:{name}", entry))
            elif name == "dram":
                found.append((f"dram:package-{package}", entry))
        elif name == "dram":
            parent = entry.parent / f"intel-rapl:{package}"
            try:
                parent_name = _read_small(parent / "name")
            except OSError:
                parent_name = f"package-{package}"
            found.append((f"dram:{parent_name}", entry))
    if not any(comp.startswith("cpu:") for comp, _ in found):
        raise MeterUnavailableError(
            f"RAPL: no package domain under {base} (this CPU or kernel exposes no RAPL counters); "
            "use --meter estimate"
        )
    found.sort(key=lambda item: (not item[0].startswith("cpu:"), item[0]))
    return found


class RaplSource(PowerSource):
    """Package and DRAM energy from RAPL counters (source ``counter``).

    Args:
        sysfs_root: the filesystem root holding ``sys/class/powercap`` (``/`` by default); tests point it at
            a fake tree.

    Raises:
        MeterUnavailableError: no RAPL domain, or ``energy_uj`` is not readable (the message names the fix).
    """

    kind = "rapl"

    def __init__(self, sysfs_root: str | os.PathLike[str] | None = None) -> None:
        self._root = Path(sysfs_root) if sysfs_root is not None else Path("/")
        self._cpu = _cpu_model(self._root)
        self._domains: list[_Domain] = []
        try:
            for component, path in find_domains(sysfs_root):
                try:
                    max_range_uj = int(_read_small(path / "max_energy_range_uj"))
                except (OSError, ValueError):
                    raise MeterUnavailableError(f"RAPL: cannot read {path / 'max_energy_range_uj'}") from None
                dom = _Domain(component, path, max_range_uj)
                try:
                    dom.fd = os.open(path / "energy_uj", os.O_RDONLY)
                except PermissionError:
                    raise MeterUnavailableError(
                        f"RAPL: {path / 'energy_uj'} is not readable by this user (kernels since 5.10 restrict "
                        f"it to root); fix: `{PERMISSION_FIX}`, or use --meter estimate"
                    ) from None
                except OSError as exc:
                    raise MeterUnavailableError(f"RAPL: cannot open {path / 'energy_uj'} ({exc})") from None
                self._domains.append(dom)
                dom.last_uj = self._read_uj(dom)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _read_uj(dom: _Domain) -> int:
        # The file stays open: a pread at offset 0 makes sysfs (seq_file) regenerate the value, so a
        # window edge costs one system call per domain instead of open + read + close.
        try:
            return int(os.pread(dom.fd, 64, 0).decode("ascii").strip())
        except PermissionError:
            raise MeterUnavailableError(
                f"RAPL: {dom.path / 'energy_uj'} is not readable; fix: `{PERMISSION_FIX}`"
            ) from None
        except (OSError, ValueError) as exc:
            raise MeterError(f"RAPL: reading {dom.path / 'energy_uj'} failed ({exc})") from None

    def components(self) -> list[ComponentSpec]:
        return [
            ComponentSpec(d.component, "counter", self._cpu if d.component.startswith("cpu:") else "DRAM", True, False)
            for d in self._domains
        ]

    def read_energy_j(self) -> dict[str, float]:
        out = {}
        for dom in self._domains:
            raw = self._read_uj(dom)
            delta = raw - dom.last_uj
            if delta < 0:
                delta += dom.max_range_uj
            dom.total_uj += delta
            dom.last_uj = raw
            out[dom.component] = dom.total_uj * 1e-6
        return out

    def close(self) -> None:
        for dom in self._domains:
            if dom.fd >= 0:
                os.close(dom.fd)
                dom.fd = -1

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cpu_model": self._cpu,
            "domains": {d.component: str(d.path) for d in self._domains},
        }
