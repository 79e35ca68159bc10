"""Electricity cost: ``cost = kWh x price (currency/kWh)``, computed here and nowhere else.

There is no default price: a cost exists only when the user gives one (``source == "user"``). The
currency is an ISO 4217 alphabetic code, checked against the ``pycountry`` table that codecarbon (a
core dependency) already installs, so the code list is a maintained one rather than typed by hand here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ssprop_energy.errors import ConfigError

J_PER_KWH = 3.6e6


def validate_currency(code: str) -> str:
    """The ISO 4217 alphabetic code, upper-cased; ``ConfigError`` if it is not one."""
    try:
        import pycountry
    except ImportError:
        raise ConfigError("currency: pycountry (installed with codecarbon) is missing; `pip install pycountry`") from None
    text = str(code).strip().upper()
    if len(text) != 3 or not text.isalpha() or pycountry.currencies.get(alpha_3=text) is None:
        raise ConfigError(f"currency must be an ISO 4217 code such as EUR or USD, got {code!r}")
    return text


@dataclass(frozen=True)
class ElectricityPrice:
    """A price of electricity.

    Attributes:
        per_kwh: price of one kWh in ``currency`` units (non-negative, finite).
        currency: ISO 4217 code.
        source: where the price comes from; only ``"user"`` exists (no default price is shipped).
    """

    per_kwh: float
    currency: str
    source: str = "user"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_price(per_kwh: float | None, currency: str | None) -> ElectricityPrice | None:
    """The user's price, or ``None`` when no price was given (then no cost is shown).

    A price without a currency (or a currency without a price) is refused: a bare number is not a cost.
    """
    if per_kwh is None and currency is None:
        return None
    if per_kwh is None or currency is None:
        raise ConfigError("a cost needs both --price-per-kwh and --currency")
    value = float(per_kwh)
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"--price-per-kwh must be a non-negative number, got {per_kwh}")
    return ElectricityPrice(per_kwh=value, currency=validate_currency(currency), source="user")


@dataclass(frozen=True)
class Cost:
    """Cost of an amount of energy.

    Attributes:
        amount: cost in ``currency`` units.
        currency: ISO 4217 code.
        per_kwh: the price used (currency/kWh).
        source: the price's source (``"user"``).
        energy_j: the energy priced, joules.
    """

    amount: float
    currency: str
    per_kwh: float
    source: str
    energy_j: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cost_of(energy_j: float, price: ElectricityPrice | None) -> Cost | None:
    """Cost of ``energy_j`` joules at ``price``; ``None`` when there is no price or no energy figure."""
    if price is None or energy_j is None or not math.isfinite(float(energy_j)):
        return None
    energy = float(energy_j)
    return Cost(amount=energy / J_PER_KWH * price.per_kwh, currency=price.currency, per_kwh=price.per_kwh,
                source=price.source, energy_j=energy)
