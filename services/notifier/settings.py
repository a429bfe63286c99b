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
| `WEBHOOKS_FILE` | none | JSON or YAML file of webhook endpoints (see `webhooks.config`) |
| `WEBHOOK_TIMEOUT_S` | `5` | timeout of one POST |
| `WEBHOOK_MAX_ATTEMPTS` | `5` | POSTs per signal and endpoint before `webhooks.dead` |
| `WEBHOOK_BACKOFF_S` | `0.5` | first retry delay; it doubles after each failure... |
| `WEBHOOK_BACKOFF_MAX_S` | `30` | ...up to this cap |
| `WEBHOOK_CONCURRENCY` | `32` | signals in delivery at once on one replica |
| `WEBHOOK_CLAIM_IDLE_MS` | `30000` | pending this long: a dead replica's entry, reclaimed |
| `WEBHOOK_MAX_DELIVERIES` | `5` | an entry claimed this often without an outcome: dead-lettered |

`NOTIFIER_BLOCK_MS` does not add latency: a blocked XREAD returns as soon as an entry arrives. It
only bounds how long the reader sits in one call (and so how soon a dead connection is noticed).

`OPS_HOST` / `OPS_PORT` from `CommonSettings` are unused here: `/health` and `/metrics` are served
on the notifier's own port, beside `/ws` and `/`, so one port is all a deployment publishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from shared.settings import CommonSettings


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

    @field_validator("webhooks_file", mode="before")
    @classmethod
    def _empty_file_is_none(cls, value: Any) -> Any:
        return None if value == "" else value
