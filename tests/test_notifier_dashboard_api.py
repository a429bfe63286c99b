"""The dashboard's `/api/...` on a real notifier (loopback), against a stand-in store that records
what it is asked: the store's token goes to the store and nowhere else, parameters are checked
before the store is asked, a store that is down, slow or failing is a 503 that says so, the page
carries a Content-Security-Policy that lets its own script run and nothing else."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from pydantic import SecretStr, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devtools.servers import free_port
from services.notifier.auth import Tokens
from services.notifier.dashboard_api import DashboardData, StoreReader
from services.notifier.settings import NotifierSettings
from shared.source_lag import SourceLag
from tests.helpers.notifier import http_url, running_notifier

pytestmark = pytest.mark.integration

TOKEN = "store-read-token-" + "x" * 24
WALLET = "0x" + "Ab" * 20
SIGNAL = {
    "signal_id": "s1",
    "kind": "whale_order",
    "wallet": WALLET.lower(),
    "wallet_label": "whale",
    "market_slug": "m",
    "title": "<b>hostile</b>",
    "condition_id": "0x" + "c" * 64,
    "token_id": "123",
    "token_label": "Yes",
    "side": "BUY",
    "price": 0.42,
    "shares": 10.0,
    "notional_usd": 4.2,
    "confidence": 0.9,
    "source": "dome_ws",
    "status": "confirmed",
    "status_reason": "",
    "exchange_ts": "2026-12-03T10:00:00Z",
    "received_at": "2026-12-03T10:00:01.5Z",
    "detected_at": "2026-12-03T10:00:02.25+00:00",
    "markout_1h_cents": 1.5,
}
FILL = {
    "order_key": "k1",
    "wallet": WALLET.lower(),
    "token_id": "123",
    "token_label": "Yes",
    "title": "t",
    "market_slug": "m",
    "side": "BUY",
    "price": 0.4,
    "shares_normalized": 10.0,
    "notional_usd": 4.0,
    "source": "dome_ws",
    "status": "confirmed",
    "exchange_ts": "2026-12-03T09:59:00Z",
}


@dataclass
class FakeStore:
    """The store's read API as far as the dashboard asks it; every request recorded."""

    status: int = 200
    delay_s: float = 0.0
    asked: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def answer(self, request: Request) -> Response:
        self.asked.append((request.url.path, request.url.query, dict(request.headers)))
        await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return JSONResponse({"detail": "database unavailable"}, status_code=self.status)
        path = request.url.path
        if path == "/wallets":
            return JSONResponse([{"address": WALLET.lower(), "label": "whale", "score": 0.5}])
        if path == "/signals/validation":
            return JSONResponse({"by": request.query_params["by"], "rows": [], "rule": "r"})
        item = SIGNAL if path == "/signals" else FILL
        return JSONResponse({"items": [item], "next_cursor": None})


@contextlib.asynccontextmanager
async def serving(store: FakeStore) -> AsyncIterator[FakeStore]:
    app = Starlette(
        routes=[Route(p, store.answer) for p in ("/signals", "/orders", "/wallets")]
        + [Route("/signals/validation", store.answer)]
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=store.port, log_config=None, lifespan="off")
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.ensure_future(server.serve())
    while not server.started:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    try:
        yield store
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


READS = [
    "/api/signals?window_s=600",
    "/api/market?token=123",
    "/api/validation?by=wallet",
    "/api/wallets",
    f"/api/wallet?address={WALLET}",
]


