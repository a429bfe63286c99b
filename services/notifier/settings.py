"""Notifier settings, from the environment (unprefixed names, like every service).

| env | default | meaning |
|---|---|---|
| `NOTIFIER_HOST` | `127.0.0.1` | interface of `/ws`, `/`, `/health` and `/metrics` |
| `NOTIFIER_PORT` | `8080` | their port |
| `NOTIFIER_CLIENT_QUEUE` | `1000` | messages queued per client; more drops it (slow consumer) |
| `NOTIFIER_BLOCK_MS` | `1000` | XREAD BLOCK of the stream reader |

`NOTIFIER_BLOCK_MS` does not add latency: a blocked XREAD returns as soon as an entry arrives. It
only bounds how long the reader sits in one call (and so how soon a dead connection is noticed).

`OPS_HOST` / `OPS_PORT` from `CommonSettings` are unused here: `/health` and `/metrics` are served
on the notifier's own port, beside `/ws` and `/`, so one port is all a deployment publishes.
"""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class NotifierSettings(CommonSettings):
    notifier_host: str = "127.0.0.1"
    notifier_port: int = Field(default=8080, ge=0, le=65535)
    notifier_client_queue: int = Field(default=1000, ge=1)
    # Zero would mean "block forever" to Redis, which would also disable our dead-socket timeout.
    notifier_block_ms: int = Field(default=1000, ge=1)
