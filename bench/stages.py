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
  0. Bounded by XREADGROUP + XACK. Partitioned (`STREAM_PARTITIONS` > 1), the orders go where the
  ingestor would put them (`OrdersRaw.publish_all`), every lane's group is rewound, and the clock
  runs until every lane has drained and every outbox has been forwarded to `signals`.
- `store`: N orders and their N signals pre-filled; same trick with the `store` group on both
  streams; the clock runs until both are drained (the store acks only after commit), then the
  Postgres row counts are checked. Bounded by COPY.

Each stage also records the CPU its processes and Redis (each node of a private one) used between
the rewind and the drain, per 1,000 items.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import httpx
import orjson
import redis.asyncio as aioredis

from bench.environment import BenchEnv, service
from bench.fixtures import (
    SPREAD_MARKETS,
    dome_orders,
    event_frames,
    order_fills,
    signal_payloads,
    tracked_addresses,
)
from bench.pipeline import API_KEY, ops_service, service_env
from bench.probes import entries_added, group_drained, total_added, unforwarded_signals, until
from devtools.processes import Memory, ServiceProcess, start_all, stop_all
from devtools.servers import free_port
from services.ingestor.frames import Fill, parse_frame
from services.ingestor.publisher import Publisher
from shared.models import OrderFill
from shared.orders_raw import OrdersRaw
from shared.redis_streams import entry_position
from shared.streams import DETECTOR_GROUP, STORE_GROUP, Streams

# Something to run beside a stage's processes while they work (a profiler), given the processes.
Watch = Callable[[list[ServiceProcess]], Awaitable[Any]]

PREFILL_BATCH = 1000
# Generous: a partitioned stage on a loaded 2-core machine has taken over 2 minutes.
STAGE_TIMEOUT_S = 240.0
# Often enough to time a drain of seconds within 1%, seldom enough that polling every lane of a
# partitioned layout costs Redis next to nothing.
DRAIN_POLL_S = 0.05
ROW_COUNT = "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM signals)"
# Pre-filled orders' dedupe keys only have to outlive the stage.
PREFILL_DEDUPE_TTL_S = 3600


