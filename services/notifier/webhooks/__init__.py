"""Webhooks: every signal POSTed, signed, to each endpoint whose filters it matches.

- `config`: the endpoints, from `WEBHOOKS_FILE` (JSON or YAML); a telegram one has a `chat_id`
  and a `bot_token`, and posts to the Bot API's `sendMessage`.
- `presets`: the request body: `generic` (the WebSocket signal message), `discord`, `slack`,
  `telegram` (HTML); feed text escaped for each.
- `signing`: the HMAC-SHA256 signature headers, and the check a receiver runs.
- `delivery`: one signal to one endpoint: POST, retries with exponential backoff, the outcome.
- `consumer`: the Redis side, in two steps, so that endpoints never wait for each other:
  - `handoff`: consumer group `webhooks` on `signals`; each entry is acked as it is appended to
    the queue of every endpoint it matches (one Redis stream per endpoint);
  - `endpoint`: one endpoint's queue, its own consumer group, deliveries, reclaims and dead
    letters (`dead`: `webhooks.dead`).

Delivery is at least once: an endpoint can get a signal twice (a lost response, a replica dying
between the 2xx and the ack). Every request carries `Idempotency-Key: <signal_id>` (for a
pending or retracted signal `<signal_id>:<status>`, so a status change is not taken for a repeat),
the same on every try and every replica, for the receiver to drop repeats.
"""
