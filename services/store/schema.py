"""Schema migrations: versioned SQL files applied in order at startup, each recorded once.

Files live in `services/store/migrations/` and are named `NNN_description.sql`; NNN orders them.
All pending files run in one transaction that first takes `pg_advisory_xact_lock(MIGRATION_LOCK)`,
so replicas starting together serialize: the first applies, the others then find nothing to do.
Each applied file is recorded in `schema_migrations` with a checksum; an applied file whose text
has changed stops startup with an error (a changed migration is a deploy bug, not a thing to guess).

Replicas of the previous version keep writing while a new one migrates, so a migration must stay
compatible with the code before it: add columns nullable or with a default, never rename or drop
in the same release. (A NOT NULL column without a default would make every old replica's rows fail
as data errors, i.e. be dead-lettered.)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# A fixed 64-bit key shared by every replica (any constant works; this one is the SHA-256 prefix
# of "betterbot.store.migrations", so it will not collide with other users of advisory locks).
MIGRATION_LOCK = int.from_bytes(
    hashlib.sha256(b"betterbot.store.migrations").digest()[:8], "big", signed=True
)
_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in order; refuses misnamed files and duplicate versions."""
    found: dict[str, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file not named NNN_description.sql: {path.name}")
        version = match.group(1)
        if version in found:
            raise MigrationError(f"two migrations with version {version}: {path.name}")
        found[version] = Migration(version, path.name, path.read_text())
    if not found:
        # E.g. an install that left the .sql files out of the package.
        raise MigrationError(f"no migrations found in {directory}")
    return sorted(found.values(), key=lambda m: int(m.version))


async def migrate(
    conn: asyncpg.Connection,
    migrations: list[Migration],
    statement_timeout_s: float | None = None,
) -> list[str]:
    """Apply the migrations not applied yet; returns the versions applied by this call.

    `statement_timeout_s` bounds each migration's SQL (default: the connection's): an index
    build on a big table can take far longer than an ordinary statement.
    """
    applied_now: list[str] = []
    async with conn.transaction():
        # The lock comes first: concurrent CREATE TABLE IF NOT EXISTS can itself fail.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        done = {row["version"]: row for row in rows}
        for migration in migrations:
            if migration.version in done:
                if done[migration.version]["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.name} changed after it was applied "
                        f"(as {done[migration.version]['name']}); add a new migration instead"
                    )
                continue
            await conn.execute(migration.sql, timeout=statement_timeout_s)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied_now.append(migration.version)
    return applied_now