async def prefill(client: aioredis.Redis, stream: str, payloads: list[bytes]) -> None:
    for start in range(0, len(payloads), PREFILL_BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for payload in payloads[start : start + PREFILL_BATCH]:
                pipe.xadd(stream, cast(Any, {b"data": payload}))
            await pipe.execute()


async def prefill_orders(
    client: aioredis.Redis, streams: Streams, fills: Sequence[OrderFill]
) -> dict[str, int]:
    """The fills where the ingestor would put them (their wallet's partition, a BUY also its
    token's), by its own script; returns the entries each stream then holds, by name."""
    orders = OrdersRaw(client, streams, stream_maxlen=1_000_000, dedupe_ttl_s=PREFILL_DEDUPE_TTL_S)
    await orders.publish_all(fills)
    names = [*streams.order_streams(), *streams.token_streams()]
    counts = await asyncio.gather(*(entries_added(client, name) for name in names))
    return dict(zip(names, counts, strict=True))


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
    streams = env.streams(env.namespace("ingest"))
    frames = event_frames(dome_orders(count, secrets.token_hex(8)))
    tracked = frozenset(tracked_addresses())
    client = await env.connected()
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
        added = await total_added(client, streams.order_streams())
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
    streams = env.streams(namespace)
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
    client = await env.connected()
    procs = [simulator, ingestor]
    try:
        await start_all(procs)

        async def first_trade_in() -> bool:
            return await total_added(client, streams.order_streams()) >= 1

        # The synthetic feed's first trade is due at once: it proves the subscription is live.
        if await until(first_trade_in, 30, 0.05) is None:
            raise RuntimeError("the ingestor never published the simulator's first trade")
        async with httpx.AsyncClient(timeout=60) as http:
            response = await http.post(f"http://127.0.0.1:{sim_port}/_sim/emit", content=body)
            response.raise_for_status()

        async def all_in() -> bool:
            return await total_added(client, streams.order_streams()) >= count + 1

        done = await until(all_in, STAGE_TIMEOUT_S, 0.05) is not None
        first_ms, last_ms = await _burst_span(client, streams.order_streams())
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


async def _burst_span(client: aioredis.Redis, streams: list[str]) -> tuple[int, int]:
    """Redis' clock (ms) at the burst's first and last entry, over every partition: the first
    entry of all is the simulator's first trade, not part of the burst."""
    firsts: list[bytes] = []
    lasts: list[bytes] = []
    for stream in streams:
        head: Any = await client.xrange(stream, count=2)
        tail: Any = await client.xrevrange(stream, count=1)
        firsts += [entry_id for entry_id, _ in head]
        lasts += [entry_id for entry_id, _ in tail]
    firsts.sort(key=lambda entry_id: entry_position(entry_id.decode()))
    first_ms = entry_position(firsts[1].decode())[0]
    last_ms = max(entry_position(entry_id.decode())[0] for entry_id in lasts)
    return first_ms, last_ms


@dataclass(frozen=True)
class StageRun:
    """One timed drain: its seconds (None: timed out), the processes' memory at its end, the CPU
    seconds each process and Redis used over it, and what the watcher returned."""

    seconds: float | None
    memory: dict[str, dict[str, float]]
    cpu_s: dict[str, float]
    watched: Any = None


async def _stage_cpu(env: BenchEnv, procs: list[ServiceProcess]) -> dict[str, float]:
    used = {f"{p.name}#{n}": c for n, p in enumerate(procs, 1) if (c := p.cpu()) is not None}
    return {**used, **await env.redis_cpu()}


async def _stage_processes(
    env: BenchEnv,
    client: aioredis.Redis,
    procs: list[ServiceProcess],
    groups: list[tuple[str, str]],
    drained: Callable[[], Awaitable[bool]],
    watch: Watch | None,
) -> StageRun:
    """Start the processes idle, rewind the groups, time until `drained`.

    `watch` (e.g. a profiler) runs beside the processes from the rewind on.
    """
    for stream, group in groups:
        await client.xgroup_create(stream, group, id="$", mkstream=True)
    try:
        await start_all(procs)
        watcher = asyncio.ensure_future(watch(procs)) if watch else None
        cpu_first = await _stage_cpu(env, procs)
        start = time.monotonic()
        await asyncio.gather(
            *(client.xgroup_setid(s, g, id="0", entries_read=0) for s, g in groups)
        )
        finished = await until(drained, STAGE_TIMEOUT_S, DRAIN_POLL_S)
        cpu_last = await _stage_cpu(env, procs)
        memory = _memory(procs)
        watched = await watcher if watcher is not None else None
    finally:
        await stop_all(procs)
    seconds = None if finished is None else finished - start
    used = {name: cpu_last[name] - cpu_first[name] for name in cpu_last if name in cpu_first}
    return StageRun(seconds, memory, used, watched)


def _groups_drained(
    client: aioredis.Redis, groups: list[tuple[str, str]]
) -> Callable[[], Awaitable[bool]]:
    async def drained() -> bool:
        checks = [await group_drained(client, stream, group) for stream, group in groups]
        return all(checks)

    return drained


def _lanes_drained(
    client: aioredis.Redis, streams: Streams, filled: dict[str, int]
) -> Callable[[], Awaitable[bool]]:
    """Every lane that got entries has read and acked them all, then every outbox has been
    forwarded: in that order, since a lane writes its outbox before it acks (and the outboxes are
    only counted once the lanes are done)."""
    lanes = [(lane.stream, DETECTOR_GROUP) for lane in streams.lanes() if filled.get(lane.stream)]
    lanes_done = _groups_drained(client, lanes)

    async def drained() -> bool:
        return await lanes_done() and await unforwarded_signals(client, streams) == 0

    return drained


def _per_1000(run: StageRun, items: int) -> dict[str, float]:
    return {name: round(1e6 * seconds / items, 1) for name, seconds in run.cpu_s.items()}


HOT_DETECTOR = "detector, 1 hot market"


async def detector(
    env: BenchEnv,
    count: int,
    replicas: int,
    watch: Watch | None = None,
    markets: int = SPREAD_MARKETS,
    *,
    orders: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`orders` (Dome-shaped, see `fixtures.dome_orders`): the same input for several runs."""
    namespace = env.namespace(f"det{replicas}m{markets}")
    streams = env.streams(namespace)
    fills = order_fills(orders or dome_orders(count, secrets.token_hex(8), markets))
    client = await env.connected()
    try:
        filled = await prefill_orders(client, streams, fills)
        base = service_env(env, namespace)
        procs = [
            ops_service("detector", base, f"stage-{replicas}x{n}-") for n in range(1, replicas + 1)
        ]
        lanes = [(lane.stream, DETECTOR_GROUP) for lane in streams.lanes()]
        drained = _lanes_drained(client, streams, filled)
        run = await _stage_processes(env, client, procs, lanes, drained, watch)
        signals = await entries_added(client, streams.signals)
    finally:
        await client.aclose()
    return _result(
        "detector" if markets > 1 else HOT_DETECTOR,
        len(fills),
        run.seconds,
        replicas=replicas,
        markets=markets,
        partitions=streams.partitions,
        complete=run.seconds is not None,
        signals=signals,
        ceiling="readgroup_ack",
        memory=run.memory,
        cpu_ms_per_1000_items=_per_1000(run, len(fills)),
        **({"watched": run.watched} if watch else {}),
    )


async def store(env: BenchEnv, count: int, watch: Watch | None = None) -> dict[str, Any]:
    namespace = env.namespace("store")
    streams = env.streams(namespace)
    fills = order_fills(dome_orders(count, secrets.token_hex(8)))
    client = await env.connected()
    conn = await env.pg()
    try:
        await prefill_orders(client, streams, fills)
        await prefill(client, streams.signals, signal_payloads(fills))
        before = await conn.fetchval(ROW_COUNT)
        procs = [ops_service("store", service_env(env, namespace), "stage-")]
        groups = [(s, STORE_GROUP) for s in (*streams.order_streams(), streams.signals)]
        drained = _groups_drained(client, groups)
        run = await _stage_processes(env, client, procs, groups, drained, watch)
        after = await conn.fetchval(ROW_COUNT)
    finally:
        await conn.close()
        await client.aclose()
    rows = 2 * count
    return _result(
        "store (orders + signals rows)",
        rows,
        run.seconds,
        complete=after - before == rows,
        rows_written=after - before,
        ceiling="copy",
        memory=run.memory,
        cpu_ms_per_1000_items=_per_1000(run, rows),
        **({"watched": run.watched} if watch else {}),
    )
