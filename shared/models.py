"""The contract between services: the order fill on `orders.raw` and the Signal on `signals`.

Models are frozen pydantic v2 classes, versioned by `v`. Readers ignore unknown fields so a newer
producer never breaks an older consumer; writers validate strictly what the pipeline needs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
SHARE_DECIMALS = 6
MAX_SHARES = 1e11
# Bounds of free text, far above Polymarket's (the bundled tape's longest title has 91 characters,
# slug 85, outcome 3), so no real fill is lost to them; they stop a field from carrying most of a
# 1 MiB frame into every stream, table and message. A slug fits the API's `market` filter (200).
TITLE_MAX = 5000
SLUG_MAX = 200
LABEL_MAX = 200
ID_MAX = 200

_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")

Address = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$", to_lower=True)]
# Ids are opaque to the pipeline, but must look like ids: no spaces, no markup, and no first
# character a spreadsheet would run as a formula (= + - @) when a history export is opened.
# Polymarket's real ones are stricter (`FeedOrder` holds orders from outside to those).
HexId = Annotated[str, StringConstraints(pattern=rf"^0x[0-9a-fA-F]{{1,{ID_MAX - 2}}}$")]
HexIdOrEmpty = Annotated[str, StringConstraints(pattern=rf"^(0x[0-9a-fA-F]{{1,{ID_MAX - 2}}})?$")]
# Lower-cased at the boundary: feeds spell one market's id in either case, and every piece of state
# keyed by it (the detector's units, the store's filters) would otherwise split in two.
ConditionId = Annotated[
    str, StringConstraints(pattern=rf"^(0x[0-9a-fA-F]{{1,{ID_MAX - 2}}})?$", to_lower=True)
]
TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z_-]{0,99}$")]
# A CLOB token id is a uint256 written in decimal: at most 78 digits.
DecimalTokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,78}$")]
Title = Annotated[str, StringConstraints(max_length=TITLE_MAX)]
Slug = Annotated[str, StringConstraints(max_length=SLUG_MAX)]
Label = Annotated[str, StringConstraints(max_length=LABEL_MAX)]
REASON_MAX = 300
StatusReason = Annotated[str, StringConstraints(max_length=REASON_MAX)]


def normalize_address(value: str) -> str:
    """Lower-case a 0x wallet address, or raise ValueError naming what is wrong with it."""
    if not isinstance(value, str) or not _HEX_ADDRESS.match(value):
        raise ValueError(f"not a 0x wallet address of 40 hex digits: {str(value)[:60]!r}")
    return value.lower()


class Side(StrEnum):
    BUY = "BUY"
    SELL = "SELL"


class Source(StrEnum):
    """Where a fill was first seen. The Dome-protocol services each have their own value, so a
    signal and the per-source lag say which paid feed was first."""

    DOME_WS = "dome_ws"
    DOME_REST = "dome_rest"
    DATA_API = "data_api"
    POLYGON = "polygon"
    PREDEXON = "predexon"
    POLYNODE = "polynode"
    RTDS = "rtds"


class Contract(BaseModel):
    """Base of every stream payload: frozen, strict types, unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=False, allow_inf_nan=False)


class DomeOrder(Contract):
    """One fill as Dome sends it (WebSocket event `data`, or an item of REST `orders`).

    Fields the pipeline needs are required; the rest are optional because the shorter shapes in the
    wild omit them.
    """

    token_id: TokenId
    side: Side
    market_slug: Slug = ""
    condition_id: ConditionId = ""
    token_label: Label = ""
    shares: int | None = None
    # Bounded so micro-shares fit the 64-bit integers Redis keeps positions in; no market has
    # ever traded 1e11 shares in one fill, so a larger value is a producer bug.
    shares_normalized: float = Field(gt=0, le=MAX_SHARES)
    price: float = Field(ge=0, le=1)
    tx_hash: HexId
    title: Title = ""
    timestamp: int = Field(gt=0)
    order_hash: HexId | None = None
    user: Address
    taker: HexId | None = None
    block_number: int | None = None
    log_index: int | None = None
    # Ours, not Dome's: which of the identical fills of this wallet in this transaction this is
    # (0: the first). Set by the ingestor (`occurrences`, `Twins`), never read from a feed.
    occurrence: int = Field(default=0, ge=0)

    @field_validator("price", "shares_normalized", mode="before")
    @classmethod
    def _numbers_not_strings(cls, value: Any) -> Any:
        # A price sent as a string is a producer bug we want to hear about, not silently coerce.
        if isinstance(value, str | bool):
            raise ValueError(f"must be a number, got {type(value).__name__}")
        return value

    @field_validator("log_index", "block_number", mode="before")
    @classmethod
    def _hex_quantities(cls, value: Any) -> Any:
        # Predexon sends the log index as a hex string ("0x2a"), as JSON-RPC logs do; Dome an int.
        if isinstance(value, str) and value[:2].lower() == "0x":
            try:
                return int(value, 16)
            except ValueError:
                raise ValueError(f"not a hex quantity: {value[:20]!r}") from None
        return value


