"""Reading a wallet's history, and the leaderboard, from Polymarket's Data API and Gamma.

- `GET <data api>/closed-positions?user=&limit=50&offset=` (50 is the API's page cap), and
  `/positions?user=&limit=500&offset=` (the simulator's `/positions` and Polymarket's both cap a
  page at 500), each up to `max_positions` items;
- `GET <data api>/trades?user=&takerOnly=false&limit=500&offset=` (without `takerOnly=false` the
  maker fills are left out), the newest `max_trades` (the API stops at offset 10,000);
- `GET <gamma>/markets?condition_ids=..&closed=true` for the open positions' markets, 20 at a time
  (Gamma leaves closed markets out unless asked so): which resolved, and what each outcome pays;
- `GET <data api>/v1/leaderboard?timePeriod=&orderBy=&category=&limit=&offset=` for discovery
  (`rank, proxyWallet, userName, vol, pnl, ...`; a page holds at most 50).

Every answer is outside input: items that are not objects are dropped, numbers are read by
`wallet_quality` (a string or NaN counts 0), and text is kept only where it is shown, bounded.
An HTTP error or an answer that is not a JSON list raises `SourceError`; nothing is half-read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from services.store.markouts import Payouts, gamma_payouts
from services.store.wallet_quality import WalletHistory

CLOSED_PAGE = 50
POSITIONS_PAGE = 500
TRADES_PAGE = 500
TRADES_OFFSET_MAX = 10_000
GAMMA_BATCH = 20
LEADERBOARD_PAGE = 50
NAME_MAX = 100

PERIODS = ("DAY", "WEEK", "MONTH", "ALL")
ORDERS = ("PNL", "VOL")


class SourceError(RuntimeError):
    """The Data API or Gamma could not be read (the message names which and why, no secrets)."""


@dataclass(frozen=True)
class Leader:
    """A leaderboard row."""

    rank: int
    address: str
    name: str
    pnl: float
    volume: float


class QualitySource:
    def __init__(
        self,
        data_api_url: str,
        gamma_url: str,
        *,
        max_trades: int = 2000,
        max_positions: int = 2000,
        timeout_s: float = 10.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._data = data_api_url.rstrip("/")
        self._gamma = gamma_url.rstrip("/")
        self._max_trades = min(max_trades, TRADES_OFFSET_MAX)
        self._max_positions = max_positions
        self._http = http or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def history(self, address: str) -> WalletHistory:
        closed = await self._pages(
            "/closed-positions", {"user": address}, CLOSED_PAGE, self._max_positions
        )
        open_positions = await self._pages(
            "/positions", {"user": address}, POSITIONS_PAGE, self._max_positions
        )
        trades = await self._pages(
            "/trades", {"user": address, "takerOnly": "false"}, TRADES_PAGE, self._max_trades
        )
        markets = {str(p.get("conditionId", "")) for p in open_positions} - {""}
        return WalletHistory(closed, open_positions, trades, await self.resolved(markets))

    async def resolved(self, condition_ids: Iterable[str]) -> dict[str, Payouts]:
        """Condition id (lower case) -> payouts, for the markets that have resolved."""
        wanted = sorted({c.lower() for c in condition_ids})
        found: dict[str, Payouts] = {}
        for start in range(0, len(wanted), GAMMA_BATCH):
            params: list[tuple[str, str | int | float | bool | None]] = [
                ("condition_ids", c) for c in wanted[start : start + GAMMA_BATCH]
            ]
            params.append(("closed", "true"))
            for market in await self._get_list(self._gamma + "/markets", params):
                payouts = gamma_payouts(market)
                if payouts is not None and isinstance(market.get("conditionId"), str):
                    found[market["conditionId"].lower()] = payouts
        return found

    async def leaderboard(
        self, *, period: str, order_by: str, category: str, limit: int
    ) -> list[Leader]:
        leaders: list[Leader] = []
        while len(leaders) < limit:
            page = min(LEADERBOARD_PAGE, limit - len(leaders))
            params: dict[str, str | int] = {
                "timePeriod": period,
                "orderBy": order_by,
                "category": category,
                "limit": page,
                "offset": len(leaders),
            }
            items = await self._get_list(self._data + "/v1/leaderboard", params)
            leaders += [leader for item in items if (leader := _leader(item)) is not None]
            if len(items) < page:
                break
        return leaders[:limit]

    async def _pages(
        self, path: str, params: dict[str, str], page: int, most: int
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while len(items) < most:
            asked = {**params, "limit": page, "offset": len(items)}
            got = await self._get_list(self._data + path, asked)
            items += got
            if len(got) < page:
                break
        return items[:most]

    async def _get_list(self, url: str, params: Any) -> list[dict[str, Any]]:
        try:
            response = await self._http.get(url, params=params)
        except httpx.HTTPError as exc:
            raise SourceError(f"{_where(url)}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise SourceError(f"{_where(url)}: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise SourceError(f"{_where(url)}: not JSON") from None
        if not isinstance(body, list):
            raise SourceError(f"{_where(url)}: not a JSON list")
        return [item for item in body if isinstance(item, dict)]


def _leader(item: dict[str, Any]) -> Leader | None:
    address = item.get("proxyWallet")
    if not isinstance(address, str) or len(address) != 42 or not address.startswith("0x"):
        return None
    try:
        int(address[2:], 16)
        rank = int(str(item.get("rank", "0")))
    except ValueError:
        return None
    name = item.get("userName")
    return Leader(
        rank=rank,
        address=address.lower(),
        name=name[:NAME_MAX] if isinstance(name, str) else "",
        pnl=_float(item.get("pnl")),
        volume=_float(item.get("vol")),
    )


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def _where(url: str) -> str:
    """The endpoint's path, for messages (a URL may carry credentials in its host part)."""
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "/" in url else url
