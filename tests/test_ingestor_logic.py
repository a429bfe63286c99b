"""Unit tests of the ingestor's new pure logic: the rate limiter, Retry-After, the HTTP client's
answers to 429/401/500, the Data API mapping, live subscription layout and reconciliation, the
dialects' messages, auth closes, and the catch-up's watermark rules."""

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from websockets.frames import Close

from services.ingestor.backfill import CatchUp
from services.ingestor.dialects import message
from services.ingestor.http_api import ApiError, AuthError, JsonApi, retry_after_seconds
from services.ingestor.ratelimit import RateLimiter
from services.ingestor.sources.dome_ws import RecentlyRemoved
from services.ingestor.sources.ws_connection import is_auth_close
from services.ingestor.subscriptions import (
    Slot,
    Subscribe,
    SubscriptionLayout,
    SubscriptionLimits,
    SubscriptionPlanError,
    SubscriptionRegistry,
    Unsubscribe,
    Update,
)
from shared.data_api import order_from_data_api
from shared.models import DomeOrder, OrderFill, Source

WALLET = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


# --- rate limiting -------------------------------------------------------------------------------


async def test_the_limiter_keeps_both_windows() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 25, clock=clock, sleep=clock.sleep)
    sent = []
    for _ in range(40):
        await limiter.acquire()
        sent.append(clock.now)
    for index in range(len(sent)):
        in_a_second = [t for t in sent if sent[index] - 1.0 < t <= sent[index]]
        in_ten = [t for t in sent if sent[index] - 10.0 < t <= sent[index]]
        assert len(in_a_second) <= 10 and len(in_ten) <= 25
    # 25 in the first window; then the 10-second window is the binding limit.
    assert sent[24] - sent[0] < 10 <= sent[25] - sent[0]


async def test_a_hold_delays_every_caller() -> None:
    clock = FakeClock()
    limiter = RateLimiter(100, 1000, clock=clock, sleep=clock.sleep)
    await limiter.acquire()
    limiter.hold(2.5)
    start = clock.now
    await limiter.acquire()
    assert clock.now - start == pytest.approx(2.5)


async def test_a_fractional_rate_spaces_requests() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0.5, 100, clock=clock, sleep=clock.sleep)
    await limiter.acquire()
    start = clock.now
    await limiter.acquire()
    assert clock.now - start == pytest.approx(2.0)


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("0.25") == 0.25
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert retry_after_seconds(date, now=1_000_000.0) == pytest.approx(30.0)
    assert retry_after_seconds(None) == retry_after_seconds("soon") == 1.0
    assert retry_after_seconds("-5") == 0.0 and retry_after_seconds("99999") == 300.0


def api(handler: Any, clock: FakeClock) -> JsonApi:
    limiter = RateLimiter(1000, 10_000, clock=clock, sleep=clock.sleep)
    return JsonApi(
        "dome_rest",
        "http://dome.test/v1",
        limiter,
        timeout_s=5,
        headers={"Authorization": "Bearer k"},
        transport=httpx.MockTransport(handler),
    )


async def test_429_is_retried_after_retry_after() -> None:
    clock = FakeClock()
    answers = [httpx.Response(429, headers={"Retry-After": "2"}), httpx.Response(200, json=[1])]
    client = api(lambda request: answers.pop(0), clock)
    assert await client.get("/x", {}) == [1]
    assert sum(clock.slept) == pytest.approx(2.0)
    await client.aclose()


async def test_401_is_an_auth_error_and_500_an_api_error_without_the_key() -> None:
    clock = FakeClock()
    for status, kind in ((401, AuthError), (403, AuthError), (500, ApiError), (404, ApiError)):
        client = api(lambda request, s=status: httpx.Response(s, text="nope " * 100), clock)
        with pytest.raises(kind) as error:
            await client.get("/polymarket/orders", {"user": WALLET})
        assert f"HTTP {status}" in str(error.value) and "Bearer" not in str(error.value)
        assert len(str(error.value)) < 300
        await client.aclose()
    client = api(lambda request: httpx.Response(200, text="<html>"), clock)
    with pytest.raises(ApiError, match="not JSON"):
        await client.get("/x", {})
    await client.aclose()


async def test_endless_429_gives_up_with_an_error() -> None:
    clock = FakeClock()
    client = api(lambda request: httpx.Response(429), clock)
    with pytest.raises(ApiError, match="still rate limited"):
        await client.get("/x", {})
    await client.aclose()


# --- the Data API mapping ------------------------------------------------------------------------


def data_api_item(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "proxyWallet": WALLET,
        "side": "buy",
        "asset": "123",
        "conditionId": "0xc0",
        "size": 68.794036,
        "price": 0.738,
        "timestamp": 1760086772,
        "title": "T",
        "slug": "s",
        "outcome": "Yes",
        "transactionHash": "0xf1",
        "name": "ignored",
    }
    item.update(changes)
    return item


