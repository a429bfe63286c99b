"""`betterbot wallets` against real Redis and Postgres: the registry (hash + control stream), its
seeding from the wallets file, and the mirror into the store's `tracked_wallets` table."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from shared import wallet_registry
from shared.redis_streams import decode
from shared.streams import Streams
from shared.wallets import load_wallets
from tests.helpers.cli import Cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "services" / "store" / "migrations"
SEED = load_wallets(ROOT / "config" / "wallets.example.json")
NEW = "0x" + "c0" * 20


@pytest.fixture
async def db(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[asyncpg.Connection]:
    """The test database with the store's migrations applied, as the CLI's DATABASE_URL."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    conn = await asyncpg.connect(database_url)
    for migration in sorted(MIGRATIONS.glob("*.sql")):
        await conn.execute(migration.read_text())
    yield conn
    await conn.close()


@pytest.fixture
def cli(redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(redis_url, namespace, capsys)


async def _row(db: asyncpg.Connection, address: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM tracked_wallets WHERE address = $1", address)


async def test_add_seeds_the_registry_announces_and_mirrors(
    cli: Cli, db: asyncpg.Connection, redis_client: aioredis.Redis, streams: Streams
) -> None:
    code, out, _ = await cli(
        "wallets", "add", NEW.upper().replace("0X", "0x"), "--label", "new", "--score", "0.8"
    )
    assert code == 0 and out["postgres_written"], out

    tracked, last_id = await wallet_registry.snapshot(redis_client, streams)
    assert {w.address for w in tracked} == {w.address for w in SEED} | {NEW}
    assert last_id == out["control_id"]
    # The seed is announced wallet by wallet, then the add.
    changes = [decode(fields) for _, fields in await redis_client.xrange(streams.wallets_control)]
    assert [c["wallet"]["address"] for c in changes] == [w.address for w in SEED] + [NEW]
    assert changes[-1]["op"] == "upsert" and changes[-1]["wallet"]["label"] == "new"

    row = await _row(db, NEW)
    assert row is not None and (row["label"], row["score"], row["removed_at"]) == ("new", 0.8, None)
    ms, seq = out["control_id"].split("-")
    assert (row["control_ms"], row["control_seq"]) == (int(ms), int(seq))


async def test_remove_tombstones_the_row_and_relabel_revives_it(
    cli: Cli, db: asyncpg.Connection, redis_client: aioredis.Redis, streams: Streams
) -> None:
    assert (await cli("wallets", "add", NEW, "--label", "a"))[0] == 0
    code, out, _ = await cli("wallets", "remove", NEW)
    assert code == 0 and out["op"] == "remove" and out["postgres_written"]
    assert await redis_client.hget(streams.wallets_key(), NEW) is None
    row = await _row(db, NEW)
    assert row is not None and row["removed_at"] is not None

    code, out, err = await cli("wallets", "remove", NEW)
    assert code == 1 and "not tracked" in err

    assert (await cli("wallets", "add", NEW, "--label", "b"))[0] == 0
    row = await _row(db, NEW)
    assert row is not None and (row["label"], row["removed_at"]) == ("b", None)


async def test_a_row_changed_by_a_later_control_entry_is_not_overwritten(
    cli: Cli, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO tracked_wallets (address, label, control_ms, control_seq) "
        "VALUES ($1, 'newer', $2, 0)",
        NEW,
        2**62,
    )
    assert (await cli("wallets", "add", NEW, "--label", "older"))[0] == 0
    row = await _row(db, NEW)
    assert row is not None and row["label"] == "newer"


async def test_list_shows_the_registry_and_where_postgres_differs(
    cli: Cli, db: asyncpg.Connection
) -> None:
    assert (await cli("wallets", "add", NEW))[0] == 0
    code, out, _ = await cli("wallets", "list")
    assert code == 0
    assert {w["address"] for w in out["wallets"]} == {w.address for w in SEED} | {NEW}
    assert out["postgres"] == [NEW]


async def test_a_table_without_tombstones_gets_plain_rows_and_deletes(
    cli: Cli, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE TABLE tracked_wallets (address text PRIMARY KEY, label text, "
            "score double precision)"
        )
        assert (await cli("wallets", "add", NEW, "--label", "x"))[0] == 0
        assert await conn.fetchval("SELECT label FROM tracked_wallets") == "x"
        assert (await cli("wallets", "remove", NEW))[0] == 0
        assert await conn.fetchval("SELECT count(*) FROM tracked_wallets") == 0
    finally:
        await conn.close()


async def test_postgres_unreachable_is_reported_and_required_only_on_request(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, redis_client: aioredis.Redis, streams: Streams
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    code, out, _ = await cli("wallets", "add", NEW)
    assert code == 0 and not out["postgres_written"] and "unreachable" in out["postgres"]
    code, _, err = await cli("wallets", "add", NEW, "--label", "y", "--db", "require")
    assert code == 1 and "unreachable" in err
    # The registry change stands: Postgres is a mirror, Redis is what the services follow.
    raw = await redis_client.hget(streams.wallets_key(), NEW)
    assert raw is not None and orjson.loads(raw)["label"] == "y"


@pytest.mark.parametrize(
    "args",
    [
        ("wallets", "add", "0x123"),
        ("wallets", "add", NEW, "--score", "1.5"),
        ("wallets", "remove", "nope"),
    ],
)
async def test_bad_input_is_a_clear_error(
    cli: Cli, args: tuple[str, ...], redis_client: aioredis.Redis, streams: Streams
) -> None:
    code, out, err = await cli(*args, "--db", "off")
    assert code == 2 and out is None and err.startswith("betterbot: ")
    assert not await redis_client.exists(streams.wallets_control)
