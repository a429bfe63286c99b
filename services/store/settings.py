"""The store's settings, from the environment (unprefixed names) or `.env`.

- `DATABASE_URL` (`postgresql://postgres@127.0.0.1:5432/postgres`): where rows go; never logged
  with its password.
- `OPS_PORT` (`8081`), `OPS_HOST` (`127.0.0.1`): the HTTP API (docs at /docs), /health and
  /metrics, all on this one port.
- `STORE_BATCH_MAX` (`500`): entries read per XREADGROUP, so at most that many rows per insert.
- `STORE_BLOCK_MS` (`100`): XREADGROUP BLOCK time.
- `STORE_LINGER_MS` (`20`, 0 = off): after a batch smaller than `STORE_BATCH_MAX`, wait this long
  before the next read, so that under a steady flow each transaction carries more rows, and the
  store and Postgres spend less CPU per order (bench/README.md). The wait delays no subscriber:
  the store is not on their path (the notifier reads `signals` itself).
- `STORE_RETRY_MIN_S` (`0.1`), `STORE_RETRY_MAX_S` (`5.0`): delay before retrying a batch that
  Postgres did not take, doubling from min to max.
- `STORE_DB_TIMEOUT_S` (`10`): connect and statement timeout, so a silent network cannot hang a
  batch.
- `STORE_POOL_SIZE` (`4`): Postgres connections of the write path (a consumer per stream, the
  health ping, the wallet follower; the API has its own pool).
- `STORE_CLAIM_IDLE_MS` (`60000`): entries pending this long with any `store` consumer are taken
  over; `STORE_CLAIM_EVERY_S` (`5`): how often to look for them.
- `STORE_MAX_DELIVERIES` (`5`): a reclaimed entry still failing after this many deliveries is
  dead-lettered.
- `STORE_SHUTDOWN_TIMEOUT_S` (`15`): on SIGTERM, how long the batch in flight may take to commit.
- `STORE_MIGRATION_TIMEOUT_S` (`3600`): bound on one migration (an index build on a big table).
- `STORE_API_TOKEN` (unset): bearer token of the write endpoints (at least 16 characters; a
  secret, never logged). Unset: the write endpoints answer 403.
- `STORE_API_READ_AUTH` (`false`): true makes the read endpoints need the token too.
- `STORE_API_MAX_BODY_BYTES` (`16384`): larger request bodies get 413.
- `STORE_API_POOL_SIZE` (`4`): the API's own Postgres connections (a CSV export holds one).
- `STORE_API_ALLOWED_HOSTS` (`localhost,127.0.0.1,[::1],store`): the host names the API answers
  to (comma-separated, no port; `*` = any), plus `OPS_HOST` when it names one address. Another
  `Host` header gets 400, so a web page that rebinds its own DNS name to this machine cannot read
  the API (DNS rebinding). /health and /metrics answer any host (Prometheus scrapes by IP).
- `STORE_CSV_MAX_STREAMS` (`2`): streamed CSV exports at once; more get 503 with Retry-After.
  Smaller than `STORE_API_POOL_SIZE`, so JSON reads and writes always find a connection.
- `STORE_CSV_MAX_SECONDS` (`300`): a streamed CSV export is cut after this long (its connection and
  snapshot given back), however slowly its client reads.
- `WALLETS_FILE` (`config/wallets.example.json`): seeds the tracked wallets on the very first
  start (empty Postgres and empty registry); relative paths are tried in the working directory,
  then in the project root.
- Validation (`validator.py`; docs/signals.md, "Does it pay? Validation"):
  - `VALIDATION_ENABLED` (`true`): run the validator task in this process.
  - `VALIDATION_PRICES_URL` (`http://127.0.0.1:8765`, the simulator): where
    `GET /prices-history` is asked; Polymarket's is `https://clob.polymarket.com` (keyless).
  - `GAMMA_API_URL` (`http://127.0.0.1:8765`, the simulator): Gamma, for resolutions; the real one
    is `https://gamma-api.polymarket.com`. The ingestor's setting of the same name.
  - `VALIDATION_FEE_BPS` (`0`): the taker fee rate, in basis points, that a follower's copy pays
    (per share: rate x p x (1 - p), Polymarket's formula); subtracted from every markout. 0: a
    fill carries no fee (nor whether its wallet was maker or taker), and Polymarket charges
    takers on fee-enabled markets only, at a rate set per category (geopolitics free): set the
    rate of the markets you follow.
  - `VALIDATION_EVERY_S` (`30`): seconds between cycles.
  - `VALIDATION_DELAY_S` (`60`): a horizon is read this long after it ended, so the price
    history holds its last minute.
  - `VALIDATION_RESOLUTION_EVERY_S` (`600`): how often Gamma is asked which markets resolved.
  - `VALIDATION_BATCH` (`200`): markouts per cycle at most (one or two price requests each).
  - `VALIDATION_LOOKBACK_S` (`604800`, 7 days): signals detected longer ago get no markouts (the
    settlement has no such limit), so a cycle reads only recent signals.
Plus the common ones: `REDIS_URL`, `STREAM_NAMESPACE`, `LOG_LEVEL`, `OPS_HOST`.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from shared.hosts import host_names, served_names
from shared.settings import DatabaseSettings

# A host name or an IP address (IPv6 in brackets), as in a Host header without its port.


class StoreSettings(DatabaseSettings):
    # A refused setting must not be echoed into the startup error: it may be the token.
    model_config = SettingsConfigDict(hide_input_in_errors=True)

    ops_port: int = 8081

    store_batch_max: int = Field(default=500, ge=1, le=10_000)
    store_block_ms: int = Field(default=100, ge=1)
    store_linger_ms: int = Field(default=20, ge=0, le=10_000)
    store_retry_min_s: float = Field(default=0.1, gt=0)
    store_retry_max_s: float = Field(default=5.0, gt=0)
    store_db_timeout_s: float = Field(default=10.0, gt=0)
    store_pool_size: int = Field(default=4, ge=2)
    store_claim_idle_ms: int = Field(default=60_000, ge=1)
    store_claim_every_s: float = Field(default=5.0, gt=0)
    store_max_deliveries: int = Field(default=5, ge=1)
    store_shutdown_timeout_s: float = Field(default=15.0, ge=0)
    store_migration_timeout_s: float = Field(default=3600.0, gt=0)

    store_api_token: SecretStr | None = None
    store_api_read_auth: bool = False
    store_api_max_body_bytes: int = Field(default=16_384, ge=256)
    store_api_pool_size: int = Field(default=4, ge=1)
    store_api_allowed_hosts: str = "localhost,127.0.0.1,[::1],store"
    store_csv_max_streams: int = Field(default=2, ge=0)
    store_csv_max_seconds: float = Field(default=300.0, gt=0)
    wallets_file: str = "config/wallets.example.json"

    validation_enabled: bool = True
    validation_prices_url: str = "http://127.0.0.1:8765"
    gamma_api_url: str = "http://127.0.0.1:8765"
    validation_fee_bps: float = Field(default=0.0, ge=0, le=10_000)
    validation_every_s: float = Field(default=30.0, gt=0)
    validation_delay_s: float = Field(default=60.0, ge=0)
    validation_give_up_s: float = Field(default=21_600.0, ge=0)
    validation_resolution_every_s: float = Field(default=600.0, ge=0)
    validation_batch: int = Field(default=200, ge=1, le=10_000)
    validation_lookback_s: int = Field(default=7 * 86_400, gt=0)

    # Wallet quality from the Data API (services/store/wallet_quality*.py).
    wallet_quality_enabled: bool = True
    data_api_url: str = "http://127.0.0.1:8765"
    wallet_quality_every_s: float = Field(default=3600.0, gt=0)
    wallet_quality_tick_s: float = Field(default=60.0, gt=0)
    wallet_quality_batch: int = Field(default=50, ge=1, le=10_000)
    wallet_quality_sets_score: bool = True
    wallet_quality_max_trades: int = Field(default=2000, ge=1, le=10_000)
    wallet_quality_min_decided: int = Field(default=5, ge=1)
    wallet_quality_pnl_scale_usd: float = Field(default=10_000.0, gt=0)

    @field_validator("validation_prices_url", "gamma_api_url", "data_api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                "VALIDATION_PRICES_URL, GAMMA_API_URL and DATA_API_URL must start with http(s)://"
            )
        return value

    @field_validator("store_api_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("store_api_allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        return host_names(value, "STORE_API_ALLOWED_HOSTS")

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        """The listed names, plus OPS_HOST when it names one address: clients reach it by that."""
        return served_names(self.store_api_allowed_hosts, self.ops_host)

    @model_validator(mode="after")
    def _consistent(self) -> StoreSettings:
        if self.store_retry_max_s < self.store_retry_min_s:
            raise ValueError("STORE_RETRY_MAX_S must be at least STORE_RETRY_MIN_S")
        token = self.store_api_token
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("STORE_API_TOKEN must be at least 16 characters")
        if self.store_api_read_auth and token is None:
            raise ValueError("STORE_API_READ_AUTH=true needs STORE_API_TOKEN")
        if self.store_csv_max_streams >= self.store_api_pool_size:
            raise ValueError(
                "STORE_CSV_MAX_STREAMS must be smaller than STORE_API_POOL_SIZE, so that JSON "
                "reads and writes always get a connection"
            )
        return self
