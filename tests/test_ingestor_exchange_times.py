"""Implausible exchange times (issue 16): a fill stamped in milliseconds or far in the future is
dead-lettered with the reason by every source (WebSocket frames, Dome REST and Data API rows, the
chain's blocks), and never reaches `orders.raw`, a watermark or the detector. The simulator stamps
such trades on purpose (`SIM_MS_TIMESTAMP_EVERY`, `SIM_FUTURE_TIMESTAMP_EVERY`); its ground truth
names them (`quirk`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from eth_abi import encode

from services.ingestor.chain.events import V2_EXCHANGES, V2_TOPIC, pad_address
from services.ingestor.chain.markets import TokenMarket
from services.ingestor.chain.source import ChainSettings, Header, PolygonSource
from services.ingestor.frames import Fill, Rejected, RejectKind, parse_frame
from shared.models import OrderFill
from shared.orders_raw import watermark_key
from shared.streams import Streams
from tests.helpers.ingestion import (
    WALLETS,
    Sim,
    ingestor_settings,
    raw_payloads,
    running,
    simulator,
    subscribed,
    truth_key,
    until,
)

NOW = 1_765_000_000.0
TOKEN = "80311845198420617467056376519440384952587327936553290283547416181426565580659"


def test_bounds_say_what_is_wrong_with_a_time() -> None:
    from shared.models import ExchangeTimeBounds

    bounds = ExchangeTimeBounds(max_future_s=300, min_ts=1_577_836_800)
    assert bounds.problem(int(NOW), NOW) is None
    assert bounds.problem(int(NOW) + 300, NOW) is None  # clock skew inside the bound
    ms = bounds.problem(int(NOW) * 1000, NOW)
    assert ms is not None and "looks like milliseconds" in ms and "2025-12-06" in ms
    ahead = bounds.problem(int(NOW) + 3600, NOW)
    assert ahead is not None and "3,600 s after the fill was received" in ahead
    assert "EXCHANGE_TS_MAX_FUTURE_S" in ahead
    old = bounds.problem(1_000, NOW)
    assert old is not None and "before 2020-01-01" in old and "EXCHANGE_TS_MIN" in old
    micro = bounds.problem(int(NOW) * 1_000_000, NOW)
    assert micro is not None and "out of the calendar" in micro


def event(timestamp: int, **changes: Any) -> bytes:
    data = {
        "token_id": TOKEN,
        "side": "BUY",
        "shares": 9_000_000,
        "shares_normalized": 9,
        "price": 0.56,
        "tx_hash": "0x" + "ac" * 32,
        "timestamp": timestamp,
        "user": WALLETS[0],
        **changes,
    }
    return orjson.dumps({"type": "event", "subscription_id": "sub_1", "data": data})


def test_a_feed_event_stamped_in_milliseconds_or_the_future_is_rejected_with_the_reason() -> None:
    from shared.models import ExchangeTimeBounds

    def parse(raw: bytes) -> object:
        return parse_frame(raw, tracked={WALLETS[0]}, received_at=NOW, max_bytes=1 << 20)

    assert isinstance(parse(event(int(NOW) - 2)), Fill)
    for stamp, words in ((int(NOW) * 1000, "milliseconds"), (int(NOW) + 7200, "after the fill")):
        result = parse(event(stamp))
        assert isinstance(result, Rejected), stamp
        assert result.kind is RejectKind.IMPLAUSIBLE_TIMESTAMP and words in result.reason
    # The bounds are settings: a wider one lets the same event through.
    wide = parse_frame(
        event(int(NOW) + 7200),
        tracked={WALLETS[0]},
        received_at=NOW,
        max_bytes=1 << 20,
        bounds=ExchangeTimeBounds(max_future_s=10_000),
    )
    assert isinstance(wide, Fill)


class ChainSink:
    def __init__(self) -> None:
        self.published: list[OrderFill] = []
        self.dead: list[str] = []

    async def publish_now(self, fills: list[OrderFill]) -> int:
        self.published += fills
        return len(fills)

    async def submit_dead(self, raw: bytes, reason: str, source: str) -> None:
        self.dead.append(reason)


class Markets:
    async def describe(self, token_id: str) -> TokenMarket:
        return TokenMarket(condition_id="0x" + "11" * 32, market_slug="m", title="t")


def chain_log(block: int, log_index: int) -> dict[str, Any]:
    data = encode(
        ["uint8", "uint256", "uint256", "uint256", "uint256", "bytes32", "bytes32"],
        [0, int(TOKEN), 5_040_000, 9_000_000, 0, b"\0" * 32, b"\0" * 32],
    )
    return {
        "address": V2_EXCHANGES[0],
        "topics": [
            V2_TOPIC,
            "0x" + "9f" * 32,
            pad_address(WALLETS[0]),
            pad_address(V2_EXCHANGES[0]),
        ],
        "data": "0x" + data.hex(),
        "blockNumber": hex(block),
        "blockHash": "0x" + f"{block:064x}",
        "transactionHash": "0x" + f"{block:064x}",
        "logIndex": hex(log_index),
        "removed": False,
    }


async def test_a_block_stamped_in_the_future_is_dead_lettered_by_the_polygon_source() -> None:
    settings = ChainSettings(
        urls=("ws://127.0.0.1:1",),
        exchanges=V2_EXCHANGES,
        confirmations=0,
        max_wallets_per_filter=10,
        getlogs_max_blocks=10,
        stall_timeout_s=1,
        failback_after_s=1,
        initial_lookback_blocks=0,
        new_wallet_lookback_blocks=0,
        open_timeout_s=1,
        call_timeout_s=1,
        reconnect_min_s=0.1,
        reconnect_max_s=0.2,
        max_frame_bytes=1 << 20,
        max_lag_blocks=5,
    )
    sink = ChainSink()
    source = PolygonSource(settings, [WALLETS[0]], sink, Markets())  # type: ignore[arg-type]
    now = int(time.time())
    for number, stamp in ((10, now - 4), (11, now + 86_400), (12, now * 1000)):
        source._headers[number] = Header(number, "0x" + f"{number:064x}", stamp)
        await source._publish(None, chain_log(number, 0), {WALLETS[0]}, live=False)  # type: ignore[arg-type]
    assert [fill.block_number for fill in sink.published] == [10]
    assert len(sink.dead) == 2
    assert "implausible block time" in sink.dead[0] and "after the fill" in sink.dead[0]
    assert "milliseconds" in sink.dead[1]


def tape(path: Path, trades: int) -> Path:
    """A Data-API tape of `trades` trades by the example wallets, a second apart."""
    items = [
        {
            "proxyWallet": WALLETS[n % 4],
            "side": "BUY" if n % 3 else "SELL",
            "asset": TOKEN,
            "conditionId": "0x" + "5a" * 32,
            "size": 10.0 + n,
            "price": 0.5,
            "timestamp": 1_760_000_000 + n,
            "title": "A market",
            "slug": "a-market",
            "outcome": "Yes",
            "transactionHash": "0x" + f"{n + 1:064x}",
        }
        for n in range(trades)
    ]
    path.write_bytes(orjson.dumps(items))
    return path


async def quirky(sim: Sim) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ground truth of the tracked wallets: the trades stamped plainly, and the odd ones."""
    truth = [t for t in await sim.get("/_sim/trades") if t["user"] in WALLETS]
    return [t for t in truth if "quirk" not in t], [t for t in truth if "quirk" in t]


