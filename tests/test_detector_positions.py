"""Positions that are true: the simulator's `/positions?user=` (holdings from an earlier tape and
the trades emitted since), the detector seeding a wallet from it in Redis (`DetectorState.seed`,
`positions.Seeder`), and a processor on seeded state deciding exactly what the reference
(`SerialDetector.seed`) decides."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from services.detector import rules
from services.detector.main import Detector
from services.detector.pipeline import RawEntry
from services.detector.positions import Seeder, fetch_positions, positions_of
from services.detector.replay import DEFAULT_TAPE, tape_orders
from services.detector.rules import RuleSettings, WalletMarketState
from services.detector.serial import SerialDetector
from services.detector.settings import DetectorSettings
from shared.models import SignalKind
from shared.redis_streams import ensure_group
from shared.streams import DETECTOR_GROUP, Scope, Streams, partition_of
from shared.wallets import load_wallets
from tests.test_detector_state import fields_of, identity, make_state, processor, signals_of
from tests.test_simulator_service import simulator

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
TAPE = ROOT / DEFAULT_TAPE
WALLETS = load_wallets(ROOT / "config" / "wallets.example.json")
XHINRA = "0x9db778f46b7c9b458045764a67ff4afcae917e1f"


def split_tape(tmp_path: Path) -> tuple[Path, list[Any], list[Any]]:
    """The bundled tape cut in two at its middle trade: the earlier half as a file (the history
    `/positions` starts from), and both halves' raw items, oldest first."""
    items = list(reversed(json.loads(TAPE.read_text())))
    cut = items[len(items) // 2]["timestamp"]
    earlier = [t for t in items if t["timestamp"] < cut]
    later = [t for t in items if t["timestamp"] >= cut]
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(list(reversed(earlier))))
    return path, earlier, later


def reference_positions(path: Path, wallet: str) -> dict[str, dict[str, int]]:
    """The wallet's positions after the rules ran through every fill of the tape."""
    detector = SerialDetector(WALLETS, RuleSettings())
    for order in tape_orders(path):
        detector.process(order)
    prefix = rules.wallet_unit(wallet, "")
    held: dict[str, dict[str, int]] = {}
    for unit, state in detector.states.items():
        if unit.startswith(prefix) and isinstance(state, WalletMarketState) and state.positions:
            held[unit[len(prefix) :]] = dict(state.positions)
    return held


async def test_simulator_positions_are_what_the_earlier_tape_adds_up_to(tmp_path: Path) -> None:
    path, earlier, _ = split_tape(tmp_path)
    async with simulator(sim_positions_tape=str(path)) as sim:
        items = await fetch_positions(sim.http, str(sim.http.base_url), XHINRA)
        assert items and positions_of(items) == reference_positions(path, XHINRA)
        first = items[0]
        assert set(first) >= {"proxyWallet", "asset", "conditionId", "size", "avgPrice", "curPrice"}
        # Largest first; the API's default sizeThreshold (1 share) leaves small holdings out.
        sizes = [item["size"] for item in items]
        assert sizes == sorted(sizes, reverse=True)
        paged = await sim.http.get(
            "/positions", params={"user": XHINRA, "sizeThreshold": 0, "limit": 2, "offset": 1}
        )
        assert paged.json() == items[1:3]
        default = (await sim.http.get("/positions", params={"user": XHINRA})).json()
        assert [i["asset"] for i in default] == [i["asset"] for i in items if i["size"] >= 1]
        # A trade emitted now adds to the holding; a sell of more than held floors at 0.
        token, size = first["asset"], first["size"]
        trade = {"user": XHINRA, "token_id": token, "condition_id": first["conditionId"]}
        await sim.emit([{**trade, "side": "BUY", "shares_normalized": 5, "price": 0.5}])
        after = positions_of(await fetch_positions(sim.http, str(sim.http.base_url), XHINRA))
        assert after[first["conditionId"]][token] == round((size + 5) * 1e6)
        await sim.emit([{**trade, "side": "SELL", "shares_normalized": size + 100, "price": 0.5}])
        gone = await fetch_positions(sim.http, str(sim.http.base_url), XHINRA)
        assert token not in {item["asset"] for item in gone}
        assert (await sim.http.get("/positions")).status_code == 400
        nobody = await sim.http.get("/positions", params={"user": "0x" + "0" * 40})
        assert nobody.json() == []
        assert len(earlier) > 100


