"""Which signals a subscriber (a WebSocket client or a webhook) wants.

```json
{"wallets": ["0xabc…"], "markets": ["nobel-peace-prize-2025"], "kinds": ["whale_order"],
 "min_confidence": 0.8, "min_notional_usd": 500, "min_price": 0.05, "max_price": 0.9,
 "sides": ["BUY"], "tags": ["politics"], "only_new_positions": true}
```

- A field left out (or `null`) matches every signal; the fields combine with AND, the values of
  one field with OR.
- `wallets`: 0x addresses (any case). `markets`: market slugs or condition ids (any case).
  `kinds`: `SignalKind` values. `min_confidence`: 0..1, inclusive.
- The noise controls a trader sets for themself: `min_notional_usd` (the fill's shares x price,
  inclusive), `min_price` / `max_price` (0..1, inclusive: leave out the near-certain outcomes and
  the long shots), `sides` (`BUY`, `SELL`).
- `tags`: the market's categories, as Gamma tags them (`politics`, `sports`, `crypto`, ...; a
  tag's label or slug, any case; see `market_tags`). A signal passes when its market has any of
  them; when its tags are not known (Gamma unreachable, no `NOTIFIER_GAMMA_URL`) it does not.
- `only_new_positions`: true passes only signals that open a position (`Signal.opens_position`
  true: the wallet held none of the token before). Unknown (`null`: the detector had not seeded
  that wallet's positions) does not pass, since "new" cannot be vouched for.
- An empty list is an error rather than "match nothing": leave the field out to match any.
- Unknown fields are errors too, so a typo (`"wallet"`) is reported instead of silently matching
  everything.

On a URL (`/ws?wallets=0xa,0xb&kinds=whale_order&min_confidence=0.8`) list fields are
comma-separated and may repeat.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from services.notifier.market_tags import MarketTags
from shared.models import Address, Side, Signal, SignalKind

FILTER_FIELDS = (
    "wallets",
    "markets",
    "kinds",
    "min_confidence",
    "min_notional_usd",
    "min_price",
    "max_price",
    "sides",
    "tags",
    "only_new_positions",
)
_LIST_FIELDS = ("wallets", "markets", "kinds", "sides", "tags")
# One value each on a URL: numbers, and `only_new_positions` (true/false, 1/0).
_NUMBER_FIELDS = (
    "min_confidence",
    "min_notional_usd",
    "min_price",
    "max_price",
    "only_new_positions",
)

Market = Annotated[
    str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=200)
]
Tag = Annotated[
    str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=100)
]


class FilterError(ValueError):
    """A filter that cannot be used; the message is short, single-line and echoes no values."""


class Filters(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    wallets: frozenset[Address] | None = None
    markets: frozenset[Market] | None = None
    kinds: frozenset[SignalKind] | None = None
    min_confidence: float = Field(default=0.0, ge=0, le=1)
    min_notional_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    min_price: float = Field(default=0.0, ge=0, le=1)
    max_price: float = Field(default=1.0, ge=0, le=1)
    sides: frozenset[Side] | None = None
    tags: frozenset[Tag] | None = None
    only_new_positions: bool = False

    @field_validator(*_LIST_FIELDS, mode="before")
    @classmethod
    def _no_empty_list(cls, value: Any) -> Any:
        if isinstance(value, list | tuple | set | frozenset) and not value:
            raise ValueError("empty list matches nothing; leave the field out to match any")
        return value

    @field_validator("sides", mode="before")
    @classmethod
    def _any_case_side(cls, value: Any) -> Any:
        if isinstance(value, list | tuple | set | frozenset):
            return [item.upper() if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _a_price_range(self) -> Filters:
        if self.min_price > self.max_price:
            raise ValueError("min_price is above max_price: that matches nothing")
        return self

    @property
    def matches_all(self) -> bool:
        return self == MATCH_ALL

    @property
    def needs_tags(self) -> bool:
        """Whether matching needs the signal's market tags (looked up from Gamma)."""
        return self.tags is not None

    def matches(self, signal: Signal, market_tags: frozenset[str] | None = None) -> bool:
        """`market_tags`: the tags of the signal's market, None when not known."""
        return (
            signal.confidence >= self.min_confidence
            and signal.notional_usd >= self.min_notional_usd
            and self.min_price <= signal.price <= self.max_price
            and (self.sides is None or signal.side in self.sides)
            and (self.kinds is None or signal.kind in self.kinds)
            and (self.wallets is None or signal.wallet in self.wallets)
            and (
                self.markets is None
                or signal.market_slug.lower() in self.markets
                or signal.condition_id.lower() in self.markets
            )
            and (not self.only_new_positions or signal.opens_position is True)
            and (self.tags is None or bool(market_tags and self.tags & market_tags))
        )

    def describe(self) -> dict[str, Any]:
        """The normalized filters as JSON (sorted lists, null for "any"), as clients get them."""
        return {
            "wallets": _sorted(self.wallets),
            "markets": _sorted(self.markets),
            "kinds": _sorted(self.kinds),
            "min_confidence": self.min_confidence,
            "min_notional_usd": self.min_notional_usd,
            "min_price": self.min_price,
            "max_price": self.max_price,
            "sides": _sorted(self.sides),
            "tags": _sorted(self.tags),
            "only_new_positions": self.only_new_positions,
        }

    def size(self) -> int:
        lists = (self.wallets, self.markets, self.kinds, self.sides, self.tags)
        return sum(len(values or ()) for values in lists)


