"""The Data API poller behind Polymarket's CDN (issue 15), against the simulator as a real HTTP
server on loopback (its CDN on, as in production: an identical URL is a HIT for 300 s), real Redis
and the ingestor's real poller and reader:

- every tracked fill, maker fills included, reaches `orders.raw` exactly once (the ground truth is
  the simulator's), and no URL is ever asked twice, so nothing is answered from cache;
- a cached answer (another client asked that URL first; here: a reader whose ledger is off) is
  counted by its `cf-cache-status` and never taken as "nothing new": the page is asked again with
  another URL and the fill the cached body lacked is read;
- a wallet listing longer than v1's offset cap (10,000), with one second larger than the largest
  v2 page (1,000), is read whole: bounded pages, then the cursor inside that second.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from services.ingestor.ratelimit import RateLimiter
from services.ingestor.sources.data_api import (
    LIMIT_MAX,
    Answer,
    DataApi,
    DataApiHistory,
    UrlLedger,
)
from shared.streams import Streams
from tests.helpers.ingestion import (
    WALLETS,
    Sim,
    converge,
    ingestor_settings,
    metric,
    raw_keys,
    running,
    simulator,
    until,
)

UNTRACKED = "0x" + "7" * 40
CACHE_METRIC = "betterbot_ingestor_data_api_cache_total"


def reader(
    sim: Sim, *, cdn_cache_s: float, clock: Any = time.time, page_limit: int = 100
) -> DataApiHistory:
    api = DataApi(
        "data_api", sim.base_url, RateLimiter(1000, 100_000), timeout_s=10, cdn_cache_s=cdn_cache_s
    )
    return DataApiHistory(api, page_limit, clock=clock)


async def read(history: DataApiHistory, wallet: str, since: int) -> list[str]:
    return [
        history.to_order(item).tx_hash
        async for page in history.read_since(wallet, since)
        for item in page
    ]


async def test_with_the_cdn_on_every_fill_arrives_once_and_no_url_is_asked_twice(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    # The tape plays at once, every 3rd trade a maker fill, beside trades emitted by hand.
    async with simulator(sim_maker_every=3, sim_wait_for_subscriber=False) as sim:
        assert (await sim.get("/_sim/cdn"))["cdn_cache_s"] == 300
        await until(lambda: _tape_done(sim), within_s=60, what="tape played")
        played = [t for t in await sim.get("/_sim/trades") if t["user"] in WALLETS]
        assert any(t.get("maker") for t in played) and not all(t.get("maker") for t in played)
        await sim.post("/_sim/emit", [{"user": w, "maker": True} for w in WALLETS])
        await sim.emit([*WALLETS, UNTRACKED], 30)
        settings = ingestor_settings(
            sim, redis_url, namespace, ingest_sources="data_api", data_api_page_limit=3
        )
        async with running(settings) as ingestor:
            await converge(sim, redis_client, streams, WALLETS)
            polls = ingestor.pollers[0].polls
            await until(lambda: ingestor.pollers[0].polls >= polls + 3 * len(WALLETS))
            await sim.post("/_sim/emit", [{"user": w, "maker": True} for w in WALLETS])
            await sim.emit(WALLETS, 9)
            await converge(sim, redis_client, streams, WALLETS)
        asked = [r for r in await sim.get("/_sim/requests") if r["path"] == "/v2/trades"]
    urls = Counter(tuple(sorted(r["params"].items())) for r in asked)
    assert urls.most_common(1)[0][1] == 1, "a URL was asked twice"
    assert {r["cache"] for r in asked} == {"MISS"}
    assert all(r["params"]["taker_only"] == "false" for r in asked)


async def _tape_done(sim: Sim) -> bool:
    return bool((await sim.status())["tape_done"])


async def test_the_fills_include_maker_fills(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator() as sim:
        makers = await sim.post("/_sim/emit", [{"user": w, "maker": True} for w in WALLETS])
        assert all(t["maker"] for t in makers["trades"])
        # By default the API would hide them: the reader must ask with taker_only=false.
        assert (await sim.get("/v2/trades", user=WALLETS[0]))["data"] == []
        settings = ingestor_settings(sim, redis_url, namespace, ingest_sources="data_api")
        async with running(settings):
            keys = await converge(sim, redis_client, streams, WALLETS)
    assert len(keys) == len(WALLETS)


async def test_a_cached_answer_is_counted_and_asked_again_with_another_url() -> None:
    now = int(time.time())
    async with simulator() as sim:
        [first] = (await sim.post("/_sim/emit", [{"user": WALLETS[0], "timestamp": now - 5}]))[
            "trades"
        ]
        # No ledger (as after a restart, or another client asking first) and a frozen clock: the
        # second walk's first URL is the first walk's, which the CDN holds.
        history = reader(sim, cdn_cache_s=0, clock=lambda: now)
        hits = metric(CACHE_METRIC, status="hit")
        misses = metric(CACHE_METRIC, status="miss")
        assert await read(history, WALLETS[0], now - 60) == [first["tx_hash"]]
        [late] = (await sim.post("/_sim/emit", [{"user": WALLETS[0], "timestamp": now - 1}]))[
            "trades"
        ]
        again = await read(history, WALLETS[0], now - 60)
        await history.api.aclose()
        log = [r for r in await sim.get("/_sim/requests") if r["path"] == "/v2/trades"]
    assert again == [late["tx_hash"], first["tx_hash"]], "the cached body lacked the late fill"
    assert metric(CACHE_METRIC, status="hit") == hits + 1
    assert metric(CACHE_METRIC, status="miss") == misses + 2
    assert [r["cache"] for r in log] == ["MISS", "HIT", "MISS"]
    hit, retry = log[1]["params"], log[2]["params"]
    assert int(retry["end"]) == int(hit["end"]) + 1
    assert {k: v for k, v in retry.items() if k != "end"} == {
        k: v for k, v in hit.items() if k != "end"
    }


async def test_a_page_bounded_by_a_second_reaches_further_back_instead_of_repeating() -> None:
    now = int(time.time())
    async with simulator() as sim:
        rows = [{"user": WALLETS[0], "timestamp": now - 30 + i // 2} for i in range(8)]
        await sim.post("/_sim/emit", rows)
        history = reader(sim, cdn_cache_s=300, clock=lambda: now, page_limit=3)
        first = await read(history, WALLETS[0], now - 60)
        second = await read(history, WALLETS[0], now - 60)
        await history.api.aclose()
        log = [r for r in await sim.get("/_sim/requests") if r["path"] == "/v2/trades"]
    assert sorted(first) == sorted(second) and len(first) == 8 == len(set(first))
    assert {r["cache"] for r in log} == {"MISS"}
    urls = [tuple(sorted(r["params"].items())) for r in log]
    assert len(urls) == len(set(urls))
    assert any(int(r["params"]["start"]) < now - 60 for r in log), "no bounded page repeated"


def test_the_ledger_forgets_a_url_after_the_cache_lifetime() -> None:
    clock = [0.0]
    ledger = UrlLedger(300, clock=lambda: clock[0])
    ledger.add({"user": "a", "end": 5})
    assert ledger.seen({"end": 5, "user": "a"})
    clock[0] = 299.0
    assert ledger.seen({"user": "a", "end": "5"})
    clock[0] = 300.0
    assert not ledger.seen({"user": "a", "end": 5})
    assert Answer([], "hit").cached and Answer([], "miss", 3).cached
    assert not Answer([], "miss").cached and not Answer([], "revalidated").cached


async def test_a_listing_longer_than_the_v1_offset_cap_is_read_whole(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    now = int(time.time())
    wallet = WALLETS[0]
    # 10,400 fills: 5 a second over 1,840 seconds, and one second holding 1,200 (> a page).
    spread = [{"user": wallet, "timestamp": now - 2000 + i // 5} for i in range(9200)]
    crowded = [{"user": wallet, "timestamp": now - 1000} for _ in range(1200)]
    async with simulator() as sim:
        await sim.post("/_sim/emit", spread + crowded)
        # v1 cannot page past its offset cap.
        past_cap = await sim.http.get("/trades", params={"user": wallet, "offset": 10_001})
        assert past_cap.status_code == 400
        settings = ingestor_settings(
            sim,
            redis_url,
            namespace,
            ingest_sources="data_api",
            data_api_page_limit=LIMIT_MAX,
        )
        async with running(settings):

            async def all_in() -> bool:
                return int(await redis_client.xlen(streams.orders_raw)) >= 10_400

            await until(all_in, within_s=120, what="10,400 fills published")
            await asyncio.sleep(0.5)  # a few more polls: nothing may come twice
        keys = await raw_keys(redis_client, streams)
        truth = await sim.truth([wallet])
        asked = [r for r in await sim.get("/_sim/requests") if r["path"] == "/v2/trades"]
    assert len(truth) == 10_400 and sorted(keys) == sorted(truth)
    assert all("offset" not in r["params"] for r in asked)
    assert any("cursor" in r["params"] for r in asked), "the crowded second needed the cursor"
