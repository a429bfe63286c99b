"""The contract between services: the order fill on `orders.raw` and the Signal on `signals`.

Models are frozen pydantic v2 classes, versioned by `v`. Readers ignore unknown fields so a newer
producer never breaks an older consumer; writers validate strictly what the pipeline needs.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

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
    DOME_WS = "dome_ws"
    DOME_REST = "dome_rest"
    DATA_API = "data_api"
    POLYGON = "polygon"


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
    condition_id: HexIdOrEmpty = ""
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

    @field_validator("price", "shares_normalized", mode="before")
    @classmethod
    def _numbers_not_strings(cls, value: Any) -> Any:
        # A price sent as a string is a producer bug we want to hear about, not silently coerce.
        if isinstance(value, str | bool):
            raise ValueError(f"must be a number, got {type(value).__name__}")
        return value


class FeedOrder(DomeOrder):
    """A Dome order as it enters the pipeline from outside (Dome's WebSocket and REST, the Data
    API, the chain): its token id must be Polymarket's, a decimal uint256. The ingestor parses
    every source through this model, so an order that fails it is dead-lettered there."""

    token_id: DecimalTokenId


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
        cls, order: DomeOrder, source: Source, received_at: float, occurrence: int = 0
    ) -> OrderFill:
        key = order_key(
            order.tx_hash,
            order.user,
            order.token_id,
            order.side,
            order.shares_normalized,
            order.price,
            occurrence,
        )
        return cls(**order.model_dump(), order_key=key, source=source, received_at=received_at)


class SignalKind(StrEnum):
    TRADER_ENTRY = "trader_entry"
    TRADER_EXIT = "trader_exit"
    WHALE_ORDER = "whale_order"
    CONSENSUS = "consensus"


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
    condition_id: HexIdOrEmpty = ""
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

    def to_json(self) -> bytes:
        """The stream form: the JSON `model_dump_json` gives, from orjson, which is cheaper on
        this hot path (the fields are plain str, float, int, list and str enums)."""
        return orjson.dumps(self.__dict__)


class TrackedWallet(Contract):
    """A wallet we follow, from the wallets file (and later the store's API)."""

    address: Address
    label: Label = ""
    score: float | None = Field(default=None, ge=0, le=1)
