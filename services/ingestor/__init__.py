"""The ingestor: tracked wallets' order fills from Dome into `orders.raw`, each fill exactly once.

Reads top-down:
- `settings.py`: every knob, from the environment (unprefixed: DOME_WS_URL, WALLETS_FILE, ...).
- `main.py`: `python -m services.ingestor`; logging, settings, `service.Ingestor` until SIGTERM.
- `service.py`: one run's wiring: startup checks, source, publisher, status writer, ops server.
- `sources/dome_ws.py`: the Dome WebSocket client (subscribe in chunks, FIFO acks, reconnect).
- `frames.py`: one server frame -> an ack, a fill, a server error, or a rejection with a reason.
- `subscriptions.py`: wallets -> subscribe messages within the tier limits; the ack registry.
- `publisher.py`: the atomic "new order_key? then XADD" Lua step, batched, retried while Redis
  is down.
- `feed_status.py`: connection state for `/health`, metrics and the dashboard's status hash.
- `backoff.py`: exponential backoff with jitter, shared by every retry loop.
- `metrics.py`: Prometheus metrics, prefixed `betterbot_ingestor_`.
"""
