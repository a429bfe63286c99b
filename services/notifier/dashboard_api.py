"""The dashboard's data: the JSON under `/api/...` that the page at `/` draws its pictures from.

The history lives in the store (its read API, `STORE_API_URL`); the per-source lag lives in Redis
(`shared/source_lag.py`). The page asks the notifier, never the store: it stays on one origin (no
CORS to open, no store address to publish), and the store's token (`STORE_API_TOKEN`, needed when
the store has `STORE_API_READ_AUTH`) stays on this side, sent only on our own GETs to fixed paths.

Every route takes a few checked parameters and asks the store for a bounded page, within a bounded
time (`STORE_API_TIMEOUT_S`). When the store cannot answer, the route says so with 503 and
`{"error": ...}`, which the page shows as a state ("history unavailable"), while the live feed
(the WebSocket) goes on without it.

With `NOTIFIER_TOKENS` set, the routes want one of its tokens (the `Authorization` header). With
none (an open feed) and `STORE_API_TOKEN` set, the routes that read the store answer 403 and say
why: the token would otherwise lend the store's protected history to anyone who reaches this port.

- `GET /api/signals?window_s=` the signals detected in the last `window_s` seconds (newest
  `SIGNALS_MAX`): the history under "signals over time".
- `GET /api/market?token=` a token's fills (its price line) and its signals.
- `GET /api/validation?by=kind|wallet` the store's validation summary, as it is.
- `GET /api/sources` each source's lag behind the first one (from Redis).
- `GET /api/wallets` the tracked wallets; `GET /api/wallet?address=` one wallet's entry, recent
  fills and signals.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import httpx
from pydantic import SecretStr
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from services.notifier.auth import Tokens, presented_token

log = logging.getLogger(__name__)

SIGNALS_MAX = 1000  # one page of the store's listing: enough for an hour of a busy feed
WINDOW_MAX_S = 24 * 3600
MARKET_TRADES_MAX = 500
MARKET_SIGNALS_MAX = 200
WALLET_ROWS_MAX = 50
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
# Outcome token ids are decimal numbers; the store takes any printable text, we take less.
TOKEN = re.compile(r"^[0-9A-Za-z_.:-]{1,100}$")
GROUPINGS = frozenset({"kind", "wallet", "source"})
# The fills that happened: a retracted fill did not, and has no place on a price line.
HAPPENED = ["confirmed", "pending"]
# What the page reads of a signal, from the history as from the live feed.
SIGNAL_FIELDS = (
    "signal_id",
    "kind",
    "wallet",
    "wallet_label",
    "market_slug",
    "title",
    "token_id",
    "token_label",
    "side",
    "price",
    "shares",
    "notional_usd",
    "confidence",
    "source",
    "status",
    "status_reason",
    "markout_5m_cents",
    "markout_1h_cents",
    "markout_24h_cents",
    "settlement_cents",
)
FILL_FIELDS = (
    "order_key",
    "token_id",
    "token_label",
    "title",
    "market_slug",
    "side",
    "price",
    "shares_normalized",
    "notional_usd",
    "source",
    "status",
)
TIMES = ("exchange_ts", "received_at", "detected_at")


OPEN_WITH_STORE_TOKEN = (
    "the dashboard's history is off: NOTIFIER_TOKENS is empty (an open feed) while "
    "STORE_API_TOKEN is set, so /api/* would serve the store's protected history to anyone; "
    "set NOTIFIER_TOKENS, or unset STORE_API_TOKEN on the notifier"
)


class StoreUnavailable(Exception):
    """The store did not answer, or not with what a read API answers: the page's "history
    unavailable" state. The message is for people and holds no secret (the token is a header)."""


class BadInput(ValueError):
    pass


class LagFigures(Protocol):
    def to_json(self) -> dict[str, Any]: ...


SourceLagReader = Callable[[], Awaitable[Sequence[LagFigures]]]


