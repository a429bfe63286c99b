"""The store's HTTP API on real Redis and Postgres (in process, over httpx's ASGI transport):
every filter, pagination without gaps or repeats while rows arrive, CSV, auth, bad input."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from services.store import rows
from services.store.api import create_app
from services.store.database import Database
from services.store.main import Store
from services.store.queries import ORDERS, SIGNALS
from services.store.settings import StoreSettings
from services.store.wallets import Wallets
from shared.models import OrderFill, Signal, SignalKind, TrackedWallet
from shared.redis_streams import encode
from shared.streams import Streams
from shared.wallets import dump_wallets
from tests.test_store_rows import EXCHANGE_TS, make_fill, make_signal
from tests.test_store_service import count, running_store, store_settings

pytestmark = pytest.mark.integration

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
W1, W2, W3 = ("0x" + c * 20 for c in ("1a", "2b", "3c"))
BASE = 1_762_480_000.0  # detected_at of signal 0
# Four kinds in turn: with two wallets and three markets, every combination of them occurs.
KINDS = [
    SignalKind.TRADER_ENTRY,
    SignalKind.TRADER_EXIT,
    SignalKind.WHALE_ORDER,
    SignalKind.CONSENSUS,
]


@dataclass
class Api:
    store: Store
    client: httpx.AsyncClient
    settings: StoreSettings


def wallets_file(tmp_path: Path, *wallets: TrackedWallet) -> str:
    path = tmp_path / "wallets.json"
    path.write_bytes(dump_wallets(list(wallets)))
    return str(path)


def seed_file(tmp_path: Path) -> str:
    return wallets_file(
        tmp_path,
        TrackedWallet(address=W1, label="one", score=0.9),
        TrackedWallet(address=W2, label="two"),
    )


@contextlib.asynccontextmanager
async def serving(settings: StoreSettings) -> AsyncIterator[Api]:
    async with running_store(settings) as store:
        app = create_app(store.api(), store.health, settings.store_api_max_body_bytes)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://store") as client:
            yield Api(store, client, settings)


@pytest.fixture
async def api(
    redis_url: str,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> AsyncIterator[Api]:
    settings = store_settings(
        redis_url, database_url, namespace, store_api_token=TOKEN, wallets_file=seed_file(tmp_path)
    )
    async with serving(settings) as running:
        yield running


def signal(i: int, **overrides: Any) -> Signal:
    """Signal i: two wallets, three markets, four tokens, the kinds in turn, confidence i%10/10,
    and detected_at shared by three signals in a row (ties the key must break)."""
    fields: dict[str, Any] = {
        "wallet": (W1, W2)[i % 2],
        "token_id": f"tok{i % 4}",
        "kind": KINDS[i % len(KINDS)],
        "confidence": (i % 10) / 10,
        "detected_at": BASE + i // 3,
    }
    return make_signal(i, **(fields | overrides))


def order(i: int, **overrides: Any) -> OrderFill:
    fields: dict[str, Any] = {
        "user": (W1, W2)[i % 2],
        "token_id": f"tok{i % 4}",
        "timestamp": EXCHANGE_TS + i // 2,
    }
    return make_fill(i, **(fields | overrides))


async def insert(store: Store, table: rows.Table, items: Sequence[Any]) -> None:
    """Through the store's own write path, without waiting for the streams."""
    entries: list[Any] = [(f"{i + 1}-0", encode(x)) for i, x in enumerate(items)]
    prepared = rows.prepare(table, entries)
    assert prepared.rejected == []
    await store.db.write(table, prepared.rows)


def newest_first(items: Sequence[Signal]) -> list[str]:
    return [
        s.signal_id for s in sorted(items, key=lambda s: (s.detected_at, s.signal_id), reverse=True)
    ]


