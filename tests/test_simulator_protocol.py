"""Unit tests of the simulator's Dome protocol parsing, fan-out registry and REST history paging."""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

import orjson
import pytest

from services.simulator.feed import OVERFLOW_CODE, Hub
from services.simulator.history import (
    History,
    OrdersQuery,
    QueryError,
    decode_pagination_key,
    encode_pagination_key,
    parse_orders_query,
)
from services.simulator.protocol import (
    Filters,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    Update,
    ack_frame,
    error_frame,
    event_prefix,
    new_subscription_id,
    parse_client_message,
)
from services.simulator.trades import Trade, injected_trade

USER_A, USER_B = "0x" + "a" * 40, "0x" + "b" * 40
SUB_ID = re.compile(r"^sub_[a-z0-9]{11}$")


def subscribe(filters: Any, **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "action": "subscribe",
            "platform": "polymarket",
            "version": 1,
            "type": "orders",
            "filters": filters,
            **extra,
        }
    )


def test_subscribe_update_unsubscribe_parse() -> None:
    message = parse_client_message(subscribe({"users": [USER_A.upper().replace("0X", "0x")]}), 10)
    assert message == Subscribe(Filters(users=frozenset({USER_A})))
    update = parse_client_message(
        subscribe({"condition_ids": ["0xABC"]}, action="update", subscription_id="sub_x"), 10
    )
    assert update == Update("sub_x", Filters(condition_ids=frozenset({"0xabc"})))
    assert parse_client_message(
        '{"action":"unsubscribe","version":1,"subscription_id":"sub_x"}', 10
    ) == Unsubscribe("sub_x")
    wildcard = parse_client_message(subscribe({"users": ["*"]}), 10)
    assert isinstance(wildcard, Subscribe) and wildcard.filters.all_users


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"action": "ping"}', "action must be"),
        (subscribe({"users": [USER_A]}, platform="kalshi"), "platform"),
        (subscribe({"users": [USER_A]}, type="trades"), "type"),
        (subscribe({"users": [USER_A]}, version=2), "version"),
        (subscribe({"users": []}), "non-empty list"),
        (subscribe({"users": [1]}), "non-empty list"),
        (subscribe({"wallets": [USER_A]}), "unknown filter"),
        (subscribe({}), "filters need one of"),
        (subscribe(None), "filters must be an object"),
        (subscribe({"users": [USER_A] * 11}), "limit is 10"),
        (b'{"action": "unsubscribe"}', "subscription_id"),
        (subscribe({"users": [USER_A]}, action="update"), "subscription_id"),
    ],
)
def test_bad_client_messages_raise_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_client_message(raw, 10)


def test_filters_match_every_given_criterion() -> None:
    by_user = Filters(users=frozenset({USER_A}))
    assert by_user.matches(USER_A, "0x1", "s") and not by_user.matches(USER_B, "0x1", "s")
    both = Filters(users=frozenset({USER_A}), market_slugs=frozenset({"s"}))
    assert both.matches(USER_A, "0x1", "s") and not both.matches(USER_A, "0x1", "t")
    everyone = Filters(users=frozenset({"*"}), all_users=True)
    assert everyone.matches(USER_B, "0x9", "z")
    assert Filters(condition_ids=frozenset({"0x1"})).matches(USER_B, "0x1", "z")


def test_frames_and_ids() -> None:
    ids = {new_subscription_id(set()) for _ in range(50)}
    assert all(SUB_ID.match(i) for i in ids) and len(ids) == 50
    assert orjson.loads(ack_frame("sub_abc")) == {"type": "ack", "subscription_id": "sub_abc"}
    assert orjson.loads(error_frame('bad "x"')) == {"type": "error", "message": 'bad "x"'}
    event = orjson.loads(event_prefix("sub_abc") + '{"price":0.5}}')
    assert event == {"type": "event", "subscription_id": "sub_abc", "data": {"price": 0.5}}


def make_trade(seq: int, user: str = USER_A, timestamp: int = 1000, **fields: Any) -> Trade:
    injected = injected_trade({"user": user, **fields}, f"t{seq}")
    return Trade.stamp(
        injected.template,
        seq=seq,
        timestamp=timestamp,
        block_number=1,
        log_index=seq,
        emitted_at=float(timestamp),
    )


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[str | bytes] = []
        self.closed: tuple[int, str | None] | None = None

    async def send_text(self, data: str) -> None:
        self.sent.append(data)

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)


