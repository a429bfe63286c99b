"""The feeds' state: what `/health`, the metrics and the dashboard's status hash report.

Each source keeps a `FeedStatus` (the WebSocket source one per connection, combined with
`combine`). "Down" means no open connection (WebSocket) or failing requests (pollers); a source
down longer than HEALTH_MAX_DISCONNECTED_S is a stale feed and turns `/health` red, as do an
unreachable Redis, tracked wallets the tier has no room for, and (when HEALTH_MAX_EVENT_SILENCE_S
is set) a source without any event for that long.

Wallets whose gap backfill has not completed (`wallets_behind`, and since when the oldest of them
has been behind, `behind_since`) are reported on `/health` and in the metrics. A wallet behind
longer than its source's `behind_limit_s` (HEALTH_MAX_BACKFILL_BEHIND_S) makes `/health`
"degraded": listed under `degraded`, still answered 200, since its live fills keep flowing and
only its gap is at stake; a down feed or Redis is what turns it red.

The status hash (`Streams.feed_status_key()`, refreshed every `STATUS_INTERVAL_S`, expiring when
the ingestor stops refreshing it) is `feed_report(...)`: the sources combined, and each source in
`sources`; its fields are the contract in shared/feed_status.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.feed_status import ConnectionState, FeedReport, SourceReport

# When parts disagree, the combined state is the first of these that any part is in.
_PRECEDENCE = (
    ConnectionState.AUTH_FAILED,
    ConnectionState.DISCONNECTED,
    ConnectionState.CONNECTING,
    ConnectionState.STARTING,
    ConnectionState.CONNECTED,
    ConnectionState.STOPPED,
)


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
    connections: int = 0
    over_capacity: int = 0
    last_error: str = ""
    # Wallets whose gap backfill has not completed, and since when the oldest has been behind.
    wallets_behind: int = 0
    behind_since: float | None = None
    # Behind longer than this degrades /health (0: never).
    behind_limit_s: float = 0.0

    def __post_init__(self) -> None:
        if self.down_since is None and self.state is not ConnectionState.CONNECTED:
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

    def report(self, now: float) -> SourceReport:
        """This source as the status hash gives it."""
        return SourceReport(
            source=self.source,
            state=self.state.value,
            connected=self.connected,
            subscriptions=self.subscriptions,
            wallets=self.wallets,
            pending_subscribes=self.pending_subscribes,
            last_event_at=self.last_event_at,
            last_exchange_ts=self.last_exchange_ts,
            seconds_since_last_event=self.seconds_since_last_event(now),
            reconnects=self.reconnects,
            last_error=self.last_error,
        )


def _latest(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def combine(source: str, parts: Sequence[FeedStatus], *, wallets: int) -> FeedStatus:
    """Several connections (or sources) seen as one: connected only when every part is."""
    if not parts:
        return FeedStatus(source=source, wallets=wallets)
    states = {part.state for part in parts}
    state = next(candidate for candidate in _PRECEDENCE if candidate in states)
    down = [part.down_since for part in parts if part.down_since is not None]
    latest = max(parts, key=lambda part: part.last_event_at or 0.0)
    return FeedStatus(
        source=source,
        wallets=wallets,
        state=state,
        started_at=min(part.started_at for part in parts),
        down_since=min(down) if down else None,
        last_event_at=_latest([part.last_event_at for part in parts]),
        last_exchange_ts=latest.last_exchange_ts,
        subscriptions=sum(part.subscriptions for part in parts),
        pending_subscribes=sum(part.pending_subscribes for part in parts),
        reconnects=sum(part.reconnects for part in parts),
        connections=sum(part.connections for part in parts),
        over_capacity=sum(part.over_capacity for part in parts),
        last_error=next((part.last_error for part in parts if part.last_error), ""),
        wallets_behind=sum(part.wallets_behind for part in parts),
        behind_since=_earliest([part.behind_since for part in parts]),
        behind_limit_s=max(part.behind_limit_s for part in parts),
    )


def _earliest(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return min(present) if present else None


def feed_report(
    statuses: Sequence[FeedStatus],
    now: float,
    *,
    published: int,
    duplicates: int,
    queued: int,
) -> FeedReport:
    """The status hash: the sources combined, plus each source in `sources`."""
    overall = combine(
        ",".join(s.source for s in statuses),
        statuses,
        wallets=max((s.wallets for s in statuses), default=0),
    ).report(now)
    return FeedReport(
        **overall.model_dump(exclude={"unreadable"}),
        published=published,
        duplicates=duplicates,
        queued=queued,
        updated_at=now,
        sources={s.source: s.report(now) for s in statuses},
    )


def evaluate_health(
    statuses: FeedStatus | Sequence[FeedStatus],
    *,
    redis_ok: bool,
    now: float,
    max_down_s: float,
    max_event_silence_s: float = 0.0,
) -> tuple[bool, dict[str, Any]]:
    """Healthy unless Redis is unreachable or a feed is stale (see the module docstring)."""
    parts = [statuses] if isinstance(statuses, FeedStatus) else list(statuses)
    problems = [] if redis_ok else ["redis unreachable"]
    degraded: list[str] = []
    for status in parts:
        problems += _feed_problems(status, now, max_down_s, max_event_silence_s)
        degraded += _behind(status, now)
    overall = combine(",".join(s.source for s in parts), parts, wallets=0)
    details: dict[str, Any] = {
        "source": overall.source,
        "state": overall.state.value,
        "subscriptions": overall.subscriptions,
        "wallets": max((s.wallets for s in parts), default=0),
        "seconds_since_last_event": round(overall.seconds_since_last_event(now), 3),
        "seconds_disconnected": round(overall.seconds_down(now), 3),
        "sources": {
            s.source: {
                "state": s.state.value,
                "wallets": s.wallets,
                "subscriptions": s.subscriptions,
                "connections": s.connections,
                "seconds_since_last_event": round(s.seconds_since_last_event(now), 3),
                "seconds_down": round(s.seconds_down(now), 3),
                "wallets_behind": s.wallets_behind,
                "behind_since": s.behind_since,
            }
            for s in parts
        },
        "wallets_behind": sum(s.wallets_behind for s in parts),
        "redis": "ok" if redis_ok else "unreachable",
        "problems": problems,
        "degraded": degraded,
    }
    return not problems, details


def _behind(status: FeedStatus, now: float) -> list[str]:
    """Why this source is degraded: wallets whose backfill has been failing too long."""
    if not status.wallets_behind or status.behind_since is None or not status.behind_limit_s:
        return []
    behind_s = now - status.behind_since
    if behind_s <= status.behind_limit_s:
        return []
    return [
        f"{status.source}: {status.wallets_behind} wallets behind on their gap backfill, the "
        f"oldest for {behind_s:.0f}s (limit {status.behind_limit_s:.0f}s)"
    ]


def _feed_problems(
    status: FeedStatus, now: float, max_down_s: float, max_event_silence_s: float
) -> list[str]:
    problems = []
    down_s = status.seconds_down(now)
    # A source with no wallet has nothing to connect for (every wallet was removed, say).
    if down_s > max_down_s and status.wallets:
        what = "auth failing" if status.state is ConnectionState.AUTH_FAILED else "not connected"
        problems.append(f"{status.source}: {what} for {down_s:.0f}s (limit {max_down_s:.0f}s)")
    if status.over_capacity:
        problems.append(
            f"{status.source}: {status.over_capacity} tracked wallets over the tier's capacity "
            "are not followed"
        )
    silence = status.seconds_since_last_event(now)
    if max_event_silence_s and status.wallets and silence > max_event_silence_s:
        problems.append(
            f"{status.source}: no event for {silence:.0f}s (limit {max_event_silence_s:.0f}s)"
        )
    return problems
