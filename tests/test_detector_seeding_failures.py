"""Seeding positions when things go wrong (services/detector/positions.py): a malformed
`/positions` item, any error of one wallet, a wallet whose units keep changing, an old seeding
finishing after a removal and re-addition, and a Data API that never answers at startup. None may
crash the detector, end a background task, or leave a wallet never asked again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from services.detector import rules
from services.detector.main import Detector
from services.detector.positions import Seeder, positions_of
from services.detector.state import SCAN_COUNT, SEED_ATTEMPTS, SEED_CONFLICT, SeedConflict
from shared.streams import Streams
from tests.test_detector_informative import MARKET, TS, W
from tests.test_detector_service import detector_settings
from tests.test_detector_state import make_state

pytestmark = pytest.mark.integration

WALLET = W[0].address
AS_OF = TS + 100
GOOD = {"asset": "tok-yes", "conditionId": MARKET, "size": 5}


def answering(body: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _: httpx.Response(200, json=body))
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"asset": "tok-no", "conditionId": MARKET, "size": None},
        "oops",
        ["a", "list"],
        None,
        {"conditionId": MARKET, "size": 3},
        {"asset": "tok-no", "conditionId": MARKET, "size": "NaN"},
        {"asset": "tok-no", "conditionId": MARKET, "size": True},
    ],
)
async def test_a_malformed_item_is_skipped_and_the_rest_seeded(
    redis_client: aioredis.Redis, streams: Streams, bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    state = make_state(redis_client, streams)
    assert positions_of([bad, GOOD]) == {MARKET: {"tok-yes": 5_000_000}}
    caplog.clear()
    async with answering([bad, GOOD]) as http:
        seeder = Seeder(http, "http://data-api", lambda _: state, lambda: AS_OF)
        await seeder.seed_all([WALLET], "1-0")
    assert seeder.seeded == {WALLET: AS_OF} and seeder.failed == {}
    assert await state.position(WALLET, MARKET, "tok-yes") == 5_000_000
    skipped = [r for r in caplog.records if r.getMessage() == "positions_items_skipped"]
    assert [getattr(r, "skipped", None) for r in skipped] == [1]


async def test_any_error_of_one_wallet_fails_that_wallet_only(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """An error nobody expected (here a TypeError out of the state) is that wallet's failure:
    asked again later; the other wallets are seeded, and `seed_all` returns."""
    state = make_state(redis_client, streams)
    other = W[1].address
    real_seed = state.seed

    async def broken(wallet: str, *args: Any, **kwargs: Any) -> int | None:
        if wallet == WALLET:
            raise TypeError("unexpected")
        return await real_seed(wallet, *args, **kwargs)

    state.seed = broken  # type: ignore[method-assign]
    async with answering([GOOD]) as http:
        seeder = Seeder(http, "http://data-api", lambda _: state, lambda: AS_OF)
        await seeder.seed_all([WALLET, other], "3-0")
    assert seeder.failed == {WALLET: "3-0"} and seeder.seeded == {other: AS_OF}


async def test_a_retry_round_that_fails_does_not_end_the_retries(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    state = make_state(redis_client, streams)
    rounds: list[int] = []

    def tracked() -> list[str]:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("the registry view broke once")
        return [WALLET]

    async with answering([GOOD]) as http:
        seeder = Seeder(http, "http://data-api", lambda _: state, lambda: AS_OF)
        seeder.failed[WALLET] = "1-0"
        task = asyncio.create_task(seeder.retry(0.01, tracked))
        try:
            for _ in range(300):
                if WALLET in seeder.seeded or task.done():
                    break
                await asyncio.sleep(0.01)
            assert not task.done() and seeder.seeded == {WALLET: AS_OF}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_seeding_scans_once_with_a_large_count_and_gives_up_when_units_keep_changing(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """The wallet's units are found by one SCAN walking many keys per round trip; a unit that
    changes at every attempt ends the seeding after `SEED_ATTEMPTS` (re-reading values only),
    and the wallet is failed, to be asked again later."""
    state = make_state(redis_client, streams)
    unit = state.unit_key(rules.wallet_unit(WALLET, "0xelsewhere"))
    await redis_client.set(unit, rules.WalletMarketState(positions={"tok-x": 7}).dump())
    scans: list[dict[str, Any]] = []
    real_scan = redis_client.scan_iter

    def counting_scan(**kwargs: Any) -> Any:
        scans.append(kwargs)
        return real_scan(**kwargs)

    attempts: list[int] = []

    async def always_changed(**_: Any) -> int:
        attempts.append(1)
        return SEED_CONFLICT

    redis_client.scan_iter = counting_scan  # type: ignore[method-assign]
    state._seed = always_changed  # type: ignore[assignment]
    with pytest.raises(SeedConflict):
        await asyncio.wait_for(state.seed(WALLET, {MARKET: {"tok-yes": 1}}, AS_OF, "1-0"), 5)
    assert len(attempts) == SEED_ATTEMPTS
    assert len(scans) == 1 and scans[0]["count"] == SCAN_COUNT >= 1000
    async with answering([GOOD]) as http:
        seeder = Seeder(http, "http://data-api", lambda _: state, lambda: AS_OF)
        await asyncio.wait_for(seeder.seed(WALLET, "2-0"), 5)
    assert seeder.failed == {WALLET: "2-0"} and seeder.seeded == {}


async def test_an_old_seeding_leaves_the_retry_of_a_newer_generation(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """Added at 10-0, removed at 20-0, added again at 30-0, whose seeding failed: the 10-0
    seeding finishing (refused) or failing late keeps the wallet to be asked again at 30-0."""
    state = make_state(redis_client, streams)
    await state.forget_seeded(WALLET, "20-0")
    async with answering([GOOD]) as http:
        seeder = Seeder(http, "http://data-api", lambda _: state, lambda: AS_OF)
        seeder.failed[WALLET] = "30-0"
        await seeder.seed(WALLET, "10-0")  # refused: the wallet was removed at 20-0
        assert seeder.failed == {WALLET: "30-0"}
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _: httpx.Response(503))
    ) as http:
        seeder.http = http
        await seeder.seed(WALLET, "10-0")  # fails late
        assert seeder.failed == {WALLET: "30-0"}
    # Its own retry refused (removed again since) drops it.
    await state.forget_seeded(WALLET, "40-0")
    async with answering([GOOD]) as http:
        seeder.http = http
        await seeder.seed(WALLET, "30-0")
    assert seeder.failed == {}


async def test_startup_consumes_after_its_seeding_deadline_and_seeds_on(
    redis_url: str, namespace: str, redis_client: aioredis.Redis
) -> None:
    """The Data API does not answer: startup waits `DETECTOR_SEED_STARTUP_S`, not a timeout per
    wallet, then consumes; the seedings go on in the background and are cancelled at stop."""
    settings = detector_settings(
        redis_url, namespace, detector_seed_positions=True, detector_seed_startup_s=0.3
    )
    answer = asyncio.Event()

    async def blackholed(request: httpx.Request) -> httpx.Response:
        await answer.wait()
        return httpx.Response(200, json=[])

    detector = Detector(settings, list(W))
    assert detector.seeder is not None
    await detector.seeder.http.aclose()
    detector.seeder.http = httpx.AsyncClient(transport=httpx.MockTransport(blackholed))
    began = time.monotonic()
    try:
        await asyncio.wait_for(detector.start(), 10)
        assert time.monotonic() - began < 5
        assert not detector.consuming.done() and detector.seeding
        assert detector.seeder.seeded == {}
        answer.set()  # the API answers at last: the startup seeding finishes in the background
        for _ in range(500):
            if len(detector.seeder.seeded) == len(W):
                break
            await asyncio.sleep(0.01)
        assert set(detector.seeder.seeded) == {w.address for w in W}
    finally:
        answer.set()
        if hasattr(detector, "consuming"):
            await detector.stop()
        else:
            await detector.seeder.http.aclose()
            await detector.client.aclose()