class FeedOrder(DomeOrder):
    """A Dome order as it enters the pipeline from outside (Dome's WebSocket and REST, the Data
    API, the chain): its token id must be Polymarket's, a decimal uint256. The ingestor parses
    every source through this model, so an order that fails it is dead-lettered there."""

    token_id: DecimalTokenId

    @model_validator(mode="before")
    @classmethod
    def _no_outside_occurrence(cls, data: Any) -> Any:
        # The occurrence is counted by the ingestor; a feed that sent one must not pick the key.
        if isinstance(data, dict) and "occurrence" in data:
            return {name: value for name, value in data.items() if name != "occurrence"}
        return data


def order_key(
    tx_hash: str,
    user: str,
    token_id: str,
    side: str,
    shares: float,
    price: float,
    occurrence: int = 0,
) -> str:
    """The identity of one fill, the same from every source (WS, REST backfill, Data API).

    Built only from fields every source has; order_hash is missing from the Data API. Shares and
    price are rounded so float noise between sources cannot split one fill into two keys.
    `occurrence` tells apart identical fills of one transaction (the n-th, in log order, from 0):
    a source that sees every log of the transaction (the chain) passes it; 0 keeps the key every
    source agrees on.
    """
    micro_shares = round(shares * 10**SHARE_DECIMALS)
    parts = [
        tx_hash.lower(),
        user.lower(),
        token_id,
        side.upper(),
        str(micro_shares),
        f"{price:.6f}",
    ]
    if occurrence:
        parts.append(str(occurrence))
    canonical = "|".join(parts)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def base_key(order: DomeOrder) -> str:
    """What makes two fills identical: their order_key before the occurrence tells them apart."""
    return order_key(
        order.tx_hash, order.user, order.token_id, order.side, order.shares_normalized, order.price
    )


def occurrences(orders: Sequence[DomeOrder]) -> list[int]:
    """The occurrence of each order of one listing among the identical ones in it.

    Identical fills are interchangeable, so any count that every source makes over the same
    transaction gives the same set of keys. Ranking by log index where the listing has it (Dome
    REST) follows the chain's log order; the listed order stands in where it has not (the Data
    API). The listing must hold the whole transaction: callers count over one response.
    """
    ranked = sorted(
        range(len(orders)),
        key=lambda i: (orders[i].log_index is None, orders[i].log_index or 0, i),
    )
    counted: dict[str, int] = {}
    result = [0] * len(orders)
    for index in ranked:
        key = base_key(orders[index])
        result[index] = counted.get(key, 0)
        counted[key] = result[index] + 1
    return result


# 2020-01-01 UTC: before Polymarket's first trade, so no real fill is older.
MIN_EXCHANGE_TS = 1_577_836_800
MAX_FUTURE_S = 300
_LAST_DATETIME_TS = 253_402_300_799  # 9999-12-31T23:59:59Z


@dataclass(frozen=True, slots=True)
class ExchangeTimeBounds:
    """The exchange times a feed may send: none before `min_ts`, none more than `max_future_s`
    after the fill was received (clock skew between the exchange and us stays well inside it).

    A time outside is a producer bug (milliseconds, a broken clock) and must not reach the
    pipeline: it would raise the wallet's watermark past every later fill, stop the token's
    consensus clock, and fail to fit the store's timestamp columns."""

    max_future_s: int = MAX_FUTURE_S
    min_ts: int = MIN_EXCHANGE_TS

    def problem(self, timestamp: int, received_at: float) -> str | None:
        """Why `timestamp` is implausible for a fill received at `received_at`; None if it is
        plausible. No source documents milliseconds (feeds.md), so one is refused, not divided."""
        latest = received_at + self.max_future_s
        if self.min_ts <= timestamp <= latest:
            return None
        if timestamp > latest and self.min_ts <= timestamp // 1000 <= latest:
            return (
                f"timestamp {timestamp} looks like milliseconds ({_utc(timestamp // 1000)} if "
                "divided by 1000); exchange times must be Unix seconds"
            )
        if timestamp > latest:
            return (
                f"timestamp {timestamp} ({_utc(timestamp)}) is {timestamp - received_at:,.0f} s "
                f"after the fill was received; at most {self.max_future_s} s is allowed "
                "(EXCHANGE_TS_MAX_FUTURE_S)"
            )
        return (
            f"timestamp {timestamp} ({_utc(timestamp)}) is before {_utc(self.min_ts)} "
            "(EXCHANGE_TS_MIN)"
        )


