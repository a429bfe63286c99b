"""The store's settings, from the environment (unprefixed names) or `.env`.

- `DATABASE_URL` (`postgresql://postgres@127.0.0.1:5432/postgres`): where rows go; never logged
  with its password.
- `OPS_PORT` (`8081`): /health and /metrics; the history API joins this port later.
- `STORE_BATCH_MAX` (`500`): entries read per XREADGROUP, so at most that many rows per insert.
- `STORE_BLOCK_MS` (`100`): XREADGROUP BLOCK time.
- `STORE_RETRY_MIN_S` (`0.1`), `STORE_RETRY_MAX_S` (`5.0`): delay before retrying a batch that
  Postgres did not take, doubling from min to max.
- `STORE_DB_TIMEOUT_S` (`10`): connect and statement timeout, so a silent network cannot hang a
  batch.
- `STORE_POOL_SIZE` (`4`): Postgres connections (two subscribers, the reclaimer, the health ping).
- `STORE_CLAIM_IDLE_MS` (`60000`): entries pending this long with any `store` consumer are taken
  over; `STORE_CLAIM_EVERY_S` (`5`): how often to look for them.
- `STORE_MAX_DELIVERIES` (`5`): a reclaimed entry still failing after this many deliveries is
  dead-lettered.
- `STORE_SHUTDOWN_TIMEOUT_S` (`15`): on SIGTERM, how long the batch in flight may take to commit.
Plus the common ones: `REDIS_URL`, `STREAM_NAMESPACE`, `LOG_LEVEL`, `OPS_HOST`.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from shared.settings import DatabaseSettings


class StoreSettings(DatabaseSettings):
    ops_port: int = 8081

    store_batch_max: int = Field(default=500, ge=1, le=10_000)
    store_block_ms: int = Field(default=100, ge=1)
    store_retry_min_s: float = Field(default=0.1, gt=0)
    store_retry_max_s: float = Field(default=5.0, gt=0)
    store_db_timeout_s: float = Field(default=10.0, gt=0)
    store_pool_size: int = Field(default=4, ge=2)
    store_claim_idle_ms: int = Field(default=60_000, ge=1)
    store_claim_every_s: float = Field(default=5.0, gt=0)
    store_max_deliveries: int = Field(default=5, ge=1)
    store_shutdown_timeout_s: float = Field(default=15.0, ge=0)

    @model_validator(mode="after")
    def _retry_bounds(self) -> StoreSettings:
        if self.store_retry_max_s < self.store_retry_min_s:
            raise ValueError("STORE_RETRY_MAX_S must be at least STORE_RETRY_MIN_S")
        return self
