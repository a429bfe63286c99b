"""Notifier: pushes every signal on `signals` to WebSocket clients, webhooks and the live page.

- `fanout`: reads the stream (plain XREAD, every replica on its own) and feeds the clients' queues.
- `clients`: a connected client, its bounded queue, its filter, and the resume bookkeeping.
- `filters`: which signals a subscriber wants (wallets, markets, kinds, minimum confidence).
- `auth`: tokens (constant-time check) and connections per token.
- `protocol`: the messages and close codes of `/ws`.
- `app`: the HTTP side: `/ws`, the live page at `/`, `/api/status`, `/health`, `/metrics`.
- `status`: the pipeline's state for the page, from the ingestor's feed status hash.
- `webhooks`: signed POSTs with retries and dead letters, through the consumer group `webhooks`.
- `main`: wiring; `python -m services.notifier` runs it until SIGTERM.

The protocol, webhooks and dashboard are documented for users in docs/notifier.md.
"""