async def test_the_store_is_read_with_its_token_which_reaches_no_browser(
    redis_url: str, namespace: str
) -> None:
    feed_token = "feed-token-" + "y" * 24
    async with (
        serving(FakeStore()) as store,
        running_notifier(
            redis_url,
            namespace,
            store_api_url=store.url,
            store_api_token=SecretStr(TOKEN),
            notifier_tokens=[SecretStr(feed_token)],
        ) as notifier,
        httpx.AsyncClient(headers={"Authorization": f"Bearer {feed_token}"}) as http,
    ):
        answers = [await http.get(http_url(notifier, path)) for path in READS]
        page = await http.get(http_url(notifier, "/"))
    assert [a.status_code for a in answers] == [200] * len(READS)
    assert all(a.headers["cache-control"] == "no-store" for a in answers)
    assert {headers["authorization"] for _, _, headers in store.asked} == {f"Bearer {TOKEN}"}
    for response in [*answers, page]:
        assert TOKEN not in response.text and TOKEN not in str(response.headers)
    assert TOKEN not in repr(notifier.settings) and TOKEN not in repr(notifier.store_reader)

    asked = {(path, query) for path, query, _ in store.asked}
    # The market's price line: the fills that happened, of that token only.
    assert ("/orders", "token=123&status=confirmed&status=pending&limit=500&order=desc") in asked
    # A wallet is asked for in the store's own spelling (lower case).
    assert ("/orders", f"wallet={WALLET.lower()}&limit=50") in asked
    signals, market, _, wallets, wallet = (a.json() for a in answers)
    # The page reads history in the live feed's shape: Unix seconds, the title as it is.
    assert signals["signals"][0]["detected_at"] == 1796292002.25
    assert signals["signals"][0]["title"] == "<b>hostile</b>"
    assert market["trades"][0]["exchange_ts"] == 1796291940.0
    assert wallets == {"wallets": [{"address": WALLET.lower(), "label": "whale", "score": 0.5}]}
    assert wallet["wallet"]["label"] == "whale" and wallet["signals"][0]["signal_id"] == "s1"


@pytest.mark.parametrize(
    "path",
    [
        "/api/market?token=<script>",
        "/api/market",
        "/api/wallet?address=0x1234",
        "/api/validation?by=everything",
        "/api/signals?window_s=soon",
        "/api/signals?window_s=999999999",
    ],
)
async def test_bad_parameters_are_refused_before_the_store_is_asked(
    redis_url: str, namespace: str, path: str
) -> None:
    async with (
        serving(FakeStore()) as store,
        running_notifier(redis_url, namespace, store_api_url=store.url) as notifier,
        httpx.AsyncClient() as http,
    ):
        response = await http.get(http_url(notifier, path))
    assert response.status_code == 400 and response.json()["error"]
    assert store.asked == []