async def all_pages(
    client: httpx.AsyncClient,
    path: str,
    params: dict[str, Any],
    limit: int,
    between_pages: Callable[[int], Any] | None = None,
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {**params, "limit": limit} | ({"cursor": cursor} if cursor else {})
        response = await client.get(path, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["items"]) <= limit
        items += body["items"]
        cursor = body["next_cursor"]
        pages += 1
        if cursor is None:
            return items
        if between_pages is not None:
            await between_pages(pages)


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


async def test_every_signal_filter_returns_exactly_the_matching_signals(api: Api) -> None:
    signals = [signal(i) for i in range(60)]
    await insert(api.store, rows.SIGNALS, signals)
    condition_2 = signals[2].condition_id
    cases: list[tuple[dict[str, Any], Callable[[Signal], bool]]] = [
        ({}, lambda s: True),
        ({"wallet": W2.upper().replace("0X", "0x")}, lambda s: s.wallet == W2),
        ({"market": "market-1"}, lambda s: s.market_slug == "market-1"),
        (
            {"market": condition_2.upper().replace("0X", "0x")},
            lambda s: s.condition_id == condition_2,
        ),
        ({"token": "tok3"}, lambda s: s.token_id == "tok3"),
        ({"kind": "trader_entry"}, lambda s: s.kind == SignalKind.TRADER_ENTRY),
        (
            {"kind": ["consensus", "whale_order"]},
            lambda s: s.kind in (SignalKind.CONSENSUS, SignalKind.WHALE_ORDER),
        ),
        ({"min_confidence": 0.7}, lambda s: s.confidence >= 0.7),
        (
            {"since": iso(BASE + 5), "until": iso(BASE + 10)},
            lambda s: BASE + 5 <= s.detected_at < BASE + 10,
        ),
        ({"since": str(int(BASE + 15))}, lambda s: s.detected_at >= BASE + 15),
        ({"until": iso(BASE + 3).replace("+00:00", "Z")}, lambda s: s.detected_at < BASE + 3),
        (
            {"since": iso(BASE + 18).replace("+00:00", "+01:00")},
            lambda s: s.detected_at >= BASE + 18 - 3600,
        ),
        (
            {"wallet": W1, "kind": "whale_order", "min_confidence": 0.3, "market": "market-0"},
            lambda s: (
                s.wallet == W1
                and s.kind == SignalKind.WHALE_ORDER
                and s.confidence >= 0.3
                and s.market_slug == "market-0"
            ),
        ),
        ({"wallet": W3}, lambda s: False),
    ]
    for params, matches in cases:
        expected = newest_first([s for s in signals if matches(s)])
        response = await api.client.get("/signals", params=params | {"limit": 1000})
        assert response.status_code == 200, (params, response.text)
        got = [item["signal_id"] for item in response.json()["items"]]
        assert got == expected, params
        assert expected or params == {"wallet": W3}, f"case selects nothing: {params}"


async def test_a_signal_item_carries_every_field(api: Api) -> None:
    sig = signal(4, wallet_label="whale four", reasons=["big", "new position"])
    await insert(api.store, rows.SIGNALS, [sig])
    [item] = (await api.client.get("/signals")).json()["items"]
    assert list(item) == list(SIGNALS.columns)
    assert item | {"stored_at": None} == {
        "signal_id": sig.signal_id,
        "kind": sig.kind.value,
        "wallet": sig.wallet,
        "wallet_label": "whale four",
        "market_slug": sig.market_slug,
        "title": sig.title,
        "condition_id": sig.condition_id,
        "token_id": sig.token_id,
        "token_label": sig.token_label,
        "side": "BUY",
        "price": sig.price,
        "shares": sig.shares,
        "notional_usd": sig.notional_usd,
        "confidence": sig.confidence,
        "reasons": ["big", "new position"],
        "order_keys": sig.order_keys,
        "source": "dome_ws",
        "exchange_ts": iso(sig.exchange_ts),
        "received_at": iso(sig.received_at),
        "detected_at": iso(sig.detected_at),
        "stream_id": "1-0",
        "stored_at": None,
        "status": "confirmed",
        "status_reason": "",
        # Its validation, none recorded yet (tests/test_store_validation.py fills them).
        "markout_5m_cents": None,
        "markout_1h_cents": None,
        "markout_24h_cents": None,
        "settlement_payout": None,
        "settlement_cents": None,
        "validation_fee_cents": None,
    }


async def test_every_order_filter_and_the_order_fields(api: Api) -> None:
    fills = [order(i) for i in range(40)]
    await insert(api.store, rows.ORDERS, fills)
    cases: list[tuple[dict[str, Any], Callable[[OrderFill], bool]]] = [
        ({}, lambda f: True),
        ({"wallet": W1}, lambda f: f.user == W1),
        ({"market": "market-2"}, lambda f: f.market_slug == "market-2"),
        ({"market": fills[1].condition_id}, lambda f: f.condition_id == fills[1].condition_id),
        ({"token": "tok1"}, lambda f: f.token_id == "tok1"),
        (
            {"since": EXCHANGE_TS + 4, "until": iso(EXCHANGE_TS + 9)},
            lambda f: EXCHANGE_TS + 4 <= f.timestamp < EXCHANGE_TS + 9,
        ),
        (
            {"wallet": W2, "market": "market-0", "since": EXCHANGE_TS + 3},
            lambda f: (
                f.user == W2 and f.market_slug == "market-0" and f.timestamp >= EXCHANGE_TS + 3
            ),
        ),
    ]
    for params, matches in cases:
        expected = [
            f.order_key
            for f in sorted(
                (f for f in fills if matches(f)),
                key=lambda f: (f.timestamp, f.order_key),
                reverse=True,
            )
        ]
        got = [item["order_key"] for item in await all_pages(api.client, "/orders", params, 6)]
        assert got == expected and expected, params
    item = (
        await api.client.get("/orders", params={"token": "tok3", "order": "asc", "limit": 1})
    ).json()["items"][0]
    fill = fills[3]
    assert list(item) == list(ORDERS.columns)
    assert item | {"stored_at": None} == {
        "order_key": fill.order_key,
        "wallet": W2,
        "token_id": "tok3",
        "token_label": "No",
        "side": "BUY",
        "market_slug": "market-0",
        "condition_id": fill.condition_id,
        "title": fill.title,
        "shares": fill.shares,
        "shares_normalized": fill.shares_normalized,
        "price": 0.56,
        "notional_usd": fill.notional_usd,
        "tx_hash": fill.tx_hash,
        "order_hash": fill.order_hash,
        "taker": fill.taker,
        "block_number": fill.block_number,
        "log_index": fill.log_index,
        "exchange_ts": iso(fill.timestamp),
        "received_at": iso(fill.received_at),
        "source": "dome_ws",
        "stored_at": None,
        "status": "confirmed",
        "status_reason": "",
    }


@pytest.mark.parametrize("direction", ["desc", "asc"])
async def test_pages_have_no_gaps_or_repeats_while_signals_arrive(api: Api, direction: str) -> None:
    signals = [signal(i) for i in range(100)]
    await insert(api.store, rows.SIGNALS, signals)
    arrived: list[Signal] = []

    async def more_signals(page: int) -> None:
        # Between pages: new signals far in the past, far in the future, and tied with
        # existing ones (same detected_at, other keys).
        batch = [
            signal(1000 + 10 * page + j, detected_at=at)
            for j, at in enumerate((BASE - 1000 - page, BASE + 10_000 + page, BASE + 16, BASE + 16))
        ]
        arrived.extend(batch)
        await insert(api.store, rows.SIGNALS, batch)

    items = await all_pages(api.client, "/signals", {"order": direction}, 7, more_signals)
    ids = [item["signal_id"] for item in items]
    assert len(ids) == len(set(ids)), "a signal was repeated"
    original = newest_first(signals)
    if direction == "asc":
        original.reverse()
    assert [i for i in ids if i in set(original)] == original, "gap or disorder"
    # What arrived meanwhile shows up only past the boundary where it sorts, in order.
    keys = [(item["detected_at"], item["signal_id"]) for item in items]
    assert keys == sorted(keys, reverse=direction == "desc")
    past = {s.signal_id for s in arrived if s.detected_at < BASE}
    future = {s.signal_id for s in arrived if s.detected_at > BASE + 9_999}
    later = past if direction == "desc" else future
    earlier = future if direction == "desc" else past
    assert later <= set(ids) and not earlier & set(ids)


async def test_a_cursor_is_bound_to_its_listing_and_order(api: Api) -> None:
    await insert(api.store, rows.SIGNALS, [signal(i) for i in range(5)])
    await insert(api.store, rows.ORDERS, [order(i) for i in range(5)])
    signal_cursor = (await api.client.get("/signals", params={"limit": 2})).json()["next_cursor"]
    response = await api.client.get("/orders", params={"cursor": signal_cursor})
    assert response.status_code == 400
    assert response.json()["detail"] == "invalid cursor: it belongs to /signals, not /orders"
    response = await api.client.get("/signals", params={"cursor": signal_cursor, "order": "asc"})
    assert response.status_code == 400 and "order=desc" in response.json()["detail"]


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def test_csv_export_streams_every_matching_row(api: Api) -> None:
    signals = [signal(i) for i in range(1_234)]
    await insert(api.store, rows.SIGNALS, signals)
    response = await api.client.get("/signals", params={"format": "csv", "wallet": W1})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert 'filename="signals.csv"' in response.headers["content-disposition"]
    lines = response.text.split("\r\n")
    assert lines[0] == ",".join(SIGNALS.columns) and lines[-1] == ""
    table = parse_csv(response.text)
    assert [r["signal_id"] for r in table] == newest_first([s for s in signals if s.wallet == W1])
    first = next(s for s in signals if s.signal_id == table[0]["signal_id"])
    assert table[0]["detected_at"] == iso(first.detected_at).replace("+00:00", "Z")
    assert table[0]["reasons"] == "; ".join(first.reasons)
    assert float(table[0]["confidence"]) == first.confidence


async def test_csv_by_accept_header_pages_with_a_cursor_header(api: Api) -> None:
    await insert(api.store, rows.ORDERS, [order(i) for i in range(9)])
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 4}
    while True:
        response = await api.client.get("/orders", params=params, headers={"Accept": "text/csv"})
        assert response.status_code == 200 and response.text.startswith("order_key,wallet,")
        seen += [r["order_key"] for r in parse_csv(response.text)]
        if "x-next-cursor" not in response.headers:
            break
        params["cursor"] = response.headers["x-next-cursor"]
    json_items = (await api.client.get("/orders", params={"limit": 100})).json()["items"]
    assert seen == [item["order_key"] for item in json_items] and len(seen) == 9