async def dead_letters(client: aioredis.Redis, streams: Streams) -> dict[str, list[str]]:
    """The tx hash of each dead letter, by the way it came: a WebSocket frame (`dome_ws`), a
    Data API row (`data_api`) or a Dome REST row (`dome_rest`)."""
    found: dict[str, list[str]] = {"dome_ws": [], "data_api": [], "dome_rest": []}
    for _, fields in await client.xrange(streams.orders_dead):
        raw, reason = orjson.loads(fields[b"raw"]), fields[b"reason"].decode()
        if reason.startswith("implausible_timestamp: "):
            found["dome_ws"].append(raw["data"]["tx_hash"])
        elif "transaction_hash" in raw:  # a /v2/trades row (v1 spelled it transactionHash)
            found["data_api"].append(raw["transaction_hash"])
        else:
            found["dome_rest"].append(raw["tx_hash"])
    return found


async def test_odd_timestamps_from_every_source_are_dead_lettered_once_and_move_no_watermark(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    streams: Streams,
    tmp_path: Path,
) -> None:
    overrides = {
        "sim_tape": tape(tmp_path / "tape.json", 15),
        "sim_ms_timestamp_every": 4,
        "sim_future_timestamp_every": 5,
        "sim_future_timestamp_s": 7200,
    }
    async with simulator(**overrides) as sim:
        settings = ingestor_settings(sim, redis_url, namespace, ingest_sources="dome_ws,data_api")
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await until(lambda: _tape_done(sim), what="tape played")
            plain, odd = await quirky(sim)
            assert {t["quirk"] for t in odd} == {"ms_timestamp", "future_timestamp"}
            odd_txs = sorted(t["tx_hash"] for t in odd)
            expected = sorted(truth_key(t) for t in plain)

            async def published() -> bool:
                keys = [p["order_key"] for p in await raw_payloads(redis_client, streams)]
                return sorted(keys) == expected

            async def dead_lettered() -> bool:
                dead = await dead_letters(redis_client, streams)
                return sorted(set(dead["dome_ws"])) == sorted(dead["data_api"]) == odd_txs

            await until(published, what="orders.raw holds every plainly stamped trade")
            await until(dead_lettered, what="each odd trade dead-lettered by both sources")
            polls = ingestor.pollers[0].polls
            await until(lambda: ingestor.pollers[0].polls >= polls + 8, what="more Data API polls")
        marks = await redis_client.hgetall(watermark_key(streams))
        dead = await dead_letters(redis_client, streams)
    # The Data API lists the odd trades on every poll: each was dead-lettered once all the same.
    assert sorted(dead["data_api"]) == odd_txs
    reasons = [f[b"reason"].decode() for _, f in await redis_client.xrange(streams.orders_dead)]
    assert any(r.startswith("implausible_timestamp: ") and "milliseconds" in r for r in reasons)
    assert any(
        r.startswith("invalid_item: ") and "after the fill was received" in r for r in reasons
    )
    # No watermark moved past the newest plainly stamped trade, let alone into the future.
    newest = max(t["timestamp"] for t in plain)
    assert marks and all(int(mark) <= newest for mark in marks.values())


async def _tape_done(sim: Sim) -> bool:
    return bool((await sim.status())["tape_done"])
