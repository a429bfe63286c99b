"""The store's wallet-quality refresher: a task beside the consumers that keeps `wallet_quality`
(migration 005) up to date for every tracked wallet, and feeds the score to the detector.

Every `WALLET_QUALITY_TICK_S` it refreshes, at most `WALLET_QUALITY_BATCH` at a time, the tracked
wallets whose last attempt is older than `WALLET_QUALITY_EVERY_S` or who have none (a wallet added
live is refreshed within a tick): their history is read (`wallet_quality_source`), their quality
computed (`wallet_quality`) and written. With `WALLET_QUALITY_SETS_SCORE` the score becomes the
wallet's score in Postgres and the registry (announced on the control stream, as `PUT /wallets`
would), which the detector's confidence formulas read; a score of None (too few decided
positions) leaves the wallet's score as it is. Only the score changes, and only while the wallet
is tracked (`Wallets.set_score`): a wallet removed or relabelled during the reads stays so.

A tick runs under a Postgres advisory lock, so replicas take turns instead of asking the Data API
twice. A wallet whose history cannot be read keeps its last figures; its row records the error
(`error`, without the URL) and it is tried again after `WALLET_QUALITY_EVERY_S`. Postgres or the
registry unavailable ends the tick; the next one tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.store.database import Database, Unavailable
from services.store.settings import StoreSettings
from services.store.wallet_quality import Quality, ScoreRule, quality_of
from services.store.wallet_quality_source import QualitySource, SourceError
from services.store.wallets import StoredWallet, Wallets, stored

log = logging.getLogger(__name__)

LOCK = int.from_bytes(
    hashlib.sha256(b"betterbot.store.wallet_quality").digest()[:8], "big", signed=True
)
# A score this close to the stored one is not worth a registry change (and a detector update).
SCORE_STEP = 0.005

REFRESHED = Counter(
    "betterbot_store_wallet_quality_refreshed",
    "Wallet quality refreshes by result: ok, or failed (the Data API or Gamma could not be read)",
    ["result"],
)

_DUE_SQL = """
SELECT w.address, w.label, w.score, w.added_at, w.updated_at
FROM tracked_wallets w LEFT JOIN wallet_quality q ON q.address = w.address
WHERE w.removed_at IS NULL
  AND (q.address IS NULL OR q.attempted_at < now() - make_interval(secs => $1))
ORDER BY q.attempted_at NULLS FIRST, w.address
LIMIT $2
"""
_SAVE_SQL = """
INSERT INTO wallet_quality AS q (address, realised_pnl, unrealised_pnl, wins, losses,
    markets_traded, trades, volume_usd, market_maker, bot, score, refreshed_at, attempted_at,
    error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now(), now(), '')
ON CONFLICT (address) DO UPDATE SET
    realised_pnl = EXCLUDED.realised_pnl, unrealised_pnl = EXCLUDED.unrealised_pnl,
    wins = EXCLUDED.wins, losses = EXCLUDED.losses, markets_traded = EXCLUDED.markets_traded,
    trades = EXCLUDED.trades, volume_usd = EXCLUDED.volume_usd,
    market_maker = EXCLUDED.market_maker, bot = EXCLUDED.bot, score = EXCLUDED.score,
    refreshed_at = now(), attempted_at = now(), error = ''
