"""Number formatting for every place that shows a figure: the report, the CLI tables and the audit ledger.

One module so that a figure reads the same everywhere (units with SI prefixes, a true minus sign, intervals
with their level). Pure Python: no torch, no pandas.
"""

from __future__ import annotations

import math
import re
from typing import Any

J_PER_WH = 3600.0

MINUS = "\u2212"
SOURCE_WORDS = {
    "counter": "read from hardware energy counters",
    "sampled": "integrated from sampled power",
    "estimated": "estimated from a power model (not measured)",
    "mixed": "combined from components of different provenance",
    "counted": "counted",
    "measured": "measured",
}



def _signed(x: float, digits: int) -> str:
    text = f"{abs(x):.{digits}f}"
    return f"{MINUS}{text}" if x < 0 and float(text) != 0.0 else text


def fmt_pct(frac: float, digits: int = 1) -> str:
    """A fraction as a percentage, with a true minus sign: ``-0.123 -> '−12.3%'``."""
    if frac is None or not math.isfinite(frac):
        return "n/a"
    return f"{_signed(100.0 * frac, digits)}%"


def fmt_pp(frac: float, digits: int = 1) -> str:
    """An accuracy difference (fraction) in percentage points, always signed."""
    if not math.isfinite(frac):
        return "n/a"
    text = _signed(100.0 * frac, digits)
    return f"{'+' if not text.startswith(MINUS) and float(text) != 0.0 else ''}{text} pp"


def fmt_ci_pct(ci: tuple[float, float] | None, level: float, digits: int = 1) -> str:
    if ci is None:
        return ""
    return f"{level:.0%} CI {fmt_pct(ci[0], digits)} to {fmt_pct(ci[1], digits)}"


def fmt_ci_pp(ci: tuple[float, float] | None, level: float, digits: int = 1) -> str:
    if ci is None:
        return ""
    return f"{level:.0%} CI {fmt_pp(ci[0], digits)} to {fmt_pp(ci[1], digits)}"


def fmt_si(value: float, unit: str, digits: int = 3) -> str:
    """``value`` with an SI prefix: ``fmt_si(1.234e15, 'FLOP') -> '1.23 PFLOP'``."""
    if value is None or not math.isfinite(value):
        return "n/a"
    prefixes = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
    for scale, prefix in prefixes:
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}"


def fmt_energy(energy_j: float) -> str:
    """Joules with an SI prefix, and watt-hours beside them (what electricity bills speak)."""
    if not math.isfinite(energy_j):
        return "n/a"
    return f"{fmt_si(energy_j, 'J')} ({fmt_si(energy_j / J_PER_WH, 'Wh')})"


def fmt_co2(co2_g: float) -> str:
    if not math.isfinite(co2_g):
        return "n/a"
    if abs(co2_g) >= 1000.0:
        return f"{co2_g / 1000.0:.3g} kg CO2e"
    if abs(co2_g) >= 1.0 or co2_g == 0.0:
        return f"{co2_g:.3g} g CO2e"
    return f"{co2_g * 1000.0:.3g} mg CO2e"


def fmt_seconds(wall_s: float) -> str:
    if not math.isfinite(wall_s):
        return "n/a"
    if wall_s >= 3600:
        return f"{wall_s / 3600:.2f} h"
    if wall_s >= 120:
        return f"{wall_s / 60:.1f} min"
    return f"{wall_s:.3g} s"


def less_or_more(frac: float, noun: str = "") -> str:
    """``0.23 -> '23.0% less'``, ``-0.05 -> '5.0% more'``."""
    if not math.isfinite(frac):
        return "n/a"
    word = "less" if frac >= 0 else "more"
    return f"{fmt_pct(abs(frac))} {word}{' ' + noun if noun else ''}"


def fmt_number(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:g}"
    return "not recorded"



def fmt_flops(flops: float) -> str:
    """FLOPs with an SI prefix: ``6.53e11 -> '653 GFLOP'``."""
    return fmt_si(flops, "FLOP")


def fmt_change(frac: float | None, ci: tuple[float, float] | None = None, digits: int = 1) -> str:
    """A signed relative change with its interval in brackets: ``'+19.5% [+3.1, +30.2]'`` (ASCII signs,
    for terminals)."""
    if frac is None or not math.isfinite(frac):
        return ""
    text = f"{frac * 100:+.{digits}f}%"
    return text + (f" [{ci[0] * 100:+.{digits}f}, {ci[1] * 100:+.{digits}f}]" if ci else "")


def fmt_change_pp(diff: float | None, ci: tuple[float, float] | None = None, digits: int = 2) -> str:
    """A signed difference of fractions in percentage points with its interval: ``'+0.50 pp [-1.00, +2.00]'``."""
    if diff is None or not math.isfinite(diff):
        return ""
    text = f"{diff * 100:+.{digits}f} pp"
    return text + (f" [{ci[0] * 100:+.{digits}f}, {ci[1] * 100:+.{digits}f}]" if ci else "")


def fmt_energy_compact(energy_j: float) -> str:
    """Energy in the largest of J, Wh, kWh that fits, ``-`` when missing (ledger tables)."""
    if not math.isfinite(energy_j):
        return "-"
    for scale, unit in ((1000 * J_PER_WH, "kWh"), (J_PER_WH, "Wh")):
        if energy_j >= scale:
            return f"{energy_j / scale:.3g} {unit}"
    return f"{energy_j:.3g} J"


def fmt_co2_compact(co2_g: float) -> str:
    """CO2e in g or kg, ``-`` when missing (ledger tables)."""
    if not math.isfinite(co2_g):
        return "-"
    return f"{co2_g / 1000:.3g} kg" if co2_g >= 1000 else f"{co2_g:.3g} g"


def fmt_wall_compact(wall_s: float) -> str:
    """Seconds, minutes or hours with one decimal, ``-`` when missing (ledger tables)."""
    if not math.isfinite(wall_s):
        return "-"
    return f"{wall_s / 3600:.2f} h" if wall_s >= 3600 else f"{wall_s / 60:.1f} min" if wall_s >= 120 else f"{wall_s:.1f} s"


_RUN_LABEL = re.compile(r"^s(\d+)r(\d+)e(\d+)$")


def fmt_run_epoch(label: str) -> str:
    """A record's ``s<seed>r<repeat>e<epoch>`` label in words: ``seed 0, epoch 3`` (``repeat R`` only when
    there is more than the first); any other text is returned as is."""
    m = _RUN_LABEL.match(label)
    if m is None:
        return label
    seed, repeat, epoch = m.groups()
    return f"seed {seed}, " + (f"repeat {int(repeat) + 1}, " if int(repeat) else "") + f"epoch {epoch}"
