"""Prometheus metrics of the streams themselves: length, consumer lag, pending entries, latency.

What a service's own counters cannot show is how far behind a consumer group is. `track_streams`
reads it from Redis every few seconds and sets gauges labelled by stream (and group):

- `betterbot_stream_length{stream}`: XLEN; for a `*.dead` stream, the dead letters waiting.
- `betterbot_stream_group_lag{stream,group}`: entries the group has not been delivered yet.
  Redis 7 reports it (XINFO GROUPS `lag`); where it cannot (older servers, or after XDEL inside the
  unread range) it is `entries-added - entries-read`, else a count of the entries after the
  group's last delivered id (capped at `LAG_COUNT_CAP`).
- `betterbot_stream_group_pending{stream,group}`: delivered and not acknowledged (XPENDING size).
- `betterbot_stream_group_consumers{stream,group}`: consumer names in the group.

Every replica of every service may run the tracker: the values are the same everywhere, so
dashboards aggregate them with `max by (stream, group)`.

`observe_signal_latency(signal)` feeds `betterbot_signal_latency_seconds{since}` from the times each
Signal carries: `since="received"` is detected_at - received_at (our own pipeline: ingestor receipt
to decision), `since="exchange"` is detected_at - exchange_ts (the trade on the exchange to the
decision; exchange_ts has whole seconds). Call it once per signal in a consumer that sees each
signal once per group (the store), so a sum over replicas counts each signal once.

Wiring, one call per service (runs until `stop` is set; Redis errors are logged and retried):

    asyncio.create_task(track_streams(client, public_streams(settings.streams), stop))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError, ResponseError

from shared.models import Signal
from shared.streams import Streams

log = logging.getLogger(__name__)

# Counting unread entries one by one is the last resort; past this many the gauge says "at least".
LAG_COUNT_CAP = 10_000
DEFAULT_INTERVAL_S = 5.0

STREAM_LENGTH = Gauge("betterbot_stream_length", "Entries in the stream (XLEN)", ["stream"])
GROUP_LAG = Gauge(
    "betterbot_stream_group_lag",
    "Entries of the stream not yet delivered to the consumer group",
    ["stream", "group"],
)
GROUP_PENDING = Gauge(
    "betterbot_stream_group_pending",
    "Entries delivered to the group and not acknowledged yet",
    ["stream", "group"],
)
GROUP_CONSUMERS = Gauge(
    "betterbot_stream_group_consumers", "Consumers registered in the group", ["stream", "group"]
)
TRACK_ERRORS = Counter(
    "betterbot_stream_metrics_errors_total", "Failed reads of stream and group information"
)
SIGNAL_LATENCY = Histogram(
    "betterbot_signal_latency_seconds",
    "detected_at minus the signal's received_at (since=received) or exchange_ts (since=exchange)",
    ["since"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
_SINCE_RECEIVED = SIGNAL_LATENCY.labels("received")
_SINCE_EXCHANGE = SIGNAL_LATENCY.labels("exchange")


@dataclass(frozen=True)
class GroupStats:
    group: str
    consumers: int
    pending: int
    lag: int
    # False when Redis could not report the lag and it was estimated (see the module docstring).
    lag_exact: bool
    last_delivered_id: str


@dataclass(frozen=True)
class StreamStats:
    stream: str
    length: int
    groups: tuple[GroupStats, ...]


def public_streams(streams: Streams) -> list[str]:
    """The streams worth watching in every deployment: data, dead letters, wallet changes."""
    return [
        *streams.order_streams(),
        *streams.token_streams(),
        streams.signals,
        streams.orders_dead,
        streams.signals_dead,
        streams.webhooks_dead,
        streams.wallets_control,
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _estimate_lag(
    client: aioredis.Redis, stream: str, info: Mapping[str, Any], added: int | None
) -> int:
    entries_read = info.get("entries-read")
    if added is not None and entries_read is not None:
        return max(0, added - int(entries_read))
    after = "(" + _text(info["last-delivered-id"])
    unread: Any = await client.xrange(stream, min=after, max="+", count=LAG_COUNT_CAP)
    return len(unread)


async def stream_stats(client: aioredis.Redis, stream: str) -> StreamStats:
    """Length and per-group state of one stream; a stream that does not exist has length 0."""
    try:
        groups_info = await client.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return StreamStats(stream, 0, ())
        raise
    length = int(await client.xlen(stream))
    added: int | None = None
    if any(info.get("lag") is None for info in groups_info):
        added = (await client.xinfo_stream(stream)).get("entries-added")
    groups = []
    for info in groups_info:
        lag = info.get("lag")
        exact = lag is not None
        if lag is None:
            lag = await _estimate_lag(client, stream, info, added)
        groups.append(
            GroupStats(
                group=_text(info["name"]),
                consumers=int(info["consumers"]),
                pending=int(info["pending"]),
                lag=int(lag),
                lag_exact=exact,
                last_delivered_id=_text(info["last-delivered-id"]),
            )
        )
    return StreamStats(stream, length, tuple(groups))


class StreamTracker:
    """Sets the gauges from `stream_stats`; label sets of vanished groups are removed."""

    def __init__(self, client: aioredis.Redis, streams: Iterable[str]) -> None:
        self.client = client
        self.streams = list(dict.fromkeys(streams))
        self._labelled: set[tuple[str, str]] = set()

    async def update(self) -> list[StreamStats]:
        stats = [await stream_stats(self.client, stream) for stream in self.streams]
        seen: set[tuple[str, str]] = set()
        for item in stats:
            STREAM_LENGTH.labels(item.stream).set(item.length)
            for group in item.groups:
                labels = (item.stream, group.group)
                seen.add(labels)
                GROUP_LAG.labels(*labels).set(group.lag)
                GROUP_PENDING.labels(*labels).set(group.pending)
                GROUP_CONSUMERS.labels(*labels).set(group.consumers)
        for labels in self._labelled - seen:
            for gauge in (GROUP_LAG, GROUP_PENDING, GROUP_CONSUMERS):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self._labelled = seen
        return stats


async def track_streams(
    client: aioredis.Redis,
    streams: Sequence[str],
    stop: asyncio.Event,
    interval_s: float = DEFAULT_INTERVAL_S,
) -> None:
    """Refresh the stream gauges every `interval_s` until `stop` is set."""
    tracker = StreamTracker(client, streams)
    failing = False
    while not stop.is_set():
        try:
            await tracker.update()
        except (RedisError, OSError) as exc:
            TRACK_ERRORS.inc()
            if not failing:
                log.warning("stream_metrics_unavailable", extra={"error": type(exc).__name__})
            failing = True
        else:
            if failing:
                log.info("stream_metrics_recovered")
            failing = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def observe_signal_latency(signal: Signal | Mapping[str, Any]) -> None:
    """Record the two latencies a Signal carries (a Signal, or its JSON payload as a dict)."""
    if isinstance(signal, Signal):
        detected, received = signal.detected_at, signal.received_at
        exchange = float(signal.exchange_ts)
    else:
        try:
            detected = float(signal["detected_at"])
            received = float(signal["received_at"])
            exchange = float(signal["exchange_ts"])
        except (KeyError, TypeError, ValueError):
            return
    _SINCE_RECEIVED.observe(max(0.0, detected - received))
    _SINCE_EXCHANGE.observe(max(0.0, detected - exchange))
