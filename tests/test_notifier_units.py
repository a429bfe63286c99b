"""The notifier's pure parts: stream ids, the client protocol, queues, resume skipping, entries."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from services.notifier.clients import Client, Delivery, StreamId
from services.notifier.fanout import rejection_reason, to_delivery
from services.notifier.protocol import (
    HELLO,
    PONG,
    Close,
    CloseCode,
    Ping,
    ProtocolError,
    read_client_message,
    replay_cut,
    slow_consumer,
)
from tests.helpers.notifier import make_signal


def test_stream_ids_parse_and_order() -> None:
    assert StreamId.parse(b"1700000000000-5") == StreamId(1700000000000, 5)
    assert str(StreamId.parse("12-0")) == "12-0"
    assert StreamId.parse("9-10") > StreamId.parse("9-9") > StreamId.parse("8-99")
    for bad in ("", "12", "12-", "-1", "a-1", "1-2-3", "$", " 1-2", f"{2**64}-0"):
        with pytest.raises(ValueError):
            StreamId.parse(bad)


MAX_BYTES = 64 * 1024


def read(message: dict[str, object]) -> object:
    return read_client_message(
        {"type": "websocket.receive", **message}, max_bytes=MAX_BYTES, max_filter_values=10
    )


def test_hello_and_pong() -> None:
    assert orjson.loads(HELLO) == {"type": "hello", "server": "betterbot-notifier", "v": 1}
    assert read({"text": '{"type":"ping","n":1}'}) == Ping()
    assert orjson.loads(PONG) == {"type": "pong"}


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"text": "x" * (MAX_BYTES + 1)}, CloseCode.MESSAGE_TOO_BIG),
        # Counted in bytes, not characters.
        ({"text": '{"type":"ping","p":"' + "é" * 40_000 + '"}'}, CloseCode.MESSAGE_TOO_BIG),
        ({"bytes": b"\0" * (MAX_BYTES + 1)}, CloseCode.MESSAGE_TOO_BIG),
        ({"bytes": b'{"type":"ping"}'}, CloseCode.UNSUPPORTED_DATA),
        ({"text": "ping"}, CloseCode.UNSUPPORTED_DATA),
        ({"text": '["ping"]'}, CloseCode.UNSUPPORTED_DATA),
        ({"text": '{"type":"unsubscribe"}'}, CloseCode.UNSUPPORTED_DATA),
        ({"text": '{"type":"subscribe","filters":{"kinds":["nope"]}}'}, CloseCode.POLICY_VIOLATION),
        ({"text": '{"type":"subscribe","filter":{}}'}, CloseCode.POLICY_VIOLATION),
        ({"text": '{"type":"subscribe","token":7}'}, CloseCode.POLICY_VIOLATION),
    ],
)
def test_client_messages_that_end_the_connection(message: dict[str, object], code: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        read(message)
    assert caught.value.close.code == code


def test_close_reasons_fit_a_close_frame() -> None:
    reason = slow_consumer(1_000_000).reason
    assert reason == "slow consumer: queue overflow at 1000000 messages; reconnect and resume"
    # The largest replay limit the settings allow, and the longest stream id.
    longest = f"{2**64 - 1}-{2**64 - 1}"
    assert replay_cut(10_000_000, longest).reason.endswith(f"last_id={longest}")
    with pytest.raises(ValueError, match="longer than 123 bytes"):
        Close(CloseCode.POLICY_VIOLATION, "x" * 124, "x")


async def test_full_queue_marks_the_client_as_slow() -> None:
    client = Client(2)
    assert client.offer(Delivery("a")) and client.offer(Delivery("b"))
    assert not client.kicked.is_set()
    assert not client.offer(Delivery("c"))
    assert client.kicked.is_set()
    assert client.close == slow_consumer(2)
    # The first reason stays; nothing more is queued once it is marked.
    client.kick(Close(CloseCode.GOING_AWAY, "bye", "shutdown"))
    assert client.close == slow_consumer(2)
    assert not client.offer(Delivery("d"))
    assert client.queue.qsize() == 2


async def test_filter_decides_which_signals_are_queued() -> None:
    wanted = make_signal(1)
    client = Client(10, accepts=lambda signal: signal.signal_id == wanted.signal_id)
    for n in (0, 1, 2):
        assert client.offer(Delivery(f"s{n}", StreamId(1, n), make_signal(n)))
    assert client.offer(Delivery(PONG))
    assert [(await client.next_delivery()).text for _ in range(2)] == ["s1", PONG]


async def test_after_a_backlog_queued_entries_it_covered_are_skipped() -> None:
    client = Client(10)
    for seq in (3, 4, 5, 6):
        client.offer(Delivery(f"e{seq}", StreamId(7, seq)))
    client.offer(Delivery(PONG))
    client.sent_through(StreamId(7, 5))
    assert (await client.next_delivery()).text == "e6"
    assert (await client.next_delivery()).text == PONG
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.next_delivery(), 0.01)


def test_entry_becomes_one_message_carrying_the_entry_json() -> None:
    signal = make_signal(3)
    fields = {b"data": orjson.dumps(signal.model_dump(mode="json") | {"future_field": [1, 2]})}
    delivery = to_delivery(b"1700000000000-2", fields)
    assert delivery.stream_id == StreamId(1700000000000, 2)
    assert delivery.signal == signal
    message = orjson.loads(delivery.text)
    assert message["type"] == "signal" and message["id"] == "1700000000000-2"
    # Passed through as written: unknown fields reach the clients too.
    assert message["signal"] == signal.model_dump(mode="json") | {"future_field": [1, 2]}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"data": b"{oops"}, "not JSON"),
        ({b"payload": b"{}"}, "no 'data' field"),
        ({b"data": b"[1, 2]"}, "entry: Input should be a valid dictionary"),
        (
            {b"data": orjson.dumps(make_signal(1).model_dump(mode="json") | {"side": "HOLD"})},
            "side: Input should be 'BUY' or 'SELL'",
        ),
    ],
)
def test_entries_that_are_not_signals_are_refused(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        to_delivery(b"1-1", fields)
    assert reason in rejection_reason(caught.value)
