"""Electricity cost: one formula, user-only price, ISO 4217 currency."""

import math

import pytest

from ssprop_energy.cost import cost_of, resolve_price, validate_currency
from ssprop_energy.errors import ConfigError


def test_cost_of_one_kwh_and_a_fraction() -> None:
    price = resolve_price(0.25, "eur")
    assert price is not None and price.currency == "EUR" and price.source == "user"
    assert math.isclose(cost_of(3.6e6, price).amount, 0.25)
    # 720 kJ = 0.2 kWh -> 0.05 at 0.25/kWh (independent hand arithmetic)
    assert math.isclose(cost_of(720_000.0, price).amount, 0.05)


def test_no_price_no_cost() -> None:
    assert resolve_price(None, None) is None
    assert cost_of(1e6, None) is None
    assert cost_of(float("nan"), resolve_price(0.1, "USD")) is None


@pytest.mark.parametrize(("price", "currency"), [(0.1, None), (None, "EUR"), (-1.0, "EUR"),
                                                 (float("inf"), "EUR"), (0.1, "EU"), (0.1, "XYZ"), (0.1, "E1R")])
def test_refused(price: float | None, currency: str | None) -> None:
    with pytest.raises(ConfigError):
        resolve_price(price, currency)


def test_currency_codes() -> None:
    assert validate_currency(" gbp ") == "GBP"
    assert validate_currency("JPY") == "JPY"
