"""The detector: order fills on `orders.raw` (group `detector`) -> signals on `signals`.

Reads top-down:
- `settings.py`: every knob, from the environment (unprefixed names: WALLETS_FILE, ...).
- `main.py`: `python -m services.detector`; startup, `/health` + `/metrics`, graceful shutdown.
- `handlers.py`: the FastStream batch subscriber and its ack (only once the effects are in Redis).
- `pipeline.py`: one batch: validate entries, dead-letter bad ones, run the rules, the state step.
- `rules.py`: the rules (`trader_entry`, `whale_order`) and their confidence, as plain functions.
- `state.py`: everything Redis-specific: the atomic per-order Lua step (done key, position, XADD).
- `metrics.py`: Prometheus metrics, prefixed `betterbot_detector_`.

Replicas share the group and all state lives in Redis, so any number can run side by side; each
order's effect happens once whichever replica, and however often, it is delivered.
"""
