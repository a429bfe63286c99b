"""The last noise controls of issue 17: market `tags` (Gamma's, looked up by the notifier) and
`only_new_positions`, in the filters, on a WebSocket and for webhooks, against the simulator's
Gamma as a real server."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets

from devtools.servers import free_port
from services.notifier import fanout as fanout_module
from services.notifier.clients import Client, Delivery
from services.notifier.fanout import Fanout
from services.notifier.filters import (
    FilterError,
    TaggedMatch,
    filters_from_query,
    parse_filters,
    signal_filter,
)
from services.notifier.market_tags import GAMMA_BATCH, MarketTags
from shared.models import Signal
from shared.streams import Streams
from tests.helpers.ingestion import Sim, simulator
from tests.helpers.notifier import (
    Receiver,
    assert_nothing_more,
    publish,
    recv_hello,
    recv_signals,
    running_notifier,
    variant,
    wait_until,
    ws_url,
)

TAPE = Path(__file__).resolve().parents[1] / "data" / "polymarket_trades_nobel2025.json"
TRUMP = "will-donald-trump-win-the-nobel-peace-prize-in-2025"
MACHADO = "will-mara-corina-machado-win-the-nobel-peace-prize-in-2025"


def condition_of(slug: str) -> str:
    trades = orjson.loads(TAPE.read_bytes())
    return str(next(t["conditionId"] for t in trades if t["slug"] == slug))


def on_market(n: int, slug: str, **changes: Any) -> Signal:
    return variant(n, market_slug=slug, condition_id=condition_of(slug), **changes)


# The filters themselves.


def test_only_new_positions_passes_true_only() -> None:
    wanted = parse_filters({"only_new_positions": True}, max_values=10)
    assert wanted.matches(variant(1, opens_position=True))
    assert not wanted.matches(variant(1, opens_position=False))
    # Unknown: the detector had not seeded that wallet, so "new" cannot be vouched for.
    assert not wanted.matches(variant(1, opens_position=None))
    assert parse_filters({}, max_values=10).matches(variant(1, opens_position=None))
    assert wanted.describe()["only_new_positions"] is True


def test_tags_match_any_listed_tag_in_any_case_and_never_unknown_tags() -> None:
    wanted = parse_filters({"tags": ["Trump", "crypto"]}, max_values=10)
    assert wanted.describe()["tags"] == ["crypto", "trump"]
    signal = variant(1)
    assert wanted.matches(signal, frozenset({"politics", "trump"}))
    assert not wanted.matches(signal, frozenset({"politics"}))
    assert not wanted.matches(signal, frozenset())
    assert not wanted.matches(signal, None)
    assert parse_filters({"kinds": ["whale_order"]}, max_values=10).matches(signal, None)


def test_the_query_carries_tags_and_only_new_positions() -> None:
    query = {"tags": ["politics,Trump"], "only_new_positions": ["true"], "kinds": ["consensus"]}
    wanted = filters_from_query(query, max_values=10)
    assert wanted.tags == frozenset({"politics", "trump"})
    assert wanted.only_new_positions is True
    assert not wanted.matches(variant(1, opens_position=True), frozenset({"trump"}))  # a whale
    with pytest.raises(FilterError, match="only_new_positions given more than once"):
        filters_from_query({"only_new_positions": ["true", "false"]}, max_values=10)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"tag": ["politics"]}, "tag: unknown field (did you mean tags?)"),
        ({"only_new_position": True}, "did you mean only_new_positions?"),
        ({"tags": []}, "empty list"),
        ({"tags": ["x" * 101]}, "tags"),
        ({"only_new_positions": "perhaps"}, "only_new_positions"),
    ],
)
def test_bad_tag_filters_are_refused(payload: dict[str, object], problem: str) -> None:
    with pytest.raises(FilterError, match=re.escape(problem)):
        parse_filters(payload, max_values=10)


def test_tags_count_against_the_filter_size() -> None:
    with pytest.raises(FilterError, match="3 values, limit 2"):
        parse_filters({"tags": ["a", "b"], "kinds": ["consensus"]}, max_values=2)


# The lookup, against the simulator's Gamma.


@contextlib.asynccontextmanager
async def gamma() -> AsyncIterator[Sim]:
    async with simulator(sim_wait_for_subscriber=True) as sim:
        yield sim


async def test_market_tags_come_from_gamma_and_are_cached() -> None:
    async with gamma() as sim:
        tags = MarketTags(sim.base_url)
        trump, machado = condition_of(TRUMP), condition_of(MACHADO)
        await tags.prefetch([trump.upper().replace("0X", "0x"), machado, "0x" + "ab" * 32])
        assert tags.known(trump) == frozenset(
            {"politics", "world", "nobel peace prize", "nobel-peace-prize", "trump"}
        )
        assert "venezuela" in (tags.known(machado) or set())
        assert tags.known("0x" + "ab" * 32) == frozenset()  # Gamma has no such market
        before = len(await sim.get("/_sim/requests"))
        assert await tags.lookup(trump) is not None
        assert len(await sim.get("/_sim/requests")) == before  # cached: Gamma not asked again
        await tags.aclose()


async def test_an_unreachable_gamma_leaves_tags_unknown_for_a_while() -> None:
    now = [1000.0]
    tags = MarketTags(
        f"http://127.0.0.1:{free_port()}", timeout_s=0.5, retry_s=60, clock=lambda: now[0]
    )
    cid = "0x" + "cd" * 32
    assert await tags.lookup(cid) is None
    now[0] += 30
    assert tags.known(cid) is None
    now[0] += 31  # past the retry delay: asked again (and fails again)
    await tags.prefetch([cid])
    assert tags.known(cid) is None
    await tags.aclose()


async def test_hostile_gamma_text_is_bounded() -> None:
    long_tags = [{"label": f"t{i}", "slug": "s" * 200} for i in range(80)]
    body = [{"conditionId": "0xAB", "tags": long_tags}, {"conditionId": 5}, "junk"]
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json=body))
    tags = MarketTags("http://gamma.test", http=httpx.AsyncClient(transport=transport))
    found = await tags.lookup("0xab")
    assert found is not None and len(found) == 50  # 50 tags kept, the 200-character slugs not
    await tags.aclose()


# Through the notifier: a WebSocket and a webhook.


async def test_a_websocket_gets_only_the_tagged_markets_new_positions(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    query = "?tags=Trump&only_new_positions=true"
    async with (
        gamma() as sim,
        running_notifier(redis_url, namespace, notifier_gamma_url=sim.base_url) as notifier,
        websockets.connect(ws_url(notifier, query)) as ws,
    ):
        await recv_hello(ws)
        signals = [
            on_market(1, MACHADO, opens_position=True),
            on_market(2, TRUMP, opens_position=None),
            on_market(3, TRUMP, opens_position=True),
            on_market(4, TRUMP, opens_position=False),
        ]
        await publish(redis_client, streams.signals, signals)
        (got,) = await recv_signals(ws, 1)
        assert got["signal"]["signal_id"] == signals[2].signal_id
        await assert_nothing_more(ws)


def hooks_file(tmp_path: Path, hooks: list[dict[str, Any]]) -> Path:
    path = tmp_path / "webhooks.json"
    path.write_bytes(orjson.dumps({"webhooks": hooks}))
    return path


async def test_a_webhook_filters_on_tags_too(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    secret = "whsec-" + "0123456789abcdef" * 2
    async with Receiver() as receiver, gamma() as sim:
        path = hooks_file(
            tmp_path,
            [
                {
                    "name": "venezuela",
                    "url": receiver.url("venezuela"),
                    "secret": secret,
                    "filters": {"tags": ["venezuela"]},
                },
                {"name": "all", "url": receiver.url("all"), "secret": secret},
            ],
        )
        async with running_notifier(
            redis_url, namespace, webhooks_file=path, notifier_gamma_url=sim.base_url
        ):
            signals = [on_market(1, TRUMP), on_market(2, MACHADO), on_market(3, TRUMP)]
            await publish(redis_client, streams.signals, signals)

            async def all_delivered() -> bool:
                return len(receiver.to("all")) == 3

            await wait_until(all_delivered, "every signal to reach 'all'")
    (only,) = receiver.to("venezuela")
    assert orjson.loads(only.body)["signal"]["signal_id"] == signals[1].signal_id


# A slow Gamma: only the subscribers that filter on tags wait for it.


class HeldGamma:
    """Gamma's `/markets` as a mock transport: every market tagged `politics`; each answer waits
    for `go`, and the most requests in flight at once is counted."""

    def __init__(self, held: bool = True) -> None:
        self.go = asyncio.Event()
        if not held:
            self.go.set()
        self.in_flight = 0
        self.most_in_flight = 0
        self.asked = asyncio.Event()

    async def answer(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.asked.set()
        try:
            await self.go.wait()
            await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
        tags = [{"label": "Politics", "slug": "politics"}]
        ids = request.url.params.get_list("condition_ids")
        return httpx.Response(200, json=[{"conditionId": cid, "tags": tags} for cid in ids])

    def market_tags(self) -> MarketTags:
        transport = httpx.MockTransport(self.answer)
        return MarketTags("http://gamma.test", http=httpx.AsyncClient(transport=transport))


async def test_the_lookup_asks_its_batches_at_once() -> None:
    gamma = HeldGamma(held=False)
    tags = gamma.market_tags()
    ids = [f"0x{n:064x}" for n in range(3 * GAMMA_BATCH)]
    await tags.prefetch(ids)
    assert all(tags.known(cid) == frozenset({"politics"}) for cid in ids)
    assert gamma.most_in_flight == 3  # three batches, asked together rather than one by one
    await tags.aclose()


def queued(client: Client) -> list[str]:
    """What the client has queued, taken: signal ids, and other messages' text."""
    found: list[Delivery] = []
    while not client.queue.empty():
        found.append(client.queue.get_nowait())
    return [d.text if d.signal is None else d.signal.signal_id for d in found]