class StoreReader:
    """GETs to the store's read API: one connection pool, a timeout on each request."""

    def __init__(self, base_url: str, timeout_s: float, token: SecretStr | None) -> None:
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout_s,
            headers=headers,
            follow_redirects=False,
            # The store is ours, reached directly: a proxy from the environment would see the token.
            trust_env=False,
        )
        self.down = False
        # Whether our GETs carry the store's token: the history they read may be protected.
        self.has_token = token is not None

    def __repr__(self) -> str:
        return f"StoreReader({self._http.base_url})"

    async def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        try:
            answer = await self._answer(path, params)
        except StoreUnavailable as exc:
            # Logged when the store goes away, not on every page's every poll meanwhile.
            if not self.down:
                log.warning("store_unavailable", extra={"path": path, "error": str(exc)})
            self.down = True
            raise
        if self.down:
            log.info("store_available_again", extra={"path": path})
        self.down = False
        return answer

    async def _answer(self, path: str, params: Mapping[str, Any] | None) -> Any:
        try:
            response = await self._http.get(path, params=params)
        except httpx.TimeoutException:
            raise StoreUnavailable("the store did not answer in time") from None
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"the store is unreachable ({type(exc).__name__})") from None
        if response.status_code != 200:
            status = response.status_code
            raise StoreUnavailable(f"the store answered {status}: {_detail(response)}")
        try:
            return response.json()
        except ValueError:
            raise StoreUnavailable("the store answered something that is not JSON") from None

    async def aclose(self) -> None:
        await self._http.aclose()


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail if isinstance(detail, str) else response.reason_phrase)[:200]


class DashboardData:
    """The `/api/...` routes of the page, over the store and the source-lag reader."""

    def __init__(self, store: StoreReader, source_lag: SourceLagReader, tokens: Tokens) -> None:
        self.store = store
        self.source_lag = source_lag
        # The history is the feed's past: a notifier that wants a token on /ws wants it here too.
        self.tokens = tokens
        # An open feed must not lend the store's token to anyone who reaches it: with no
        # NOTIFIER_TOKENS, a STORE_API_TOKEN (the store's reads may be protected) turns /api/*
        # off (403, saying why) rather than serving the store's protected history to everyone.
        self.lends_store_token = tokens.open and store.has_token
        if self.lends_store_token:
            log.warning("dashboard_history_refused", extra={"detail": OPEN_WITH_STORE_TOKEN})

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/signals", self._answer(self.signals)),
            Route("/api/market", self._answer(self.market)),
            Route("/api/validation", self._answer(self.validation)),
            # From Redis, not the store: served whatever the store's token.
            Route("/api/sources", self._answer(self.sources, reads_store=False)),
            Route("/api/wallets", self._answer(self.wallets)),
            Route("/api/wallet", self._answer(self.wallet)),
        ]

    def _answer(
        self,
        build: Callable[[Mapping[str, str]], Awaitable[dict[str, Any]]],
        *,
        reads_store: bool = True,
    ) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def endpoint(request: Request) -> JSONResponse:
            if reads_store and self.lends_store_token:
                return JSONResponse(
                    {"error": OPEN_WITH_STORE_TOKEN},
                    status_code=403,
                    headers={"Cache-Control": "no-store"},
                )
            if not self._admitted(request):
                return JSONResponse(
                    {"error": "this notifier needs a token: Authorization: Bearer <token>"},
                    status_code=401,
                    headers={"Cache-Control": "no-store", "WWW-Authenticate": "Bearer"},
                )
            try:
                body, status = await build(request.query_params), 200
            except BadInput as exc:
                body, status = {"error": str(exc)}, 400
            except StoreUnavailable as exc:
                body, status = {"error": str(exc), "store": "unavailable"}, 503
            return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

        return endpoint

    def _admitted(self, request: Request) -> bool:
        if self.tokens.open:
            return True
        # The header only: a token in a URL would end up in proxies' and servers' logs.
        token = presented_token(request.headers, {})
        return token is not None and self.tokens.identify(token) is not None

    async def signals(self, query: Mapping[str, str]) -> dict[str, Any]:
        window_s = _number(query.get("window_s", "3600"), "window_s", 60, WINDOW_MAX_S)
        since = time.time() - window_s
        page = await self.store.get(
            "/signals", {"since": f"{since:.3f}", "limit": SIGNALS_MAX, "order": "desc"}
        )
        return {
            "window_s": window_s,
            "signals": [compact_signal(item) for item in page["items"]],
            "truncated": page["next_cursor"] is not None,
        }

    async def market(self, query: Mapping[str, str]) -> dict[str, Any]:
        token = _match(TOKEN, query.get("token", ""), "token (an outcome token id)")
        fills, signals = await asyncio.gather(
            self.store.get(
                "/orders",
                {"token": token, "status": HAPPENED, "limit": MARKET_TRADES_MAX, "order": "desc"},
            ),
            self.store.get("/signals", {"token": token, "limit": MARKET_SIGNALS_MAX}),
        )
        trades = sorted((compact_fill(item) for item in fills["items"]), key=_by_time)
        return {
            "token": token,
            "trades": trades,
            "trades_truncated": fills["next_cursor"] is not None,
            "signals": [compact_signal(item) for item in signals["items"]],
        }

    async def validation(self, query: Mapping[str, str]) -> dict[str, Any]:
        by = query.get("by", "kind")
        if by not in GROUPINGS:
            raise BadInput(f"by must be one of {', '.join(sorted(GROUPINGS))}")
        summary: dict[str, Any] = await self.store.get("/signals/validation", {"by": by})
        return summary

    async def sources(self, _: Mapping[str, str]) -> dict[str, Any]:
        try:
            lags = await asyncio.wait_for(self.source_lag(), 3)
        except (RedisError, OSError, TimeoutError):
            # Not the store, but the same state for the page: these figures cannot be read now.
            raise StoreUnavailable("Redis did not answer for the source lags") from None
        return {"sources": [lag.to_json() for lag in lags]}

    async def wallets(self, _: Mapping[str, str]) -> dict[str, Any]:
        return {"wallets": await self.store.get("/wallets")}

    async def wallet(self, query: Mapping[str, str]) -> dict[str, Any]:
        address = _match(ADDRESS, query.get("address", ""), "address (0x + 40 hex digits)").lower()
        tracked, fills, signals = await asyncio.gather(
            self.store.get("/wallets"),
            self.store.get("/orders", {"wallet": address, "limit": WALLET_ROWS_MAX}),
            self.store.get("/signals", {"wallet": address, "limit": WALLET_ROWS_MAX}),
        )
        entry = next((w for w in tracked if str(w.get("address", "")).lower() == address), None)
        return {
            "address": address,
            # Whatever the store says of the wallet, quality fields included when it has them.
            "wallet": entry,
            "fills": [compact_fill(item) for item in fills["items"]],
            "signals": [compact_signal(item) for item in signals["items"]],
        }


