"""What should have come out of a run, and what did.

Orders: the simulator's ground truth (`GET /_sim/trades`, every trade it emitted), kept for the
tracked wallets, each identified by its `order_key` as every source computes it.

Signals: the detector's own pure rules (`services.detector.serial.SerialDetector`, the semantics
every number of replicas must reproduce) run over `orders.raw` in stream order. Stream order, not
tape order: after a reconnect the backfill publishes missed trades late, and the rules (cooldowns,
consensus windows) depend on the order the detector sees; whether every trade reached
`orders.raw` at all is the orders check. A fault-free run of the same tape gives the same set.

With partitions (`STREAM_PARTITIONS` > 1) every fill is once on its wallet partition, and a BUY
also on its token partition; each partition is a detector lane with its share of the rules
(`Streams.lanes()`): whale, entry and exit on a wallet partition, consensus on a token partition.
The two shares never read each other's state (`rules.decide`), so the rules over one lane's
stream in its order, keeping that lane's share of the signals, are exactly what the lane must
emit; the expected set is the union over the lanes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import ValidationError

from services.detector.serial import SerialDetector
from services.detector.settings import DetectorSettings
from shared.models import OrderFill, Signal, SignalKind, TrackedWallet, order_key
from shared.streams import Scope, Streams

PAGE = 5000


def expected_order_keys(trades: list[dict[str, Any]], wallets: list[TrackedWallet]) -> set[str]:
    """The order_keys of the tracked wallets' trades, identical fills of one transaction told
    apart by their occurrence (`shared.models.occurrences`: the n-th identical one gets n), and
    without the trades a simulator quirk stamped wrongly (`quirk`: they must be dead-lettered)."""
    tracked = {w.address for w in wallets}
    seen: Counter[str] = Counter()
    keys: set[str] = set()
    for t in trades:
        base = base_key_of(t)
        occurrence = seen[base]
        seen[base] += 1
        if str(t["user"]).lower() not in tracked or t.get("quirk"):
            continue
        keys.add(
            order_key(
                t["tx_hash"],
                t["user"],
                t["token_id"],
                t["side"],
                t["shares_normalized"],
                t["price"],
                occurrence=occurrence,
            )
        )
    return keys


def base_key_of(t: dict[str, Any]) -> str:
    return order_key(
        t["tx_hash"], t["user"], t["token_id"], t["side"], t["shares_normalized"], t["price"]
    )


def fill_base_key(fill: OrderFill) -> str:
    """A published fill's key before its occurrence: what `base_key_of` gives its trade."""
    return order_key(
        fill.tx_hash, fill.user, fill.token_id, fill.side, fill.shares_normalized, fill.price
    )


def quirk_trades(
    trades: list[dict[str, Any]], wallets: list[TrackedWallet]
) -> list[dict[str, Any]]:
    """The tracked wallets' trades a simulator quirk stamped wrongly (ms or future timestamps):
    each must end in `orders.dead`, never in `orders.raw`."""
    tracked = {w.address for w in wallets}
    return [t for t in trades if t.get("quirk") and str(t["user"]).lower() in tracked]


async def read_stream(client: aioredis.Redis, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """Every entry of a stream, oldest first."""
    entries: list[tuple[str, dict[bytes, bytes]]] = []
    start = "-"
    while batch := await client.xrange(stream, min=start, max="+", count=PAGE):
        entries += [(_text(entry_id), _fields(fields)) for entry_id, fields in batch]
        if len(batch) < PAGE:
            break
        ms, _, seq = entries[-1][0].partition("-")
        start = f"{ms}-{int(seq) + 1}"
    return entries


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _fields(fields: Any) -> dict[bytes, bytes]:
    return {_bytes(k): _bytes(v) for k, v in (fields or {}).items()}


def in_scope(signal: Signal, scope: Scope) -> bool:
    """Whether a lane of `scope` emits this signal: consensus on token lanes, the rest on wallet
    lanes, all on the one lane without partitions."""
    if scope is Scope.ALL:
        return True
    return (signal.kind is SignalKind.CONSENSUS) == (scope is Scope.TOKEN)


@dataclass
class StreamTruth:
    # Every fill once, in stream order: `orders.raw`, or its wallet partitions one after another.
    orders: list[OrderFill]
    order_key_repeats: int
    unreadable_orders: int
    signal_ids: list[str]
    signals: dict[str, dict[str, Any]]
    # What each detector lane read, in its order (None: `orders` is the one lane's stream).
    lanes: list[tuple[Scope, list[OrderFill]]] | None = field(default=None)

    def describe(self, signal_id: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """A signal (as the detector wrote it, unless given), with where its orders sit on
        `orders.raw`."""
        payload = payload or self.signals.get(signal_id, {})
        position = {o.order_key: n for n, o in enumerate(self.orders)}
        return {
            "signal_id": signal_id,
            **{k: payload.get(k) for k in ("kind", "wallet", "token_id", "side", "exchange_ts")},
            "orders_at": [position.get(k) for k in payload.get("order_keys") or ()],
        }

    def expected_signals(self, wallets: list[TrackedWallet]) -> dict[str, Signal]:
        expected: dict[str, Signal] = {}
        for scope, orders in self.lanes or [(Scope.ALL, self.orders)]:
            detector = SerialDetector(wallets, DetectorSettings().rules())
            for order in orders:
                signals = detector.process(order)
                expected.update((s.signal_id, s) for s in signals if in_scope(s, scope))
        return expected


async def read_fills(client: aioredis.Redis, stream: str) -> tuple[list[OrderFill], int]:
    """The fills of an order stream, oldest first, and how many entries were no fill."""
    fills: list[OrderFill] = []
    unreadable = 0
    for _, fields in await read_stream(client, stream):
        try:
            fills.append(OrderFill.model_validate_json(fields[b"data"]))
        except (KeyError, ValidationError):
            unreadable += 1
    return fills, unreadable


def _repeats(orders: Iterable[OrderFill]) -> int:
    return sum(n - 1 for n in Counter(order.order_key for order in orders).values())


async def stream_truth(client: aioredis.Redis, streams: Streams) -> StreamTruth:
    lanes: list[tuple[Scope, list[OrderFill]]] = []
    unreadable = 0
    for lane in streams.lanes():
        fills, bad = await read_fills(client, lane.stream)
        lanes.append((lane.scope, fills))
        unreadable += bad
    orders = [fill for scope, fills in lanes if scope is not Scope.TOKEN for fill in fills]
    # A fill twice on the order streams, or twice on its token partition.
    repeats = _repeats(orders) + sum(
        _repeats(fills) for scope, fills in lanes if scope is Scope.TOKEN
    )
    signal_ids, signals = [], {}
    for _, fields in await read_stream(client, streams.signals):
        try:
            payload = orjson.loads(fields[b"data"])
            signal_ids.append(str(payload["signal_id"]))
        except (KeyError, TypeError, orjson.JSONDecodeError):
            continue
        signals[signal_ids[-1]] = payload
    return StreamTruth(
        orders=orders,
        order_key_repeats=repeats,
        unreadable_orders=unreadable,
        signal_ids=signal_ids,
        signals=signals,
        lanes=lanes if streams.partitioned else None,
    )
