"""Identical fills in one transaction (issue 16): a maker whose two equal resting orders are hit by
one taker has two fills that agree on every field order_key is built from. Each must keep a key
of its own (the `occurrence`), and the same two keys must come from every source, so that a fill
read twice (WebSocket and backfill, Dome and the Data API, the chain) is still published once.

The rows below are built independently, as each service renders the same transaction: Dome's with
raw shares, log indexes and order hashes; the Data API's with float noise in size and price, a
mixed-case condition id and neither log index nor order hash; the chain's as OrderFilled logs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from services.ingestor.backfill import CatchUp
from services.ingestor.chain.events import decode_log
from services.ingestor.chain.markets import TokenMarket
from services.ingestor.chain.source import chain_order
from services.ingestor.frames import Fill, parse_frame
from services.ingestor.http_api import JsonApi
from services.ingestor.publisher import Publisher
from services.ingestor.ratelimit import RateLimiter
from services.ingestor.sources.data_api import DataApiHistory
from services.ingestor.sources.dome_rest import DomeRestHistory
from shared.models import OrderFill, Source, order_key
from shared.streams import Streams
from tests.helpers.ingestion import (
    WALLETS,
    Sim,
    ingestor_settings,
    raw_payloads,
    running,
    simulator,
    until,
)
from tests.test_ingestor_exchange_times import TOKEN, chain_log, tape

MAKER = WALLETS[0]
TX = "0x" + "3c" * 32
CONDITION = "0x5853E1C3B3E0B8AD2D6B9BBD0C7A7CDE6A6A5EC6E7A2E2E5B0C1D4A3F2E161BD"
HASHES = {5: "0x" + "a5" * 32, 7: "0x" + "a7" * 32}


def dome_row(log_index: int, ts: int) -> dict[str, Any]:
    """One fill as Dome's REST (and WebSocket `data`) renders it."""
    return {
        "token_id": TOKEN,
        "token_label": "No",
        "side": "BUY",
        "market_slug": "btc-updown-15m",
        "condition_id": CONDITION.lower(),
        "shares": 9_000_000,
        "shares_normalized": 9.0,
        "price": 0.56,
        "block_number": 79_000_123,
        "log_index": log_index,
        "tx_hash": TX,
        "title": "Bitcoin Up or Down",
        "timestamp": ts,
        "order_hash": HASHES[log_index],
        "user": MAKER,
        "taker": "0x" + "8d" * 20,
    }


def data_api_row(ts: int) -> dict[str, Any]:
    """The same fill as Polymarket's Data API renders it: its own names and float noise."""
    return {
        "proxyWallet": MAKER,
        "side": "BUY",
        "asset": TOKEN,
        "conditionId": CONDITION,
        "size": 8.999999999999998,
        "price": 0.5600000001,
        "timestamp": ts,
        "title": "Bitcoin Up or Down",
        "slug": "btc-updown-15m",
        "icon": "",
        "eventSlug": "",
        "outcome": "No",
        "outcomeIndex": 1,
        "name": "",
        "pseudonym": "",
        "transactionHash": TX,
    }


def api(source: str, base: str, answer: Any) -> JsonApi:
    return JsonApi(
        source,
        base,
        RateLimiter(1000, 10_000),
        timeout_s=5,
        transport=httpx.MockTransport(lambda request: httpx.Response(200, json=answer)),
    )


def reader(history: Any, publisher: Publisher) -> CatchUp:
    return CatchUp(
        history, publisher, feed="dome", overlap_s=120, initial_lookback_s=3600, backfill=True
    )


