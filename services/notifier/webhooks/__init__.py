"""Webhooks: every signal POSTed, signed, to each endpoint whose filters it matches.

- `config`: the endpoints, from `WEBHOOKS_FILE` (JSON or YAML).
- `presets`: the request body: `generic` (the WebSocket signal message), `discord`, `slack`.
- `signing`: the HMAC-SHA256 signature headers, and the check a receiver runs.
- `delivery`: one signal to one endpoint: POST, retries with exponential backoff, the outcome.
- `consumer`: the Redis side (the only module here that knows Redis): consumer group `webhooks` on
  `signals`, so each signal is handled by exactly one replica; ack after the final outcome;
  `webhooks.dead` after the last try; reclaiming a dead replica's pending entries.
"""
