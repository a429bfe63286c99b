"""The whole ingestor (real `ws_connection`, real Redis) against a small Predexon server written
here from feeds.md: greeting, acks with a channel, `event` and `trade` frames with hex log
indexes, pending then confirmed fills, a fee refund, twins, then an `ITEMS_LIMIT` refusal. The
tracked fills land in orders.raw exactly once per status, under one order_key per fill, as
`predexon`; the refusal is logged with its code and the setting to change, shown in the feed
status and the metrics, and followed by no hot reconnect. No log line, status or error holds the
key. A connection whose last wallet leaves is closed, not held open (Predexon would close it
after 120 s and it counts against the plan)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from services.ingestor.service import Ingestor
from services.ingestor.settings import IngestorSettings
from shared import wallet_registry
from shared.feed_status import ConnectionState
from shared.streams import Streams
from tests.helpers.ingestion import WALLETS, metric, raw_payloads, running, until

KEY = "pdx-itest-8e2c41b7d09f5a36"
TX = ["0x" + f"{n:02x}" * 32 for n in (0xA1, 0xB2, 0xC3)]
TOKEN = "80311845198420617467056376519440384952587327936553290283547416181426565580659"


@dataclass
class Provider:
    """A Dome-protocol server: acks each subscribe in its dialect, records what clients send,
    and sends what the test asks to every open connection."""

    dialect: str
    key: str
    paths: list[str] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    open: list[ServerConnection] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.paths.append(ws.request.path)
        if self.key not in ws.request.path:
            await ws.close(4001, "invalid api key")
            return
        self.open.append(ws)
        if self.dialect == "predexon":
            await ws.send('{"type":"connected","message":"Connected to Predexon WebSocket"}')
        try:
            async for raw in ws:
                request = orjson.loads(raw)
                self.received.append(request)
                if request.get("action") == "subscribe":
                    await ws.send(orjson.dumps(self._ack(f"sub_{next(self._ids)}")).decode())
        except ConnectionClosed:
            pass
        finally:
            self.open.remove(ws)
            self.closes.append((ws.close_code, ws.close_reason))

    def _ack(self, subscription_id: str) -> dict[str, Any]:
        if self.dialect == "polynode":
            return {
                "type": "subscribed",
                "subscription_id": subscription_id,
                "subscription_type": "dome",
                "warnings": ["since clamped to the plan's window"],
            }
        return {"type": "ack", "subscription_id": subscription_id, "channel": "trades"}

    async def send(self, *frames: str | bytes) -> None:
        for ws in list(self.open):
            for frame in frames:
                await ws.send(frame)

    def subscribes(self) -> list[dict[str, Any]]:
        return [r for r in self.received if r.get("action") == "subscribe"]


@contextlib.asynccontextmanager
async def provider(dialect: str, key: str) -> AsyncIterator[tuple[Provider, int]]:
    server = Provider(dialect, key)
    async with serve(server.handler, "127.0.0.1", 0) as listening:
        port = listening.sockets[0].getsockname()[1]
        yield server, port


def settings_for(
    redis_url: str, namespace: str, base_url: str, **overrides: Any
) -> IngestorSettings:
    values: dict[str, Any] = {
        "_env_file": None,
        "redis_url": redis_url,
        "stream_namespace": namespace,
        "dome_ws_url": base_url,
        "backfill_via": "off",
        "dome_reconnect_min_s": 0.05,
        "dome_reconnect_max_s": 1.0,
        "dome_plan_limit_wait_s": 30.0,
        "dome_close_timeout_s": 0.3,
        "status_interval_s": 0.05,
        "ops_port": 0,
        "shutdown_flush_timeout_s": 5,
        **overrides,
    }
    return IngestorSettings(**values)


def fill(tx: str, user: str, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "token_id": TOKEN,
        "token_label": "Yes",
        "side": "BUY",
        "market_slug": "btc-updown-15m-1762479900",
        "condition_id": "0x5853e1c3b3e0b8ad2d6b9bbd0c7a7cde6a6a5ec6e7a2e2e5b0c1d4a3f2e161bd",
        "shares": 4000000,
        "shares_normalized": 4,
        "price": 0.37,
        "tx_hash": tx,
        "title": "Bitcoin Up or Down",
        "timestamp": int(time.time()) - 3,
        "order_hash": "0x" + "7f" * 32,
        "user": user,
        "taker": "0xe111180000d2663c0091e4f400237545b87b996b",
        **fields,
    }
    return data


def predexon_event(
    data: dict[str, Any], status: str, log_index: int | None, kind: str = "event"
) -> str:
    extras = {
        "event_type": "order_filled",
        "status": status,
        "role": "maker",
        "fee": 0,
        "version": 2,
        "builder": "0x" + "00" * 32,
        "metadata": "0x" + "00" * 32,
        "outcome_index": 0,
        "is_neg_risk": False,
        "block_number": None if log_index is None else 78_100_000,
        "log_index": None if log_index is None else hex(log_index),
    }
    return orjson.dumps(
        {"type": kind, "subscription_id": "sub_1", "data": {**data, **extras}}
    ).decode()


def record_texts(records: list[logging.LogRecord]) -> list[str]:
    """What the ingestor logged (the test server's own request lines hold the key, by design)."""
    ours = [r for r in records if not r.name.startswith("websockets.server")]
    return [text for r in ours for text in (r.getMessage(), repr(r.__dict__))]


async def ingest_settled(client: aioredis.Redis, streams: Streams, count: int) -> list[Any]:
    """orders.raw once it holds `count` entries, and still `count` a moment later."""

    async def enough() -> bool:
        return len(await raw_payloads(client, streams)) >= count

    await until(enough, what=f"{count} entries in orders.raw")
    await asyncio.sleep(0.3)
    return await raw_payloads(client, streams)


async def connected(ingestor: Ingestor) -> None:
    def ready() -> bool:
        source = ingestor.websocket
        return bool(source and source.status.connected and source.status.subscriptions)

    await until(ready, what="subscribed")


async def test_predexon_fills_land_once_per_status_and_a_plan_refusal_is_reported(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with provider("predexon", KEY) as (server, port):
        settings = settings_for(
            redis_url,
            namespace,
            f"ws://127.0.0.1:{port}/v1",
            dome_dialect="predexon",
            predexon_api_key=KEY,
            predexon_status_all=True,
        )
        async with running(settings) as ingestor:
            await connected(ingestor)
            assert server.paths == [f"/v1/{KEY}"]
            assert server.subscribes()[0]["filters"]["status"] == "all"
            twins = [fill(TX[2], WALLETS[0], order_hash="0x" + h * 32) for h in ("a5", "a7")]
            await server.send(
                predexon_event(fill(TX[0], WALLETS[0]), "pending", None),
                predexon_event(fill(TX[0], WALLETS[0]), "confirmed", 0x2A),
                predexon_event(fill(TX[0], WALLETS[0]), "confirmed", 0x2A),  # a resend
                predexon_event(fill(TX[1], WALLETS[1], side="SELL"), "confirmed", 3, "trade"),
                orjson.dumps(
                    {
                        "type": "event",
                        "data": {**fill(TX[1], WALLETS[1]), "event_type": "fee_refund"},
                    }
                ).decode(),
                *(predexon_event(twin, "pending", None) for twin in twins),
                *(
                    predexon_event(twin, "confirmed", i)
                    for i, twin in ((9, twins[1]), (8, twins[0]))
                ),
            )
            entries = await ingest_settled(redis_client, streams, 7)
            refusals_before = metric(
                "betterbot_ingestor_provider_refusals_total", source="dome_ws", code="ITEMS_LIMIT"
            )
            await server.send('{"type":"error","code":"ITEMS_LIMIT","message":"plan allows 10"}')
            await until(lambda: not server.open, what="the client closed the refused connection")
            refused_at = time.monotonic()
            assert server.closes == [(1000, "refused: ITEMS_LIMIT")]
            assert ingestor.websocket is not None
            status = ingestor.websocket.status

            async def reported() -> bool:
                feed = await redis_client.hgetall(streams.feed_status_key())
                return b"ITEMS_LIMIT" in repr(feed).encode()

            await until(reported, what="the refusal in the feed status hash")
            assert "ITEMS_LIMIT" in status.last_error and "DOME_TIER" in status.last_error
            assert status.state is ConnectionState.DISCONNECTED
            # The first wait after a refusal is at least 3/4 of DOME_RECONNECT_MAX_S (1 s).
            while time.monotonic() - refused_at < 0.5:
                assert len(server.paths) == 1, "reconnected at once after a plan refusal"
                await asyncio.sleep(0.02)
            assert (
                metric(
                    "betterbot_ingestor_provider_refusals_total",
                    source="dome_ws",
                    code="ITEMS_LIMIT",
                )
                == refusals_before + 1
            )
            assert (
                metric(
                    "betterbot_ingestor_non_fill_events_total",
                    source="dome_ws",
                    event_type="fee_refund",
                )
                >= 1
            )
    by_key: dict[str, list[str]] = {}
    for entry in entries:
        assert entry["source"] == "predexon"
        by_key.setdefault(entry["order_key"], []).append(entry["status"])
    assert len(entries) == 7 and len(by_key) == 4
    assert Counter(tuple(sorted(statuses)) for statuses in by_key.values()) == {
        ("confirmed", "pending"): 3,  # TX[0] and the two twins
        ("confirmed",): 1,  # the `trade` frame
    }
    assert await redis_client.xlen(streams.orders_dead) == 0
    logged = [r for r in caplog.records if r.getMessage() == "provider_refused"]
    assert logged and logged[0].levelno == logging.ERROR
    assert "DOME_TIER" in repr(logged[0].__dict__)
    assert any(r.getMessage() == "server_greeting" for r in caplog.records)
    texts = [*record_texts(caplog.records), repr(status), repr(ingestor.statuses)]
    assert [t[:200] for t in texts if KEY in t] == []


async def test_a_connection_left_without_subscriptions_is_closed_not_held_open(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with provider("predexon", KEY) as (server, port):
        settings = settings_for(
            redis_url,
            namespace,
            f"ws://127.0.0.1:{port}/v1",
            dome_dialect="predexon",
            predexon_api_key=KEY,
        )
        async with running(settings) as ingestor:
            await connected(ingestor)
            for wallet in WALLETS:
                await wallet_registry.remove(redis_client, streams, wallet)
            await until(lambda: server.closes, what="the idle connection closed")
            assert server.closes == [(1000, "no subscriptions")]
            assert any(r.get("action") == "unsubscribe" for r in server.received)
            source = ingestor.websocket
            assert source is not None
            await until(lambda: source.status.state is ConnectionState.STOPPED)
            healthy, details = await ingestor.health()
            assert healthy, details
            await asyncio.sleep(0.3)
            assert len(server.paths) == 1, "reconnected with nothing to subscribe"