async def test_twins_keep_their_own_keys_and_match_across_every_source(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    ts = int(time.time()) - 30
    rest_answer = {
        "orders": [dome_row(7, ts), dome_row(5, ts)],
        "pagination": {"limit": 100, "offset": 0, "total": 2, "has_more": False},
    }
    dome = DomeRestHistory(api("dome_rest", "http://dome.test/v1", rest_answer), 100)
    page = {"data": [data_api_row(ts)] * 2, "pagination": {"next_cursor": None, "has_more": False}}
    data = DataApiHistory(api("data_api", "http://data.test", page), 100)
    publisher = Publisher(redis_client, streams, stream_maxlen=1000, dedupe_ttl_s=600)

    try:
        assert await reader(data, publisher).wallet(MAKER) == 2
        assert await reader(dome, publisher).wallet(MAKER) == 0  # both already published
    finally:
        await data.api.aclose()
        await dome.api.aclose()

    from services.ingestor.frames import Twins

    twins = Twins()
    live = []
    for log_index in (5, 7, 7):  # the last one a resend
        frame = orjson.dumps({"type": "event", "data": dome_row(log_index, ts)})
        parsed = parse_frame(
            frame, tracked={MAKER}, received_at=ts + 0.5, max_bytes=1 << 20, twins=twins
        )
        assert isinstance(parsed, Fill)
        live.append(parsed.fill)
    assert await publisher.publish_now(live) == 0

    on_chain = chain_keys(ts)
    payloads = await raw_payloads(redis_client, streams)
    assert len(payloads) == 2
    assert sorted(p["order_key"] for p in payloads) == sorted(on_chain)
    assert sorted(p["occurrence"] for p in payloads) == [0, 1]
    assert {p["source"] for p in payloads} == {"data_api"}
    assert {p["condition_id"] for p in payloads} == {CONDITION.lower()}
    assert [f.occurrence for f in live] == [0, 1, 1]
    assert {f.order_key for f in live} == set(on_chain)


def chain_keys(ts: int) -> list[str]:
    """The keys the polygon source gives the two OrderFilled logs of the transaction."""
    from tests.test_ingestor_polygon_units import source_for_units

    source = source_for_units()
    market = TokenMarket(condition_id=CONDITION.lower(), market_slug="btc-updown-15m")
    keys = []
    for log_index in (5, 7):
        log = chain_log(100, log_index) | {"transactionHash": TX}
        fill = decode_log(log)
        order = chain_order(fill, market, ts)
        keys.append(
            OrderFill.from_dome(order, Source.POLYGON, ts + 2.0, source._occurrence(fill)).order_key
        )
    return keys


def twin_truth(trades: list[dict[str, Any]]) -> list[str]:
    """The ground truth's keys, identical fills of one transaction counted in emission order."""
    counted: dict[str, int] = {}
    keys = []
    for trade in trades:
        base = order_key(
            trade["tx_hash"],
            trade["user"],
            trade["token_id"],
            trade["side"],
            trade["shares_normalized"],
            trade["price"],
        )
        occurrence = counted.get(base, 0)
        counted[base] = occurrence + 1
        keys.append(
            order_key(
                trade["tx_hash"],
                trade["user"],
                trade["token_id"],
                trade["side"],
                trade["shares_normalized"],
                trade["price"],
                occurrence,
            )
        )
    return sorted(keys)


async def test_the_simulators_twins_reach_orders_raw_once_each_through_both_listings(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    streams: Streams,
    tmp_path: Path,
) -> None:
    overrides = {
        "sim_tape": tape(tmp_path / "tape.json", 12),
        "sim_twin_every": 2,
        "sim_unstable_ties": True,
        "sim_wait_for_subscriber": False,
    }
    async with simulator(**overrides) as sim:
        await until(lambda: _tape_done(sim), what="tape played")
        truth = [t for t in await sim.get("/_sim/trades") if t["user"] in WALLETS]
        # Every second trade has a twin: the same transaction, wallet, token, size and price.
        assert len(truth) == 18 and len({base_key_of(t) for t in truth}) == 12
        assert len({t["order_hash"] for t in truth}) == 18
        expected = twin_truth(truth)
        settings = ingestor_settings(
            sim,
            redis_url,
            namespace,
            ingest_sources="dome_rest,data_api",
            dome_rest_page_limit=2,
            data_api_page_limit=3,
        )
        async with running(settings) as ingestor:
            await until(
                lambda: _published(redis_client, streams, expected), what="orders.raw == truth"
            )
            await until(lambda: all(p.polls >= 4 for p in ingestor.pollers), what="more polls")
        payloads = await raw_payloads(redis_client, streams)
    keys = [p["order_key"] for p in payloads]
    assert sorted(keys) == expected and len(keys) == len(set(keys))
    assert {p["source"] for p in payloads} <= {"dome_rest", "data_api"}
    assert sum(p["occurrence"] for p in payloads) == 6
    assert all(base_key_of(p) in {base_key_of(t) for t in truth} for p in payloads)


def base_key_of(fill: dict[str, Any]) -> str:
    return order_key(
        fill["tx_hash"],
        fill["user"],
        fill["token_id"],
        fill["side"],
        fill["shares_normalized"],
        fill["price"],
    )


async def _published(client: aioredis.Redis, streams: Streams, expected: list[str]) -> bool:
    return sorted(p["order_key"] for p in await raw_payloads(client, streams)) == expected


async def _tape_done(sim: Sim) -> bool:
    return bool((await sim.status())["tape_done"])


def test_an_outside_occurrence_is_ignored_and_the_base_key_is_the_plain_one() -> None:
    from shared.data_api import order_from_data_api
    from shared.models import FeedOrder, base_key

    order = FeedOrder.model_validate(dome_row(5, 1_760_000_000) | {"occurrence": 4})
    assert order.occurrence == 0
    assert base_key(order) == base_key(order_from_data_api(data_api_row(1_760_000_000)))
