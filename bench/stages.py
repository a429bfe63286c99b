"""Each stage alone, from input that is all there before its clock starts.

- `ingestor_inprocess`: the ingestor's own code path without the socket: `frames.parse_frame` on
  pre-built Dome event frames, then `Publisher.submit` (the dedupe + XADD Lua step, batched), in
  this process. Bounded by the XADD ceiling.
- `ingestor_burst`: the real ingestor process, fed one burst of N orders through the simulator's
  `/_sim/emit` over its WebSocket; the rate is measured between the first and the last entry's
  stream id (Redis' clock), so process start and the simulator's request handling are left out.
  The simulator's sending shares the cores, so this is a lower bound of the ingestor alone.
- `detector`: N orders pre-filled in `orders.raw`, the tracked wallets over 1,000 markets (or all
  in one hot market: the contention case, as replicas wait for each other on shared state); the
  group is created past them, the replicas start and become healthy idle, then the group is moved
  back to the start (XGROUP SETID 0) and the clock runs until the group's lag and pending are both
  0. Bounded by XREADGROUP + XACK.
- `store`: N orders and their N signals pre-filled; same trick with the `store` group on both
  streams; the clock runs until both are drained (the store acks only after commit), then the
  Postgres row counts are checked. Bounded by COPY.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httpx
import orjson
import redis.asyncio as aioredis

from bench.environment import BenchEnv, service
from bench.fixtures import (
    SPREAD_MARKETS,
    dome_orders,
    event_frames,
    fill_payloads,
    order_fills,
    signal_payloads,
    tracked_addresses,
)
from bench.pipeline import API_KEY, ops_service, service_env
from bench.probes import entries_added, group_drained, until
from devtools.processes import Memory, ServiceProcess, start_all, stop_all
from devtools.servers import free_port
from services.ingestor.frames import Fill, parse_frame
from services.ingestor.publisher import Publisher
from shared.streams import DETECTOR_GROUP, STORE_GROUP, Streams

# Something to run beside a stage's processes while they work (a profiler), given the processes.
Watch = Callable[[list[ServiceProcess]], Awaitable[Any]]

PREFILL_BATCH = 1000
STAGE_TIMEOUT_S = 120.0
ROW_COUNT = "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM signals)"


async def prefill(client: aioredis.Redis, stream: str, payloads: list[bytes]) -> None:
    for start in range(0, len(payloads), PREFILL_BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for payload in payloads[start : start + PREFILL_BATCH]:
                pipe.xadd(stream, cast(Any, {b"data": payload}))
            await pipe.execute()


def _memory(procs: list[ServiceProcess]) -> dict[str, dict[str, float]]:
    found: dict[str, Memory] = {}
    for proc in procs:
        if (mem := proc.memory()) is not None:
            found[f"{proc.name}#{len(found) + 1}"] = mem
    return {name: vars(mem) for name, mem in found.items()}


def _result(stage: str, items: int, seconds: float | None, **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "items": items,
        "seconds": None if seconds is None else round(seconds, 3),
        "per_s": None if not seconds else round(items / seconds),
        **extra,
    }


async def ingestor_inprocess(env: BenchEnv, count: int) -> dict[str, Any]:
    streams = Streams(env.namespace("ingest"))
    frames = event_frames(dome_orders(count, secrets.token_hex(8)))
    tracked = frozenset(tracked_addresses())
    client = env.redis()
    publisher = Publisher(client, streams, stream_maxlen=1_000_000, dedupe_ttl_s=3600)
    runner = asyncio.create_task(publisher.run())
    try:
        start = time.perf_counter()
        for raw in frames:
            frame = parse_frame(raw, tracked=tracked, received_at=time.time(), max_bytes=1 << 20)
            if not isinstance(frame, Fill):
                raise RuntimeError(f"bench frame rejected: {frame}")
            await publisher.submit(frame.fill)
        left = await publisher.flush(STAGE_TIMEOUT_S)
        elapsed = time.perf_counter() - start
        added = await entries_added(client, streams.orders_raw)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await client.aclose()
    return _result(
        "ingestor (in-process parse+dedupe+publish)",
        count,
        elapsed,
        complete=added == count and left == 0,
        ceiling="xadd",
    )


async def ingestor_burst(env: BenchEnv, count: int) -> dict[str, Any]:
    namespace = env.namespace("burst")
    streams = Streams(namespace)
    base = service_env(env, namespace)
    sim_port = free_port()
    simulator = service(
        "simulator",
        {
            **base,
            "SIM_HOST": "127.0.0.1",
            "SIM_PORT": str(sim_port),
            "SIM_MODE": "synthetic",
            "SIM_RATE": "0.001",
            "SIM_API_KEY": API_KEY,
            "SIM_SEND_QUEUE_MAX": str(count * 2),
        },
        f"http://127.0.0.1:{sim_port}/health",
        "burst-",
    )
    ingestor = ops_service(
        "ingestor",
        base,
        "burst-",
        DOME_WS_URL=f"ws://127.0.0.1:{sim_port}",
        DOME_API_URL=f"http://127.0.0.1:{sim_port}/v1",
        DOME_API_KEY=API_KEY,
        PUBLISH_QUEUE_SIZE=str(count * 2),
    )
    body = orjson.dumps(dome_orders(count, secrets.token_hex(8)))
    client = env.redis()
    procs = [simulator, ingestor]
    try:
        await start_all(procs)

        async def first_trade_in() -> bool:
            return await entries_added(client, streams.orders_raw) >= 1

        # The synthetic feed's first trade is due at once: it proves the subscription is live.
        if await until(first_trade_in, 30, 0.05) is None:
            raise RuntimeError("the ingestor never published the simulator's first trade")
        async with httpx.AsyncClient(timeout=60) as http:
            response = await http.post(f"http://127.0.0.1:{sim_port}/_sim/emit", content=body)
            response.raise_for_status()

        async def all_in() -> bool:
            return await entries_added(client, streams.orders_raw) >= count + 1

        done = await until(all_in, STAGE_TIMEOUT_S, 0.05) is not None
        entries: Any = await client.xrange(streams.orders_raw, count=2)
        last: Any = await client.xrevrange(streams.orders_raw, count=1)
        first_ms = int(entries[1][0].split(b"-")[0])
        last_ms = int(last[0][0].split(b"-")[0])
        memory = _memory(procs)
    finally:
        await stop_all(procs)
        await client.aclose()
    seconds = max(last_ms - first_ms, 1) / 1000
    return _result(
        "ingestor process (WebSocket burst)",
        count,
        seconds,
        complete=done,
        ceiling="xadd",
        memory=memory,
    )


async def _stage_processes(
    client: aioredis.Redis,
    procs: list[ServiceProcess],
    groups: list[tuple[str, str]],
    watch: Watch | None,
) -> tuple[float | None, dict[str, dict[str, float]], Any]:
    """Start the processes idle, rewind the groups, time until every group has drained.

    `watch` (e.g. a profiler) runs beside the processes from the rewind on; its result is the
    third value.
    """
    for stream, group in groups:
        await client.xgroup_create(stream, group, id="$", mkstream=True)
    watched: Any = None
    try:
        await start_all(procs)
        watcher = asyncio.ensure_future(watch(procs)) if watch else None
        start = time.monotonic()
        for stream, group in groups:
            await client.xgroup_setid(stream, group, id="0", entries_read=0)

        async def drained() -> bool:
            checks = [await group_drained(client, stream, group) for stream, group in groups]
            return all(checks)

        finished = await until(drained, STAGE_TIMEOUT_S)
        memory = _memory(procs)
        if watcher is not None:
            watched = await watcher
    finally:
        await stop_all(procs)
    return (None if finished is None else finished - start), memory, watched


HOT_DETECTOR = "detector, 1 hot market"


async def detector(
    env: BenchEnv,
    count: int,
    replicas: int,
    watch: Watch | None = None,
    markets: int = SPREAD_MARKETS,
) -> dict[str, Any]:
    namespace = env.namespace(f"det{replicas}m{markets}")
    streams = Streams(namespace)
    payloads = fill_payloads(order_fills(dome_orders(count, secrets.token_hex(8), markets)))
    client = env.redis()
    try:
        await prefill(client, streams.orders_raw, payloads)
        base = service_env(env, namespace)
        procs = [
            ops_service("detector", base, f"stage-{replicas}x{n}-") for n in range(1, replicas + 1)
        ]
        seconds, memory, watched = await _stage_processes(
            client, procs, [(streams.orders_raw, DETECTOR_GROUP)], watch
        )
        signals = await entries_added(client, streams.signals)
    finally:
        await client.aclose()
    return _result(
        "detector" if markets > 1 else HOT_DETECTOR,
        count,
        seconds,
        replicas=replicas,
        markets=markets,
        complete=seconds is not None,
        signals=signals,
        ceiling="readgroup_ack",
        memory=memory,
        **({"watched": watched} if watch else {}),
    )


async def store(env: BenchEnv, count: int, watch: Watch | None = None) -> dict[str, Any]:
    namespace = env.namespace("store")
    streams = Streams(namespace)
    fills = order_fills(dome_orders(count, secrets.token_hex(8)))
    client = env.redis()
    conn = await env.pg()
    try:
        await prefill(client, streams.orders_raw, fill_payloads(fills))
        await prefill(client, streams.signals, signal_payloads(fills))
        before = await conn.fetchval(ROW_COUNT)
        procs = [ops_service("store", service_env(env, namespace), "stage-")]
        groups = [(streams.orders_raw, STORE_GROUP), (streams.signals, STORE_GROUP)]
        seconds, memory, watched = await _stage_processes(client, procs, groups, watch)
        after = await conn.fetchval(ROW_COUNT)
    finally:
        await conn.close()
        await client.aclose()
    rows = 2 * count
    return _result(
        "store (orders + signals rows)",
        rows,
        seconds,
        complete=after - before == rows,
        rows_written=after - before,
        ceiling="copy",
        memory=memory,
        **({"watched": watched} if watch else {}),
    )
