"""A trade before emission (`TradeTemplate`) and once emitted (`Trade`), in Dome's order shape.

An emitted trade has the 16 fields of Dome's orders API (`ORDER_FIELDS`, in Dome's order); the
same object is the `data` of a WebSocket event, because Dome documents event data as "matching the
format of our orders API" (its shorter WS examples omit `block_number` and `log_index`).

Fields no source gives us are synthesized deterministically:
- `order_hash`: sha256 of the fill's identity (tx hash, wallet, token, side, raw shares), 0x hex;
- `taker`: the Polymarket CTF Exchange contract, as on fills matched against several orders;
- `block_number`/`log_index`: Polygon-like, one block per 2 s of the emission timestamp, log
  indexes counting up within a block (see `BlockClock`).

`Quirks` makes the simulated world as rough as the real feeds, each way switchable (settings
`SIM_*`, or live on the simulator's `quirks`): timestamps in milliseconds or far in the future,
identical fills in one transaction, and (in the Data API) the trades of one second listed in a
different order on every page. A trade stamped oddly says so in the ground truth (`quirk`).

Maker fills: a trade is the tracked wallet's fill as maker (its resting order was hit) or as taker.
Dome and the chain show both; Polymarket's Data API hides maker fills unless asked with
`takerOnly=false` (`taker_only=false` on `/v2/trades`). A maker fill says `"maker": true` in the
ground truth; `Quirks.maker_every` (SIM_MAKER_EVERY) or `"maker": true` in `/_sim/emit` makes one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from shared.models import SHARE_DECIMALS

if TYPE_CHECKING:
    from services.simulator.settings import SimulatorSettings

SHARE_SCALE = 10**SHARE_DECIMALS
# Polymarket's CTF Exchange on Polygon: the taker of fills matched against several maker orders.
EXCHANGE_ADDRESS = "0x4bfb41d5b3570defd03c39a9a4d8de6bd8b8982e"

ORDER_FIELDS = (
    "token_id",
    "token_label",
    "side",
    "market_slug",
    "condition_id",
    "shares",
    "shares_normalized",
    "price",
    "block_number",
    "log_index",
    "tx_hash",
    "title",
    "timestamp",
    "order_hash",
    "user",
    "taker",
)


def raw_shares(size: float) -> int:
    """Dome's `shares`: the size in micro-shares (6 decimals), as an integer."""
    return round(size * SHARE_SCALE)


def sha256_hex(text: str) -> str:
    return "0x" + hashlib.sha256(text.encode()).hexdigest()


def synthetic_order_hash(tx_hash: str, user: str, token_id: str, side: str, shares: int) -> str:
    return sha256_hex(f"order|{tx_hash}|{user}|{token_id}|{side}|{shares}")


class StampQuirk(StrEnum):
    """How a trade's timestamp is written, when a quirk is on (`Quirks`)."""

    NONE = ""
    MILLISECONDS = "ms_timestamp"
    FUTURE = "future_timestamp"


@dataclass(frozen=True, slots=True)
class TradeTemplate:
    """Everything about a trade except when it happens; `tape_ts` is its time on the tape.

    `stamp_quirk` (with `ahead_s` for a future stamp) makes its emission write a wrong timestamp.
    """

    token_id: str
    token_label: str
    side: str
    market_slug: str
    condition_id: str
    shares: int
    shares_normalized: float
    price: float
    tx_hash: str
    title: str
    order_hash: str
    user: str
    taker: str = EXCHANGE_ADDRESS
    tape_ts: int = 0
    stamp_quirk: StampQuirk = StampQuirk.NONE
    ahead_s: int = 0
    # The wallet's order was the resting one (the Data API hides it unless takerOnly=false).
    maker: bool = False

    def stamped(self, timestamp: int) -> int:
        """The timestamp the feeds show for a trade emitted at `timestamp` (Unix seconds)."""
        if self.stamp_quirk is StampQuirk.MILLISECONDS:
            return timestamp * 1000
        if self.stamp_quirk is StampQuirk.FUTURE:
            return timestamp + self.ahead_s
        return timestamp


def twin_of(template: TradeTemplate) -> TradeTemplate:
    """An identical fill in the same transaction: the same wallet, token, side, size and price
    from another resting order (its own order hash), as when one taker hits two equal orders of
    one maker."""
    order_hash = sha256_hex(f"twin|{template.order_hash}")
    return replace(template, order_hash=order_hash, stamp_quirk=StampQuirk.NONE, ahead_s=0)


