"""Plain stream entries through FastStream's batch subscribers, without its per-entry JSON work.

FastStream 0.7's batch parser turns every entry into JSON and back (and fails on an entry whose
bytes are not UTF-8, leaving the whole batch pending). `parse_plain_batch` keeps FastStream's
message (bound to the consumer group, so `ack()` still works) but skips that work, and
`plain_entries` hands a handler each entry's id and raw fields, to validate and dead-letter itself.
Relies on 0.7.x internals (`message_ids`, `data` of the raw batch); the project pins faststream<0.8.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from faststream.message import StreamMessage

Parser = Callable[[Mapping[str, Any]], Awaitable[StreamMessage[Any]]]


async def parse_plain_batch(raw: Mapping[str, Any], original: Parser) -> StreamMessage[Any]:
    """FastStream's message for the batch (bound to the group for `ack`), minus its JSON work."""
    message = await original({**raw, "data": []})
    message.raw_message = raw
    return message


def plain_entries(message: StreamMessage[Any]) -> list[tuple[str, Mapping[bytes, bytes]]]:
    """(entry id, fields) of every entry of a batch parsed by `parse_plain_batch`, in order."""
    raw = message.raw_message
    return [
        (entry_id.decode(), fields)
        for entry_id, fields in zip(raw["message_ids"], raw["data"], strict=True)
    ]
