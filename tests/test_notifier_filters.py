"""The subscriber's noise controls (issue 17): notional, price range and sides, on the WebSocket's
query and in a webhook's JSON filters, each combined with the others by AND."""

from __future__ import annotations

import pytest

from services.notifier.filters import FilterError, filters_from_query, parse_filters
from shared.models import Side, Signal
from tests.helpers.notifier import variant


def signal(price: float, shares: float, side: Side = Side.BUY) -> Signal:
    return variant(1, price=price, shares=shares, notional_usd=price * shares, side=side)


def test_notional_price_range_and_sides_each_narrow_the_feed() -> None:
    wanted = parse_filters(
        {"min_notional_usd": 500, "min_price": 0.05, "max_price": 0.9, "sides": ["buy"]},
        max_values=10,
    )
    assert wanted.matches(signal(0.5, 1000))  # $500, inside the range, a BUY
    assert not wanted.matches(signal(0.5, 999))  # $499.50
    assert not wanted.matches(signal(0.95, 10_000))  # near-certain
    assert not wanted.matches(signal(0.01, 100_000))  # a long shot
    assert not wanted.matches(signal(0.5, 1000, Side.SELL))
    assert wanted.matches(signal(0.9, 1000)) and wanted.matches(signal(0.05, 20_000))
    assert wanted.describe()["sides"] == ["BUY"]


def test_the_query_carries_them_too() -> None:
    query = {"min_notional_usd": ["100"], "max_price": ["0.8"], "sides": ["SELL,buy"]}
    wanted = filters_from_query(query, max_values=10)
    assert wanted.sides == frozenset({Side.SELL, Side.BUY})
    assert wanted.max_price == 0.8 and wanted.min_notional_usd == 100
    assert not wanted.matches(signal(0.85, 1000))


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"min_price": 0.9, "max_price": 0.1}, "min_price is above max_price"),
        ({"max_price": 1.5}, "max_price"),
        ({"min_notional_usd": -1}, "min_notional_usd"),
        ({"min_notional_usd": "inf"}, "min_notional_usd"),
        ({"sides": ["HOLD"]}, "sides"),
        ({"sides": []}, "empty list"),
    ],
)
def test_bad_values_are_refused_with_the_field(payload: dict[str, object], problem: str) -> None:
    with pytest.raises(FilterError, match=problem):
        parse_filters(payload, max_values=10)


def test_a_price_given_twice_on_the_query_is_refused() -> None:
    with pytest.raises(FilterError, match="min_price given more than once"):
        filters_from_query({"min_price": ["0.1", "0.2"]}, max_values=10)
