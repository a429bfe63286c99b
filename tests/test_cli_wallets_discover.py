"""`betterbot wallets discover` against the simulator's leaderboard and Data API (a real server),
real Redis and Postgres: candidates ranked, scored from their history, the tracked ones marked,
and `--add` tracking the chosen ones."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from cli.wallets_discover import safe_label
from shared import wallet_registry
from shared.models import TrackedWallet
from shared.streams import Streams
from shared.wallets import dump_wallets
from tests.helpers.cli import Cli
from tests.helpers.ingestion import Sim, simulator
from tests.test_wallet_quality import (
    HAND,
    HAND_SCORE,
    MACHADO,
    RESOLUTION,
    W,
    history_trades,
    yes_of,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "services" / "store" / "migrations"
V = "0x" + "9f" * 20


@pytest.fixture
async def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sim]:
    """The simulator with W's hand-computed history and V's one trade; V is tracked."""
    async with simulator(sim_resolution=RESOLUTION) as running:
        v_trade = {**yes_of(MACHADO), "user": V, "side": "BUY", "shares_normalized": 10}
        await running.post("/_sim/emit", [*history_trades(), {**v_trade, "price": 0.5}])
        seed = tmp_path / "wallets.json"
        seed.write_bytes(dump_wallets([TrackedWallet(address=V, label="vee")]))
        monkeypatch.setenv("WALLETS_FILE", str(seed))
        monkeypatch.setenv("DATA_API_URL", running.base_url)
        monkeypatch.setenv("GAMMA_API_URL", running.base_url)
        yield running


@pytest.fixture
async def db(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[asyncpg.Connection]:
    monkeypatch.setenv("DATABASE_URL", database_url)
    conn = await asyncpg.connect(database_url)
    for migration in sorted(MIGRATIONS.glob("*.sql")):
        await conn.execute(migration.read_text())
    yield conn
    await conn.close()


async def test_discover_ranks_scores_and_marks_the_tracked(
    sim: Sim,
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli = Cli(redis_url, namespace, capsys)
    await wallet_registry.seed(redis_client, streams, [TrackedWallet(address=V, label="vee")])
    code, out, err = await cli("wallets", "discover", "--period", "all", "--min-decided", "3")
    assert code == 0, err
    first, second = out["candidates"]
    assert (first["rank"], first["address"], first["tracked"]) == (1, W, False)
    assert (second["address"], second["tracked"]) == (V, True)
    assert first["leaderboard_pnl"] == pytest.approx(47.0)
    quality = first["quality"]
    assert {k: quality[k] for k in HAND} == pytest.approx(HAND)
    assert quality["score"] == pytest.approx(HAND_SCORE, abs=1e-3)
    assert out["added"] == []
    # The leaderboard was asked as asked; nothing was tracked.
    asked = [r for r in await sim.get("/_sim/requests") if r["path"] == "/v1/leaderboard"]
    assert asked[-1]["params"] | {} == {
        "timePeriod": "ALL",
        "orderBy": "PNL",
        "category": "OVERALL",
        "limit": "10",
        "offset": "0",
    }

    code, text, _ = await cli("wallets", "discover", "--period", "all", as_json=False)
    assert code == 0
    lines = text.splitlines()
    assert lines[1].startswith("  1   " + W) and lines[2].startswith("  2*  " + V)


async def test_add_tracks_the_chosen_with_their_score(
    sim: Sim,
    db: asyncpg.Connection,
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli = Cli(redis_url, namespace, capsys)
    code, out, err = await cli(
        "wallets",
        "discover",
        "--period",
        "all",
        "--min-decided",
        "3",
        "--add",
        "1",
        "--db",
        "require",
    )
    assert code == 0, err
    (added,) = out["added"]
    assert added["wallet"]["address"] == W
    assert added["wallet"]["score"] == pytest.approx(HAND_SCORE, abs=1e-3)
    tracked, _ = await wallet_registry.snapshot(redis_client, streams)
    assert {w.address for w in tracked} == {V, W}  # V from the seed, W added
    row = await db.fetchrow("SELECT score, removed_at FROM tracked_wallets WHERE address = $1", W)
    assert row is not None and row["removed_at"] is None
    assert row["score"] == pytest.approx(HAND_SCORE, abs=1e-3)

    code, _, err = await cli("wallets", "discover", "--period", "all", "--add", "7")
    assert code == 2 and "--add 7: not a rank or address listed" in err


async def test_bad_options_and_an_unreachable_api_are_usage_errors(
    redis_url: str,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli = Cli(redis_url, namespace, capsys)
    code, _, err = await cli("wallets", "discover", "--category", "po;litics")
    assert code == 2 and "--category" in err
    code, _, err = await cli("wallets", "discover", "--limit", "0")
    assert code == 2 and "--limit must be 1..200" in err
    monkeypatch.setenv("DATA_API_URL", "http://127.0.0.1:9")
    code, _, err = await cli("wallets", "discover")
    assert code == 2 and "leaderboard: /v1/leaderboard: ConnectError" in err


def test_a_hostile_name_becomes_a_safe_label() -> None:
    assert safe_label("\x1b[31mevil\u202e name\x00 ") == "[31mevil name"
    assert len(safe_label("x" * 500)) == 200
