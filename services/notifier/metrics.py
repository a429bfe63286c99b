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

WEBHOOK_ATTEMPTS = Counter(
    "betterbot_notifier_webhook_attempts",
    "Webhook POSTs, by endpoint name and result (2xx, 4xx, 5xx, timeout, error, ...)",
    ["webhook", "result"],
)
WEBHOOK_OUTCOMES = Counter(
    "betterbot_notifier_webhook_outcomes",
    "Signals finished per endpoint: delivered, or dead (dead-lettered on webhooks.dead)",
    ["webhook", "outcome"],
)
WEBHOOK_LATENCY = Histogram(
    "betterbot_notifier_webhook_latency_seconds",
    "From the ingestor receiving the order (signal received_at) to the endpoint's 2xx",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
WEBHOOK_IN_FLIGHT = Gauge(
    "betterbot_notifier_webhook_in_flight",
    "Signals being delivered to the endpoint on this replica",
    ["webhook"],
)
WEBHOOK_RECLAIMED = Counter(
    "betterbot_notifier_webhook_reclaimed",
    "Signals of the endpoint's queue taken over from a replica that stopped delivering them",
    ["webhook"],
)
WEBHOOK_BACKLOG = Gauge(
    "betterbot_notifier_webhook_backlog",
    "Signals the endpoint still owes (its queue's length: waiting or in delivery), any replica",
    ["webhook"],
)
WEBHOOK_SKIPPED = Counter(
    "betterbot_notifier_webhook_entries_skipped",
    "Entries of the signals stream acked without delivery because they are not a Signal",
)
