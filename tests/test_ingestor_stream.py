"""The ingestor end to end against real Redis and a small Dome-protocol WebSocket server of the
test's own (`FakeDome`): subscriptions and acks, fills on `orders.raw`, dedupe across reconnects,
rejected frames, reconnects, the key kept out of every log line, and the process's SIGTERM path.
FakeDome has no REST side, so gap backfill is off here (see test_ingestor_faults.py for it)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from devtools.servers import free_port
from services.ingestor.service import Ingestor, StartupError
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.ws_connection import DomeConnection
from shared.logs import JsonFormatter
from shared.models import order_key
from shared.streams import Streams
from shared.wallets import load_wallets
from tests.helpers.ingestion import until
from tests.helpers.processes import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-5f0c1e9a7b3d4c2e8f6a"
# In the registry's order (by address), which is the order the ingestor subscribes them in.
WALLETS = sorted(w.address for w in load_wallets(ROOT / "config" / "wallets.example.json"))
TRADES = [
    trade
    for trade in json.loads((ROOT / "data" / "polymarket_trades_nobel2025.json").read_bytes())
    if trade["proxyWallet"] in WALLETS
]
UNTRACKED_TRADE = next(
    trade
    for trade in json.loads((ROOT / "data" / "polymarket_trades_nobel2025.json").read_bytes())
    if trade["proxyWallet"] not in WALLETS
)
PER_SUBSCRIPTION = 7
CHUNKS = [
    tuple(WALLETS[start : start + PER_SUBSCRIPTION])
    for start in range(0, len(WALLETS), PER_SUBSCRIPTION)
]
MAX_FRAME = 4096


def dome_data(trade: dict[str, Any]) -> dict[str, Any]:
    """A Data-API trade from the tape as Dome's event `data`."""
    return {
        "token_id": trade["asset"],
        "token_label": trade["outcome"],
        "side": trade["side"],
        "market_slug": trade["slug"],
        "condition_id": trade["conditionId"],
        "shares": round(trade["size"] * 1_000_000),
        "shares_normalized": trade["size"],
        "price": trade["price"],
        "tx_hash": trade["transactionHash"],
        "title": trade["title"],
        "timestamp": trade["timestamp"],
        "order_hash": None,
        "user": trade["proxyWallet"],
        "taker": None,
    }


def event(trade: dict[str, Any] | None = None, subscription_id: str = "sub_1", **data: Any) -> str:
    payload = {**dome_data(trade or TRADES[0]), **data}
    return json.dumps({"type": "event", "subscription_id": subscription_id, "data": payload})


def expected_key(trade: dict[str, Any]) -> str:
    return order_key(
        trade["transactionHash"],
        trade["proxyWallet"],
        trade["asset"],
        trade["side"],
        trade["size"],
        trade["price"],
    )