"""
_FAILED_SQL = """
INSERT INTO wallet_quality AS q (address, attempted_at, error) VALUES ($1, now(), $2)
ON CONFLICT (address) DO UPDATE SET attempted_at = now(), error = EXCLUDED.error
"""
_READ_SQL = "SELECT * FROM wallet_quality WHERE address = ANY($1::text[])"


@dataclass(frozen=True)
class QualityConfig:
    data_api_url: str
    gamma_url: str
    every_s: float = 3600.0
    tick_s: float = 60.0
    batch: int = 50
    sets_score: bool = True
    max_trades: int = 2000
    rule: ScoreRule = field(default_factory=ScoreRule)

    @classmethod
    def of(cls, s: StoreSettings) -> QualityConfig:
        return cls(
            data_api_url=s.data_api_url,
            gamma_url=s.gamma_api_url,
            every_s=s.wallet_quality_every_s,
            tick_s=s.wallet_quality_tick_s,
            batch=s.wallet_quality_batch,
            sets_score=s.wallet_quality_sets_score,
            max_trades=s.wallet_quality_max_trades,
            rule=ScoreRule(s.wallet_quality_min_decided, s.wallet_quality_pnl_scale_usd),
        )


class QualityRefresher:
    def __init__(
        self,
        db: Database,
        wallets: Wallets,
        config: QualityConfig,
        source: QualitySource | None = None,
    ) -> None:
        self.db = db
        self.wallets = wallets
        self.config = config
        self.source = source or QualitySource(
            config.data_api_url, config.gamma_url, max_trades=config.max_trades
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop` is set; a tick that fails is logged and the next one retries."""
        while not stop.is_set():
            try:
                await self.tick()
            except (Unavailable, asyncpg.PostgresError, OSError, RedisError) as exc:
                log.warning("wallet_quality_tick_failed", extra={"error": type(exc).__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.tick_s)

    async def close(self) -> None:
        await self.source.aclose()
        await self.db.close()

    async def tick(self) -> int:
        """Refresh the wallets that are due; how many were refreshed (0 while another replica
        holds the lock)."""
        async with self.db.connection() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK):
                return 0
            try:
                rows = await conn.fetch(_DUE_SQL, self.config.every_s, self.config.batch)
                due = [stored(row) for row in rows]
                return sum([await self.refresh(conn, wallet) for wallet in due])
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", LOCK)

    async def refresh(self, conn: asyncpg.Connection, wallet: StoredWallet) -> bool:
        try:
            history = await self.source.history(wallet.address)
        except SourceError as exc:
            REFRESHED.labels("failed").inc()
            log.warning(
                "wallet_quality_unavailable", extra={"wallet": wallet.address, "error": str(exc)}
            )
            await conn.execute(_FAILED_SQL, wallet.address, str(exc)[:300])
            return False
        quality = quality_of(history, self.config.rule)
        await conn.execute(_SAVE_SQL, wallet.address, *_columns(quality))
        REFRESHED.labels("ok").inc()
        # The score only, and only if the wallet is still tracked: its label and its being
        # tracked may have changed during the reads above (`Wallets.set_score`).
        score = quality.score
        wanted = self.config.sets_score and score is not None and _moved(wallet.score, score)
        if wanted and score is not None and not await self.wallets.set_score(wallet.address, score):
            log.info("wallet_quality_score_skipped", extra={"wallet": wallet.address})
        return True


def _columns(q: Quality) -> tuple[Any, ...]:
    return (
        q.realised_pnl,
        q.unrealised_pnl,
        q.wins,
        q.losses,
        q.markets_traded,
        q.trades,
        q.volume_usd,
        q.market_maker,
        q.bot,
        q.score,
    )


def _moved(stored: float | None, computed: float | None) -> bool:
    if computed is None:
        return False
    return stored is None or abs(stored - computed) >= SCORE_STEP


async def qualities(db: Database, addresses: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The stored quality of these wallets, as the API serves it (win rate derived)."""
    async with db.connection() as conn:
        rows = await conn.fetch(_READ_SQL, list(addresses))
    return {row["address"]: served(dict(row)) for row in rows}


def served(row: dict[str, Any]) -> dict[str, Any]:
    decided = row["wins"] + row["losses"]
    refreshed: datetime | None = row["refreshed_at"]
    return {
        "score": row["score"],
        "realised_pnl": row["realised_pnl"],
        "unrealised_pnl": row["unrealised_pnl"],
        "win_rate": row["wins"] / decided if decided else None,
        "wins": row["wins"],
        "losses": row["losses"],
        "markets_traded": row["markets_traded"],
        "trades": row["trades"],
        "volume_usd": row["volume_usd"],
        "market_maker": row["market_maker"],
        "bot": row["bot"],
        "refreshed_at": refreshed,
        "error": row["error"],
    }
