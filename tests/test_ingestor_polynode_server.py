"""The whole ingestor (real `ws_connection`, real Redis) against a small polynode server written
here from feeds.md and polynode's SDK message types: `subscribed` acks with warnings, heartbeats,
a snapshot, events as binary raw deflate (`compress=zlib`) with a pending event before its
confirmation, a decompression bomb, and finally the free plan's session limit. Fills land in
orders.raw once per status under one order_key, as `polynode`; the bomb is dead-lettered as
oversized; the session limit is reported (log, feed status, metric) and waited out, never a hot
reconnect loop; `since` rides on every subscribe; the key shows nowhere."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from shared.feed_status import ConnectionState
from shared.streams import Streams
from tests.helpers.ingestion import WALLETS, metric, until
from tests.test_ingestor_predexon_server import (
    TX,
    connected,
    fill,
    ingest_settled,
    provider,
    record_texts,
    running,
    settings_for,
)

KEY = "pn-itest-3f9a0c7e51d2b846"


def deflate(raw: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(raw) + packer.flush()


def event(data: dict[str, Any], *, pending: bool = False) -> bytes:
    """A polynode event frame, compressed: Dome's 16 fields, block and log index null when
    pending."""
    chain = {"block_number": None, "log_index": None} if pending else {}
    body = {"block_number": 78_100_001, "log_index": 4, **data, **chain}
    return deflate(orjson.dumps({"type": "event", "subscription_id": "sub_1", "data": body}))


async def test_polynode_compressed_pending_snapshot_and_the_session_limit(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with provider("polynode", KEY) as (server, port):
        settings = settings_for(
            redis_url,
            namespace,
            f"ws://127.0.0.1:{port}/ws",
            dome_dialect="polynode",
            polynode_api_key=KEY,
            polynode_compress=True,
            polynode_since_s=30,
            dome_max_frame_bytes=64 * 1024,
        )
        async with running(settings) as ingestor:
            await connected(ingestor)
            assert server.paths == [f"/ws?key={KEY}&compress=zlib"]
            assert server.subscribes()[0]["filters"]["since"] == 30
            confirmed = fill(TX[1], WALLETS[1], order_hash="0x" + "3b" * 32)
            snapshot_item = {**fill(TX[0], WALLETS[0]), "block_number": 78_100_000, "log_index": 1}
            snapshot = {"type": "snapshot", "data": [snapshot_item]}
            bomb = deflate(b'{"type":"event","data":"' + b"0" * (4 << 20) + b'"}')
            await server.send(
                '{"type":"heartbeat","ts":1762480391000}',
                orjson.dumps(snapshot).decode(),
                event(confirmed, pending=True),
                event(confirmed),
                bomb,
                event(fill(TX[2], "0x" + "12" * 20)),  # an untracked wallet
                '{"type":"unsubscribed","subscription_id":"sub_0"}',
            )
            entries = await ingest_settled(redis_client, streams, 3)

            async def dead_lettered() -> bool:
                return await redis_client.xlen(streams.orders_dead) >= 2

            await until(dead_lettered, what="the bomb dead-lettered")
            await server.send(
                '{"type":"error","code":"SESSION_LIMIT","message":"Daily session limit reached"}'
            )
            await until(lambda: not server.open, what="the session ended")
            ended_at = time.monotonic()
            assert ingestor.websocket is not None
            status = ingestor.websocket.status
            assert "SESSION_LIMIT" in status.last_error
            assert "DOME_PLAN_LIMIT_WAIT_S" in status.last_error
            assert status.state is ConnectionState.DISCONNECTED
            while time.monotonic() - ended_at < 0.5:
                assert len(server.paths) == 1, "reconnected at once after the session limit"
                await asyncio.sleep(0.02)
            assert (
                metric(
                    "betterbot_ingestor_provider_refusals_total",
                    source="dome_ws",
                    code="SESSION_LIMIT",
                )
                >= 1
            )
            # The wait is bounded: the next attempt comes, and is refused again the same way.
            await until(lambda: len(server.paths) == 2, what="a retry after the wait")
        dead = await redis_client.xrange(streams.orders_dead)
    assert dead is not None
    assert [(e["source"], e["status"]) for e in entries] == [
        ("polynode", "confirmed"),
        ("polynode", "pending"),
        ("polynode", "confirmed"),
    ]
    assert entries[1]["order_key"] == entries[2]["order_key"] != entries[0]["order_key"]
    assert len(dead) == 2 and b"oversized" in repr(dead[0][1]).encode()
    # What inflated but was refused is kept readable: the JSON, not the compressed bytes.
    untracked = dead[1][1]
    assert untracked is not None and b"untracked_wallet" in untracked[b"reason"]
    assert orjson.loads(untracked[b"raw"])["data"]["tx_hash"] == TX[2]
    warned = [r for r in caplog.records if r.getMessage() == "subscription_warnings"]
    assert warned and "clamped" in repr(warned[0].__dict__)
    texts = [*record_texts(caplog.records), repr(status), repr(dead)]
    assert [t[:200] for t in texts if KEY in t] == []


async def test_a_session_limit_close_naming_the_key_is_a_refusal_not_an_auth_failure(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.ingestor")
    async with provider("polynode", KEY) as (server, port):
        settings = settings_for(
            redis_url,
            namespace,
            f"ws://127.0.0.1:{port}/ws",
            dome_dialect="polynode",
            polynode_api_key=KEY,
        )
        async with running(settings) as ingestor:
            await connected(ingestor)
            for ws in list(server.open):
                await ws.close(1008, "daily session limit reached for this api key")
            source = ingestor.websocket
            assert source is not None
            await until(lambda: "SESSION_LIMIT" in source.status.last_error)
            assert source.status.state is ConnectionState.DISCONNECTED
            assert not any(r.getMessage() == "auth_failed" for r in caplog.records)
            assert any(r.getMessage() == "provider_refused" for r in caplog.records)
