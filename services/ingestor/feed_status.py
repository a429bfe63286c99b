"""The feed's state: what `/health`, the metrics and the dashboard's status hash report.

The status hash (`Streams.feed_status_key()`, refreshed every `STATUS_INTERVAL_S`, expiring when
the ingestor stops refreshing it) holds string fields:
`source`, `state` (starting | connecting | connected | disconnected | auth_failed | stopped),
`connected` ("1"/"0"), `subscriptions`, `wallets`, `pending_subscribes`, `last_event_at` (Unix s
of the last valid event's receipt, "" when none), `last_exchange_ts`, `seconds_since_last_event`,
`reconnects`, `published`, `duplicates`, `queued`, `last_error`, `updated_at`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ConnectionState(StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    AUTH_FAILED = "auth_failed"
    STOPPED = "stopped"


@dataclass
class FeedStatus:
    source: str
    wallets: int
    state: ConnectionState = ConnectionState.STARTING
    started_at: float = field(default_factory=time.time)
    # Since when the feed has been without a connection (start, or the last drop).
    down_since: float | None = None
    last_event_at: float | None = None
    last_exchange_ts: int | None = None
    subscriptions: int = 0
    pending_subscribes: int = 0
    reconnects: int = 0
    last_error: str = ""

    def __post_init__(self) -> None:
        if self.down_since is None:
            self.down_since = self.started_at

    @property
    def connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED

    def mark_connected(self) -> None:
        self.state = ConnectionState.CONNECTED
        self.down_since = None
        self.subscriptions = 0
        self.last_error = ""

    def mark_down(self, state: ConnectionState, error: str, now: float) -> None:
        if self.down_since is None:
            self.down_since = now
        self.state = state
        self.subscriptions = 0
        self.pending_subscribes = 0
        self.last_error = error

    def mark_event(self, received_at: float, exchange_ts: int) -> None:
        self.last_event_at = received_at
        self.last_exchange_ts = exchange_ts

    def seconds_since_last_event(self, now: float) -> float:
        """Since the last event, or since start when none came yet (silence is silence)."""
        return max(0.0, now - (self.last_event_at or self.started_at))

    def seconds_down(self, now: float) -> float:
        return 0.0 if self.down_since is None else max(0.0, now - self.down_since)

    def as_fields(
        self, now: float, *, published: int, duplicates: int, queued: int
    ) -> dict[str, str]:
        return {
            "source": self.source,
            "state": self.state.value,
            "connected": "1" if self.connected else "0",
            "subscriptions": str(self.subscriptions),
            "wallets": str(self.wallets),
            "pending_subscribes": str(self.pending_subscribes),
            "last_event_at": "" if self.last_event_at is None else f"{self.last_event_at:.6f}",
            "last_exchange_ts": "" if self.last_exchange_ts is None else str(self.last_exchange_ts),
            "seconds_since_last_event": f"{self.seconds_since_last_event(now):.3f}",
            "reconnects": str(self.reconnects),
            "published": str(published),
            "duplicates": str(duplicates),
            "queued": str(queued),
            "last_error": self.last_error,
            "updated_at": f"{now:.6f}",
        }


def evaluate_health(
    status: FeedStatus, *, redis_ok: bool, now: float, max_down_s: float
) -> tuple[bool, dict[str, Any]]:
    """Healthy unless Redis is unreachable or the feed has been down longer than `max_down_s`."""
    down_s = status.seconds_down(now)
    problems = []
    if not redis_ok:
        problems.append("redis unreachable")
    if down_s > max_down_s:
        problems.append(f"not connected for {down_s:.0f}s (limit {max_down_s:.0f}s)")
    details: dict[str, Any] = {
        "source": status.source,
        "state": status.state.value,
        "subscriptions": status.subscriptions,
        "wallets": status.wallets,
        "seconds_since_last_event": round(status.seconds_since_last_event(now), 3),
        "seconds_disconnected": round(down_s, 3),
        "redis": "ok" if redis_ok else "unreachable",
        "problems": problems,
    }
    return not problems, details
