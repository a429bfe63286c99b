"""`betterbot dead list|replay` against a real Redis: dead letters go back to their stream, once,
and what would only fail again stays where it is with the reason."""

from __future__ import annotations

import orjson
import pytest
import redis.asyncio as aioredis

from shared.models import DomeOrder, OrderFill, Side, Signal, SignalKind, Source
from shared.orders_raw import OrdersRaw
from shared.redis_streams import dead_letter, decode
from shared.streams import Streams
from tests.helpers.cli import Cli

pytestmark = pytest.mark.integration

WALLET = "0x" + "de" * 20


@pytest.fixture
def cli(redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(redis_url, namespace, capsys)


def _order(tx: str = "0xabc") -> dict[str, object]:
    return {
        "token_id": "77",
        "side": "BUY",
        "shares_normalized": 12.5,
        "price": 0.42,
        "tx_hash": tx,
        "timestamp": 1760086772,
        "user": WALLET,
        "market_slug": "m",
    }


def _fill() -> OrderFill:
    return OrderFill.from_dome(DomeOrder.model_validate(_order("0xf1")), Source.DOME_WS, 1.0)


async def _ids(client: aioredis.Redis, stream: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await client.xrange(stream)]


async def test_list_shows_every_field(
    cli: Cli, redis_client: aioredis.Redis, streams: Streams
) -> None:
    await dead_letter(redis_client, streams.orders_dead, b"{oops", "not JSON", origin="ingestor")
    await dead_letter(
        redis_client, streams.orders_dead, b"{}", "no fields", origin="detector", deliveries=3
    )
    code, out, _ = await cli("dead", "list", "orders.dead")
    assert code == 0 and out["length"] == 2
    first, second = out["entries"]
    assert (first["raw"], first["reason"], first["origin"]) == ("{oops", "not JSON", "ingestor")
    assert (second["origin"], second["deliveries"]) == ("detector", 3)

    code, text, _ = await cli("dead", "list", "orders.dead", "--count", "1", as_json=False)
    assert code == 0 and "reason: not JSON" in text and "1 shown of 2" in text


async def test_replay_all_sends_back_what_can_be_processed_and_keeps_the_rest(
    cli: Cli, redis_client: aioredis.Redis, streams: Streams
) -> None:
    fill = _fill()
    valid = fill.model_dump_json().encode()
    invalid = orjson.dumps({**orjson.loads(valid), "price": "0.42"})
    frame = orjson.dumps({"type": "event", "subscription_id": "sub_1", "data": _order("0xf2")})
    for raw, origin in (
        (valid, "store"),
        (invalid, "detector"),
        (frame, "ingestor"),
        (b"{not json", "ingestor"),
    ):
        await dead_letter(redis_client, streams.orders_dead, raw, "why", origin=origin)
    kept_ids = (await _ids(redis_client, streams.orders_dead))[1::2]

    code, out, _ = await cli("dead", "replay", "orders.dead", "--all")
    assert code == 1
    assert [o["replayed"] for o in out["outcomes"]] == [True, False, True, False]
    assert "not a valid OrderFill" in out["outcomes"][1]["detail"]
    assert await _ids(redis_client, streams.orders_dead) == kept_ids

    entries = await redis_client.xrange(streams.orders_raw)
    assert entries[0][1] == {b"data": valid}, "a consumer's dead letter goes back byte for byte"
    from_frame = OrderFill.model_validate(decode(entries[1][1]))
    assert (from_frame.tx_hash, from_frame.source) == ("0xf2", Source.DOME_WS)
    assert len(entries) == 2

    # The same frame dead-lettered again: its order is in the stream already, so nothing is added.
    await dead_letter(redis_client, streams.orders_dead, frame, "again", origin="ingestor")
    new_id = (await _ids(redis_client, streams.orders_dead))[-1]
    code, out, _ = await cli("dead", "replay", "orders.dead", "--id", new_id)
    assert code == 0 and "already in" in out["outcomes"][0]["detail"]
    assert await redis_client.xlen(streams.orders_raw) == 2
    assert new_id not in await _ids(redis_client, streams.orders_dead)

    code, out, _ = await cli("dead", "replay", "orders.dead", "--id", kept_ids[0], "--force")
    assert code == 0 and out["outcomes"][0]["replayed"]
    assert (await redis_client.xrange(streams.orders_raw))[-1][1] == {b"data": invalid}


async def test_signals_dead_goes_back_to_signals(
    cli: Cli, redis_client: aioredis.Redis, streams: Streams
) -> None:
    signal = Signal(
        signal_id="s1",
        kind=SignalKind.TRADER_ENTRY,
        wallet=WALLET,
        token_id="77",
        side=Side.BUY,
        price=0.42,
        shares=12.5,
        notional_usd=5.25,
        confidence=0.6,
        source=Source.DOME_WS,
        exchange_ts=1760086772,
        received_at=1760086773.0,
        detected_at=1760086773.1,
    )
    raw = signal.model_dump_json().encode()
    await dead_letter(redis_client, streams.signals_dead, raw, "refused", origin="store")
    (dead_id,) = await _ids(redis_client, streams.signals_dead)
    code, out, _ = await cli("dead", "replay", "signals.dead", "--id", dead_id)
    assert code == 0 and out["target"] == streams.signals
    ((_, fields),) = await redis_client.xrange(streams.signals)
    assert Signal.model_validate(decode(fields)) == signal
    assert await redis_client.xlen(streams.signals_dead) == 0


async def test_unknown_ids_and_streams_without_origin(
    cli: Cli, redis_client: aioredis.Redis, streams: Streams
) -> None:
    code, out, _ = await cli("dead", "replay", "orders.dead", "--id", "1-1")
    assert code == 1 and out["missing"] == ["1-1"]

    await dead_letter(redis_client, streams.webhooks_dead, b"{}", "410", origin="notifier")
    code, _, err = await cli("dead", "replay", "webhooks.dead", "--all")
    assert code == 2 and "--to" in err
    assert await redis_client.xlen(streams.webhooks_dead) == 1

    code, out, _ = await cli("dead", "replay", "webhooks.dead", "--all", "--to", "retry.me")
    assert code == 0 and out["target"] == streams.namespace + "retry.me"
    assert await redis_client.xlen(streams.namespace + "retry.me") == 1


async def test_with_partitions_a_consumers_dead_fill_goes_back_to_its_partitions(
    cli: Cli,
    redis_client: aioredis.Redis,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Published once (its dedupe mark set), then dead-lettered by the store: the replay adds it
    to its wallet's partition and, a BUY, to its token's, as it is, the mark notwithstanding."""
    monkeypatch.setenv("STREAM_PARTITIONS", "4")
    parts = Streams(namespace, 4)
    fill = _fill()
    assert await OrdersRaw(redis_client, parts, stream_maxlen=100, dedupe_ttl_s=60).publish_all(
        [fill]
    )
    raw = fill.model_dump_json().encode()
    await dead_letter(redis_client, parts.orders_dead, raw, "postgres refused", origin="store")
    code, out, _ = await cli("dead", "replay", "orders.dead", "--all")
    assert code == 0 and out["outcomes"][0]["replayed"]
    wallet_stream, token_stream = parts.wallet_stream(WALLET), parts.token_stream(fill.token_id)
    assert token_stream is not None
    assert [f for _, f in await redis_client.xrange(wallet_stream)][-1] == {b"data": raw}
    assert await redis_client.xlen(wallet_stream) == 2
    assert [f for _, f in await redis_client.xrange(token_stream)][-1] == {b"data": raw}
    assert await redis_client.xlen(parts.orders_dead) == 0