def _utc(timestamp: int) -> str:
    if not 0 <= timestamp <= _LAST_DATETIME_TS:
        return "out of the calendar"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class FillStatus(StrEnum):
    """Where a fill (and every signal drawn from it) stands.

    `pending`: seen before its block (a mempool event); `confirmed`: in a block (the default, and
    all a source without pending events ever sends); `retracted`: the fill will not happen or no
    longer has (a reorg removed its block, a pending fill never confirmed). A status change is a
    new entry with the same `order_key` (orders.raw) or `signal_id` (signals): readers that ignore
    the field see a repeat, which every consumer already drops.
    """

    PENDING = "pending"
    CONFIRMED = "confirmed"
    RETRACTED = "retracted"


class OrderFill(DomeOrder):
    """An entry of `orders.raw`: the Dome order plus where and when we got it."""

    v: int = SCHEMA_VERSION
    order_key: str
    source: Source
    received_at: float
    status: FillStatus = FillStatus.CONFIRMED
    # Why the status changed (a retraction's cause), for people.
    status_reason: StatusReason = ""

    @property
    def notional_usd(self) -> float:
        return self.shares_normalized * self.price

    @classmethod
    def from_dome(
        cls,
        order: DomeOrder,
        source: Source,
        received_at: float,
        occurrence: int | None = None,
    ) -> OrderFill:
        """The fill of `order`; its occurrence is `occurrence`, else the one the order carries."""
        counted = order.occurrence if occurrence is None else occurrence
        key = order_key(
            order.tx_hash,
            order.user,
            order.token_id,
            order.side,
            order.shares_normalized,
            order.price,
            counted,
        )
        fields = order.model_dump() | {"occurrence": counted}
        return cls(**fields, order_key=key, source=source, received_at=received_at)


class SignalKind(StrEnum):
    TRADER_ENTRY = "trader_entry"
    TRADER_EXIT = "trader_exit"
    WHALE_ORDER = "whale_order"
    CONSENSUS = "consensus"
    # A tracked wallet building (BUYs) or unwinding (SELLs) a position through many small fills
    # that together cross a notional threshold within a window (docs/signals.md).
    ACCUMULATION = "accumulation"
    DISTRIBUTION = "distribution"


def signal_id(kind: str, *order_keys: str) -> str:
    """Deterministic: the same kind over the same order(s) gives the same id on every replica."""
    return hashlib.sha256("|".join((kind, *sorted(order_keys))).encode()).hexdigest()[:32]


class Signal(Contract):
    """An entry of `signals`: one thing a tracked wallet did that is worth acting on."""

    v: int = SCHEMA_VERSION
    signal_id: str
    kind: SignalKind
    wallet: Address
    wallet_label: Label = ""
    market_slug: Slug = ""
    title: Title = ""
    condition_id: ConditionId = ""
    token_id: TokenId
    token_label: Label = ""
    side: Side
    price: float
    shares: float
    notional_usd: float
    confidence: float = Field(ge=0, le=1)
    reasons: list[str] = Field(default_factory=list)
    order_keys: list[str] = Field(default_factory=list)
    source: Source
    exchange_ts: int
    received_at: float
    detected_at: float
    # A retraction repeats the signal (same `signal_id`) with status `retracted`, the reason, and
    # `detected_at` the time the retraction was decided.
    status: FillStatus = FillStatus.CONFIRMED
    status_reason: StatusReason = ""
    # The fill reached us more than SIGNAL_MAX_AGE_S after it traded (`received_at - exchange_ts`,
    # a backfill): the signal describes the past, not something to act on now.
    late: bool = False
    # Whether the wallet held none of the token before this signal's fills (a new position);
    # None where the detector cannot know (its positions were not seeded for that wallet).
    opens_position: bool | None = None

    def to_json(self) -> bytes:
        """The stream form: the JSON `model_dump_json` gives, from orjson, which is cheaper on
        this hot path (the fields are plain str, float, int, list and str enums)."""
        return orjson.dumps(self.__dict__)


class TrackedWallet(Contract):
    """A wallet we follow, from the wallets file (and later the store's API)."""

    address: Address
    label: Label = ""
    score: float | None = Field(default=None, ge=0, le=1)