def compact_signal(item: Mapping[str, Any]) -> dict[str, Any]:
    """A stored signal as the page reads it: the live feed's shape (times in Unix seconds)."""
    out = {name: item.get(name) for name in SIGNAL_FIELDS}
    out.update({name: _seconds(item.get(name)) for name in TIMES})
    return out


def compact_fill(item: Mapping[str, Any]) -> dict[str, Any]:
    out = {name: item.get(name) for name in FILL_FIELDS}
    out["wallet"] = item.get("wallet")
    out["exchange_ts"] = _seconds(item.get("exchange_ts"))
    return out


def _by_time(fill: Mapping[str, Any]) -> tuple[float, str]:
    return fill["exchange_ts"] or 0.0, str(fill["order_key"])


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


def _number(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadInput(f"{name} must be a whole number of seconds") from None
    if not low <= value <= high:
        raise BadInput(f"{name} must be between {low} and {high}")
    return value


def _match(pattern: re.Pattern[str], text: str, what: str) -> str:
    if not pattern.match(text):
        raise BadInput(f"expected {what}")
    return text


_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def page_policy(html: str) -> str:
    """The page's Content-Security-Policy: its own inline script (by hash) and nothing else runs,
    it talks to this origin only, and no other site may frame it. A feed text that reached the
    DOM as markup despite the page's care still could not run a script."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in _SCRIPT.findall(html)
    )
    return (
        "default-src 'none'; "
        f"script-src {hashes}; "
        "style-src 'unsafe-inline'; "
        "connect-src 'self'; "
        "img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