class FakeDome:
    """Dome's WebSocket protocol, small: the key in the path, each subscribe acked with a new id in
    order; the test pushes frames, drops connections and rejects handshakes."""

    def __init__(self) -> None:
        self.url = ""
        self.reject_status: int | None = None
        self.rejected = 0
        self.subscribes: list[dict[str, Any]] = []
        self.ack_ids: list[str] = []
        self.connections: list[ServerConnection] = []
        self._ids = itertools.count(1)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.reject_status is not None:
            self.rejected += 1
            return connection.respond(self.reject_status, "invalid API key\n")
        if request.path != f"/{KEY}":
            return connection.respond(403, "unknown key\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        with contextlib.suppress(ConnectionClosed):
            await self._serve(ws)

    async def _serve(self, ws: ServerConnection) -> None:
        async for message in ws:
            request = json.loads(message)
            if request.get("action") == "subscribe":
                self.subscribes.append(request)
                subscription_id = f"sub_{next(self._ids)}"
                self.ack_ids.append(subscription_id)
                await ws.send(json.dumps({"type": "ack", "subscription_id": subscription_id}))

    async def send(self, *frames: str | bytes) -> None:
        for frame in frames:
            await self.connections[-1].send(frame, text=True)


@pytest.fixture
async def dome() -> AsyncIterator[FakeDome]:
    fake = FakeDome()
    # The server logs request lines (the key is in the path) at DEBUG; only the ingestor's own
    # lines are under test.
    quiet = logging.getLogger("tests.fake_dome")
    quiet.setLevel(logging.ERROR)
    async with serve(
        fake.handler,
        "127.0.0.1",
        0,
        process_request=fake.process_request,
        logger=quiet,
        max_size=None,
    ) as server:
        fake.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        yield fake


@pytest.fixture
def settings_for(redis_url: str, namespace: str, dome: FakeDome) -> Callable[..., IngestorSettings]:
    def make(**overrides: Any) -> IngestorSettings:
        values: dict[str, Any] = {
            "_env_file": None,
            "redis_url": redis_url,
            "stream_namespace": namespace,
            "dome_ws_url": dome.url,
            "dome_api_key": KEY,
            "dome_wallets_per_subscription": PER_SUBSCRIPTION,
            "dome_reconnect_min_s": 0.02,
            "dome_reconnect_max_s": 0.2,
            "dome_max_frame_bytes": MAX_FRAME,
            "status_interval_s": 0.05,
            "ops_port": 0,
            "shutdown_flush_timeout_s": 5,
            "backfill_via": "off",
            **overrides,
        }
        return IngestorSettings(**values)

    return make


@contextlib.asynccontextmanager
async def running(settings: IngestorSettings) -> AsyncIterator[Ingestor]:
    ingestor = Ingestor(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(ingestor.run(stop))
    try:
        yield ingestor
    finally:
        stop.set()
        left = await asyncio.wait_for(task, 20)
    assert left == 0


def connection(ingestor: Ingestor) -> DomeConnection:
    assert ingestor.websocket is not None
    (only,) = ingestor.websocket.connections
    return only


async def subscribed(ingestor: Ingestor, dome: FakeDome, connections: int) -> None:
    """The client holds exactly the subscriptions acked on the newest connection.

    Comparing ids, not counts: after a drop the client still holds the old connection's
    subscriptions until it notices, and a count alone would be satisfied by them."""

    def newest_acks() -> set[str]:
        acked = dome.ack_ids[(connections - 1) * len(CHUNKS) :]
        return set(acked) if len(acked) == len(CHUNKS) else set()

    await until(
        lambda: (
            len(dome.connections) == connections
            and ingestor.websocket is not None
            and connection(ingestor).registry.pending == 0
            and set(connection(ingestor).registry.active) == newest_acks()
            and bool(newest_acks())
        )
    )


Entry = tuple[bytes, dict[bytes, bytes]]


async def entries(client: aioredis.Redis, stream: str) -> list[Entry]:
    return cast(list[Entry], await client.xrange(stream))


async def published(client: aioredis.Redis, streams: Streams) -> list[dict[str, Any]]:
    found = await entries(client, streams.orders_raw)
    assert all(set(fields) == {b"data"} for _, fields in found)
    return [json.loads(fields[b"data"]) for _, fields in found]


def extra(record: logging.LogRecord, name: str) -> Any:
    """A structured field of a log record (passed with `extra=`)."""
    return record.__dict__[name]


async def count(client: aioredis.Redis, stream: str, expected: int) -> bool:
    return bool(await client.xlen(stream) == expected)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_subscribes_in_chunks_and_matches_acks_in_order(
    dome: FakeDome,
    settings_for: Callable[..., IngestorSettings],
    redis_client: aioredis.Redis,
    streams: Streams,
) -> None:
    async with running(settings_for()) as ingestor:
        await subscribed(ingestor, dome, connections=1)
        assert [tuple(request["filters"]["users"]) for request in dome.subscribes] == CHUNKS
        for request in dome.subscribes:
            assert {k: v for k, v in request.items() if k != "filters"} == {
                "action": "subscribe",
                "platform": "polymarket",
                "version": 1,
                "type": "orders",
            }
        assert connection(ingestor).registry.active == dict(zip(dome.ack_ids, CHUNKS, strict=True))
        status_key = streams.feed_status_key()
        await until(lambda: _hash_has(redis_client, status_key, connected=b"1", subscriptions=b"3"))


async def _hash_has(client: aioredis.Redis, key: str, **expected: bytes) -> bool:
    fields = await client.hgetall(key)
    return all(fields.get(name.encode()) == value for name, value in expected.items())


async def test_too_many_wallets_fail_at_startup_naming_the_numbers(
    dome: FakeDome, settings_for: Callable[..., IngestorSettings]
) -> None:
    ingestor = Ingestor(settings_for(dome_max_subscriptions=2, dome_wallets_per_subscription=5))
    with pytest.raises(StartupError) as error:
        await ingestor.start()
    await ingestor.redis.aclose()
    assert "20 tracked wallets exceed the capacity of 2 subscriptions x 5 wallets = 10" in str(
        error.value
    )
    assert dome.connections == []


async def test_events_reach_orders_raw_as_plain_json(
    dome: FakeDome,
    settings_for: Callable[..., IngestorSettings],
    redis_client: aioredis.Redis,
    streams: Streams,
) -> None:
    trades = TRADES[:3]
    published_before = metric("betterbot_ingestor_published_total", source="dome_ws")
    async with running(settings_for()) as ingestor:
        await subscribed(ingestor, dome, connections=1)
        await dome.send(*(event(trade) for trade in trades))
        await until(lambda: count(redis_client, streams.orders_raw, 3))
        await until(lambda: _hash_has(redis_client, streams.feed_status_key(), published=b"3"))
    payloads = await published(redis_client, streams)
    assert [p["order_key"] for p in payloads] == [expected_key(t) for t in trades]
    for payload, trade in zip(payloads, trades, strict=True):
        assert payload["source"] == "dome_ws" and payload["v"] == 1
        assert payload["user"] == trade["proxyWallet"]
        assert payload["token_id"] == trade["asset"] and payload["price"] == trade["price"]
        assert payload["received_at"] > trade["timestamp"]
    status = await redis_client.hgetall(streams.feed_status_key())
    assert status[b"state"] == b"stopped" and status[b"connected"] == b"0"
    assert status[b"last_exchange_ts"] == str(trades[-1]["timestamp"]).encode()
    assert metric("betterbot_ingestor_published_total", source="dome_ws") - published_before == 3


async def test_a_fill_is_published_once_even_when_repeated_after_a_reconnect(
    dome: FakeDome,
    settings_for: Callable[..., IngestorSettings],
    redis_client: aioredis.Redis,
    streams: Streams,
) -> None:
    first, second = TRADES[3], TRADES[4]
    async with running(settings_for()) as ingestor:
        await subscribed(ingestor, dome, connections=1)
        await dome.send(event(first), event(first))
        await until(lambda: ingestor.publisher.duplicates == 1)

        await dome.connections[-1].close()
        await subscribed(ingestor, dome, connections=2)
        assert set(connection(ingestor).registry.active) == {"sub_4", "sub_5", "sub_6"}
        await dome.send(event(first, "sub_4"), event(second, "sub_5"))
        await until(lambda: count(redis_client, streams.orders_raw, 2))
        await until(lambda: ingestor.publisher.duplicates == 2)
    keys = [payload["order_key"] for payload in await published(redis_client, streams)]
    assert keys == [expected_key(first), expected_key(second)]


async def test_reconnects_and_resubscribes_after_close_and_abrupt_drop(
    dome: FakeDome,
    settings_for: Callable[..., IngestorSettings],
    redis_client: aioredis.Redis,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.ingestor")
    async with running(settings_for()) as ingestor:
        await subscribed(ingestor, dome, connections=1)
        await dome.connections[-1].close(code=1011, reason="restarting")
        await subscribed(ingestor, dome, connections=2)
        dome.connections[-1].transport.abort()
        await subscribed(ingestor, dome, connections=3)
        assert [tuple(r["filters"]["users"]) for r in dome.subscribes] == CHUNKS * 3
        assert connection(ingestor).status.reconnects == 2
        assert connection(ingestor).backoff.attempt == 2  # short-lived connections: no reset
        await dome.send(event(TRADES[5], "sub_7"))
        await until(lambda: count(redis_client, streams.orders_raw, 1))
    lost = [r for r in caplog.records if r.getMessage() == "connection_lost"]
    assert len(lost) >= 2
    assert "1011" in extra(lost[0], "error")


async def test_a_connection_that_stayed_up_resets_the_backoff(
    dome: FakeDome, settings_for: Callable[..., IngestorSettings]
) -> None:
    async with running(settings_for(dome_stable_after_s=0)) as ingestor:
        await subscribed(ingestor, dome, connections=1)
        for connections in (2, 3):
            dome.connections[-1].transport.abort()
            await subscribed(ingestor, dome, connections=connections)
        assert connection(ingestor).status.reconnects == 2
        assert connection(ingestor).backoff.attempt == 1


async def test_malformed_frames_are_rejected_dead_lettered_and_streaming_goes_on(
    dome: FakeDome,
    settings_for: Callable[..., IngestorSettings],
    redis_client: aioredis.Redis,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.ingestor")
    no_tx_hash = {k: v for k, v in dome_data(TRADES[6]).items() if k != "tx_hash"}
    bad = {
        "bad_json": '{"type":"event","subscription_id":"sub_1","data":{',
        "invalid_event:tx_hash": json.dumps(
            {"type": "event", "subscription_id": "sub_2", "data": no_tx_hash}
        ),
        "invalid_event:price": event(TRADES[6], "sub_3", price=str(TRADES[6]["price"])),
        "unknown_type": '{"type":"heartbeat","subscription_id":"sub_1"}',
        "oversized": event(TRADES[6], title="x" * MAX_FRAME),
        "untracked_wallet": event(UNTRACKED_TRADE),
    }
    async with running(settings_for()) as ingestor:
        await subscribed(ingestor, dome, connections=1)
        await dome.send(*bad.values(), '{"type":"error","message":"slow down"}', event(TRADES[7]))
        await until(lambda: count(redis_client, streams.orders_raw, 1))
        await until(lambda: count(redis_client, streams.orders_dead, len(bad)))
        assert len(dome.connections) == 1

    (payload,) = await published(redis_client, streams)
    assert payload["order_key"] == expected_key(TRADES[7])
    dead = [fields for _, fields in await entries(redis_client, streams.orders_dead)]
    for fields, (label, frame) in zip(dead, bad.items(), strict=True):
        kind, _, field = label.partition(":")
        assert fields[b"raw"] == frame.encode()
        assert fields[b"reason"].decode().startswith(f"{kind}: ")
        assert field.encode() in fields[b"reason"]
        assert fields[b"origin"] == b"ingestor"
    rejected = [r for r in caplog.records if r.getMessage() == "frame_rejected"]
    assert [extra(r, "reason_class") for r in rejected] == [
        label.partition(":")[0] for label in bad
    ]
    assert [extra(r, "subscription_id") for r in rejected][:4] == [None, "sub_2", "sub_3", "sub_1"]
    assert all(r.levelno == logging.WARNING and extra(r, "reason") for r in rejected)
    (server_error,) = [r for r in caplog.records if r.getMessage() == "server_error"]
    assert "slow down" in extra(server_error, "detail")


async def test_a_frame_past_the_socket_limit_is_recorded_and_the_client_reconnects(
    dome: FakeDome,
    settings_for: Callable[..., IngestorSettings],
    redis_client: aioredis.Redis,
    streams: Streams,
) -> None:
    async with running(settings_for()) as ingestor:
        await subscribed(ingestor, dome, connections=1)
        await dome.send(event(TRADES[8], title="x" * (MAX_FRAME * 5)))
        await subscribed(ingestor, dome, connections=2)
        await dome.send(event(TRADES[9], "sub_4"))
        await until(lambda: count(redis_client, streams.orders_raw, 1))
    ((_, fields),) = await entries(redis_client, streams.orders_dead)
    assert fields[b"raw"] == b""
    assert fields[b"reason"].startswith(b"oversized: ") and b"hard limit" in fields[b"reason"]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("ingestor"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines() -> Iterator[_Lines]:
    handler = _Lines()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


async def test_the_key_is_in_no_log_line_through_auth_failures_and_reconnects(
    dome: FakeDome,
    settings_for: Callable[..., IngestorSettings],
    redis_client: aioredis.Redis,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
    json_lines: _Lines,
) -> None:
    caplog.set_level(logging.DEBUG)
    dome.reject_status = 401
    settings = settings_for()
    async with running(settings) as ingestor:
        await until(lambda: dome.rejected >= 2)
        dome.reject_status = None
        await subscribed(ingestor, dome, connections=1)
        dome.connections[-1].transport.abort()
        await subscribed(ingestor, dome, connections=2)
        await dome.send("not json", event(TRADES[10], "sub_4"))
        await until(lambda: count(redis_client, streams.orders_raw, 1))

    auth = [r for r in caplog.records if r.getMessage() == "auth_failed"]
    assert len(auth) >= 2 and all(
        extra(r, "status") == 401 and r.levelno == logging.ERROR for r in auth
    )
    # Retried at the maximum backoff (0.2 s here, less at most a quarter of jitter).
    after_auth = [
        extra(later, "in_s")
        for record, later in itertools.pairwise(caplog.records)
        if record.getMessage() == "auth_failed" and later.getMessage() == "reconnect_scheduled"
    ]
    assert after_auth and all(0.15 <= delay <= 0.2 for delay in after_auth)
    assert any(r.getMessage() == "connection_lost" for r in caplog.records)
    # The client library's request line went through the scrubbing filter, path and all.
    assert any("GET /*** HTTP/1.1" in r.getMessage() for r in caplog.records)
    texts = [caplog.text, *json_lines.lines]
    texts += [repr(record.__dict__) for record in caplog.records]
    texts += [str(settings), repr(settings)]
    status = await redis_client.hgetall(streams.feed_status_key())
    texts += [repr(status), repr(await redis_client.xrange(streams.orders_dead))]
    leaks = [text for text in texts if KEY in text]
    assert leaks == []


async def test_sigterm_closes_the_socket_flushes_and_exits_zero(
    dome: FakeDome,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    streams: Streams,
) -> None:
    ops_port = free_port()
    service = ServiceProcess(
        "ingestor",
        {
            "REDIS_URL": redis_url,
            "STREAM_NAMESPACE": namespace,
            "DOME_WS_URL": dome.url,
            "DOME_API_KEY": KEY,
            "OPS_PORT": str(ops_port),
            "LOG_LEVEL": "DEBUG",
            "DOME_RECONNECT_MIN_S": "0.05",
            "DOME_RECONNECT_MAX_S": "0.5",
            "BACKFILL_VIA": "off",
        },
        health_url=f"http://127.0.0.1:{ops_port}/health",
        tag=namespace.rstrip(":") + "-",
    )
    try:
        await asyncio.to_thread(service.wait_healthy, 30)
        await until(lambda: len(dome.subscribes) == 1 and len(dome.ack_ids) == 1, within_s=20)
        await dome.send(event(TRADES[11]))
        await until(lambda: count(redis_client, streams.orders_raw, 1))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops_port}") as http:
            health = (await http.get("/health")).json()
            metrics_text = (await http.get("/metrics")).text
    finally:
        code = await asyncio.to_thread(service.stop)
    assert code == 0, service.log_tail()
    assert health["ok"] is True and health["state"] == "connected"
    assert health["subscriptions"] == 1 and health["redis"] == "ok"
    assert 'betterbot_ingestor_published_total{source="dome_ws"} 1.0' in metrics_text
    assert 'betterbot_ingestor_connected{source="dome_ws"} 1.0' in metrics_text
    assert dome.connections[-1].close_code == 1001  # going away
    status = await redis_client.hgetall(streams.feed_status_key())
    assert status[b"state"] == b"stopped"
    log_text = service.log_text()
    assert KEY not in log_text
    assert '"event":"stopping"' in log_text
