"""Consume BetterBot signals from your own service: plain redis-py and json, nothing else.

Each entry of the `signals` stream has one field, `data`, holding a Signal as JSON
(docs/streams.md, docs/schemas/signal.schema.json). Your service reads with a consumer group of its
own, so it gets every signal once however many replicas it runs, and acks each one after handling
it; after a crash it first finishes what it had been given (its pending entries), then reads new
ones. Signals carry a deterministic `signal_id`: make your handler idempotent on it, since a
crash between handling and XACK delivers that signal again.

    python examples/consume_signals.py --group my-service --count 5
"""

import argparse
import json
import os
import socket
import sys
from typing import Any

import redis


def handle(signal: dict[str, Any]) -> None:
    """Your logic goes here; this one prints the signal as one JSON line."""
    print(json.dumps(signal), flush=True)


def consume(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    count: int = 0,
    start: str = "$",
    block_ms: int = 5000,
) -> int:
    """Read, handle and ack signals; stop after `count` of them (0: never). Returns how many."""
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    handled, cursor = 0, "0"  # "0": our own pending entries first, then ">" for new ones
    while count == 0 or handled < count:
        limit = 100 if count == 0 else min(100, count - handled)
        reply = client.xreadgroup(group, consumer, {stream: cursor}, count=limit, block=block_ms)
        entries = reply[0][1] if reply else []
        if cursor == "0" and not entries:
            cursor = ">"
        for entry_id, fields in entries:
            try:
                signal = json.loads(fields[b"data"])
            except (KeyError, ValueError):
                # Not a signal: say so and ack it, or it would come back after every restart.
                print(f"skipped entry {entry_id!r}: no JSON data field", file=sys.stderr)
            else:
                handle(signal)
                handled += 1
            client.xack(stream, group, entry_id)
    return handled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--stream", default=os.environ.get("STREAM_NAMESPACE", "") + "signals")
    parser.add_argument("--group", default="my-service")
    # Stable across restarts of one replica, so a restarted replica finds its own pending entries.
    parser.add_argument("--consumer", default=socket.gethostname())
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    parser.add_argument(
        "--from-start",
        action="store_true",
        help="a new group starts at the oldest kept signal instead of new ones",
    )
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    start = "0" if args.from_start else "$"
    consume(client, args.stream, args.group, args.consumer, args.count, start)


if __name__ == "__main__":
    main()
