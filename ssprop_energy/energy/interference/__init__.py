"""Interference monitor: how much of the machine was busy with work that is not this run's.

Split into ``readings`` (the record), ``readers`` (procfs/psutil/NVML) and ``monitor`` (windows); this
package re-exports every name other modules and tests import.
"""

from ssprop_energy.energy.interference.monitor import InterferenceMonitor, WindowToken, measure_foreign_load
from ssprop_energy.energy.interference.readers import _in_init_pid_namespace, own_delta_s
from ssprop_energy.energy.interference.readings import (
    DEFAULT_THRESHOLD_CORES,
    THROTTLE_REASON_BITS,
    InterferenceReading,
    decode_throttle_reasons,
)

__all__ = [
    "DEFAULT_THRESHOLD_CORES", "THROTTLE_REASON_BITS", "InterferenceMonitor", "InterferenceReading",
    "WindowToken", "_in_init_pid_namespace", "decode_throttle_reasons", "measure_foreign_load", "own_delta_s",
]