def test_a_data_api_trade_maps_to_the_dome_order() -> None:
    order = order_from_data_api(data_api_item())
    assert order.user == WALLET and order.token_id == "123" and order.side == "BUY"
    assert order.shares == 68_794_036 and order.shares_normalized == 68.794036
    assert (order.market_slug, order.token_label, order.tx_hash) == ("s", "Yes", "0xf1")
    assert order.order_hash is None


@pytest.mark.parametrize(
    "item",
    [data_api_item(price="0.7"), data_api_item(transactionHash=None), "not an object"],
)
def test_unusable_data_api_trades_raise(item: Any) -> None:
    with pytest.raises((ValidationError, ValueError)):
        order_from_data_api(item)


# --- live layout and reconciliation --------------------------------------------------------------


def layout(count: int, per: int = 2, subs: int = 4, per_conn: int = 2, conns: int = 2) -> Any:
    wallets = [f"0x{i:040x}" for i in range(1, count + 1)]
    return SubscriptionLayout(wallets, SubscriptionLimits(per, subs, per_conn, conns))


def test_a_new_wallet_fills_a_slot_then_a_connection_then_opens_one() -> None:
    plan = layout(3)
    assert [[s.wallets for s in conn] for conn in plan.connections] == [
        [["0x" + "0" * 39 + "1", "0x" + "0" * 39 + "2"], ["0x" + "0" * 39 + "3"]]
    ]
    assert plan.add("0x" + "a" * 40) == 0  # the second slot had room
    assert plan.add("0x" + "b" * 40) == 1  # connection 0 is full: a new one
    assert plan.add("0x" + "b" * 40) is None  # already placed
    assert plan.add("0x" + "c" * 40) == 1
    assert (plan.subscriptions, plan.wallets, len(plan.connections)) == (3, 6, 2)
    assert plan.add("0x" + "d" * 40) == 1
    assert plan.add("0x" + "e" * 40) == 1
    with pytest.raises(SubscriptionPlanError, match="9 tracked wallets exceed"):
        plan.add("0x" + "f" * 40)
    assert "0x" + "f" * 40 not in plan


def test_removing_the_last_wallet_of_a_slot_drops_the_slot() -> None:
    plan = layout(3)
    third = "0x" + "0" * 39 + "3"
    assert plan.remove(third) == 0
    assert [len(conn) for conn in plan.connections] == [1]
    assert plan.remove(third) is None


def test_reconcile_updates_and_unsubscribes_confirmed_subscriptions() -> None:
    registry = SubscriptionRegistry()
    one, two = Slot(1, ["a", "b"]), Slot(2, ["c"])
    registry.reconcile([one, two])
    registry.acked("sub_1")
    # The second slot changes while its subscribe awaits the ack: held back until then.
    two.wallets.append("d")
    one.wallets.remove("b")
    assert registry.reconcile([one, two]) == [Update(1, "sub_1", ("a",))]
    registry.acked("sub_2")
    assert registry.reconcile([one, two]) == [Update(2, "sub_2", ("c", "d"))]
    assert registry.reconcile([two]) == [Unsubscribe(1, "sub_1")]
    assert registry.active == {"sub_2": ("c", "d")} and registry.confirmed() == {"c", "d"}
    registry.clear()
    assert registry.reconcile([two]) == [Subscribe(2, ("c", "d"))]


def test_both_dialects_shape_every_request() -> None:
    assert message(Update(1, "sub_1", ("a",)), "dome") == {
        "action": "update",
        "subscription_id": "sub_1",
        "platform": "polymarket",
        "version": 1,
        "type": "orders",
        "filters": {"users": ["a"]},
    }
    assert message(Subscribe(1, ("a",)), "polynode") == {
        "action": "subscribe",
        "type": "dome",
        "filters": {"wallets": ["a"]},
    }
    assert message(Update(1, "sub_1", ("a",)), "polynode")["filters"] == {"wallets": ["a"]}
    assert message(Unsubscribe(1, "sub_1"), "dome") == {
        "action": "unsubscribe",
        "version": 1,
        "subscription_id": "sub_1",
    }
    assert message(Unsubscribe(1, "sub_1"), "polynode") == {
        "action": "unsubscribe",
        "subscription_id": "sub_1",
    }


def test_auth_closes_are_recognised() -> None:
    assert is_auth_close(Close(4001, "unauthorized: API key revoked"))
    assert is_auth_close(Close(4003, ""))
    assert is_auth_close(Close(1008, "invalid API key"))
    assert not is_auth_close(Close(1008, "message too long"))
    assert not is_auth_close(Close(1012, "service restart"))
    assert not is_auth_close(None)


def test_recently_removed_wallets_expire() -> None:
    removed = RecentlyRemoved(grace_s=60)
    removed.add(WALLET)
    assert WALLET in removed and OTHER not in removed
    removed.discard(WALLET)
    assert WALLET not in removed
    expired = RecentlyRemoved(grace_s=0)
    expired.add(WALLET)
    assert WALLET not in expired


