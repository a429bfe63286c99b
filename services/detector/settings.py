"""The detector's settings, from the environment (unprefixed names) or `.env`.

- `WALLETS_FILE` (`config/wallets.example.json`): tracked wallets, label and score; read at start.
- `WHALE_MIN_NOTIONAL_USD` (1000): the `whale_order` threshold on shares_normalized * price, and
  the size scale of both rules' confidence.
- `SIGNAL_MAX_PRICE` (0.95): fills at or above this price buy a near-certain outcome: no signal.
- `SIGNAL_MIN_NOTIONAL_USD` (0): fills below this notional emit no signal.
- `DETECTOR_BATCH_SIZE` (500): most entries read per XREADGROUP (its COUNT).
- `DETECTOR_BLOCK_MS` (100): XREADGROUP BLOCK time in milliseconds.
- `DETECTOR_SCRIPT_BATCH` (250): most orders decided in one Lua call (each stays atomic).
- `DETECTOR_DONE_TTL_S` (604800 = 7 days): how long an order_key is remembered as decided, so the
  window in which a redelivery is recognised.
- `DETECTOR_STATE_RETRY_S` (30): how long a batch retries while Redis is unreachable.
- `DETECTOR_SHUTDOWN_GRACE_S` (15): on SIGTERM, how long the in-flight batch may take to finish.
- `OPS_PORT` (8083): `/health` and `/metrics`.

Plus the common ones (`REDIS_URL`, `STREAM_NAMESPACE`, `STREAM_MAXLEN`, `LOG_LEVEL`, `OPS_HOST`):
see `shared.settings`.
"""

from __future__ import annotations

from pydantic import Field

from services.detector.rules import RuleSettings
from shared.settings import CommonSettings


class DetectorSettings(CommonSettings):
    ops_port: int = 8083

    wallets_file: str = "config/wallets.example.json"

    whale_min_notional_usd: float = Field(default=1000.0, gt=0)
    signal_max_price: float = Field(default=0.95, gt=0, le=1)
    signal_min_notional_usd: float = Field(default=0.0, ge=0)

    detector_batch_size: int = Field(default=500, ge=1, le=10_000)
    detector_block_ms: int = Field(default=100, ge=1)
    detector_script_batch: int = Field(default=250, ge=1, le=5_000)
    detector_done_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    detector_state_retry_s: float = Field(default=30.0, ge=0)
    detector_shutdown_grace_s: float = Field(default=15.0, gt=0)

    def rules(self) -> RuleSettings:
        return RuleSettings(
            whale_min_notional_usd=self.whale_min_notional_usd,
            signal_max_price=self.signal_max_price,
            signal_min_notional_usd=self.signal_min_notional_usd,
        )
