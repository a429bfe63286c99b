"""What should have come out of a run, and what did.

Orders: the simulator's ground truth (`GET /_sim/trades`, every trade it emitted), kept for the
tracked wallets, each identified by its `order_key` as every source computes it.

Signals: the detector's own pure rules (`services.detector.serial.SerialDetector`, the semantics
every number of replicas must reproduce) run over `orders.raw` in stream order. Stream order, not
tape order: after a reconnect the backfill publishes missed trades late, and the rules (cooldowns,
consensus windows) depend on the order the detector sees; whether every trade reached
`orders.raw` at all is the orders check. A fault-free run of the same tape gives the same set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import ValidationError

from services.detector.serial import SerialDetector
from services.detector.settings import DetectorSettings
from shared.models import OrderFill, Signal, TrackedWallet, order_key
from shared.streams import Streams

PAGE = 5000


def expected_order_keys(trades: list[dict[str, Any]], wallets: list[TrackedWallet]) -> set[str]:
    tracked = {w.address for w in wallets}
    return {
        order_key(
            t["tx_hash"], t["user"], t["token_id"], t["side"], t["shares_normalized"], t["price"]
        )
        for t in trades
        if str(t["user"]).lower() in tracked
    }


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


@dataclass
class StreamTruth:
    orders: list[OrderFill]
    order_key_repeats: int
    unreadable_orders: int
    signal_ids: list[str]
    signals: dict[str, dict[str, Any]]

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
        detector = SerialDetector(wallets, DetectorSettings().rules())
        return {s.signal_id: s for order in self.orders for s in detector.process(order)}


async def stream_truth(client: aioredis.Redis, streams: Streams) -> StreamTruth:
    orders: list[OrderFill] = []
    unreadable = 0
    for _, fields in await read_stream(client, streams.orders_raw):
        try:
            orders.append(OrderFill.model_validate_json(fields[b"data"]))
        except (KeyError, ValidationError):
            unreadable += 1
    keys = Counter(order.order_key for order in orders)
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
        order_key_repeats=sum(n - 1 for n in keys.values()),
        unreadable_orders=unreadable,
        signal_ids=signal_ids,
        signals=signals,
    )