@dataclass
class Quirks:
    """The ways the simulated feeds are rough, each off by default. One object per simulator,
    read at every trade, so a switch made while it runs applies from the next trade on.

    - `ms_timestamp_every` n: every n-th scheduled trade is stamped in milliseconds;
    - `future_timestamp_every` n: every n-th scheduled trade is stamped `future_timestamp_s` ahead;
    - `twin_every` n: every n-th scheduled trade has an identical twin (`twin_of`) emitted right
      after it, so in the same block at the next log index;
    - `unstable_ties`: the Data API lists the trades of one second in another order on each page
      (`data_api.trades_page`);
    - `maker_every` n: every n-th scheduled trade is the wallet's maker fill, which the Data API
      lists only with `takerOnly=false`.
    """

    ms_timestamp_every: int = 0
    future_timestamp_every: int = 0
    future_timestamp_s: int = 3600
    twin_every: int = 0
    unstable_ties: bool = False
    maker_every: int = 0

    @classmethod
    def of(cls, settings: SimulatorSettings) -> Quirks:
        return cls(
            ms_timestamp_every=settings.sim_ms_timestamp_every,
            future_timestamp_every=settings.sim_future_timestamp_every,
            future_timestamp_s=settings.sim_future_timestamp_s,
            twin_every=settings.sim_twin_every,
            unstable_ties=settings.sim_unstable_ties,
            maker_every=settings.sim_maker_every,
        )

    def stamp(self, template: TradeTemplate, count: int) -> TradeTemplate:
        """The `count`-th scheduled trade (from 1), with its timestamp quirk if one is due, and
        made a maker fill when one is due."""
        if _due(self.maker_every, count):
            template = replace(template, maker=True)
        if _due(self.ms_timestamp_every, count):
            return replace(template, stamp_quirk=StampQuirk.MILLISECONDS)
        if _due(self.future_timestamp_every, count):
            return replace(template, stamp_quirk=StampQuirk.FUTURE, ahead_s=self.future_timestamp_s)
        return template

    def twinned(self, count: int) -> bool:
        return _due(self.twin_every, count)


def _due(every: int, count: int) -> bool:
    return every > 0 and count % every == 0


@dataclass(slots=True, eq=False)
class Trade:
    """An emitted trade: the template stamped with its emission time, block and sequence number."""

    seq: int
    token_id: str
    token_label: str
    side: str
    market_slug: str
    condition_id: str
    shares: int
    shares_normalized: float
    price: float
    block_number: int
    log_index: int
    tx_hash: str
    title: str
    timestamp: int
    order_hash: str
    user: str
    taker: str
    emitted_at: float
    quirk: str = ""
    maker: bool = False
    # The block's time, whatever `timestamp` a quirk wrote: what the Data API's v2 time window
    # and keyset order go by (its `block_timestamp`).
    block_time: int = 0

    @classmethod
    def stamp(
        cls,
        template: TradeTemplate,
        *,
        seq: int,
        timestamp: int,
        block_number: int,
        log_index: int,
        emitted_at: float,
    ) -> Trade:
        t = template
        return cls(
            seq,
            t.token_id,
            t.token_label,
            t.side,
            t.market_slug,
            t.condition_id,
            t.shares,
            t.shares_normalized,
            t.price,
            block_number,
            log_index,
            t.tx_hash,
            t.title,
            t.stamped(timestamp),
            t.order_hash,
            t.user,
            t.taker,
            emitted_at,
            t.stamp_quirk.value,
            t.maker,
            timestamp,
        )

    def order(self) -> dict[str, Any]:
        """The Dome order: a REST `orders` item and the `data` of a WebSocket event."""
        return {
            "token_id": self.token_id,
            "token_label": self.token_label,
            "side": self.side,
            "market_slug": self.market_slug,
            "condition_id": self.condition_id,
            "shares": self.shares,
            "shares_normalized": self.shares_normalized,
            "price": self.price,
            "block_number": self.block_number,
            "log_index": self.log_index,
            "tx_hash": self.tx_hash,
            "title": self.title,
            "timestamp": self.timestamp,
            "order_hash": self.order_hash,
            "user": self.user,
            "taker": self.taker,
        }

    def truth(self) -> dict[str, Any]:
        """The ground-truth record: the Dome order plus when it was emitted (float Unix time),
        and for a trade stamped oddly on purpose, which `quirk` (no consumer should accept it); a
        maker fill says `maker`."""
        record = {**self.order(), "emitted_at": self.emitted_at}
        if self.quirk:
            record["quirk"] = self.quirk
        if self.maker:
            record["maker"] = True
        return record


