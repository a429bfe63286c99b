"""A Dome-protocol simulator: Dome's WebSocket and REST order feeds, from a tape or a generator.

Any Dome client can be pointed at it by changing only the base URL:

- WebSocket `ws://SIM_HOST:SIM_PORT/<API_KEY>` speaks Dome's order-feed protocol (subscribe -> ack,
  events with the subscription id, update, unsubscribe); see `protocol` and `feed`.
- WebSocket `ws://SIM_HOST:SIM_PORT/ws?key=<API_KEY>` speaks the same feed in the polynode dialect,
  `ws://SIM_HOST:SIM_PORT/v1/<API_KEY>` in the Predexon dialect, each with its provider's quirks,
  limits and pending (mempool) events; see `successors`.
- REST `GET /v1/polymarket/orders` answers like `https://api.domeapi.io/v1/polymarket/orders`; see
  `history`.
- REST `GET /trades` answers like Polymarket's Data API `/trades`; see `data_api`.
- `/health` and `/metrics` (Prometheus) on the same port.
- `/_sim/*` is a control API for tests and the benchmark, not part of Dome, including fault
  injection (drop, stall, reject auth, 429; see `faults`); see `app`.

Trades (`trades`) come from `tape` (real Data-API trades replayed oldest first, time-compressed,
looped with fresh hashes) or `synthetic` (seeded random trades at a fixed rate); `replay` paces them
on the simulated clock and emits each one once: into the in-memory history (REST and the ground
truth) and to every matching subscription.

Run it with `python -m services.simulator`; settings are in `settings`.
"""
