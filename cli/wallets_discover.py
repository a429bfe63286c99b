"""`betterbot wallets discover`: wallets worth tracking, from Polymarket's leaderboard, each with
its quality measured on its history, those already tracked marked; `--add` tracks chosen ones.

The leaderboard is the Data API's `GET /v1/leaderboard` (`--period day|week|month|all`,
`--category overall|politics|sports|crypto|...`, `--order-by pnl|vol`, at most 50 a page): it
ranks by PnL or volume over the window, which says nothing about luck or market making. So each
proposed wallet is measured as the store measures tracked ones (`services/store/wallet_quality`):
realised and unrealised PnL, win rate counting losers never redeemed, markets, market-maker and
bot flags, and the score (docs/store.md, "Wallet quality"). Read from DATA_API_URL and
GAMMA_API_URL (the simulator's by default, like the services).

`--add` takes a rank or an address from the list (repeatable, or comma-separated), or `all` for
every proposed wallet not tracked yet. A wallet is added as `betterbot wallets add` would add it
(the registry, then the Postgres mirror per `--db`), labelled with its leaderboard name and with
its score. Names are outside text: shown escaped, and stored only as printable text.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from cli import wallets
from cli.settings import CliSettings
from services.store.wallet_quality import Quality, ScoreRule, quality_of
from services.store.wallet_quality_source import Leader, QualitySource, SourceError
from shared.models import LABEL_MAX, TrackedWallet
from shared.terminal import printable
from shared.wallet_registry import snapshot

PERIODS = ("day", "week", "month", "all")
ORDERS = ("pnl", "vol")
_CATEGORY = re.compile(r"^[A-Za-z_-]{1,40}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


class DiscoverError(ValueError):
    """A usage problem, or the Data API could not be read."""


@dataclass(frozen=True)
class Candidate:
    leader: Leader
    quality: Quality | None
    error: str
    tracked: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--period", choices=PERIODS, default="week", help="leaderboard window")
    parser.add_argument("--category", default="overall", help="overall, politics, sports, ...")
    parser.add_argument("--order-by", choices=ORDERS, default="pnl", help="rank by PnL or volume")
    parser.add_argument("--limit", type=int, default=10, help="wallets proposed (1..200)")
    parser.add_argument(
        "--add", action="append", default=[], help="rank, address, or all; repeatable"
    )
    parser.add_argument(
        "--min-decided", type=int, default=5, help="decided positions needed for a score"
    )
    parser.add_argument(
        "--db", choices=("auto", "require", "off"), default="auto", help="Postgres mirror of --add"
    )


async def candidates(
    args: argparse.Namespace, client: aioredis.Redis, s: CliSettings, source: QualitySource
) -> list[Candidate]:
    if not 1 <= args.limit <= 200:
        raise DiscoverError("--limit must be 1..200")
    if not _CATEGORY.match(args.category):
        raise DiscoverError("--category must be a name such as overall or politics")
    try:
        leaders = await source.leaderboard(
            period=args.period.upper(),
            order_by=args.order_by.upper(),
            category=args.category.upper(),
            limit=args.limit,
        )
    except SourceError as exc:
        raise DiscoverError(f"leaderboard: {exc}") from None
    tracked = {w.address for w in (await snapshot(client, s.streams))[0]}
    rule = ScoreRule(min_decided=max(1, args.min_decided))
    found = []
    for leader in leaders:
        try:
            quality, error = quality_of(await source.history(leader.address), rule), ""
        except SourceError as exc:
            quality, error = None, str(exc)
        found.append(Candidate(leader, quality, error, leader.address in tracked))
    return found


def chosen(picks: Sequence[str], found: Sequence[Candidate]) -> list[Candidate]:
    """The candidates `--add` names (ranks, addresses, `all`: every one not tracked)."""
    wanted = [part.strip().lower() for pick in picks for part in pick.split(",") if part.strip()]
    if "all" in wanted:
        return [c for c in found if not c.tracked]
    by_rank = {str(c.leader.rank): c for c in found}
    by_address = {c.leader.address: c for c in found}
    picked: list[Candidate] = []
    for item in wanted:
        candidate = by_rank.get(item) or by_address.get(item)
        if candidate is None:
            raise DiscoverError(f"--add {printable(item[:60])}: not a rank or address listed")
        if candidate not in picked:
            picked.append(candidate)
    return picked


async def track(
    args: argparse.Namespace,
    client: aioredis.Redis,
    s: CliSettings,
    picked: Sequence[Candidate],
    seed: Sequence[TrackedWallet],
) -> list[dict[str, Any]]:
    added = []
    for candidate in picked:
        wallet = TrackedWallet(
            address=candidate.leader.address,
            label=safe_label(candidate.leader.name),
            score=None if candidate.quality is None else candidate.quality.score,
        )
        control_id = await wallets.add(client, s.streams, wallet, seed)
        mirrored = await wallets.mirror(s.database_url, args.db, "upsert", wallet, control_id)
        added.append(
            {
                "wallet": wallet.model_dump(mode="json"),
                "control_id": control_id,
                "postgres": mirrored.detail,
            }
        )
    return added


def safe_label(name: str) -> str:
    """A leaderboard name as a label: control and direction characters dropped, bounded."""
    return _CONTROL.sub("", name).strip()[:LABEL_MAX]


def as_json(found: Sequence[Candidate]) -> list[dict[str, Any]]:
    return [
        {
            "rank": c.leader.rank,
            "address": c.leader.address,
            "name": c.leader.name,
            "leaderboard_pnl": c.leader.pnl,
            "leaderboard_volume": c.leader.volume,
            "tracked": c.tracked,
            "quality": None if c.quality is None else _quality_json(c.quality),
            "error": c.error,
        }
        for c in found
    ]


def _quality_json(q: Quality) -> dict[str, Any]:
    return {
        "score": q.score,
        "realised_pnl": q.realised_pnl,
        "unrealised_pnl": q.unrealised_pnl,
        "win_rate": q.win_rate,
        "wins": q.wins,
        "losses": q.losses,
        "markets_traded": q.markets_traded,
        "trades": q.trades,
        "volume_usd": q.volume_usd,
        "market_maker": q.market_maker,
        "bot": q.bot,
    }


def render(found: Sequence[Candidate], added: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "rank  address                                     score  win%   realised  unrealised  "
        "mkts  flags     name"
    ]
    for c in found:
        lines.append(_line(c))
    if not found:
        lines.append("(the leaderboard is empty for this window and category)")
    lines += [f"tracking {a['wallet']['address']}; postgres: {a['postgres']}" for a in added]
    return lines


def _line(c: Candidate) -> str:
    mark = "*" if c.tracked else " "
    q = c.quality
    if q is None:
        figures = f"{'-':>5}  {'-':>4}  {'-':>9}  {'-':>10}  {'-':>4}  {'error':<8}"
    else:
        score = "-" if q.score is None else f"{q.score:.2f}"
        win = "-" if q.win_rate is None else f"{100 * q.win_rate:.0f}"
        flags = ",".join(f for f, on in (("mm", q.market_maker), ("bot", q.bot)) if on) or "-"
        figures = (
            f"{score:>5}  {win:>4}  {q.realised_pnl:>9.0f}  {q.unrealised_pnl:>10.0f}  "
            f"{q.markets_traded:>4}  {flags:<8}"
        )
    name = printable(c.leader.name) + (f" ({printable(c.error)})" if c.error else "")
    return f"{c.leader.rank:>3}{mark}  {c.leader.address}  {figures}  {name}"
