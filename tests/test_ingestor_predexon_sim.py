"""The Predexon dialect against the bundled simulator, which another engineer built from feeds.md
on its own: two independent readings of one protocol must agree. With pending events on and
`"status":"all"`, every tracked fill of the ground truth lands in orders.raw confirmed exactly
once, a pending copy at most once and under the same order_key, and fee refunds (not fills) and
both event types (`event`, `trade`) pass without a dead letter."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import redis.asyncio as aioredis

from shared.streams import Streams
from tests.helpers.ingestion import (
    KEY,
    WALLETS,
    Sim,
    ingestor_settings,
    metric,
    raw_payloads,
    running,
    simulator,
    subscribed,
    until,
)


async def pending_then_confirmed(
    sim: Sim,
    redis_url: str,
    namespace: str,
    client: aioredis.Redis,
    streams: Streams,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Run the ingestor against `sim` until every fill of the ground truth is confirmed in
    orders.raw and every pending fill seen by then is confirmed under its key; check no key is
    there twice in one status and no confirmed key is outside the ground truth."""
    settings = ingestor_settings(sim, redis_url, namespace, **overrides)
    statuses: dict[str, list[str]] = defaultdict(list)
    async with running(settings) as ingestor:
        await subscribed(ingestor)
        await sim.emit(WALLETS, 12)

        async def confirmed_all() -> bool:
            statuses.clear()
            for entry in await raw_payloads(client, streams):
                statuses[entry["order_key"]].append(entry["status"])
            truth = set(await sim.truth(WALLETS))
            done = {key for key, seen in statuses.items() if "confirmed" in seen}
            return bool(truth) and done == truth

        await until(confirmed_all, what="every fill of the ground truth confirmed")
        # Every pending fill seen so far is then confirmed under its own key (none is dropped).
        waiting = {key for key, seen in statuses.items() if "pending" in seen}

        async def paired() -> bool:
            entries = await raw_payloads(client, streams)
            confirmed = {e["order_key"] for e in entries if e["status"] == "confirmed"}
            return waiting <= confirmed

        await until(paired, what="each pending fill confirmed under its key")
        entries = await raw_payloads(client, streams)
        statuses.clear()
        for entry in entries:
            statuses[entry["order_key"]].append(entry["status"])
        truth = set(await sim.truth(WALLETS))
    # The simulator's clock keeps trading: fills still pending when it stopped may be unknown.
    outside = {
        key: seen for key, seen in statuses.items() if key not in truth and "confirmed" in seen
    }
    assert not outside, outside
    # Each fill at most once per status (a clock trade may still be pending when it stopped).
    for key, seen in statuses.items():
        counts = Counter(seen)
        assert counts["confirmed"] <= 1 and counts["pending"] <= 1, (key, seen)
    assert any("pending" in seen for seen in statuses.values()), "no pending event was seen"
    assert await client.xlen(streams.orders_dead) == 0
    return entries


async def test_the_simulators_predexon_pending_then_confirmed_lands_once_per_status(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    refunds = metric(
        "betterbot_ingestor_non_fill_events_total", source="dome_ws", event_type="fee_refund"
    )
    async with simulator(
        sim_pending_events=True,
        sim_pending_lead_s=0.3,
        sim_predexon_event_type="alternate",
        sim_predexon_fee_refund_every=3,
    ) as sim:
        entries = await pending_then_confirmed(
            sim,
            redis_url,
            namespace,
            redis_client,
            streams,
            dome_dialect="predexon",
            dome_ws_url=f"{sim.ws_url}/v1",
            predexon_api_key=KEY,
            predexon_status_all=True,
        )
    assert {entry["source"] for entry in entries} <= {"predexon", "dome_rest"}
    assert any(entry["source"] == "predexon" for entry in entries)
    assert (
        metric(
            "betterbot_ingestor_non_fill_events_total", source="dome_ws", event_type="fee_refund"
        )
        > refunds
    )
