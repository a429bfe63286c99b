"""Notifier: pushes every signal on `signals` to WebSocket clients, live and resumable.

- `fanout`: reads the stream (plain XREAD, every replica on its own) and feeds the clients' queues.
- `clients`: a connected client, its bounded queue, its filter, and the resume bookkeeping.
- `protocol`: the messages and close codes of `/ws`.
- `app`: the HTTP side: `/ws`, the live page at `/`, `/health`, `/metrics`.
- `main`: wiring; `python -m services.notifier` runs it until SIGTERM.
"""
