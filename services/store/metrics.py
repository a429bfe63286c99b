"""The store's Prometheus metrics (process-wide, default registry), labelled by table."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "betterbot_store_"

ROWS_INSERTED = Counter(PREFIX + "rows_inserted", "Rows newly written", ["table"])
DUPLICATES = Counter(
    PREFIX + "duplicates_skipped",
    "Valid entries whose key was already stored and that changed no status (a repeat, or older "
    "than the newest entry applied to the row)",
    ["table"],
)
STATUS_CHANGES = Counter(
    PREFIX + "status_changes",
    "Entries that changed the status of a stored row, by the status set (an entry that inserts "
    "its row counts in rows_inserted, whatever its status)",
    ["table", "status"],
)
DEAD_LETTERED = Counter(
    PREFIX + "dead_lettered",
    "Entries sent to the dead-letter stream: invalid = failed the contract, "
    "rejected = refused by Postgres, failing = kept failing after reclaims",
    ["table", "reason"],
)
BATCH_SIZE = Histogram(
    PREFIX + "batch_size",
    "Entries per batch",
    ["table"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
COMMIT_SECONDS = Histogram(
    PREFIX + "commit_seconds",
    "Time to write and commit one batch (successful attempt)",
    ["table"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DB_RETRIES = Counter(PREFIX + "db_retries", "Failed write attempts that will be retried", ["table"])
DB_UP = Gauge(PREFIX + "db_up", "1 while Postgres answers, 0 while writes fail")
WALLET_CHANGES = Counter(
    PREFIX + "wallet_changes",
    "Tracked-wallet changes written to Postgres and/or the registry, by operation and path "
    "(api, follow = applied from the control stream, startup = the startup sync)",
    ["op", "via"],
)
API_REQUESTS = Counter(
    PREFIX + "api_requests", "History/wallet API requests answered", ["method", "route", "status"]
)
API_SECONDS = Histogram(
    PREFIX + "api_seconds",
    "Time to answer an API request (until the first byte for streams)",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