async def test_a_processor_on_seeded_state_decides_as_the_seeded_reference(
    tmp_path: Path, redis_url: str
) -> None:
    """Seed every tracked wallet from the simulator's `/positions`, then run the later half of
    the tape through the Redis processor: the signals of the reference seeded alike. And the
    seeding does what it should: no entry of XHINRA for a token it held before the cut."""
    path, earlier, later = split_tape(tmp_path)
    as_of = max(t["timestamp"] for t in earlier)
    streams = Streams(f"t{uuid.uuid4().hex[:10]}:")
    client = aioredis.Redis.from_url(redis_url)
    settings = RuleSettings()
    try:
        state = make_state(client, streams)
        await ensure_group(client, streams.orders_raw, DETECTOR_GROUP)
        decider = processor(state, WALLETS, settings)
        reference = SerialDetector(WALLETS, settings)
        async with simulator(sim_positions_tape=str(path)) as sim:
            seeder = Seeder(sim.http, str(sim.http.base_url), lambda _: state, lambda: as_of)
            await seeder.seed_all(w.address for w in WALLETS)
            for wallet in WALLETS:
                items = await fetch_positions(sim.http, str(sim.http.base_url), wallet.address)
                reference.seed(wallet.address, positions_of(items), as_of)
        assert seeder.seeded == dict.fromkeys((w.address for w in WALLETS), as_of)
        assert await state.seeded() == seeder.seeded
        later_path = tmp_path / "later.json"
        later_path.write_text(json.dumps(list(reversed(later))))
        orders = tape_orders(later_path)
        entries = [RawEntry(f"{i + 1}-0", fields_of(o)) for i, o in enumerate(orders)]
        for start in range(0, len(entries), 50):
            await decider.process(entries[start : start + 50])
        expected = [s for o in orders for s in reference.process(o)]
        got = await signals_of(client, streams)
        assert [identity(s) for s in got] == [identity(s) for s in expected]
        assert [s["opens_position"] for s in got] == [s.opens_position for s in expected]
        held_before = set().union(*reference_positions(path, XHINRA).values())
        entries_of_xhinra = {
            s["token_id"]
            for s in got
            if s["kind"] == SignalKind.TRADER_ENTRY and s["wallet"] == XHINRA
        }
        assert held_before and not entries_of_xhinra & held_before
        assert all(s["opens_position"] is True for s in got if s["kind"] == "trader_entry")
    finally:
        keys = [k async for k in client.scan_iter(match=f"*{streams.namespace}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def no_http(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"unexpected request {request.url}")


async def test_another_replica_adopts_the_seeding_and_a_failure_leaves_it_unseeded(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    state = make_state(redis_client, streams)
    market, token = "0x" + "33" * 32, "tok-held"
    answer = [{"asset": token, "conditionId": market, "size": 12.5}]

    def data_api(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/positions"
        assert request.url.params["sizeThreshold"] == "0"
        return httpx.Response(200, json=answer)

    async with httpx.AsyncClient(transport=httpx.MockTransport(data_api)) as http:
        seeder = Seeder(http, "http://data-api", lambda _: state, lambda: 1000.7)
        await seeder.seed(XHINRA)
    assert seeder.seeded == {XHINRA: 1000} and await state.seeding(XHINRA) == 1000
    unit = await redis_client.get(state.unit_key(rules.wallet_unit(XHINRA, market)))
    assert isinstance(unit, bytes)
    assert orjson.loads(unit) == {"positions": {token: 12_500_000}, "last_signal": {}}
    assert await redis_client.ttl(state.unit_key(rules.wallet_unit(XHINRA, market))) == -1
    # A second replica: finds it in Redis, asks nothing; seeding again keeps the first.
    async with httpx.AsyncClient(transport=httpx.MockTransport(no_http)) as http:
        other = Seeder(http, "http://data-api", lambda _: state, lambda: 2000.0)
        await other.seed_all([XHINRA])
    assert other.seeded == {XHINRA: 1000}
    assert await state.seed(XHINRA, {}, 3000) == 1000
    # The API down: the wallet stays unseeded, to be asked again.
    wallet = WALLETS[1].address
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _: httpx.Response(503))
    ) as http:
        failing = Seeder(http, "http://data-api", lambda _: state, lambda: 4000.0)
        await failing.seed(wallet, "5-0")
    assert await state.seeding(wallet) is None and failing.failed == {wallet: "5-0"}
    # Forgotten when untracked: tracked again, it is seeded afresh.
    await state.forget_seeded(XHINRA, "9-0")
    assert await state.seeded() == {}


async def test_a_wallet_is_seeded_in_its_own_wallet_partition(redis_url: str) -> None:
    """Partitioned, a wallet's units live in the lane of its wallet partition: the seeding goes
    there (and nowhere else), where that lane's rules will read it."""
    settings = DetectorSettings(
        redis_url=redis_url, stream_namespace=f"t{uuid.uuid4().hex[:8]}:", stream_partitions=4
    )
    detector = Detector(settings, WALLETS)
    try:
        streams = settings.streams
        for wallet in (XHINRA, *(w.address for w in WALLETS[:5])):
            lane = detector.wallet_lane(wallet).lane
            assert lane.scope is Scope.WALLET
            assert lane.stream == streams.wallet_partition(partition_of(wallet, 4))
        state = detector.wallet_lane(XHINRA)
        await state.seed(XHINRA, {"0x" + "44" * 32: {"tok": 5}}, 1000)
        seeded = [await w.state.seeded() for w in detector.workers]
        assert sum(bool(s) for s in seeded) == 1 and await state.seeded() == {XHINRA: 1000}
    finally:
        for worker in detector.workers:
            prefix = worker.state.unit_key("")
            keys = [k async for k in detector.client.scan_iter(match=f"{prefix}*")]
            if keys:
                await detector.client.delete(*keys)
        await detector.client.aclose()
        if detector.seeder is not None:
            await detector.seeder.http.aclose()
