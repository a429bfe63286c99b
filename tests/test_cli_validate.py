"""`betterbot validate` against real Postgres: its figures checked against a second, independent
computation (plain Python over the rows the test wrote, Wilson from its closed form), for every
grouping and a time window; retracted signals and unpriced rows left out; bad input and an
unreachable or empty database are exit code 2."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from devtools.servers import free_port
from services.store import rows
from services.store.database import write_batch
from shared.models import FillStatus, Signal, SignalKind, Source
from shared.redis_streams import encode
from tests.helpers.cli import Cli
from tests.test_store_rows import make_signal

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "services" / "store" / "migrations"
WALLETS = ["0x" + c * 40 for c in "abc"]
HORIZONS = ["5m", "1h", "24h", "settlement"]
DAY0 = 1_790_000_000  # detected_at of the first half; the second half a day later
Z = 1.959963984540054


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


@pytest.fixture
def cli(redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(redis_url, namespace, capsys)


def signals(count: int) -> list[Signal]:
    rng = random.Random(17)
    made = []
    for i in range(count):
        detected = DAY0 + (i % 2) * 86_400 + i
        made.append(
            make_signal(
                i,
                kind=rng.choice(list(SignalKind)),
                wallet=rng.choice(WALLETS),
                source=rng.choice([Source.DOME_WS, Source.POLYGON]),
                status=FillStatus.RETRACTED if i % 11 == 0 else FillStatus.CONFIRMED,
                exchange_ts=detected - 1,
                detected_at=float(detected),
            )
        )
    return made


def outcomes(made: list[Signal]) -> list[tuple[str, str, float | None, float]]:
    """(signal_id, horizon, markout or None, fee): whale orders mostly pay, the rest are noise;
    some markouts are exactly 0 (flat) and some missing (no price)."""
    rng = random.Random(29)
    result = []
    for s in made:
        for horizon in HORIZONS:
            if rng.random() < 0.2:
                continue
            fee = rng.choice([0.0, 0.24])
            if rng.random() < 0.1:
                result.append((s.signal_id, horizon, None, fee))
                continue
            bias = 0.8 if s.kind is SignalKind.WHALE_ORDER else 0.5
            move = 0.0 if rng.random() < 0.1 else rng.uniform(0.1, 40)
            sign = 1 if rng.random() < bias else -1
            result.append((s.signal_id, horizon, 0.0 if move == 0 else sign * move - fee, fee))
    return result


async def seed(db: asyncpg.Connection, made: list[Signal], measured: list[Any]) -> None:
    entries: list[Any] = [(f"{i + 1}-0", encode(s)) for i, s in enumerate(made)]
    await write_batch(db, rows.SIGNALS, rows.prepare(rows.SIGNALS, entries).rows, 10)
    await db.executemany(
        "INSERT INTO signal_validation (signal_id, horizon, markout_cents, fee_cents, price) "
        "VALUES ($1, $2, $3, $4, CASE WHEN $3::float8 IS NULL THEN NULL ELSE 0.5 END)",
        measured,
    )


def expected_rows(
    made: list[Signal], measured: list[Any], by: str, since: float = 0
) -> dict[tuple[str, str], dict[str, Any]]:
    """The report, computed here from scratch."""
    signal = {s.signal_id: s for s in made}
    values: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for signal_id, horizon, markout, fee in measured:
        s = signal[signal_id]
        if s.status is FillStatus.RETRACTED or markout is None or s.detected_at < since:
            continue
        group = {"kind": s.kind.value, "wallet": s.wallet, "source": s.source.value}[by]
        values[group, horizon].append((markout, fee))
    report = {}
    for key, pairs in values.items():
        n = len(pairs)
        hits = sum(1 for markout, _ in pairs if markout > 0)
        root = Z * math.sqrt(hits * (n - hits) / n + Z * Z / 4)
        report[key] = {
            "n": n,
            "hits": hits,
            "flat": sum(1 for markout, _ in pairs if markout == 0),
            "mean_markout_cents": sum(m for m, _ in pairs) / n,
            "mean_fee_cents": sum(f for _, f in pairs) / n,
            "ci95_low": (hits + Z * Z / 2 - root) / (n + Z * Z),
            "ci95_high": (hits + Z * Z / 2 + root) / (n + Z * Z),
        }
    return report


def check(out: dict[str, Any], expected: dict[tuple[str, str], dict[str, Any]]) -> None:
    got = {(r["group"], r["horizon"]): r for r in out["rows"] if r["n"]}
    assert set(got) == set(expected)
    for key, want in expected.items():
        row = got[key]
        for name, value in want.items():
            assert row[name] == pytest.approx(value, abs=1e-9), (key, name)
        low, high = want["ci95_low"], want["ci95_high"]
        quiet = want["n"] < 10 or low <= 0.5 <= high
        assert row["verdict"].startswith("not significant") == quiet, (key, row)


async def test_the_report_matches_an_independent_computation(
    cli: Cli, db: asyncpg.Connection
) -> None:
    made = signals(400)
    measured = outcomes(made)
    await seed(db, made, measured)
    verdicts = set()
    for by in ("kind", "wallet", "source"):
        code, out, err = await cli("validate", "--by", by)
        assert code == 0, err
        assert out["by"] == by and out["horizons"] == HORIZONS and "Wilson" in out["rule"]
        check(out, expected_rows(made, measured, by))
        verdicts |= {r["verdict"] for r in out["rows"]}
    # The data make both answers appear: whale orders pay, the rest is noise.
    assert "significant: hits more often than not" in verdicts
    assert "not significant (interval includes 50%)" in verdicts
    since = datetime.fromtimestamp(DAY0 + 86_400, UTC).isoformat()
    code, out, _ = await cli("validate", "--since", since)
    assert code == 0
    check(out, expected_rows(made, measured, "kind", since=DAY0 + 86_400))


async def test_the_text_report_is_a_table_with_the_rule(cli: Cli, db: asyncpg.Connection) -> None:
    made = signals(30)
    await seed(db, made, outcomes(made))
    code, out, _ = await cli("validate", "--since", "3650d", as_json=False)
    assert code == 0
    assert "Rule: hit = net markout > 0" in out
    assert "| kind | horizon | n | mean markout ¢ | fee ¢ | hits | flat | hit rate | 95% CI" in out
    assert "not significant (n < 10)" in out


async def test_bad_input_and_no_database_are_exit_code_2(
    cli: Cli, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = await cli("validate", "--since", "yesterday", as_json=False)
    assert code == 2 and "--since/--until" in err
    await db.execute("DROP TABLE signal_validation")
    code, _, err = await cli("validate", as_json=False)
    assert code == 2 and "no validation in this database" in err
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    code, _, err = await cli("validate", as_json=False)
    assert code == 2 and "Postgres unreachable" in err