async def test_csv_neutralizes_spreadsheet_formulas(api: Api) -> None:
    await insert(api.store, rows.SIGNALS, [signal(1, wallet_label='=HYPERLINK("x")')])
    [row] = parse_csv((await api.client.get("/signals", params={"format": "csv"})).text)
    assert row["wallet_label"] == '\'=HYPERLINK("x")'


async def test_write_endpoints_need_the_right_bearer_token(api: Api) -> None:
    path, body = f"/wallets/{W3}", {"label": "three"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "missing 'Authorization: Bearer <token>' header"),
        ({"Authorization": f"Basic {TOKEN}"}, "missing 'Authorization: Bearer <token>' header"),
        ({"Authorization": "Bearer wrong-token-0123456789"}, "invalid token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "invalid token"),
        ({"Authorization": "Bearer \u00e9t\u00e9".encode("latin-1")}, "invalid token"),
    ]
    for headers, detail in cases:
        for response in (
            await api.client.put(path, json=body, headers=headers),
            await api.client.delete(f"/wallets/{W1}", headers=headers),
        ):
            assert response.status_code == 401, (headers, response.text)
            assert response.json() == {"detail": detail}
            assert response.headers["www-authenticate"] == "Bearer"
    assert W3 not in {w["address"] for w in (await api.client.get("/wallets")).json()}
    assert (await api.client.put(path, json=body, headers=AUTH)).status_code == 201
    assert (await api.client.delete(path, headers=AUTH)).status_code == 204
    assert (await api.client.get("/signals")).status_code == 200  # reads are open by default


