"""Notifier settings, from the environment (unprefixed names, like every service).

| env | default | meaning |
|---|---|---|
| `NOTIFIER_HOST` | `127.0.0.1` | interface of `/ws`, `/`, `/api/status`, `/health`, `/metrics` |
| `NOTIFIER_PORT` | `8080` | their port |
| `NOTIFIER_CLIENT_QUEUE` | `1000` | messages queued per client; more drops it (slow consumer) |
| `NOTIFIER_BLOCK_MS` | `1000` | XREAD / XREADGROUP BLOCK of the stream readers |
| `NOTIFIER_TOKENS` | empty: open | tokens allowed on `/ws`: comma-separated or a JSON list |
| `NOTIFIER_MAX_CLIENTS_PER_TOKEN` | `50` | connections one token may hold on one replica |
| `NOTIFIER_MAX_MESSAGE_BYTES` | `65536` | largest message a client may send |
| `NOTIFIER_MAX_FILTER_VALUES` | `1000` | wallets + markets + kinds in one filter |
| `NOTIFIER_SETUP_TIMEOUT_S` | `10` | time a client owing its token has for its first message |
| `NOTIFIER_ALLOWED_HOSTS` | `localhost,127.0.0.1,[::1],notifier` | `Host` names served (`*`: any) |
| `NOTIFIER_ALLOWED_ORIGINS` | empty: same-origin | browser origins besides the notifier's own |
| `NOTIFIER_MAX_CLIENTS` | `1000` | WebSocket connections on one replica |
| `NOTIFIER_MAX_CLIENTS_PER_IP` | `100` | WebSocket connections from one address on one replica |
| `NOTIFIER_MAX_REPLAY_ENTRIES` | `10000` | stream entries one resume reads before it is cut |
| `NOTIFIER_GAMMA_URL` | `http://127.0.0.1:8765` | Gamma host of market tags (`tags` filters) |
| `NOTIFIER_TAGS_TIMEOUT_S` | `2` | one tag lookup's timeout (it holds that read's signals) |
| `NOTIFIER_TAGS_CACHE` | `10000` | markets whose tags are kept (least recently used dropped) |
| `NOTIFIER_TAGS_TTL_S` | `3600` | how long a market's tags are kept (a failure: 60 s) |
| `STORE_API_URL` | `http://127.0.0.1:8081` | the store's read API, for the dashboard's `/api/...` |
| `STORE_API_TIMEOUT_S` | `3` | timeout of one request to it |
| `STORE_API_TOKEN` | none | its bearer token (`STORE_API_READ_AUTH`); never sent to a browser |
| `WEBHOOKS_FILE` | none | JSON or YAML file of webhook endpoints (see `webhooks.config`) |
| `WEBHOOK_TIMEOUT_S` | `5` | timeout of one POST |
| `WEBHOOK_MAX_ATTEMPTS` | `5` | POSTs per signal and endpoint before `webhooks.dead` |
| `WEBHOOK_BACKOFF_S` | `0.5` | first retry delay; it doubles after each failure... |
| `WEBHOOK_BACKOFF_MAX_S` | `30` | ...up to this cap |
| `WEBHOOK_CONCURRENCY` | `32` | signals in delivery at once per endpoint and replica |
| `WEBHOOK_CLAIM_IDLE_MS` | `30000` | pending this long: a dead replica's entry, reclaimed |
| `WEBHOOK_MAX_DELIVERIES` | `5` | an entry claimed this often without an outcome: dead-lettered |

`NOTIFIER_GAMMA_URL`: the simulator by default; Polymarket's is `https://gamma-api.polymarket.com`;
empty turns the lookup off (a `tags` filter then matches nothing). Tags are asked only while some
subscriber filters on them.

`NOTIFIER_BLOCK_MS` does not add latency: a blocked XREAD returns as soon as an entry arrives. It
only bounds how long the reader sits in one call (and so how soon a dead connection is noticed).

`NOTIFIER_ALLOWED_HOSTS` and `NOTIFIER_ALLOWED_ORIGINS` keep other web sites out (see `auth.Site`):
hosts are names without scheme or port (IPv6 in brackets), and `NOTIFIER_HOST` is added when it
names one address; origins are `scheme://host[:port]`.

`OPS_HOST` / `OPS_PORT` from `CommonSettings` are unused here: `/health` and `/metrics` are served
on the notifier's own port, beside `/ws` and `/`, so one port is all a deployment publishes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import orjson
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from services.notifier.auth import MIN_TOKEN_LENGTH, token_is_strong
from shared.hosts import NAME, entries, host_names, served_names
from shared.settings import CommonSettings

_ORIGIN = re.compile(rf"^(?:\*|https?://{NAME}(?::\d{{1,5}})?)$")


class NotifierSettings(CommonSettings):
    notifier_host: str = "127.0.0.1"
    notifier_port: int = Field(default=8080, ge=0, le=65535)
    notifier_client_queue: int = Field(default=1000, ge=1)
    # Zero would mean "block forever" to Redis, which would also disable our dead-socket timeout.
    notifier_block_ms: int = Field(default=1000, ge=1)
    notifier_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    notifier_max_clients_per_token: int = Field(default=50, ge=1)
    notifier_max_message_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)
    notifier_max_filter_values: int = Field(default=1000, ge=1)
    notifier_setup_timeout_s: float = Field(default=10.0, gt=0)
    # The compose service name is in the default: other containers reach us as `notifier`.
    notifier_allowed_hosts: str = "localhost,127.0.0.1,[::1],notifier"
    notifier_allowed_origins: str = ""
    notifier_max_clients: int = Field(default=1000, ge=1)
    notifier_max_clients_per_ip: int = Field(default=100, ge=1)
    notifier_max_replay_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    notifier_gamma_url: str = "http://127.0.0.1:8765"
    notifier_tags_timeout_s: float = Field(default=2.0, gt=0, le=60)
    notifier_tags_cache: int = Field(default=10_000, ge=1)
    notifier_tags_ttl_s: float = Field(default=3600.0, gt=0)

    # The dashboard's history: the store's read API, asked by the notifier, never by the browser.
    store_api_url: str = "http://127.0.0.1:8081"
    store_api_timeout_s: float = Field(default=3.0, gt=0, le=60)
    store_api_token: SecretStr | None = None

    webhooks_file: Path | None = None
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_max_attempts: int = Field(default=5, ge=1)
    webhook_backoff_s: float = Field(default=0.5, ge=0)
    webhook_backoff_max_s: float = Field(default=30.0, ge=0)
    webhook_concurrency: int = Field(default=32, ge=1)
    webhook_claim_idle_ms: int = Field(default=30_000, ge=100)
    webhook_max_deliveries: int = Field(default=5, ge=1)

    @field_validator("notifier_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                # `from None`: the decoder's message and context would quote the tokens.
                raise ValueError("NOTIFIER_TOKENS is not a valid JSON list of strings") from None
        return tuple(part.strip() for part in text.split(",") if part.strip())

    @field_validator("notifier_tokens")
    @classmethod
    def _long_tokens(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for n, token in enumerate(value, start=1):
            if not token_is_strong(token.get_secret_value()):
                # Named by position only: the value, even a short one, is a credential.
                raise ValueError(
                    f"NOTIFIER_TOKENS: token {n} must be at least {MIN_TOKEN_LENGTH} characters, "
                    "with no spaces around it"
                )
        return value

    @field_validator("notifier_gamma_url")
    @classmethod
    def _gamma_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("NOTIFIER_GAMMA_URL must start with http(s):// (or be empty: off)")
        return value

    @field_validator("notifier_allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        return host_names(value, "NOTIFIER_ALLOWED_HOSTS")

    @field_validator("notifier_allowed_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        origins = [origin.rstrip("/") for origin in entries(value)]
        for origin in origins:
            if not _ORIGIN.match(origin):
                raise ValueError(
                    f"NOTIFIER_ALLOWED_ORIGINS: {origin[:60]!r} is not an origin "
                    "(http or https scheme://host[:port], no path; * for any)"
                )
        return ",".join(origins)

    @field_validator("store_api_url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+/?$", value):
            # Not echoed: a URL may carry a password.
            raise ValueError("STORE_API_URL must be a base URL: http(s)://host[:port], no path")
        return value.rstrip("/")

    @field_validator("store_api_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("webhooks_file", mode="before")
    @classmethod
    def _empty_file_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    def allowed_hosts(self) -> tuple[str, ...]:
        """The Host names served: the listed ones, plus NOTIFIER_HOST when it names one address."""
        return served_names(self.notifier_allowed_hosts, self.notifier_host)

    def allowed_origins(self) -> tuple[str, ...]:
        """Origins allowed on `/ws` besides the notifier's own (same-origin is always allowed)."""
        return (
            tuple(self.notifier_allowed_origins.split(",")) if self.notifier_allowed_origins else ()
        )
