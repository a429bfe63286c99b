"""The ingestor: tracked wallets' order fills into `orders.raw`, each fill exactly once, from the
Dome WebSocket (or its polynode dialect), Dome REST polling and/or Polymarket's Data API.

Reads top-down:
- `settings.py`: every knob, from the environment (unprefixed: DOME_WS_URL, INGEST_SOURCES, ...),
  with DOME_TIER=free|dev filling in a tier's limits.
- `main.py`: `python -m services.ingestor`; logging, settings, `service.Ingestor` until SIGTERM.
- `service.py`: one run's wiring: wallets from the registry, the sources, the publisher, the
  wallet follower (live changes), the status writer, the ops server.
- `sources/dome_ws.py`: the WebSocket source: wallets over subscriptions over connections, live
  wallet changes; `sources/ws_connection.py`: one connection (subscribe, FIFO acks, liveness,
  reconnect, gap backfill).
- `sources/poller.py`: the polling sources; `sources/dome_rest.py` and `sources/data_api.py`: the
  two HTTP histories (also used for backfill); `backfill.py`: catch one wallet up from its
  watermark.
- `frames.py`: one server frame -> an ack, a fill, a server error, or a rejection with a reason.
- `subscriptions.py`: planning within the tier's limits, the live layout, the ack registry;
  `dialects.py`: the requests of each dialect.
- `publisher.py`: the atomic "new order_key? then XADD" Lua step and the watermarks (the one
  Redis-specific module), batched, retried while Redis is down.
- `http_api.py` + `ratelimit.py`: rate-limited GETs honouring 429 and Retry-After.
- `feed_status.py`: per-source state for `/health`, metrics and the dashboard's status hash.
- `metrics.py`: Prometheus metrics, prefixed `betterbot_ingestor_`, labelled by source.

docs/ingestion.md explains the sources, the tiers and what happens on each failure.
"""
