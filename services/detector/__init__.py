"""The detector: order fills on `orders.raw` (group `detector`) -> signals on `signals`.

Reads top-down:
- `settings.py`: every knob, from the environment (unprefixed names) over `DETECTOR_RULES_FILE`.
- `main.py`: `python -m services.detector`; startup, the wallet registry, the consumer group
  (`shared/consumer.py`: reads, acks, reclaims, dead-letters, drains), `/health` + `/metrics`.
- `pipeline.py`: one batch: validate entries, dead-letter bad ones, order against the other
  replicas, decide with the rules, hand the decisions to the state step.
- `rules.py`: the rules (`trader_entry`, `trader_exit`, `whale_order`, `consensus`,
  `accumulation`, `distribution`), filters, cooldowns and confidence, as plain functions over plain
  state.
- `positions.py`: wallets' positions seeded from the Data API's `/positions` when tracking starts.
- `serial.py`: the reference: the rules over a stream in order, state in memory.
- `state.py`: everything Redis-specific: the atomic per-order Lua step (prerequisites, done key,
  compare-and-set of the state, XADD), the pending-list reads that order replicas, dead letters.
- `replay.py`: `python -m services.detector.replay TAPE`: what the rules signal on a tape.
- `metrics.py`: Prometheus metrics, prefixed `betterbot_detector_`.

Replicas share the group and all state lives in Redis, so any number can run side by side: orders
that touch the same state are decided in stream order whichever replica holds them, so N replicas
emit exactly what one would (docs/signals.md), and each order's effect happens once however often
it is delivered.
"""