async def test_a_tags_subscriber_does_not_hold_back_the_others_signals(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    gamma = HeldGamma()
    lookup = gamma.market_tags()

    def on_tags() -> TaggedMatch:
        accepts = signal_filter(parse_filters({"tags": ["politics"]}, max_values=10), lookup)
        assert isinstance(accepts, TaggedMatch)
        return accepts

    plain, tagged, switcher = Client(100), Client(100, accepts=on_tags()), Client(100)
    switcher.accepts = on_tags()
    fanout = Fanout(redis_url, streams.signals, block_ms=50)
    reading = asyncio.create_task(fanout.run())
    try:
        await asyncio.wait_for(fanout.ready.wait(), 10)
        for client in (plain, tagged, switcher):
            fanout.add(client)
        first = [on_market(n, TRUMP) for n in (1, 2, 3)]
        await publish(redis_client, streams.signals, first)
        await asyncio.wait_for(gamma.asked.wait(), 10)
        # Gamma has not answered. The switcher drops its tags filter: what it was owed still
        # comes after the lookup, and what is read meanwhile comes after that, not before.
        switcher.change_filter(None, Delivery("subscribed"))
        later = [on_market(n, MACHADO) for n in (4, 5)]
        await publish(redis_client, streams.signals, later)
        every = [s.signal_id for s in first + later]

        async def plain_has_all() -> bool:
            return plain.queue.qsize() == len(every)

        # Every signal reached the client without a tags filter while Gamma held the others'.
        await wait_until(plain_has_all, "the plain client's signals", 5)
        assert queued(plain) == every
        assert tagged.queue.empty() and switcher.queue.qsize() == 1

        gamma.go.set()

        async def others_have_all() -> bool:
            return tagged.queue.qsize() == len(every) and switcher.queue.qsize() == 1 + len(every)

        await wait_until(others_have_all, "the tagged clients' signals", 5)
        assert queued(tagged) == every  # in stream order
        assert queued(switcher) == ["subscribed", *every]
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await lookup.aclose()


async def test_a_gamma_that_never_answers_holds_the_tagged_clients_only_so_long(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx's timeouts are per phase: a Gamma trickling bytes never times out. The round of
    lookups has its own bound; past it the tagged client's signals go out, and without tags
    known they pass no `tags` filter (the switcher, without a filter now, gets them all)."""
    monkeypatch.setattr(fanout_module, "TAGS_DEADLINE_S", 0.5)
    gamma = HeldGamma()  # never released
    lookup = gamma.market_tags()
    accepts = signal_filter(parse_filters({"tags": ["politics"]}, max_values=10), lookup)
    assert isinstance(accepts, TaggedMatch)
    tagged, switcher = Client(100, accepts=accepts), Client(100, accepts=accepts)
    fanout = Fanout(redis_url, streams.signals, block_ms=50)
    reading = asyncio.create_task(fanout.run())
    try:
        await asyncio.wait_for(fanout.ready.wait(), 10)
        fanout.add(tagged)
        fanout.add(switcher)
        signals = [on_market(n, TRUMP) for n in (1, 2)]
        await publish(redis_client, streams.signals, signals)
        await asyncio.wait_for(gamma.asked.wait(), 10)
        switcher.change_filter(None, Delivery("subscribed"))

        async def switcher_has_all() -> bool:
            return switcher.queue.qsize() == 1 + len(signals)

        await wait_until(switcher_has_all, "the signals held for the lookup", 5)
        assert queued(switcher) == ["subscribed", *[s.signal_id for s in signals]]
        assert tagged.queue.empty()
    finally:
        gamma.go.set()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await lookup.aclose()
