"""`betterbot partitions move`: the tape's first part through one partition, a move to four, the
rest through four, a move back to one and a last part: the signals are exactly the reference's
(positions, cooldowns and consensus moved with their wallets and tokens), no fill is published
twice (dedupe keys moved), and every wallet keeps its watermark. A pipeline not drained is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from cli.main import run as cli
from services.detector.main import Detector
from services.detector.rules import SEED_UNIT, RuleSettings
from services.detector.serial import run as reference_run
from services.detector.settings import DetectorSettings
from shared.layout import LayoutMismatch
from shared.models import OrderFill, TrackedWallet
from shared.orders_raw import OrdersRaw, Outgoing
from shared.streams import Streams
from tests.test_detector_replicas import drained, identities, replica_scenario
from tests.test_detector_rules import make_order
from tests.test_detector_service import read_signals

pytestmark = [pytest.mark.integration]

TAPE = Path(__file__).resolve().parents[1] / "data" / "polymarket_trades_nobel2025.json"


async def through(
    redis_url: str,
    client: aioredis.Redis,
    streams: Streams,
    orders: list[OrderFill],
    wallets: list[TrackedWallet],
) -> int:
    """Publish the orders as the ingestor does and let one detector decide them; how many new."""
    publisher = OrdersRaw(client, streams, stream_maxlen=100_000, dedupe_ttl_s=3600)
    added = sum(await publisher.publish([Outgoing(order, "dome") for order in orders]))
    settings = DetectorSettings(
        redis_url=redis_url,
        stream_namespace=streams.namespace,
        stream_partitions=streams.partitions,
        ops_port=0,
    )
    detector = Detector(settings, wallets)
    await detector.start()
    try:
        await drained(client, streams)
    finally:
        await detector.stop()
    return added


async def move(redis_url: str, streams: Streams, to: int, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("STREAM_PARTITIONS", str(streams.partitions))
    argv = ["partitions", "move", "--to", str(to)]
    return await cli([*argv, "--redis-url", redis_url, "--namespace", streams.namespace])


async def test_moving_between_partition_counts_keeps_every_rule_state(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orders, wallets = replica_scenario()
    first, second, third = orders[:600], orders[600:900], orders[900:]
    one, four = Streams(namespace, 1), Streams(namespace, 4)

    await through(redis_url, redis_client, one, first, wallets)
    assert await move(redis_url, one, 4, monkeypatch) == 0
    assert "moved 1 -> 4 partitions" in capsys.readouterr().out
    # Fills the first part published already are known in their new partitions: none again.
    again = await through(redis_url, redis_client, four, first[-50:] + second, wallets)
    assert again == len({o.order_key for o in second} - {o.order_key for o in first})
    assert await move(redis_url, four, 1, monkeypatch) == 0
    await through(redis_url, redis_client, one, third, wallets)

    expected = reference_run(orders, wallets, RuleSettings())
    assert {s.kind.value for s in expected} >= {"trader_exit", "consensus"}
    found = await read_signals(redis_client, one)
    assert len(found) == len({s["signal_id"] for s in found}), "a signal was emitted twice"
    assert identities(found) == identities([s.model_dump(mode="json") for s in expected])

    marks = OrdersRaw(redis_client, one, stream_maxlen=10, dedupe_ttl_s=10)
    for address in {o.user for o in orders}:
        newest = max(o.timestamp for o in orders if o.user == address)
        assert await marks.watermark("dome", address) == newest


async def test_a_pipeline_not_drained_is_not_moved(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    one = Streams(namespace, 1)
    orders, _ = replica_scenario()
    await redis_client.xgroup_create(one.orders_raw, "detector", id="0", mkstream=True)
    await OrdersRaw(redis_client, one, stream_maxlen=100, dedupe_ttl_s=60).publish(
        [Outgoing(orders[0])]
    )
    assert await move(redis_url, one, 4, monkeypatch) == 2
    assert "not drained" in capsys.readouterr().err
    assert not await redis_client.exists(Streams(namespace, 4).order_streams()[0])
    status = await cli(["partitions", "status", "--redis-url", redis_url, "--namespace", namespace])
    assert status == 1
    assert "group detector has lag 1" in capsys.readouterr().out


async def test_a_count_other_than_the_one_the_redis_holds_is_refused(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One layout recorded (here by a detector of one partition); a detector, a replay and a move
    from a count other than it are refused, saying both counts; a move records the new one."""
    orders, wallets = replica_scenario()
    await through(redis_url, redis_client, Streams(namespace, 1), orders[:20], wallets)
    settings = DetectorSettings(
        redis_url=redis_url, stream_namespace=namespace, stream_partitions=4, ops_port=0
    )
    detector = Detector(settings, wallets)
    with pytest.raises(LayoutMismatch, match="STREAM_PARTITIONS is 4, but this Redis holds"):
        await detector.start()
    await detector.client.aclose()

    monkeypatch.setenv("STREAM_PARTITIONS", "4")
    target = ["--redis-url", redis_url, "--namespace", namespace]
    assert await cli(["replay-tape", str(TAPE), *target]) == 2
    assert "holds the layout of 1 partition(s)" in capsys.readouterr().err
    assert await move(redis_url, Streams(namespace, 2), 4, monkeypatch) == 2
    assert await move(redis_url, Streams(namespace, 1), 4, monkeypatch) == 0
    assert await redis_client.get(Streams(namespace).layout_key()) == b"4"
    assert await move(redis_url, Streams(namespace, 4), 300, monkeypatch) == 2