class BlockClock:
    """Polygon-like block numbers from emission timestamps, with log indexes within a block."""

    BASE_BLOCK = 77_000_000
    BASE_TIME = 1_760_000_000
    SECONDS_PER_BLOCK = 2

    def __init__(self) -> None:
        self._block = -1
        self._next_log = 0

    def next(self, timestamp: int) -> tuple[int, int]:
        block = self.BASE_BLOCK + (timestamp - self.BASE_TIME) // self.SECONDS_PER_BLOCK
        if block != self._block:
            self._block, self._next_log = block, 0
        log_index = self._next_log
        self._next_log += 1
        return block, log_index


class TradeInputError(ValueError):
    pass


_STR_FIELDS = (
    "token_id",
    "token_label",
    "side",
    "market_slug",
    "condition_id",
    "tx_hash",
    "title",
    "order_hash",
    "user",
    "taker",
)
_INT_FIELDS = ("shares", "timestamp", "block_number", "log_index")
_NUMBER_FIELDS = ("shares_normalized", "price")
_IGNORED_FIELDS = ("emitted_at",)
_FLAG_FIELDS = ("maker",)

INJECT_USER = "0x" + "5" * 40
INJECT_SLUG = "simulated-market"
INJECT_CONDITION = sha256_hex(INJECT_SLUG)
INJECT_TOKEN = str(int(sha256_hex("simulated-market|Yes"), 16))[:77]


@dataclass(frozen=True, slots=True)
class Injected:
    """A trade given to `/_sim/emit`: its template and the times it fixes (None: stamp now)."""

    template: TradeTemplate
    timestamp: int | None
    block_number: int | None
    log_index: int | None


def _check_types(item: Mapping[str, Any]) -> None:
    known = {*ORDER_FIELDS, *_IGNORED_FIELDS, *_FLAG_FIELDS}
    unknown = sorted(set(item) - known)
    if unknown:
        raise TradeInputError(f"unknown field(s) {unknown}; Dome order fields are {ORDER_FIELDS}")
    for name in _FLAG_FIELDS:
        if name in item and not isinstance(item[name], bool):
            raise TradeInputError(f"{name} must be a boolean")
    for name in _STR_FIELDS:
        if name in item and not isinstance(item[name], str):
            raise TradeInputError(f"{name} must be a string")
    for name in _INT_FIELDS:
        if name in item and (not isinstance(item[name], int) or isinstance(item[name], bool)):
            raise TradeInputError(f"{name} must be an integer")
    for name in _NUMBER_FIELDS:
        value = item.get(name, 0.0)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TradeInputError(f"{name} must be a number")


def injected_trade(item: Any, unique: str) -> Injected:
    """A Dome-shaped trade from a test, missing fields filled; values are kept as given
    (`"maker": true` makes it the wallet's maker fill).

    Types are checked (the simulator indexes and filters on them) but not ranges, so a test can
    push a price of 1.5 through the normal path to see a consumer reject it. `unique` makes the
    default tx hash unique.
    """
    if not isinstance(item, Mapping):
        raise TradeInputError("each trade must be a JSON object")
    _check_types(item)
    if "shares_normalized" in item:
        normalized = float(item["shares_normalized"])
        shares = item.get("shares", raw_shares(normalized))
    else:
        shares = item.get("shares", 10 * SHARE_SCALE)
        normalized = shares / SHARE_SCALE
    user = item.get("user", INJECT_USER)
    token_id = item.get("token_id", INJECT_TOKEN)
    side = item.get("side", "BUY")
    tx_hash = item.get("tx_hash", sha256_hex(f"inject|{unique}"))
    template = TradeTemplate(
        token_id=token_id,
        token_label=item.get("token_label", "Yes"),
        side=side,
        market_slug=item.get("market_slug", INJECT_SLUG),
        condition_id=item.get("condition_id", INJECT_CONDITION),
        shares=shares,
        shares_normalized=normalized,
        price=item.get("price", 0.5),
        tx_hash=tx_hash,
        title=item.get("title", "Simulated market"),
        order_hash=item.get(
            "order_hash", synthetic_order_hash(tx_hash, user, token_id, side, shares)
        ),
        user=user,
        taker=item.get("taker", EXCHANGE_ADDRESS),
        maker=item.get("maker", False),
    )
    return Injected(
        template, item.get("timestamp"), item.get("block_number"), item.get("log_index")
    )