async def test_a_store_down_slow_or_failing_is_a_503_that_says_so(
    redis_url: str, namespace: str
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    cases = [
        (FakeStore(), nobody, "the store is unreachable (ConnectError)"),
        (FakeStore(delay_s=3), None, "the store did not answer in time"),
        (FakeStore(status=503), None, "the store answered 503: database unavailable"),
    ]
    for fake, url, said in cases:
        async with (
            serving(fake) as store,
            running_notifier(
                redis_url, namespace, store_api_url=url or store.url, store_api_timeout_s=0.3
            ) as notifier,
            httpx.AsyncClient(timeout=10) as http,
        ):
            for path in READS:
                response = await http.get(http_url(notifier, path))
                assert response.status_code == 503, (path, response.text)
                assert response.json() == {"error": said, "store": "unavailable"}
            # The rest of the notifier does not depend on the store.
            assert (await http.get(http_url(notifier, "/api/status"))).status_code == 200
            assert (await http.get(http_url(notifier, "/"))).status_code == 200


async def test_the_page_runs_its_own_script_only(redis_url: str, namespace: str) -> None:
    async with (
        running_notifier(redis_url, namespace) as notifier,
        httpx.AsyncClient() as http,
    ):
        page = await http.get(http_url(notifier, "/"))
    policy = page.headers["content-security-policy"]
    (script,) = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-eval" not in policy and "frame-ancestors 'none'" in policy


def fake_lags() -> list[SourceLag]:
    return [
        SourceLag("dome_ws", 5, 0, None, None, None, None),
        SourceLag("rtds", 1, 4, 0.5, 1.0, 2.0, 0.8),
    ]


async def test_source_lags_are_served_and_a_redis_outage_is_a_503() -> None:
    async def lags() -> list[SourceLag]:
        return fake_lags()

    async def broken() -> list[SourceLag]:
        raise RedisConnectionError("down")

    reader = StoreReader(f"http://127.0.0.1:{free_port()}", 1.0, None)
    for source, status in ((lags, 200), (broken, 503)):
        app = Starlette(routes=DashboardData(reader, source, Tokens(())).routes())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notifier") as http:
            response = await http.get("/api/sources")
        assert response.status_code == status
        if status == 200:
            assert response.json() == {"sources": [lag.to_json() for lag in fake_lags()]}
        else:
            assert "Redis" in response.json()["error"]
    await reader.aclose()


async def test_an_open_feed_does_not_lend_the_stores_token_to_anyone() -> None:
    """No NOTIFIER_TOKENS (an open feed) and a STORE_API_TOKEN (the store's reads may be
    protected): the history routes answer 403 naming both settings, and the store is not asked;
    the source lags (from Redis, not the store) are still served."""

    async def lags() -> list[SourceLag]:
        return fake_lags()

    async with serving(FakeStore()) as store:
        reader = StoreReader(store.url, 1.0, SecretStr(TOKEN))
        app = Starlette(routes=DashboardData(reader, lags, Tokens(())).routes())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notifier") as http:
            answers = [await http.get(path) for path in READS]
            sources = await http.get("/api/sources")
        await reader.aclose()
    for answer in answers:
        assert answer.status_code == 403, answer.text
        error = answer.json()["error"]
        assert "NOTIFIER_TOKENS" in error and "STORE_API_TOKEN" in error
        assert TOKEN not in answer.text
    assert store.asked == []
    assert sources.status_code == 200

    # Without the store's token an open feed serves the (then unprotected) history as before.
    async with serving(FakeStore()) as store:
        reader = StoreReader(store.url, 1.0, None)
        app = Starlette(routes=DashboardData(reader, lags, Tokens(())).routes())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notifier") as http:
            assert [(await http.get(p)).status_code for p in READS] == [200] * len(READS)
        await reader.aclose()


def test_store_settings_are_checked() -> None:
    settings = NotifierSettings(
        _env_file=None, store_api_url="http://store:8081/", store_api_token=""
    )
    assert settings.store_api_url == "http://store:8081" and settings.store_api_token is None
    for bad in ("store:8081", "http://store:8081/signals", "ftp://store"):
        with pytest.raises(ValidationError, match="STORE_API_URL"):
            NotifierSettings(_env_file=None, store_api_url=bad)
    with pytest.raises(ValidationError):
        NotifierSettings(_env_file=None, store_api_timeout_s=0)


async def test_a_notifier_with_tokens_serves_the_history_to_a_token_holder_only(
    redis_url: str, namespace: str
) -> None:
    feed_token = "feed-token-" + "y" * 24
    async with (
        serving(FakeStore()) as store,
        running_notifier(
            redis_url, namespace, store_api_url=store.url, notifier_tokens=[SecretStr(feed_token)]
        ) as notifier,
        httpx.AsyncClient() as http,
    ):
        for path in READS:
            refused = await http.get(http_url(notifier, path))
            wrong = await http.get(
                http_url(notifier, path), headers={"Authorization": "Bearer " + "z" * 30}
            )
            # In the URL it would be logged along the way: only the header counts.
            joiner = "&" if "?" in path else "?"
            in_url = await http.get(http_url(notifier, f"{path}{joiner}token={feed_token}"))
            assert refused.status_code == wrong.status_code == in_url.status_code == 401
            assert feed_token not in refused.text
        assert store.asked == []
        for path in READS:
            allowed = await http.get(
                http_url(notifier, path), headers={"Authorization": f"Bearer {feed_token}"}
            )
            assert allowed.status_code == 200, allowed.text
        assert len(store.asked) >= len(READS)
