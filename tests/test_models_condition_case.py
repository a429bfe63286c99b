"""Mixed-case condition ids (issue 16): feeds spell one market's id in either case. The contract
lower-cases it at the boundary, so a wallet's buy and sell of one market meet in one piece of
detector state whatever case each source used."""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis

from services.ingestor.frames import Fill, parse_frame
from shared.data_api import order_from_data_api
from shared.models import FeedOrder, OrderFill, Signal
from tests.test_detector_replicas import one_replica
from tests.test_detector_rules import make_order, wallet

UPPER = "0x" + "AB12CD" * 10 + "ABCD"
TRACKED = wallet(0x61, 0.8)


def test_every_model_lowers_the_condition_id() -> None:
    order = make_order(condition_id=UPPER)
    assert order.condition_id == UPPER.lower()
    assert OrderFill.model_validate(order.model_dump() | {"condition_id": UPPER}) == order
    dome = FeedOrder.model_validate(order.model_dump() | {"token_id": "1"})
    assert dome.condition_id == UPPER.lower()
    trade = {
        "proxyWallet": order.user,
        "side": "BUY",
        "asset": "1",
        "conditionId": UPPER,
        "size": 1.0,
        "price": 0.5,
        "timestamp": order.timestamp,
        "transactionHash": order.tx_hash,
    }
    assert order_from_data_api(trade).condition_id == UPPER.lower()
    fields = {
        "signal_id": "s",
        "kind": "whale_order",
        "wallet": order.user,
        "condition_id": UPPER,
        "token_id": "1",
        "side": "BUY",
        "price": 0.5,
        "shares": 1.0,
        "notional_usd": 0.5,
        "confidence": 0.5,
        "source": "dome_ws",
        "exchange_ts": 1,
        "received_at": 1.0,
        "detected_at": 1.0,
    }
    assert Signal.model_validate(fields).condition_id == UPPER.lower()


async def test_a_buy_and_a_sell_spelled_in_two_cases_are_one_market_to_the_detector(
    redis_url: str, namespace: str, redis_client: aioredis.Redis
) -> None:
    token = "12345"
    buy = make_order(user=TRACKED.address, token_id=token, shares=50, condition_id=UPPER.lower())
    sell = make_order(
        user=TRACKED.address,
        token_id=token,
        side="SELL",
        shares=50,
        timestamp=buy.timestamp + 5,
    )
    data = sell.model_dump(mode="json") | {"condition_id": UPPER}
    frame = orjson.dumps({"type": "event", "data": data})
    parsed = parse_frame(
        frame, tracked={TRACKED.address}, received_at=buy.received_at + 5, max_bytes=1 << 20
    )
    assert isinstance(parsed, Fill)
    signals = await one_replica(redis_url, namespace, redis_client, [buy, parsed.fill], [TRACKED])
    assert [s["kind"] for s in signals] == ["trader_entry", "trader_exit"]
    assert {s["condition_id"] for s in signals} == {UPPER.lower()}