async def test_without_a_configured_token_writes_are_refused(
    redis_url: str,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    settings = store_settings(redis_url, database_url, namespace, wallets_file=seed_file(tmp_path))
    async with serving(settings) as api:
        for headers in ({}, AUTH, {"Authorization": "Bearer "}):
            response = await api.client.put(f"/wallets/{W3}", json={}, headers=headers)
            assert response.status_code == 403
            assert "no STORE_API_TOKEN set" in response.json()["detail"]
        assert (await api.client.get("/wallets")).status_code == 200


async def test_reads_can_require_the_token(
    redis_url: str,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    settings = store_settings(
        redis_url,
        database_url,
        namespace,
        store_api_token=TOKEN,
        store_api_read_auth=True,
        wallets_file=seed_file(tmp_path),
    )
    async with serving(settings) as api:
        for path in ("/signals", "/orders", "/wallets"):
            assert (await api.client.get(path)).status_code == 401, path
            assert (await api.client.get(path, headers=AUTH)).status_code == 200, path
        for path in ("/health", "/metrics", "/docs", "/openapi.json"):
            assert (await api.client.get(path)).status_code == 200, path
        schema = (await api.client.get("/openapi.json")).json()
        assert schema["paths"]["/signals"]["get"]["security"] == [{"HTTPBearer": []}]


BAD_INPUT: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("GET", "/signals", {"params": {"wallet": "bob"}}, 422, "not a 0x wallet address"),
    ("GET", "/signals", {"params": {"wallet": "0x" + "g" * 40}}, 422, "wallet address"),
    ("GET", "/signals", {"params": {"kind": "nope"}}, 422, "'trader_entry'"),
    ("GET", "/signals", {"params": {"cursor": "garbage"}}, 400, "invalid cursor"),
    ("GET", "/signals", {"params": {"cursor": "x" * 301}}, 422, "at most 300"),
    ("GET", "/signals", {"params": {"limit": 0}}, 422, "greater than or equal to 1"),
    ("GET", "/orders", {"params": {"limit": 1001}}, 422, "less than or equal to 1000"),
    ("GET", "/orders", {"params": {"limit": "ten"}}, 422, "valid integer"),
    (
        "GET",
        "/signals",
        {"params": {"since": "yesterday"}},
        422,
        "not a time: give RFC 3339 with an offset",
    ),
    (
        "GET",
        "/signals",
        {"params": {"since": "0001-01-01T00:00:00+05:00"}},
        422,
        "not a valid time: date value out of range",
    ),
    (
        "GET",
        "/orders",
        {"params": {"since": "2025-01-02T00:00:00Z", "until": "1735689600"}},
        400,
        "empty time range",
    ),
    ("GET", "/signals", {"params": {"since": "2025-01-02T00:00:00"}}, 422, "with an offset"),
    ("GET", "/orders", {"params": {"until": "2025-01-02"}}, 422, "with an offset"),
    ("GET", "/orders", {"params": {"until": "2025-02-30T00:00:00Z"}}, 422, "day is out of"),
    ("GET", "/orders", {"params": {"since": "-5"}}, 422, "Unix seconds must be in"),
    ("GET", "/signals", {"params": {"min_confidence": 1.5}}, 422, "less than or equal"),
    ("GET", "/signals", {"params": {"min_confidence": "nan"}}, 422, "finite number"),
    ("GET", "/signals", {"params": {"market": "a\x00b"}}, 422, "should match pattern"),
    ("GET", "/orders", {"params": {"token": "9" * 201}}, 422, "at most 200"),
    ("GET", "/orders", {"params": {"format": "xml"}}, 422, "'json' or 'csv'"),
    ("GET", "/orders", {"params": {"order": "up"}}, 422, "'desc' or 'asc'"),
    ("PUT", "/wallets/bob", {"json": {}}, 422, "not a 0x wallet address"),
    ("PUT", f"/wallets/{W3}", {"json": {"score": 2}}, 422, "less than or equal to 1"),
    ("PUT", f"/wallets/{W3}", {"json": {"label": "x" * 201}}, 422, "at most 200"),
    ("PUT", f"/wallets/{W3}", {"json": {"label": "a\nb"}}, 422, "should match pattern"),
    ("PUT", f"/wallets/{W3}", {"json": {"labels": "x"}}, 422, "Extra inputs"),
    ("PUT", f"/wallets/{W3}", {"json": [1]}, 422, "valid dictionary"),
    (
        "PUT",
        f"/wallets/{W3}",
        {"content": b"{", "headers": {"content-type": "application/json"}},
        422,
        "JSON decode error",
    ),
    ("PUT", f"/wallets/{W3}", {}, 422, "Field required"),
    ("PUT", f"/wallets/{W3}", {"json": {"label": "x" * 20_000}}, 413, "too large"),
    ("DELETE", "/wallets/0x123", {}, 422, "not a 0x wallet address"),
    ("DELETE", f"/wallets/{W3}", {}, 404, "is not tracked"),
    ("GET", "/nowhere", {}, 404, "Not Found"),
]


async def test_bad_input_is_a_clear_4xx(api: Api) -> None:
    """One store for every case (a store per case would cost seconds); each case says which."""
    for method, path, kwargs, status, says in BAD_INPUT:
        options = dict(kwargs)
        headers = options.pop("headers", {}) | AUTH
        response = await api.client.request(method, path, headers=headers, **options)
        assert response.status_code == status, (method, path, kwargs, response.text)
        assert says in response.text, (method, path, kwargs, response.text)


async def test_a_streamed_body_over_the_limit_is_refused(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"label": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    response = await api.client.put(
        f"/wallets/{W3}", content=chunks(), headers=AUTH | {"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["detail"] == "request body too large: the limit is 16384 bytes"


async def test_unavailable_postgres_or_redis_is_a_503_and_changes_nothing(
    api: Api,
    redis_url: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    nowhere = Database(
        f"postgresql://postgres@127.0.0.1:{free_port()}/x",
        pool_size=1,
        timeout=2,
        retry_min=0.1,
        retry_max=0.1,
    )
    no_redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    cases = [
        (
            Wallets(nowhere, nowhere, api.store.redis, streams, "-"),
            "GET",
            "/signals",
            "Postgres unavailable",
        ),
        (
            Wallets(nowhere, nowhere, api.store.redis, streams, "-"),
            "GET",
            "/wallets",
            "Postgres unavailable",
        ),
        (
            Wallets(api.store.db, api.store.api_db, no_redis, streams, "-"),
            "PUT",
            f"/wallets/{W3}",
            "Redis (wallet registry) unavailable",
        ),
    ]
    for wallets, method, path, says in cases:
        wallets.synced.set()
        db = nowhere if method == "GET" else api.store.api_db
        app = create_app(
            dataclasses.replace(api.store.api(), db=db, wallets=wallets), api.store.health, 16_384
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://store"
        ) as client:
            response = await client.request(method, path, headers=AUTH, json={"label": "x"})
        assert response.status_code == 503, response.text
        assert response.json() == {"detail": f"{says}, retry later"}
        assert response.headers["retry-after"] == "1"
    await nowhere.close()
    await no_redis.aclose()
    # The PUT whose registry write failed left no row behind (its transaction rolled back).
    assert await count(api.settings.database_url, f"tracked_wallets WHERE address = '{W3}'") == 0
    assert not await redis_client.hexists(streams.wallets_key(), W3)