# --- catch-up ------------------------------------------------------------------------------------


def dome_item(ts: int, user: str = WALLET, tx: str | None = None) -> dict[str, Any]:
    return {
        "token_id": "1",
        "side": "BUY",
        "shares_normalized": 1.0,
        "price": 0.5,
        "tx_hash": tx or f"0x{ts:x}",
        "timestamp": ts,
        "user": user,
    }


class FakeHistory:
    source = Source.DOME_REST

    def __init__(self, pages: list[list[Any]], fail_after: int | None = None) -> None:
        self.pages = pages
        self.fail_after = fail_after
        self.asked: list[tuple[str, int]] = []

    async def read_since(self, wallet: str, since: int) -> AsyncIterator[list[Any]]:
        self.asked.append((wallet, since))
        for index, page in enumerate(self.pages):
            if self.fail_after is not None and index >= self.fail_after:
                raise ApiError("HTTP 502")
            yield page

    def to_order(self, item: Any) -> DomeOrder:
        return DomeOrder.model_validate(item)


class FakePublisher:
    def __init__(self, marks: dict[str, int] | None = None) -> None:
        self.marks = dict(marks or {})
        self.published: list[OrderFill] = []
        self.dead: list[str] = []

    async def publish_now(self, fills: list[OrderFill]) -> int:
        self.published += fills
        return len(fills)

    async def submit_dead(self, raw: bytes, reason: str, source: str) -> None:
        self.dead.append(reason)

    async def watermark(self, feed: str, wallet: str) -> int | None:
        return self.marks.get(f"{feed}:{wallet}")

    async def advance_watermark(self, feed: str, wallet: str, timestamp: int) -> None:
        key = f"{feed}:{wallet}"
        self.marks[key] = max(self.marks.get(key, 0), timestamp)


def catch_up(history: FakeHistory, publisher: FakePublisher) -> CatchUp:
    return CatchUp(
        history,
        publisher,
        feed="dome",
        overlap_s=120,
        initial_lookback_s=3600,
        backfill=True,
        clock=lambda: 10_000.0,
    )


async def test_catch_up_reads_from_the_watermark_less_the_overlap_and_moves_it() -> None:
    history = FakeHistory([[dome_item(5000), dome_item(4990)], [dome_item(4900)]])
    publisher = FakePublisher({f"dome:{WALLET}": 4950})
    assert await catch_up(history, publisher).wallet(WALLET) == 3
    assert history.asked == [(WALLET, 4950 - 120)]
    assert publisher.marks[f"dome:{WALLET}"] == 5000


async def test_catch_up_without_a_watermark_reads_the_initial_lookback() -> None:
    history = FakeHistory([[]])
    publisher = FakePublisher()
    assert await catch_up(history, publisher).wallet(WALLET) == 0
    assert history.asked == [(WALLET, 10_000 - 3600)]
    assert publisher.marks == {}  # nothing read: the watermark does not move


async def test_the_overlap_never_reaches_past_what_the_dedupe_remembers() -> None:
    history = FakeHistory([[]])
    publisher = FakePublisher({f"dome:{WALLET}": 1000})
    reader = CatchUp(
        history,
        publisher,
        feed="dome",
        overlap_s=120,
        initial_lookback_s=3600,
        backfill=True,
        dedupe_ttl_s=5000,
        clock=lambda: 10_000.0,
    )
    await reader.wallet(WALLET)
    # 1000 - 120 is older than 10000 - 5000: start just after the watermark instead.
    assert history.asked == [(WALLET, 1001)]
    publisher.marks[f"dome:{WALLET}"] = 6000
    await reader.wallet(WALLET)
    assert history.asked[-1] == (WALLET, 6000 - 120)


async def test_a_walk_that_fails_half_way_leaves_the_watermark() -> None:
    history = FakeHistory([[dome_item(5000)], [dome_item(4900)]], fail_after=1)
    publisher = FakePublisher({f"dome:{WALLET}": 4000})
    with pytest.raises(ApiError):
        await catch_up(history, publisher).wallet(WALLET)
    assert len(publisher.published) == 1
    assert publisher.marks[f"dome:{WALLET}"] == 4000


async def test_bad_items_are_dead_lettered_and_do_not_hold_the_walk() -> None:
    bad = {**dome_item(5001), "price": "0.5"}
    history = FakeHistory([[bad, dome_item(5000, user=OTHER), dome_item(4999)]])
    publisher = FakePublisher()
    assert await catch_up(history, publisher).wallet(WALLET) == 1
    assert [reason.split(":")[0] for reason in publisher.dead] == ["invalid_item", "wrong_wallet"]
    assert "price" in publisher.dead[0]
    assert publisher.marks[f"dome:{WALLET}"] == 4999
    assert publisher.published[0].source is Source.DOME_REST
