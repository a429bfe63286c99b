"""The store on real Redis and Postgres: entries XADDed -> rows, replays, dead letters, replicas,
reclaim of abandoned entries.

Shared with `test_store_outage.py`: `store_settings`, `running_store`, `wait_until`, `xadd_all`,
`settled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.store.main import Store
from services.store.settings import StoreSettings
from shared.models import OrderFill
from shared.redis_streams import encode, entry_position
from shared.streams import STORE_GROUP, Streams
from tests.test_store_rows import EXCHANGE_TS, WALLET, make_fill, make_signal

pytestmark = pytest.mark.integration

WAIT_S = 20.0


def store_settings(
    redis_url: str, database_url: str, namespace: str, **overrides: Any
) -> StoreSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "database_url": database_url,
        "stream_namespace": namespace,
        "ops_port": 0,
        "store_block_ms": 20,
        "store_retry_min_s": 0.05,
        "store_retry_max_s": 0.4,
        "store_db_timeout_s": 3.0,
        "store_claim_every_s": 0.2,
        "store_shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return StoreSettings(**values)


@contextlib.asynccontextmanager
async def running_store(
    settings: StoreSettings, consumer: str | None = None
) -> AsyncIterator[Store]:
    store = Store(settings, consumer)
    await store.start()
    try:
        yield store
    finally:
        await store.stop()


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, within_s: float = WAIT_S
) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def xadd_all(client: aioredis.Redis, stream: str, items: Sequence[Any]) -> list[str]:
    """XADD each item (a model, or raw entry fields) in order; returns the entry ids."""
    async with client.pipeline(transaction=False) as pipe:
        for item in items:
            fields: Any = item if isinstance(item, dict) else encode(item)
            pipe.xadd(stream, fields)
        ids = await pipe.execute()
    return [entry_id.decode() for entry_id in ids]


async def settled(client: aioredis.Redis, stream: str) -> bool:
    """True once group `store` has read everything in the stream and holds nothing pending."""
    for group in await client.xinfo_groups(stream):
        if group["name"] == STORE_GROUP.encode():
            return group["pending"] == 0 and group["lag"] == 0
    return False


async def count(database_url: str, table: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def dead_letters(client: aioredis.Redis, stream: str) -> list[tuple[bytes, Any]]:
    entries: Any = await client.xrange(stream)
    return list(entries)


def has_rows(database_url: str, table: str, expected: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await count(database_url, table) >= expected

    return check


def metric(name: str, table: str, **labels: str) -> float:
    return (
        REGISTRY.get_sample_value(f"betterbot_store_{name}_total", {"table": table, **labels})
        or 0.0
    )


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def test_orders_and_signals_become_rows_with_their_values(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    fills = [make_fill(i) for i in range(30)]
    signals = [make_signal(i) for i in range(5)]
    async with running_store(store_settings(redis_url, database_url, namespace)) as store:
        order_ids = await xadd_all(redis_client, streams.orders_raw, fills)
        signal_ids = await xadd_all(redis_client, streams.signals, signals)
        await wait_until(has_rows(database_url, "orders", 30), "30 orders")
        await wait_until(has_rows(database_url, "signals", 5), "5 signals")
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "orders acked")
        await wait_until(lambda: settled(redis_client, streams.signals), "signals acked")
        ok, details = await store.health()
        assert ok and details["postgres"] == "up" and details["schema"] == "005"

    order = (
        await fetch(database_url, "SELECT * FROM orders WHERE order_key = $1", fills[7].order_key)
    )[0]
    expected: OrderFill = fills[7]
    status_ms, status_seq = entry_position(order_ids[7])
    assert dict(order) | {"stored_at": None, "payload": None} == {
        "order_key": expected.order_key,
        "wallet": WALLET,
        "token_id": expected.token_id,
        "token_label": "No",
        "side": "BUY",
        "market_slug": "market-1",
        "condition_id": f"0x{1:064x}",
        "title": "Market 1?",
        "shares": Decimal(9_000_007),
        "shares_normalized": expected.shares_normalized,
        "price": 0.56,
        "notional_usd": expected.notional_usd,
        "tx_hash": expected.tx_hash,
        "order_hash": expected.order_hash,
        "taker": expected.taker,
        "block_number": 78_000_007,
        "log_index": 7,
        "exchange_ts": utc(EXCHANGE_TS + 7),
        "received_at": utc(expected.received_at),
        "source": "dome_ws",
        "v": 1,
        "stored_at": None,
        "payload": None,
        "status": "confirmed",
        "status_reason": "",
        "status_ms": status_ms,
        "status_seq": status_seq,
        "newest_ms": status_ms,
        "newest_seq": status_seq,
    }
    assert orjson.loads(order["payload"]) == expected.model_dump(mode="json")
    assert order["stored_at"] >= order["received_at"]

    rows = await fetch(database_url, "SELECT * FROM signals ORDER BY detected_at")
    by_id = {row["signal_id"]: row for row in rows}
    for sig, stream_id in zip(signals, signal_ids, strict=True):
        row = by_id[sig.signal_id]
        got = {
            k: row[k]
            for k in (
                "kind",
                "wallet",
                "wallet_label",
                "market_slug",
                "title",
                "condition_id",
                "token_id",
                "token_label",
                "side",
                "price",
                "shares",
                "notional_usd",
                "confidence",
                "reasons",
                "order_keys",
                "source",
                "stream_id",
            )
        }
        assert got == {
            "kind": "whale_order",
            "wallet": sig.wallet,
            "wallet_label": "whale one",
            "market_slug": sig.market_slug,
            "title": sig.title,
            "condition_id": sig.condition_id,
            "token_id": sig.token_id,
            "token_label": sig.token_label,
            "side": sig.side.value,
            "price": sig.price,
            "shares": sig.shares,
            "notional_usd": sig.notional_usd,
            "confidence": 0.75,
            "reasons": sig.reasons,
            "order_keys": sig.order_keys,
            "source": "dome_ws",
            "stream_id": stream_id,
        }
        assert (row["exchange_ts"], row["received_at"], row["detected_at"]) == (
            utc(sig.exchange_ts),
            utc(sig.received_at),
            utc(sig.detected_at),
        )
        assert orjson.loads(row["payload"]) == sig.model_dump(mode="json")


async def test_a_replayed_batch_is_stored_once(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    fills = [make_fill(i) for i in range(50)]
    signals = [make_signal(i) for i in range(5)]
    inserted, duplicates = metric("rows_inserted", "orders"), metric("duplicates_skipped", "orders")
    async with running_store(store_settings(redis_url, database_url, namespace)):
        await xadd_all(redis_client, streams.orders_raw, fills)
        first_ids = await xadd_all(redis_client, streams.signals, signals)
        await wait_until(has_rows(database_url, "orders", 50), "50 orders")
        await wait_until(has_rows(database_url, "signals", 5), "5 signals")
        # The same entries again, as a producer retrying after a crash would write them.
        await xadd_all(redis_client, streams.orders_raw, fills)
        await xadd_all(redis_client, streams.signals, signals)
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "replay acked")
        await wait_until(lambda: settled(redis_client, streams.signals), "replay acked")

    assert await count(database_url, "orders") == 50
    assert await count(database_url, "signals") == 5
    assert metric("rows_inserted", "orders") - inserted == 50
    assert metric("duplicates_skipped", "orders") - duplicates == 50
    stored_ids = {r["stream_id"] for r in await fetch(database_url, "SELECT * FROM signals")}
    assert stored_ids == set(first_ids)  # the first delivery's stream id is kept


async def test_bad_entries_are_dead_lettered_with_a_reason_and_acked(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    good = [make_fill(i) for i in range(5)]
    with_junk = {**make_fill(104).model_dump(mode="json"), "note": "\u0000"}
    bad_entries: list[tuple[Any, str]] = [
        ({b"junk": b"1"}, "no 'data' field"),
        ({b"data": b"\xff\xfe"}, "not JSON"),
        (
            {b"data": orjson.dumps({**good[0].model_dump(mode="json"), "price": 7})},
            "price: Input should be less than or equal to 1",
        ),
        # Valid for the contract, refused by Postgres: caught by the row-by-row pass.
        (make_fill(101, block_number=2**63), "value out of int64 range"),
        (make_fill(102, title="nul \x00 byte"), "CharacterNotInRepertoireError"),
        ({b"data": orjson.dumps(with_junk)}, "UntranslatableCharacterError"),
    ]
    # Written before the store starts, so all of them arrive in one batch.
    ids = await xadd_all(
        redis_client,
        streams.orders_raw,
        [good[0], good[1], *[item for item, _ in bad_entries], *good[2:]],
    )
    bad_ids = ids[2 : 2 + len(bad_entries)]
    invalid = metric("dead_lettered", "orders", reason="invalid")
    refused = metric("dead_lettered", "orders", reason="rejected")
    async with running_store(store_settings(redis_url, database_url, namespace)):
        await wait_until(has_rows(database_url, "orders", 5), "the good orders")
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "all acked")
        await wait_until(
            lambda: _length(redis_client, streams.orders_dead, len(bad_entries)), "the dead letters"
        )

    keys = {r["order_key"] for r in await fetch(database_url, "SELECT order_key FROM orders")}
    assert keys == {fill.order_key for fill in good}
    dead = await dead_letters(redis_client, streams.orders_dead)
    by_entry = {}
    for _, fields in dead:
        reason = fields[b"reason"].decode()
        by_entry[reason.rsplit("(entry ", 1)[1].rstrip(")")] = (reason, fields)
    assert set(by_entry) == set(bad_ids)
    for entry_id, (item, expected_reason) in zip(bad_ids, bad_entries, strict=True):
        reason, fields = by_entry[entry_id]
        assert expected_reason in reason
        raw = item[b"data"] if isinstance(item, dict) and b"data" in item else None
        if raw is not None:
            assert fields[b"raw"] == raw
        assert fields[b"origin"] == b"store"
    assert metric("dead_lettered", "orders", reason="invalid") - invalid == 3
    assert metric("dead_lettered", "orders", reason="rejected") - refused == 3


async def _length(client: aioredis.Redis, stream: str, expected: int) -> bool:
    return int(await client.xlen(stream)) >= expected


async def test_two_instances_in_one_group_store_each_row_once(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    settings = store_settings(redis_url, database_url, namespace, store_batch_max=50)
    handled: dict[str, int] = {}
    duplicates = metric("duplicates_skipped", "orders")
    async with running_store(settings, "store-a") as a, running_store(settings, "store-b") as b:
        for store in (a, b):
            _count_entries(store, handled)
        for chunk in range(30):
            await xadd_all(
                redis_client, streams.orders_raw, [make_fill(chunk * 100 + i) for i in range(100)]
            )
            await asyncio.sleep(0.01)
        await wait_until(has_rows(database_url, "orders", 3000), "3000 orders")
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "all acked")

    assert await count(database_url, "orders") == 3000
    assert sum(handled.values()) == 3000, handled  # no entry went to both
    assert handled["store-a"] > 0 and handled["store-b"] > 0, handled
    assert metric("duplicates_skipped", "orders") - duplicates == 0


def _count_entries(store: Store, handled: dict[str, int]) -> None:
    """Count what each instance's batches held, by wrapping its own `BatchStore.store`."""
    original = store.batches.store
    handled[store.consumer] = 0

    async def counting(feed: Any, entries: Any) -> Any:
        handled[store.consumer] += len(entries)
        return await original(feed, entries)

    store.batches.store = counting  # type: ignore[method-assign]