async def settle() -> None:
    """Let ready tasks run (the fake socket never blocks, so one turn drains a writer)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_hub_sends_acks_errors_and_one_event_per_matching_subscription_in_order() -> None:
    hub = Hub(max_queue=100, max_subscriptions=5, max_filter_values=10)
    socket = FakeSocket()
    conn = hub.connect(socket)
    writer = asyncio.create_task(conn.write_loop())
    hub.handle(conn, subscribe({"users": [USER_A]}))
    hub.handle(conn, b"oops")
    hub.handle(conn, subscribe({"users": ["*"]}))
    assert hub.publish(make_trade(0, USER_B)) == 1
    assert hub.publish(make_trade(1, USER_A)) == 2
    await settle()
    frames = [orjson.loads(f) for f in socket.sent]
    assert [f["type"] for f in frames] == ["ack", "error", "ack", "event", "event", "event"]
    by_user, everyone = frames[0]["subscription_id"], frames[2]["subscription_id"]
    assert SUB_ID.match(by_user) and SUB_ID.match(everyone) and by_user != everyone
    assert frames[3]["subscription_id"] == everyone and frames[3]["data"]["user"] == USER_B
    assert {frames[4]["subscription_id"], frames[5]["subscription_id"]} == {by_user, everyone}
    assert frames[4]["data"] == frames[5]["data"] == make_trade(1, USER_A).order()
    hub.close(conn, 1000, "bye")
    await writer
    assert socket.closed == (1000, "bye") and hub.subscription_count == 0


async def test_hub_cuts_off_a_client_whose_queue_overflows() -> None:
    hub = Hub(max_queue=3, max_subscriptions=2, max_filter_values=10)
    socket = FakeSocket()
    conn = hub.connect(socket)  # no writer running: the client reads nothing
    hub.handle(conn, subscribe({"users": [USER_A]}))
    hub.handle(conn, subscribe({"users": ["*"]}))
    hub.handle(conn, subscribe({"users": [USER_B]}))  # over the limit: an error frame
    assert hub.subscription_count == 2
    assert hub.publish(make_trade(0, USER_A)) == 0  # 2 acks + 1 error fill the queue of 3
    assert conn.closing and conn not in hub.connections and hub.subscription_count == 0
    await conn.write_loop()
    assert socket.sent == [] and socket.closed is not None and socket.closed[0] == OVERFLOW_CODE
    assert hub.publish(make_trade(1, USER_A)) == 0


def history_of(n: int) -> History:
    history = History(max_trades=10_000)
    for seq in range(n):
        history.append(make_trade(seq, USER_A if seq % 2 else USER_B, timestamp=1000 + seq))
    return history


def seqs(body: dict[str, Any]) -> list[int]:
    return [order["log_index"] for order in body["orders"]]


def test_pagination_key_pages_have_no_gap_or_repeat_even_as_trades_arrive() -> None:
    history = history_of(50)
    first = history.page(OrdersQuery(limit=20))
    assert seqs(first) == list(range(49, 29, -1))
    assert first["pagination"]["has_more"] and first["pagination"]["total"] == 50
    for seq in range(50, 55):  # newer trades arrive between the pages
        history.append(make_trade(seq))
    key = first["pagination"]["pagination_key"]
    second = history.page(parse_orders_query({"limit": "20", "pagination_key": key}))
    assert seqs(second) == list(range(29, 9, -1))
    assert second["pagination"]["offset"] == 20
    third = history.page(
        parse_orders_query(
            {"limit": "20", "pagination_key": second["pagination"]["pagination_key"]}
        )
    )
    assert seqs(third) == list(range(9, -1, -1))
    assert third["pagination"] == {
        "limit": 20,
        "offset": 40,
        "total": 55,
        "has_more": False,
        "pagination_key": None,
    }


def test_filters_and_time_bounds_are_inclusive() -> None:
    history = history_of(20)
    body = history.page(parse_orders_query({"user": USER_A.upper().replace("0X", "0x")}))
    assert seqs(body) == list(range(19, 0, -2))
    body = history.page(parse_orders_query({"start_time": "1005", "end_time": "1007"}))
    assert seqs(body) == [7, 6, 5]
    body = history.page(parse_orders_query({"user": USER_B, "offset": "2", "limit": "3"}))
    assert seqs(body) == [14, 12, 10] and body["pagination"]["has_more"]


def test_history_is_bounded_and_keeps_its_indexes_consistent() -> None:
    history = History(max_trades=3)
    for seq in range(5):
        history.append(make_trade(seq, USER_A if seq < 2 else USER_B))
    assert [t.seq for t in history.trades()] == [2, 3, 4]
    assert list(history.trades(USER_A)) == []
    assert history.page(parse_orders_query({"user": USER_A}))["orders"] == []
    assert [t.seq for t in history.trades(USER_B)] == [2, 3, 4]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"market_slug": "a", "token_id": "1"}, "at most one"),
        ({"limit": "0"}, "limit must be 1..1000"),
        ({"limit": "1001"}, "limit must be 1..1000"),
        ({"limit": "ten"}, "limit must be an integer"),
        ({"offset": "-1"}, "offset must be >= 0"),
        ({"start_time": "5", "end_time": "4"}, "start_time must not be after"),
        ({"pagination_key": "!!!"}, "pagination_key"),
        ({"pagination_key": "eyJ4IjoxfQ"}, "pagination_key"),
    ],
)
def test_bad_queries_are_rejected(params: dict[str, str], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_orders_query(params)


def test_pagination_key_round_trips() -> None:
    key = encode_pagination_key(123, 40)
    assert key.startswith("eyJ") and decode_pagination_key(key) == (123, 40)


def test_listening_socket_is_tcp_so_asyncio_disables_nagle() -> None:
    from services.simulator.main import listen

    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[1] > 0
    finally:
        sock.close()