async def test_a_move_back_finds_no_stale_state(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A position opened on one partition (at 0.97: no signal, so nothing but the position in its
    unit), closed after a move to four (the unit then empty, deleted), then a move back: the
    closed position must not come back from the first layout, so the next BUY is an entry."""
    wallet = TrackedWallet(address="0x" + "ab" * 20, label="w")
    buy = make_order(user=wallet.address, token_id="77", shares=200, price=0.97)
    sell = make_order(user=wallet.address, token_id="77", side="SELL", shares=200, price=0.97)
    again = make_order(user=wallet.address, token_id="77", shares=100, price=0.55)
    sell = sell.model_copy(update={"timestamp": buy.timestamp + 1000})
    again = again.model_copy(update={"timestamp": buy.timestamp + 5000})
    one, four = Streams(namespace, 1), Streams(namespace, 4)
    await through(redis_url, redis_client, one, [buy], [wallet])
    assert await move(redis_url, one, 4, monkeypatch) == 0
    await through(redis_url, redis_client, four, [sell], [wallet])
    assert await move(redis_url, four, 1, monkeypatch) == 0
    await through(redis_url, redis_client, one, [again], [wallet])
    kinds = [s["kind"] for s in await read_signals(redis_client, one)]
    expected = reference_run([buy, sell, again], [wallet], RuleSettings())
    # The full sale is an exit (a SELL is never dropped for its price); the BUY after it opens a
    # new position, not stale state from the first layout.
    assert [s.kind.value for s in expected] == ["trader_exit", "trader_entry"]
    assert kinds == ["trader_exit", "trader_entry"]


async def test_a_wallets_positions_seeding_moves_with_its_units(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without it a move would delete the seeding as stale, and the wallet be seeded again."""
    wallets = ["0x" + f"{n:02x}" * 20 for n in range(1, 9)]
    one, four = Streams(namespace, 1), Streams(namespace, 4)
    (lane,) = one.lanes()
    for wallet in wallets:
        await redis_client.set(lane.state_prefix + SEED_UNIT + wallet, f"1760000000|1-{wallet[-1]}")
    assert await move(redis_url, one, 4, monkeypatch) == 0
    for wallet in wallets:
        target = next(x for x in four.lanes() if x.stream == four.wallet_stream(wallet))
        assert await redis_client.get(target.state_prefix + SEED_UNIT + wallet) == (
            f"1760000000|1-{wallet[-1]}".encode()
        )
        assert not await redis_client.exists(lane.state_prefix + SEED_UNIT + wallet)