async def test_entries_left_by_a_dead_consumer_are_reclaimed(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    fills = [make_fill(i) for i in range(20)]
    await redis_client.xgroup_create(streams.orders_raw, STORE_GROUP, id="0", mkstream=True)
    await xadd_all(redis_client, streams.orders_raw, fills)
    # A consumer reads them and dies before storing or acking anything.
    await redis_client.xreadgroup(STORE_GROUP, "crashed", {streams.orders_raw: ">"}, count=100)
    labels = {"group": STORE_GROUP, "stream": streams.orders_raw}
    reclaimed = REGISTRY.get_sample_value("betterbot_consumer_entries_reclaimed_total", labels)
    settings = store_settings(redis_url, database_url, namespace, store_claim_idle_ms=200)
    async with running_store(settings):
        await wait_until(has_rows(database_url, "orders", 20), "the abandoned orders")
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "all acked")
    after = REGISTRY.get_sample_value("betterbot_consumer_entries_reclaimed_total", labels)
    assert (after or 0) - (reclaimed or 0) == 20
    assert await count(database_url, "orders") == 20


async def test_a_batch_that_keeps_failing_is_dead_lettered_after_max_deliveries(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    settings = store_settings(
        redis_url, database_url, namespace, store_claim_idle_ms=100, store_max_deliveries=3
    )
    async with running_store(settings) as store:
        original = store.db.write

        async def broken_for_signals(table: Any, rows: Any) -> Any:
            if table.name == "signals":
                raise RuntimeError("a bug in the signal path")
            return await original(table, rows)

        store.db.write = broken_for_signals  # type: ignore[method-assign]
        await xadd_all(redis_client, streams.signals, [make_signal(1)])
        await xadd_all(redis_client, streams.orders_raw, [make_fill(1)])
        await wait_until(lambda: _length(redis_client, streams.signals_dead, 1), "dead letter")
        await wait_until(lambda: settled(redis_client, streams.signals), "the signal acked")
        await wait_until(has_rows(database_url, "orders", 1), "the order, unaffected")
    [(_, fields)] = await dead_letters(redis_client, streams.signals_dead)
    assert (
        b"(STORE_MAX_DELIVERIES 3); last error: RuntimeError: a bug in the signal path"
        in (fields[b"reason"])
    )
    assert int(fields[b"deliveries"]) > 3
    assert orjson.loads(fields[b"raw"])["signal_id"] == make_signal(1).signal_id


async def test_stop_stores_entries_delivered_to_it_but_not_handled(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    settings = store_settings(redis_url, database_url, namespace)
    async with running_store(settings, "store-x"):
        # What a read in flight at shutdown leaves behind: entries delivered to this consumer
        # that no handler saw. Read here on its behalf, in one MULTI with the XADDs so that its
        # own blocked read cannot get them first.
        async with redis_client.pipeline(transaction=True) as pipe:
            for i in range(10):
                fields: Any = encode(make_fill(i))
                pipe.xadd(streams.orders_raw, fields)
            pipe.xreadgroup(STORE_GROUP, "store-x", {streams.orders_raw: ">"}, count=10)
            *_, delivered = await pipe.execute()
        assert len(delivered[0][1]) == 10
        await asyncio.sleep(0.2)
        assert await count(database_url, "orders") == 0  # no handler saw them
    assert await count(database_url, "orders") == 10
    assert await settled(redis_client, streams.orders_raw)
    consumers = await redis_client.xinfo_consumers(streams.orders_raw, STORE_GROUP)
    assert [c["name"] for c in consumers] == []  # it left the group, holding nothing


async def test_a_group_lost_with_redis_data_is_made_again_and_consuming_goes_on(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    async with running_store(store_settings(redis_url, database_url, namespace)) as store:
        assert (await store.health())[0]
        # What a Redis restarted without its data looks like: no stream, no group.
        await redis_client.delete(streams.signals)
        await xadd_all(redis_client, streams.signals, [make_signal(7)])
        await wait_until(has_rows(database_url, "signals", 1), "the signal, stored")
        assert (await store.health())[0]
