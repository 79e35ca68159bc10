"""Machine load before, during and after a benchmark, and whether its figures may be cited.

Every script in ``benchmarks/`` calls :func:`begin` before it measures and :func:`end` after. ``begin``
prints the 1-minute load average and the foreign CPU load (busy cores that are not this process tree's,
from :mod:`ssprop_energy.energy.interference`) over a short idle probe, then keeps a monitor window open
over the whole measurement; ``end`` prints the window's foreign load (mean and max), a second probe, and
a verdict. The figures are marked NOT CITABLE when the foreign load averaged more than
:data:`NOT_CITABLE_FOREIGN_CORES` busy cores before, during or after, or another process used the GPU:
contention changes speed ratios, not only absolute times (a compute-bound variant suffers more than a
memory-bound one), so side-by-side interleaving does not make a loaded run citable.

Run the benchmarks as ``python benchmarks/<name>.py`` (this module is imported from the script's folder).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ssprop_energy.energy.interference import InterferenceMonitor, InterferenceReading, measure_foreign_load

NOT_CITABLE_FOREIGN_CORES = 0.5
PROBE_S = 2.0


@dataclass
class LoadCheck:
    """The open measurement window and the probe taken before it."""

    before: InterferenceReading
    monitor: InterferenceMonitor
    token: object
    gpu_index: int | None


def nvml_index(device: str) -> int | None:
    """NVML index of a torch device string (``cuda``, ``cuda:1``); None for anything else.

    CUDA numbers the GPUs listed in ``CUDA_VISIBLE_DEVICES``; NVML numbers all of them.
    """
    if not device.startswith("cuda"):
        return None
    cuda_index = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and cuda_index < len(visible):
        return int(visible[cuda_index])
    return cuda_index


def describe(label: str, r: InterferenceReading, probe: bool) -> str:
    """One line: load average and foreign load of a probe (``probe``) or of the measurement window."""
    load = "unreadable" if r.load_avg_1m is None else f"{r.load_avg_1m:.2f}"
    if probe:
        text = (f"load {label}: load average (1 min) {load}, foreign CPU {r.foreign_cpu_cores_mean:.2f} busy "
                f"cores of {r.cpu_count} (mean over a {r.wall_s:.1f} s idle probe, max {r.foreign_cpu_cores_max:.2f})")
    else:
        text = (f"load {label}: foreign CPU {r.foreign_cpu_cores_mean:.2f} busy cores mean, "
                f"{r.foreign_cpu_cores_max:.2f} max, over {r.wall_s:.1f} s ({r.n_samples} reads); this benchmark "
                f"{r.own_cpu_cores_mean:.2f} cores; load average (1 min) at the end {load}")
    if (r.steal_cpu_cores_mean or 0.0) >= 0.005:
        text += f"; hypervisor steal {r.steal_cpu_cores_mean:.2f} cores"
    if r.gpu_foreign_processes_max:
        text += f"; other processes on the GPU: {r.gpu_foreign_pids}"
    return text


def citable(readings: list[InterferenceReading], threshold_cores: float = NOT_CITABLE_FOREIGN_CORES) -> list[str]:
    """Why the figures are not citable (empty when they are)."""
    why = [f"{label} {r.foreign_cpu_cores_mean:.2f} busy cores"
           for label, r in zip(("before", "during", "after"), readings)
           if r.foreign_cpu_cores_mean > threshold_cores]
    if any(r.gpu_foreign_processes_max for r in readings):
        why.append("other processes on the GPU")
    return why


def begin(gpu_index: int | None = None, probe_s: float = PROBE_S) -> LoadCheck:
    """Probe the machine while idle, print the result, and open a window over the measurement."""
    before = measure_foreign_load(probe_s, gpu_index=gpu_index)
    print(describe("before", before, probe=True), flush=True)
    monitor = InterferenceMonitor(sample_period_s=0.25, gpu_index=gpu_index).start()
    return LoadCheck(before, monitor, monitor.begin("benchmark"), gpu_index)


def end(check: LoadCheck, probe_s: float = PROBE_S) -> bool:
    """Close the window, probe again, print both and the verdict; True when the figures are citable."""
    during = check.monitor.end(check.token)
    check.monitor.stop()
    after = measure_foreign_load(probe_s, gpu_index=check.gpu_index)
    print()
    print(describe("during", during, probe=False))
    print(describe("after", after, probe=True))
    why = citable([check.before, during, after])
    if why:
        print(f"NOT CITABLE: the figures above were taken under load ({'; '.join(why)}; the limit is "
              f"{NOT_CITABLE_FOREIGN_CORES} busy core not ours on average); rerun on a quiet machine")
    else:
        print(f"citable: foreign CPU load stayed at or below {NOT_CITABLE_FOREIGN_CORES} busy core on average "
              "before, during and after the measurement")
    sys.stdout.flush()
    return not why
