"""The ingestor's Prometheus metrics (process-wide, default registry). Labels never hold a key or
a URL: only fixed reason classes and source names."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "betterbot_ingestor_"

EVENTS_RECEIVED = Counter(
    PREFIX + "events_received", "Valid order events received from a source", ["source"]
)
PUBLISHED = Counter(PREFIX + "published", "Fills added to orders.raw (new order_keys)")
DUPLICATES = Counter(PREFIX + "duplicates", "Fills skipped because their order_key was seen")
REJECTED = Counter(
    PREFIX + "rejected", "Frames rejected and dead-lettered, by reason class", ["source", "reason"]
)
SERVER_ERRORS = Counter(PREFIX + "server_errors", "Error frames sent by the server", ["source"])
RECONNECTS = Counter(PREFIX + "reconnects", "Connection attempts after the first", ["source"])
AUTH_FAILURES = Counter(PREFIX + "auth_failures", "Handshakes rejected with 401/403", ["source"])
CONNECTED = Gauge(PREFIX + "connected", "1 while the source's connection is open", ["source"])
SUBSCRIPTIONS = Gauge(
    PREFIX + "subscriptions", "Subscriptions acknowledged on the current connection", ["source"]
)
SECONDS_SINCE_LAST_EVENT = Gauge(
    PREFIX + "seconds_since_last_event",
    "Seconds since the last valid event (since start when none yet)",
    ["source"],
)
REDIS_ERRORS = Counter(PREFIX + "redis_errors", "Failed Redis calls (each is retried)")
QUEUE_DEPTH = Gauge(PREFIX + "queue_depth", "Fills and dead letters waiting for Redis")
PUBLISH_BATCH = Histogram(
    PREFIX + "publish_batch_size",
    "Fills per Lua call",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
PUBLISH_LATENCY = Histogram(
    PREFIX + "publish_latency_seconds",
    "From frame receipt to the fill being in orders.raw",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
