"""The detector's Prometheus metrics, prefixed `betterbot_detector_`, served on `/metrics`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ORDERS = Counter(
    "betterbot_detector_orders_processed_total",
    "Valid order fills handled (every delivery, duplicates included)",
)
DUPLICATES = Counter(
    "betterbot_detector_duplicates_total",
    "Orders the state step had already decided (redeliveries, or one fill twice in the stream)",
)
SIGNALS = Counter(
    "betterbot_detector_signals_emitted_total", "Signals written to the signals stream", ["kind"]
)
SUPPRESSED = Counter(
    "betterbot_detector_signals_suppressed_total",
    "Signals a cooldown held back (SIGNAL_COOLDOWN_S)",
    ["kind"],
)
WAITS = Counter(
    "betterbot_detector_order_waits_total",
    "Rounds in which orders of a batch waited for earlier orders on the same state units",
)
CONFLICTS = Counter(
    "betterbot_detector_state_conflicts_total",
    "Orders decided on state that changed before the apply step (decided again)",
)
UNSETTLED = Counter(
    "betterbot_detector_orders_left_pending_total",
    "Orders still waiting after DETECTOR_WAIT_S, left pending for a later retry",
)
DEAD_LETTERED = Counter(
    "betterbot_detector_dead_lettered_total",
    "Entries of orders.raw sent to orders.dead as invalid or failing their rules (entries delivered"
    " too often: betterbot_consumer_entries_dead_lettered_total)",
    ["reason"],
)
WALLETS = Gauge("betterbot_detector_tracked_wallets", "Wallets tracked (from the wallet registry)")
SEEDINGS = Counter(
    "betterbot_detector_position_seedings_total",
    "Wallets' positions seeded from the Data API's /positions: seeded (by this replica), adopted "
    "(another's seeding found in Redis), failed (asked again after DETECTOR_SEED_RETRY_S)",
    ["result"],
)
BATCH_SIZE = Histogram(
    "betterbot_detector_batch_size",
    "Entries per batch read from orders.raw",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
LATENCY = Histogram(
    "betterbot_detector_processing_latency_seconds",
    "detected_at - received_at of every order the state step decided (receipt to decision)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
