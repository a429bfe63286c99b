"""The detector's settings: the environment (unprefixed names) or `.env`, over a rules file.

Rules and thresholds may come from a YAML (or JSON) file named by `DETECTOR_RULES_FILE`, holding
the rule settings below under their lower-case names (see `config/rules.example.yaml`); an
environment variable still overrides the file, and the file overrides the defaults. A file that
is missing, not a mapping, or names an unknown setting stops the detector at startup.

Rules (`docs/signals.md` has the exact semantics and confidence formulas):
- `WHALE_MIN_NOTIONAL_USD` (1000): the `whale_order` threshold on shares_normalized * price, and
  the size scale of every confidence.
- `SIGNAL_MAX_PRICE` (0.95): BUYs at or above this price buy a near-certain outcome: no signal.
- `SIGNAL_MIN_PRICE` (0.05): BUYs at or below this price buy a near-impossible one: no signal
  (SELLs are never dropped for their price); 0 disables.
- `SIGNAL_MIN_NOTIONAL_USD` (10): fills below this notional emit no signal.
- `SIGNAL_COOLDOWN_S` (300): no second signal of a kind for one wallet x market (consensus: one
  token) within this many seconds of exchange time; 0 disables.
- `EXIT_MIN_FRACTION` (0.8): `trader_exit` when a sell is at least this part of the position.
- `CONSENSUS_MIN_WALLETS` (3): K, distinct tracked wallets buying one token for `consensus`.
- `CONSENSUS_WINDOW_S` (21600 = 6 h): W, the exchange-time window they must buy within.
- `SIGNAL_MAX_AGE_S` (900): a fill received more than this many seconds after it traded (a
  backfill) still moves positions and consensus, but its signals are marked `late`; 0 disables.
- `ACCUMULATION_MIN_NOTIONAL_USD` (500): `accumulation` / `distribution` when a tracked wallet's
  small BUYs / SELLs of one token add up to this within the window; 0 disables.
- `ACCUMULATION_WINDOW_S` (1800): that window, exchange seconds.
- `ACCUMULATION_MIN_FILLS` (3): the fewest fills that make one.

Service:
- `WALLETS_FILE` (`config/wallets.example.json`): seeds the wallet registry (shared.wallet_registry)
  the first time; after that the detector follows the registry live.
- `DETECTOR_RULES_FILE` (empty: none): the rules file above.
- `DETECTOR_BATCH_SIZE` (500): most entries read per XREADGROUP (its COUNT).
- `DETECTOR_BLOCK_MS` (100): XREADGROUP BLOCK time in milliseconds.
- `DETECTOR_SCRIPT_BATCH` (250): most orders decided in one Lua call (each stays atomic).
- `DETECTOR_DONE_TTL_S` (604800 = 7 days): how long an order_key is remembered as decided (the
  window in which a redelivery is recognised), and the lifetime of cooldown and consensus state.
- `DETECTOR_STATE_RETRY_S` (30): how long a batch retries while Redis is unreachable.
- `DETECTOR_WAIT_S` (60): how long a batch waits for earlier orders held by other replicas before
  leaving the rest pending for a retry.
- `DETECTOR_CLAIM_MIN_IDLE_MS` (30000): entries pending this long are reclaimed from their consumer.
- `DETECTOR_RECLAIM_INTERVAL_S` (5): how often each replica sweeps the pending list.
- `DETECTOR_MAX_DELIVERIES` (5): an entry delivered more often goes to `orders.dead`.
- `DETECTOR_SHUTDOWN_GRACE_S` (15): on SIGTERM, how long the in-flight batch may take to finish.
- `DETECTOR_SEED_POSITIONS` (true): seed the positions of every wallet that starts being tracked
  from the Data API's `/positions?user=` (docs/signals.md, "Positions that are true").
- `DATA_API_URL` (`http://127.0.0.1:8765`, the simulator): where `/positions` is asked (the
  ingestor's setting of the same name; Polymarket's is `https://data-api.polymarket.com`).
- `DETECTOR_SEED_TIMEOUT_S` (10): the timeout of one `/positions` request.
- `DETECTOR_SEED_RETRY_S` (300): how often a wallet whose seeding failed is asked again.
- `DETECTOR_SEED_STARTUP_S` (60): how long startup waits for the seedings before consuming; the
  rest go on in the background (their wallets decided unseeded meanwhile).
- `OPS_PORT` (8083): `/health` and `/metrics`.

Plus the common ones (`REDIS_URL`, `STREAM_NAMESPACE`, `STREAM_MAXLEN`, `LOG_LEVEL`, `OPS_HOST`):
see `shared.settings`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from services.detector.rules import RuleSettings
from shared.settings import CommonSettings

RULE_SETTINGS = frozenset(RuleSettings.__dataclass_fields__)
RULES_FILE_SETTING = "detector_rules_file"


class RulesFileError(ValueError):
    pass


def load_rules_file(path: str | Path) -> dict[str, Any]:
    """The rule settings of a YAML/JSON file, by lower-case name; unknown names are an error."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError as exc:
        raise RulesFileError(f"rules file not found: {file}") from exc
    except yaml.YAMLError as exc:
        raise RulesFileError(f"rules file {file} is not YAML/JSON: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RulesFileError(f"rules file {file} must hold a mapping of setting: value")
    names = {str(key).lower(): value for key, value in data.items()}
    if unknown := sorted(set(names) - RULE_SETTINGS):
        raise RulesFileError(
            f"rules file {file}: unknown setting(s) {unknown}; known: {sorted(RULE_SETTINGS)}"
        )
    return names


class RulesFileSource(PydanticBaseSettingsSource):
    """Rule settings from `DETECTOR_RULES_FILE`: an init argument, else the environment, else
    `.env`."""

    def __init__(self, settings_cls: type[BaseSettings], *candidates: Any) -> None:
        super().__init__(settings_cls)
        self.path = next((str(c) for c in candidates if c), "")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return load_rules_file(self.path) if self.path else {}


class DetectorSettings(CommonSettings):
    ops_port: int = 8083

    wallets_file: str = "config/wallets.example.json"
    detector_rules_file: str = ""

    whale_min_notional_usd: float = Field(default=1000.0, gt=0)
    signal_max_price: float = Field(default=0.95, gt=0, le=1)
    signal_min_price: float = Field(default=0.05, ge=0, lt=1)
    signal_min_notional_usd: float = Field(default=10.0, ge=0)
    signal_cooldown_s: int = Field(default=300, ge=0)
    exit_min_fraction: float = Field(default=0.8, gt=0, le=1)
    consensus_min_wallets: int = Field(default=3, ge=2)
    consensus_window_s: int = Field(default=6 * 3600, gt=0)
    signal_max_age_s: int = Field(default=900, ge=0)
    accumulation_min_notional_usd: float = Field(default=500.0, ge=0)
    accumulation_window_s: int = Field(default=1800, gt=0)
    accumulation_min_fills: int = Field(default=3, ge=2)

    detector_batch_size: int = Field(default=500, ge=1, le=10_000)
    detector_block_ms: int = Field(default=100, ge=1)
    detector_script_batch: int = Field(default=250, ge=1, le=5_000)
    detector_done_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    detector_state_retry_s: float = Field(default=30.0, ge=0)
    detector_wait_s: float = Field(default=60.0, gt=0)
    detector_claim_min_idle_ms: int = Field(default=30_000, ge=1)
    detector_reclaim_interval_s: float = Field(default=5.0, gt=0)
    detector_max_deliveries: int = Field(default=5, ge=1)
    detector_shutdown_grace_s: float = Field(default=15.0, gt=0)

    # Positions seeded from the Data API's `/positions?user=` (services/detector/positions.py);
    # DATA_API_URL is the ingestor's setting of the same name.
    detector_seed_positions: bool = True
    data_api_url: str = "http://127.0.0.1:8765"
    detector_seed_timeout_s: float = Field(default=10.0, gt=0)
    detector_seed_retry_s: float = Field(default=300.0, gt=0)
    detector_seed_startup_s: float = Field(default=60.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        rules_file = RulesFileSource(
            settings_cls,
            getattr(init_settings, "init_kwargs", {}).get(RULES_FILE_SETTING),
            os.environ.get(RULES_FILE_SETTING.upper()),
            dotenv_settings().get(RULES_FILE_SETTING),
        )
        return init_settings, env_settings, dotenv_settings, rules_file, file_secret_settings

    def rules(self) -> RuleSettings:
        return RuleSettings(**{name: getattr(self, name) for name in RULE_SETTINGS})

    @property
    def touch_every_s(self) -> float:
        """How often a waiting batch refreshes its entries' idle time: well inside min idle."""
        return self.detector_claim_min_idle_ms / 1000 / 3