MATCH_ALL = Filters()


class TaggedMatch:
    """A subscriber's filters that ask for market tags, with the lookup that knows them.

    Matching stays synchronous (the fan-out hands a signal to every client without waiting):
    the tags are looked up beforehand with `prepare`, and `__call__` reads the cache.
    """

    def __init__(self, filters: Filters, market_tags: MarketTags | None) -> None:
        self.filters = filters
        self.market_tags = market_tags

    def __call__(self, signal: Signal) -> bool:
        tags = None if self.market_tags is None else self.market_tags.known(signal.condition_id)
        return self.filters.matches(signal, tags)

    async def prepare(self, signals: Iterable[Signal]) -> None:
        if self.market_tags is not None:
            await self.market_tags.prefetch(signal.condition_id for signal in signals)


def signal_filter(
    filters: Filters, market_tags: MarketTags | None
) -> TaggedMatch | Callable[[Signal], bool] | None:
    """What a subscriber's filters accept: None for everything, else a callable."""
    if filters.matches_all:
        return None
    return TaggedMatch(filters, market_tags) if filters.needs_tags else filters.matches


def _sorted(values: Iterable[str] | None) -> list[str] | None:
    return None if values is None else sorted(str(value) for value in values)


def parse_filters(payload: Any, *, max_values: int) -> Filters:
    """Filters from a JSON value (an object, or null for "everything"); FilterError otherwise."""
    if payload is None:
        return MATCH_ALL
    if not isinstance(payload, dict):
        raise FilterError("filters must be a JSON object")
    # Counted before validation too, so an oversized filter costs nothing to refuse.
    raw_size = sum(len(v) for k, v in payload.items() if k in _LIST_FIELDS and isinstance(v, list))
    if raw_size > max_values:
        raise FilterError(f"{raw_size} values, limit {max_values}")
    try:
        filters = Filters.model_validate(payload)
    except ValidationError as exc:
        raise FilterError(_first_problem(exc)) from None
    if filters.size() > max_values:
        raise FilterError(f"{filters.size()} values, limit {max_values}")
    return filters


def filters_from_query(params: Mapping[str, list[str]], *, max_values: int) -> Filters:
    """Filters from URL query parameters (each name with all its values); FilterError if bad."""
    payload: dict[str, Any] = {}
    for name in _LIST_FIELDS:
        if name in params:
            payload[name] = [
                part.strip() for value in params[name] for part in value.split(",") if part.strip()
            ]
    for name in _NUMBER_FIELDS:
        if name in params:
            values = params[name]
            if len(values) != 1:
                raise FilterError(f"{name} given more than once")
            payload[name] = values[0]
    return parse_filters(payload, max_values=max_values)


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "filters"
    if error["type"] == "extra_forbidden":
        # Short enough for a WebSocket close reason (123 bytes), which lists of fields are not.
        close = difflib.get_close_matches(where, FILTER_FIELDS, n=1)
        hint = f"did you mean {close[0]}?" if close else "see docs/notifier.md, filters"
        return f"{where}: unknown field ({hint})"
    if error["type"] == "frozen_set_type":
        return f"{where}: must be a list"
    if error["type"] == "string_pattern_mismatch":
        return f"{where}: not a 0x wallet address of 40 hex digits"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"
