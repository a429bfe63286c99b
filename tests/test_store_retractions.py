"""Statuses in the store (docs/streams.md, "Status"): a status change is a new entry with the same
`order_key` / `signal_id`; the store applies it to the stored row unless a newer entry of the row
was applied already, so a redelivered old entry never undoes a newer status. Then the history
API: `status` in every item and CSV row, and the `status` filter.

Entries go through the store's own batch handler (`BatchStore.store`) with explicit stream ids,
so the tests choose the order in which entries are redelivered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.store.batches import Feed, Outcome
from services.store.main import Store
from services.store.queries import ORDERS as ORDER_LISTING
from services.store.queries import SIGNALS as SIGNAL_LISTING
from services.store.queries import VALIDATION_COLUMNS, filters
from services.store.rows import ORDERS, SIGNALS, prepare
from shared.models import FillStatus, OrderFill, Signal
from shared.redis_streams import encode, entry_position
from shared.streams import Streams
from tests.test_store_api import Api, parse_csv, seed_file, serving
from tests.test_store_rows import entry, make_fill, make_signal
from tests.test_store_service import (
    fetch,
    metric,
    running_store,
    settled,
    store_settings,
    wait_until,
    xadd_all,
)

PENDING, CONFIRMED, RETRACTED = FillStatus.PENDING, FillStatus.CONFIRMED, FillStatus.RETRACTED
REORG = "reorg: block 78000001 replaced"


def with_status(item: Any, status: FillStatus, reason: str = "", **changes: Any) -> Any:
    """The entry a producer writes when the status of `item` changes (fields repeated)."""
    return item.model_copy(update={"status": status, "status_reason": reason, **changes})


def retraction(signal: Signal, reason: str = REORG) -> Signal:
    # A signal's retraction carries the time it was decided as its `detected_at`.
    return with_status(signal, RETRACTED, reason, detected_at=signal.detected_at + 30)


async def store_entries(store: Store, feed: Feed, *items: tuple[str, Any]) -> Outcome:
    """One batch, as the consumer runtime hands it over: (stream id, fields) in the given order."""
    entries: list[Any] = [(stream_id, encode(x)) for stream_id, x in items]
    return await store.batches.store(feed, entries)


async def status_of(database_url: str, table: str, key: str) -> tuple[str, str]:
    column = "order_key" if table == "orders" else "signal_id"
    [row] = await fetch(
        database_url, f"SELECT status, status_reason FROM {table} WHERE {column} = $1", key
    )
    return row["status"], row["status_reason"]


def changes(table: str, status: str) -> float:
    return metric("status_changes", table, status=status)


def latency_count() -> float:
    sample = REGISTRY.get_sample_value(
        "betterbot_signal_latency_seconds_count", {"since": "received"}
    )
    return sample or 0.0


@pytest.fixture
async def store(redis_url: str, database_url: str, namespace: str) -> AsyncIterator[Store]:
    async with running_store(store_settings(redis_url, database_url, namespace)) as running:
        yield running


def test_a_row_carries_its_status_and_the_position_of_its_entry() -> None:
    fill = with_status(make_fill(1), RETRACTED, REORG)
    [row] = prepare(ORDERS, [entry(fill, "1700000000000-4")]).rows
    values = dict(zip(ORDERS.columns, row.values, strict=True))
    assert (values["status"], values["status_reason"]) == ("retracted", REORG)
    assert (values["status_ms"], values["status_seq"]) == (1_700_000_000_000, 4)
    assert (values["newest_ms"], values["newest_seq"]) == (1_700_000_000_000, 4)
    # A status change of a key already in the batch is kept: it is an entry of its own.
    both = prepare(
        SIGNALS, [entry(make_signal(1), "1-0"), entry(retraction(make_signal(1)), "2-0")]
    )
    assert [row.stream_id for row in both.rows] == ["1-0", "2-0"] and both.valid == 2
    assert entry_position("9-0") < entry_position("10-0")


def test_the_status_filter_names_the_partial_index_predicate_when_it_can() -> None:
    def conditions(*statuses: str) -> tuple[list[str], list[Any]]:
        query = filters(ORDER_LISTING, statuses=statuses)
        return query.conditions, query.params

    assert conditions() == ([], [])
    assert conditions("pending", "confirmed", "retracted") == ([], [])
    assert conditions("confirmed") == (["status = ANY($1::text[])"], [["confirmed"]])
    assert conditions("retracted") == (
        ["status <> 'confirmed'", "status = ANY($1::text[])"],
        [["retracted"]],
    )


def test_only_confirmed_signals_feed_the_latency_histogram() -> None:
    before = latency_count()
    prepare(SIGNALS, [entry(make_signal(1), "1-0")])
    prepare(SIGNALS, [entry(with_status(make_signal(2), PENDING), "2-0")])
    prepare(SIGNALS, [entry(retraction(make_signal(1)), "3-0")])
    assert latency_count() - before == 1


@pytest.mark.integration
async def test_a_retraction_marks_the_stored_order_and_signal_with_its_reason(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    fills = [make_fill(i) for i in range(3)]
    signals = [make_signal(i) for i in range(3)]
    inserted = metric("rows_inserted", "orders")
    duplicates = metric("duplicates_skipped", "orders"), metric("duplicates_skipped", "signals")
    retracted = changes("orders", "retracted"), changes("signals", "retracted")
    async with running_store(store_settings(redis_url, database_url, namespace)):
        await xadd_all(redis_client, streams.orders_raw, fills)
        await xadd_all(redis_client, streams.signals, signals)
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "orders stored")
        await wait_until(lambda: settled(redis_client, streams.signals), "signals stored")
        await xadd_all(redis_client, streams.orders_raw, [with_status(fills[1], RETRACTED, REORG)])
        await xadd_all(redis_client, streams.signals, [retraction(signals[1])])
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "retraction stored")
        await wait_until(lambda: settled(redis_client, streams.signals), "retraction stored")

    assert await status_of(database_url, "orders", fills[1].order_key) == ("retracted", REORG)
    assert await status_of(database_url, "signals", signals[1].signal_id) == ("retracted", REORG)
    for untouched in (fills[0].order_key, fills[2].order_key):
        assert await status_of(database_url, "orders", untouched) == ("confirmed", "")
    # The row keeps the data it was stored with: only its status changed.
    [row] = await fetch(
        database_url, "SELECT detected_at FROM signals WHERE signal_id = $1", signals[1].signal_id
    )
    assert row["detected_at"].timestamp() == pytest.approx(signals[1].detected_at)
    assert metric("rows_inserted", "orders") - inserted == 3
    assert changes("orders", "retracted") - retracted[0] == 1
    assert changes("signals", "retracted") - retracted[1] == 1
    # A status change is not a duplicate.
    assert metric("duplicates_skipped", "orders") == duplicates[0]
    assert metric("duplicates_skipped", "signals") == duplicates[1]


@pytest.mark.integration
async def test_a_redelivered_older_entry_does_not_undo_a_newer_status(
    store: Store, database_url: str
) -> None:
    orders, signals = store.feeds
    fill, signal = make_fill(1), make_signal(1)
    await store_entries(store, orders, ("5-0", fill))
    await store_entries(store, signals, ("5-0", signal))
    await store_entries(store, orders, ("7-0", with_status(fill, RETRACTED, REORG)))
    await store_entries(store, signals, ("7-0", retraction(signal)))

    again = await store_entries(store, orders, ("5-0", fill))
    assert (again.inserted, again.status_changes, again.duplicates) == (0, 0, 1)
    await store_entries(store, signals, ("5-0", signal))
    assert await status_of(database_url, "orders", fill.order_key) == ("retracted", REORG)
    assert await status_of(database_url, "signals", signal.signal_id) == ("retracted", REORG)

    # Out of order across batches: the reinstatement (9-0) is stored before the retraction it
    # follows (8-0) is redelivered; by stream order the fill stands.
    other = make_fill(2)
    await store_entries(store, orders, ("5-1", other))
    await store_entries(store, orders, ("9-0", with_status(other, CONFIRMED)))
    late = await store_entries(store, orders, ("8-0", with_status(other, RETRACTED, REORG)))
    assert (late.status_changes, late.duplicates) == (0, 1)
    assert await status_of(database_url, "orders", other.order_key) == ("confirmed", "")


@pytest.mark.integration
async def test_a_retraction_before_its_original_inserts_a_retracted_row(
    store: Store, database_url: str
) -> None:
    orders, signals = store.feeds
    fill, signal = make_fill(3), make_signal(3)
    first = await store_entries(store, orders, ("7-0", with_status(fill, RETRACTED, REORG)))
    assert (first.inserted, first.status_changes, first.duplicates) == (1, 0, 0)
    await store_entries(store, signals, ("7-0", retraction(signal)))
    # The original, redelivered late (a reclaim), is older than the retraction: a duplicate.
    late = await store_entries(store, orders, ("5-0", fill))
    assert (late.inserted, late.status_changes, late.duplicates) == (0, 0, 1)
    await store_entries(store, signals, ("5-0", signal))

    assert await status_of(database_url, "orders", fill.order_key) == ("retracted", REORG)
    assert await status_of(database_url, "signals", signal.signal_id) == ("retracted", REORG)
    [row] = await fetch(database_url, "SELECT * FROM orders WHERE order_key = $1", fill.order_key)
    assert (row["wallet"], row["tx_hash"], row["price"]) == (fill.user, fill.tx_hash, fill.price)
    assert (row["status_ms"], row["status_seq"]) == (7, 0)


@pytest.mark.integration
async def test_a_confirmation_after_a_retraction_reinstates_the_row(
    store: Store, database_url: str
) -> None:
    orders, signals = store.feeds
    fill, signal = make_fill(4), make_signal(4)
    confirmed = changes("orders", "confirmed")
    await store_entries(store, orders, ("1-0", fill), ("2-0", with_status(fill, RETRACTED, REORG)))
    await store_entries(store, signals, ("1-0", signal), ("2-0", retraction(signal)))
    assert await status_of(database_url, "orders", fill.order_key) == ("retracted", REORG)

    # Included again by a later block: the same key, confirmed.
    back = await store_entries(store, orders, ("3-0", with_status(fill, CONFIRMED)))
    assert (back.inserted, back.status_changes, back.duplicates) == (0, 1, 0)
    await store_entries(store, signals, ("3-0", with_status(signal, CONFIRMED)))
    assert await status_of(database_url, "orders", fill.order_key) == ("confirmed", "")
    assert await status_of(database_url, "signals", signal.signal_id) == ("confirmed", "")
    assert changes("orders", "confirmed") - confirmed == 1
    [row] = await fetch(
        database_url,
        "SELECT status_ms, newest_ms FROM orders WHERE order_key = $1",
        fill.order_key,
    )
    assert (row["status_ms"], row["newest_ms"]) == (3, 3)


@pytest.mark.integration
async def test_every_entry_counts_once_when_a_batch_holds_a_key_several_times(
    store: Store, database_url: str
) -> None:
    orders, _ = store.feeds
    fill = make_fill(5)
    outcome = await store_entries(
        store,
        orders,
        ("1-0", with_status(fill, PENDING)),
        ("2-0", with_status(fill, PENDING)),  # the same status again: a duplicate
        ("3-0", fill),
        ("4-0", with_status(fill, RETRACTED, REORG)),
        ("4-1", make_fill(6)),
    )
    assert (outcome.inserted, outcome.status_changes, outcome.duplicates) == (2, 2, 1)
    assert await status_of(database_url, "orders", fill.order_key) == ("retracted", REORG)
    [row] = await fetch(
        database_url,
        "SELECT status_ms, newest_ms, newest_seq FROM orders WHERE order_key = $1",
        fill.order_key,
    )
    assert (row["status_ms"], row["newest_ms"], row["newest_seq"]) == (4, 4, 0)


@pytest.mark.integration
async def test_a_row_refused_by_postgres_leaves_the_status_changes_of_the_others(
    store: Store, database_url: str
) -> None:
    orders, _ = store.feeds
    fill = make_fill(7)
    await store_entries(store, orders, ("1-0", fill))
    outcome = await store_entries(
        store,
        orders,
        ("2-0", with_status(fill, RETRACTED, REORG)),
        ("2-1", make_fill(8, title="nul \x00 byte")),  # refused by Postgres: the row-by-row pass
    )
    assert (outcome.status_changes, outcome.dead_lettered, outcome.duplicates) == (1, 1, 0)
    assert await status_of(database_url, "orders", fill.order_key) == ("retracted", REORG)


# The history API


@dataclass
class Stored:
    api: Api
    fills: list[OrderFill]
    signals: list[Signal]


@pytest.fixture
async def stored(
    redis_url: str,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> AsyncIterator[Stored]:
    """Nine orders and nine signals: 0, 3, 6 confirmed; 1, 4, 7 pending; 2, 5, 8 retracted."""
    settings = store_settings(redis_url, database_url, namespace, wallets_file=seed_file(tmp_path))
    fills = [make_fill(i) for i in range(9)]
    signals = [make_signal(i) for i in range(9)]
    async with serving(settings) as api:
        orders, signal_feed = api.store.feeds
        await store_entries(api.store, orders, *statuses(fills, "=reorg"))
        await store_entries(api.store, signal_feed, *statuses(signals, "=reorg"))
        yield Stored(api, fills, signals)


def statuses(items: Sequence[Any], reason: str) -> list[tuple[str, Any]]:
    """Item i stored confirmed (i % 3 == 0), pending (1), or confirmed then retracted (2)."""
    entries: list[tuple[str, Any]] = []
    for i, item in enumerate(items):
        first = with_status(item, PENDING) if i % 3 == 1 else item
        entries.append((f"1-{i}", first))
        if i % 3 == 2:
            entries.append((f"2-{i}", with_status(item, RETRACTED, reason)))
    return entries


def keys_with(items: Sequence[Any], key: str, *remainders: int) -> set[str]:
    return {getattr(x, key) for i, x in enumerate(items) if i % 3 in remainders}


@pytest.mark.integration
async def test_the_listings_filter_by_status_and_serve_it(stored: Stored) -> None:
    client = stored.api.client
    for path, items, key in (
        ("/orders", stored.fills, "order_key"),
        ("/signals", stored.signals, "signal_id"),
    ):
        body = (await client.get(path)).json()
        by_key = {item[key]: item for item in body["items"]}
        assert set(by_key) == keys_with(items, key, 0, 1, 2)
        assert by_key[getattr(items[2], key)]["status"] == "retracted"
        assert by_key[getattr(items[2], key)]["status_reason"] == "=reorg"
        assert by_key[getattr(items[1], key)]["status"] == "pending"
        assert by_key[getattr(items[0], key)]["status"] == "confirmed"
        for params, remainders in (
            ({"status": "retracted"}, (2,)),
            ({"status": ["confirmed", "pending"]}, (0, 1)),
            ({"status": ["pending", "retracted"], "limit": 2}, (1, 2)),
            ({"status": ["pending", "confirmed", "retracted"]}, (0, 1, 2)),
        ):
            got: set[str] = set()
            query: dict[str, Any] = dict(params)
            while True:
                response = await client.get(path, params=query)
                assert response.status_code == 200, response.text
                page = response.json()
                assert {item["status"] for item in page["items"]} <= {
                    ("confirmed", "pending", "retracted")[r] for r in remainders
                }
                got |= {item[key] for item in page["items"]}
                if page["next_cursor"] is None:
                    break
                query["cursor"] = page["next_cursor"]
            assert got == keys_with(items, key, *remainders), (path, params)
        response = await client.get(path, params={"status": "gone"})
        assert response.status_code == 422


@pytest.mark.integration
async def test_csv_has_the_status_columns_last_and_neutralised(stored: Stored) -> None:
    client = stored.api.client
    for path, listing, key in (
        ("/orders", ORDER_LISTING, "order_key"),
        ("/signals", SIGNAL_LISTING, "signal_id"),
    ):
        pages: list[dict[str, Any]] = [{"format": "csv"}, {"format": "csv", "limit": 50}]
        # A signal's validation columns came later, so they follow (known columns keep places).
        after = VALIDATION_COLUMNS if listing is SIGNAL_LISTING else ()
        for params in pages:
            text = (await client.get(path, params={**params, "status": "retracted"})).text
            header = ",".join(("stored_at", "status", "status_reason", *after))
            assert text.split("\r\n")[0].endswith("," + header)
            assert listing.columns[-3 - len(after) :] == (
                "stored_at",
                "status",
                "status_reason",
                *after,
            )
            table = parse_csv(text)
            assert len(table) == 3
            assert {row["status"] for row in table} == {"retracted"}
            # Every text cell is neutralised, the reason too.
            assert {row["status_reason"] for row in table} == {"'=reorg"}
            assert all(row[key] for row in table)


@pytest.mark.integration
async def test_the_status_filter_is_in_the_openapi_document(stored: Stored) -> None:
    document = (await stored.api.client.get("/openapi.json")).json()
    for path in ("/orders", "/signals"):
        parameters = {p["name"]: p for p in document["paths"][path]["get"]["parameters"]}
        schema = parameters["status"]["schema"]
        assert "pending" in str(schema) and "retracted" in str(schema), schema
        assert parameters["status"]["description"]
    item = document["components"]["schemas"]["OrderItem"]["properties"]
    assert "status" in item and "status_reason" in item
