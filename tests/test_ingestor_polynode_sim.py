"""The polynode dialect against the bundled simulator (another engineer's independent reading of
feeds.md): compressed event frames, `since` on subscribe, `subscribed` acks, heartbeats and
pending events. Every tracked fill lands confirmed once, pending at most once under its key."""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.streams import Streams
from tests.helpers.ingestion import simulator
from tests.test_ingestor_predexon_sim import pending_then_confirmed


async def test_the_simulators_polynode_compressed_pending_then_confirmed(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator(
        sim_api_key="",
        sim_pending_events=True,
        sim_pending_lead_s=0.3,
        sim_polynode_heartbeat_s=0.2,
    ) as sim:
        entries = await pending_then_confirmed(
            sim,
            redis_url,
            namespace,
            redis_client,
            streams,
            dome_dialect="polynode",
            dome_ws_url=f"{sim.ws_url}/ws",
            polynode_api_key="pn-sim-key-51c9",
            polynode_compress=True,
            polynode_since_s=30,
            polynode_status_all=True,
        )
    assert {entry["source"] for entry in entries} <= {"polynode", "dome_rest"}
    assert any(entry["source"] == "polynode" for entry in entries)
