"""The ingestor's settings, from the environment (unprefixed names) or `.env`.

Defaults work with the bundled simulator on 127.0.0.1:8765 and the local Redis. The tier limits
default to Dome's Dev tier (500 subscriptions x 500 wallets); the Free tier is 2 x 5.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from shared.settings import CommonSettings

MIB = 1 << 20
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class IngestorSettings(CommonSettings):
    ops_port: int = 8082

    # Dome puts the key in the URL path (`<DOME_WS_URL>/<key>`); it is never logged or shown.
    dome_api_key: SecretStr = SecretStr("demo-key")
    dome_ws_url: str = "ws://127.0.0.1:8765"
    # REST base for polling and gap backfill (a later version); kept here so one config serves both.
    dome_api_url: str = "http://127.0.0.1:8765/v1"
    # False selects REST polling, which this version does not have: startup fails saying so.
    dome_use_websocket: bool = True
    dome_max_subscriptions: int = Field(default=500, ge=1)
    dome_wallets_per_subscription: int = Field(default=500, ge=1)
    # A relative path is read from the working directory, else from the project root.
    wallets_file: str = "config/wallets.example.json"

    # Reconnect backoff: doubles from min to max, with jitter; reset once a connection has stayed
    # up for `dome_stable_after_s`.
    dome_reconnect_min_s: float = Field(default=1.0, gt=0)
    dome_reconnect_max_s: float = Field(default=60.0, gt=0)
    dome_stable_after_s: float = Field(default=30.0, ge=0)
    # WebSocket keepalive: a ping every interval; no pong within the timeout = dead connection.
    dome_ping_interval_s: float = Field(default=10.0, gt=0)
    dome_ping_timeout_s: float = Field(default=10.0, gt=0)
    dome_open_timeout_s: float = Field(default=10.0, gt=0)
    # Frames above this are rejected and dead-lettered (their first bytes); the socket's own hard
    # limit is a multiple of it, see `sources.dome_ws.HARD_LIMIT_FACTOR`.
    dome_max_frame_bytes: int = Field(default=MIB, ge=1024)

    # How long an order_key is remembered for dedupe (s): covers reconnect replays and backfill.
    dedupe_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    # Fills waiting for Redis; when full the socket reader waits (backpressure), nothing dropped.
    publish_queue_size: int = Field(default=10_000, ge=1)
    # Most fills published in one Lua call when several are already waiting.
    publish_batch_max: int = Field(default=500, ge=1, le=5_000)
    # /health turns red after this long without a connection.
    health_max_disconnected_s: float = Field(default=60.0, gt=0)
    # How often the feed status hash is written for the dashboard.
    status_interval_s: float = Field(default=1.0, gt=0)
    # On SIGTERM, how long to keep trying to publish what is queued before giving up.
    shutdown_flush_timeout_s: float = Field(default=10.0, ge=0)

    @field_validator("dome_ws_url")
    @classmethod
    def _websocket_scheme(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("DOME_WS_URL must start with ws:// or wss://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _backoff_bounds(self) -> IngestorSettings:
        if self.dome_reconnect_max_s < self.dome_reconnect_min_s:
            raise ValueError("DOME_RECONNECT_MAX_S must be at least DOME_RECONNECT_MIN_S")
        return self

    def dome_ws_endpoint(self) -> str:
        """The URL to connect to, key included: pass it to the client only, never to a log."""
        return f"{self.dome_ws_url}/{self.dome_api_key.get_secret_value()}"

    def wallets_path(self) -> Path:
        path = Path(self.wallets_file)
        if path.is_absolute() or path.exists():
            return path
        return PROJECT_ROOT / path
