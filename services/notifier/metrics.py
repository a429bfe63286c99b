"""Prometheus metrics of the notifier (served on its own port at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CLIENTS = Gauge("betterbot_notifier_clients", "WebSocket clients connected now")
MESSAGES_SENT = Counter(
    "betterbot_notifier_messages_sent",
    "Signal messages sent to clients; phase=backlog for resumed entries, live for the rest",
    ["phase"],
)
SENT_LIVE = MESSAGES_SENT.labels("live")
SENT_BACKLOG = MESSAGES_SENT.labels("backlog")
CLIENTS_DROPPED = Counter(
    "betterbot_notifier_clients_dropped",
    "Connections the server closed, by reason (slow_consumer, message_too_big, shutdown, ...)",
    ["reason"],
)
SIGNALS_READ = Counter("betterbot_notifier_signals_read", "Valid signals read from the stream")
ENTRIES_INVALID = Counter(
    "betterbot_notifier_entries_invalid", "Stream entries skipped because they are not a Signal"
)
READ_ERRORS = Counter(
    "betterbot_notifier_read_errors", "Failed stream reads (the reader reconnects and retries)"
)
LATENCY = Histogram(
    "betterbot_notifier_latency_seconds",
    "From the ingestor receiving the order (signal received_at) to the signal sent to a client",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
