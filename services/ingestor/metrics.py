"""The ingestor's Prometheus metrics (process-wide, default registry). Labels never hold a key or
a URL: only source names (dome_ws, dome_rest, data_api), fixed reason classes and HTTP status
codes.

Per source: events received, published (new order_keys), deduplicated (seen before, from this or
another source), dead-lettered, backfilled (new fills recovered by gap backfill), reconnects,
seconds since the last event, subscriptions, and the HTTP requests and 429s of the REST sources.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "betterbot_ingestor_"

EVENTS_RECEIVED = Counter(
    PREFIX + "events_received", "Valid order events received from a source", ["source"]
)
PUBLISHED = Counter(PREFIX + "published", "Fills added to orders.raw (new order_keys)", ["source"])
DUPLICATES = Counter(
    PREFIX + "duplicates", "Fills skipped because their order_key was already seen", ["source"]
)
DEAD_LETTERED = Counter(PREFIX + "dead_lettered", "Entries written to orders.dead", ["source"])
BACKFILLED = Counter(
    PREFIX + "backfilled",
    "Fills the live feed had missed, recovered by gap backfill (new order_keys)",
    ["source"],
)
REJECTED = Counter(
    PREFIX + "rejected", "Frames rejected and dead-lettered, by reason class", ["source", "reason"]
)
IGNORED = Counter(
    PREFIX + "ignored", "Events of wallets removed a moment ago (not dead-lettered)", ["source"]
)
SERVER_ERRORS = Counter(PREFIX + "server_errors", "Error frames sent by the server", ["source"])
# `code` is one of a fixed set: INVALID_FILTERS, ITEMS_LIMIT, CONNECTION_LIMIT, SESSION_LIMIT.
PROVIDER_REFUSALS = Counter(
    PREFIX + "provider_refusals",
    "Connections the provider refused or ended for the plan or the filters, by code",
    ["source", "code"],
)
NON_FILL_EVENTS = Counter(
    PREFIX + "non_fill_events",
    "Events that are not fills (Predexon's fee_refund), skipped, not dead-lettered",
    ["source", "event_type"],
)
RECONNECTS = Counter(PREFIX + "reconnects", "Connection attempts after the first", ["source"])
AUTH_FAILURES = Counter(
    PREFIX + "auth_failures", "Requests or handshakes refused for the key", ["source"]
)
SILENCE_TIMEOUTS = Counter(
    PREFIX + "silence_timeouts", "Connections replaced after a silence while subscribed", ["source"]
)
CONNECTED = Gauge(
    PREFIX + "connected", "1 while every connection of the source is open", ["source"]
)
CONNECTIONS = Gauge(PREFIX + "connections", "Open connections of the source", ["source"])
SUBSCRIPTIONS = Gauge(
    PREFIX + "subscriptions", "Subscriptions acknowledged over the open connections", ["source"]
)
WALLETS = Gauge(PREFIX + "wallets", "Wallets the source follows", ["source"])
OVER_CAPACITY = Gauge(
    PREFIX + "wallets_over_capacity",
    "Tracked wallets the tier has no subscription room for (not followed)",
    ["source"],
)
SECONDS_SINCE_LAST_EVENT = Gauge(
    PREFIX + "seconds_since_last_event",
    "Seconds since the last valid event (since start when none yet)",
    ["source"],
)
WALLETS_BEHIND = Gauge(
    PREFIX + "wallets_behind",
    "Wallets whose gap backfill has not completed (not read yet since they needed it, or failing)",
    ["source"],
)
WALLETS_BEHIND_SINCE = Gauge(
    PREFIX + "wallets_behind_since_timestamp_seconds",
    "Unix time since when the wallet longest behind has been behind (0: none is)",
    ["source"],
)
BACKFILL_FAILURES = Counter(
    PREFIX + "backfill_failures",
    "Failed backfill attempts of one wallet (each wallet retries with its own backoff)",
    ["source"],
)
BACKFILL_REREADS = Counter(
    PREFIX + "backfill_rereads",
    "Second backfill passes of a wallet (REST indexing lag, updates not confirmed)",
    ["source"],
)
HTTP_REQUESTS = Counter(
    PREFIX + "http_requests", "REST requests by source and HTTP status", ["source", "status"]
)
RATE_LIMITED = Counter(PREFIX + "rate_limited", "HTTP 429 answers honoured", ["source"])
DATA_API_CACHE = Counter(
    PREFIX + "data_api_cache",
    "Data API answers by the CDN's cf-cache-status (lower case; none: no header); cached ones "
    "(hit, stale, updating, or an age above 0) are never used: the page is asked again",
    ["status"],
)
REDIS_ERRORS = Counter(PREFIX + "redis_errors", "Failed Redis calls (each is retried)")
QUEUE_DEPTH = Gauge(PREFIX + "queue_depth", "Fills and dead letters waiting for Redis")
PUBLISH_BATCH = Histogram(
    PREFIX + "publish_batch_size",
    "Fills per Lua call",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
# Per fill, how far each source ran behind the first one that delivered it (shared/source_lag.py
# keeps the same figures in Redis for the dashboard; these are this process's deliveries only).
SOURCE_FIRST = Counter(
    PREFIX + "source_first", "Fills (per status) this source delivered before any other", ["source"]
)
SOURCE_LAG = Histogram(
    PREFIX + "source_lag_seconds",
    "How long after the first source this source delivered the same fill",
    ["source"],
    buckets=(0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 120, 300, 900),
)
PUBLISH_LATENCY = Histogram(
    PREFIX + "publish_latency_seconds",
    "From frame receipt to the fill being in orders.raw",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# The rtds source (services/ingestor/sources/rtds.py): the firehose's frames by what they were,
# and the new sockets its payload watchdog opened.
RTDS_FRAMES = Counter(
    PREFIX + "rtds_frames",
    "RTDS frames by kind: fill (a tracked wallet's), untracked, empty, pong, no_payload, "
    "other_topic, rejected",
    ["kind"],
)
RTDS_WATCHDOG_RECONNECTS = Counter(
    PREFIX + "rtds_watchdog_reconnects",
    "New RTDS sockets opened because no payload came for RTDS_PAYLOAD_TIMEOUT_S",
)

# The polygon source (services/ingestor/chain). No label holds an endpoint's URL: it carries a key.
CHAIN_HEAD = Gauge(PREFIX + "chain_head_block", "Newest block number the node announced")
CHAIN_BLOCK = Gauge(PREFIX + "chain_read_block", "Last block fully read and published (watermark)")
CHAIN_LAG = Gauge(
    PREFIX + "chain_lag_blocks", "Settled blocks not read yet (head - confirmations - read)"
)
CHAIN_ENDPOINT = Gauge(
    PREFIX + "chain_endpoint", "Position in POLYGON_WS_URLS of the endpoint in use"
)
CHAIN_REORGS = Counter(PREFIX + "chain_reorgs", "Reorgs found under the block watermark")
CHAIN_REMOVED = Counter(
    PREFIX + "chain_removed_logs", "Published fills a reorg took back (removed: true)"
)
CHAIN_RANGES_READ = Counter(PREFIX + "chain_ranges_read", "eth_getLogs ranges read")
CHAIN_RANGES_SPLIT = Counter(
    PREFIX + "chain_ranges_split", "eth_getLogs ranges halved because the provider refused them"
)

# Pending (mempool) fills and their lifecycle (services/ingestor/pending.py).
PENDING_PUBLISHED = Counter(
    PREFIX + "pending_published", "Pending fills added to orders.raw (new order_keys)", ["source"]
)
PENDING_CONFIRMED = Counter(
    PREFIX + "pending_confirmed", "Pending fills some source confirmed (any source)"
)
PENDING_RETRACTED = Counter(
    PREFIX + "pending_retracted",
    "Pending fills retracted: no source confirmed them within PENDING_CONFIRM_TIMEOUT_S",
)
PENDING_CONFIRM_DELAY = Histogram(
    PREFIX + "pending_confirm_delay_seconds",
    "From a pending fill's receipt to its confirmation's (fills seen pending by this process)",
    buckets=(0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 60, 120),
)
