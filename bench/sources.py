"""Fill-to-signal latency per source: which feed tells a user first, and by how much.

One pipeline per source profile (and one with every source at once) reads the simulator in
synthetic mode at a low, trader-like rate. The start of each figure is the trade's match: the
moment the simulator's clock emitted it (`/_sim/trades` `emitted_at`); the end is a WebSocket
subscriber's receipt of the trade's first signal. One clock, one machine. Unlike `chain.py` (which
starts at the block, to isolate the source's own cost), the block time is in these figures: on
the real chain a trade waits for its block too, and a mempool source's point is to beat it.

The simulator applies each feed's documented delays (../shared/reference/feeds.md): blocks every
2 s with chain logs after them; the Dome-protocol feeds as they deliver; the Data API polled
through its CDN. With every source at once, each signal names the source that delivered its fill
first, and the ingestor's counts (`shared/source_lag.py`) give every other source's lag behind it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.environment import BenchEnv
from bench.latency import first_receipts, trade_key
from bench.pipeline import API_KEY, Pipeline, chain_source
from bench.stats import percentile, summary_ms
from shared.source_lag import read_source_lag

DRAIN_TIMEOUT_S = 30.0
WARMUP_S = 1.0


@dataclass(frozen=True)
class Profile:
    """A source as a user would configure it: the ingestor's settings and the simulator's."""

    name: str
    ingest: Callable[[int], dict[str, str]]
    sim: dict[str, str] = field(default_factory=dict)
    # How long after the window its last fills may still arrive (a polled source's cycle).
    tail_s: float = 8.0


def _dome(port: int) -> dict[str, str]:
    return {"INGEST_SOURCES": "dome_ws"}


def _predexon(port: int) -> dict[str, str]:
    return {
        "INGEST_SOURCES": "dome_ws",
        "DOME_DIALECT": "predexon",
        "DOME_WS_URL": f"ws://127.0.0.1:{port}/v1",
        "PREDEXON_API_KEY": API_KEY,
        "PREDEXON_STATUS_ALL": "true",
    }


def _polynode(port: int) -> dict[str, str]:
    return {
        "INGEST_SOURCES": "dome_ws",
        "DOME_DIALECT": "polynode",
        "DOME_WS_URL": f"ws://127.0.0.1:{port}/ws",
        "POLYNODE_API_KEY": API_KEY,
        "POLYNODE_STATUS_ALL": "true",
    }


def _polygon(port: int) -> dict[str, str]:
    return chain_source(port, 0)


def _data_api(port: int) -> dict[str, str]:
    return {
        "INGEST_SOURCES": "data_api",
        "DATA_API_URL": f"http://127.0.0.1:{port}",
        "DATA_API_POLL_INTERVAL_S": "2",
    }


def _rtds(port: int) -> dict[str, str]:
    return {
        "INGEST_SOURCES": "rtds",
        "RTDS_URL": f"ws://127.0.0.1:{port}/rtds",
        "DATA_API_URL": f"http://127.0.0.1:{port}",
    }


def _everything(port: int) -> dict[str, str]:
    return {
        **chain_source(port, 0),
        **_data_api(port),
        **_rtds(port),
        **_polynode(port),
        "INGEST_SOURCES": "polygon,dome_ws,data_api,rtds",
    }


# The mempool announces each fill SIM_PENDING_LEAD_S (3 s) before its confirmed events: the
# pending-capable feeds (Predexon, polynode) may then signal before the trade's `emitted_at`.
MEMPOOL = {"SIM_PENDING_EVENTS": "true"}

PROFILES: tuple[Profile, ...] = (
    Profile("polygon", _polygon),
    Profile("dome_ws", _dome),
    Profile("predexon", _predexon, MEMPOOL),
    Profile("polynode", _polynode, MEMPOOL),
    # A poller subscribes to nothing: the simulator's clock starts without waiting for it.
    Profile("data_api", _data_api, {"SIM_WAIT_FOR_SUBSCRIBER": "false"}, tail_s=20.0),
    Profile("rtds", _rtds),
    Profile("all", _everything, MEMPOOL, tail_s=20.0),
)


async def measure(env: BenchEnv, profile: Profile, rate: float, seconds: float) -> dict[str, Any]:
    pipe = Pipeline(env, tag=f"src-{profile.name}-")
    pipe.ingest = profile.ingest(pipe.sim_port)
    pipe.sim_env = dict(profile.sim)
    try:
        await pipe.start()
        pipe.subscriber.record()
        await pipe.start_feed(rate, keep_history=True)
        await asyncio.sleep(WARMUP_S + seconds + profile.tail_s)
        trades = await pipe.sim_trades()
        await pipe.stop_feed()
        drained = await pipe.drained(DRAIN_TIMEOUT_S)
        firsts = first_receipts(pipe.subscriber.take_recording())
        lags = [lag.to_json() for lag in await read_source_lag(pipe.redis, pipe.streams)]
    finally:
        await pipe.stop()
    return (
        {"source": profile.name, "rate": rate, "seconds": seconds, "drained": drained}
        | join(trades, firsts, seconds)
        | {"lag_behind_first": lags}
    )


def join(trades: list[dict[str, Any]], firsts: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The window's trades joined with their first signals: latency from the match, and which
    source delivered first."""
    start = min((t["emitted_at"] for t in trades), default=0.0)
    window = [
        t for t in trades if start + WARMUP_S <= t["emitted_at"] <= start + WARMUP_S + seconds
    ]
    latencies: list[float] = []
    first_source: Counter[str] = Counter()
    for trade in window:
        receipt = firsts.get(trade_key(trade))
        if receipt is None:
            continue
        latencies.append(receipt.at - float(trade["emitted_at"]))
        first_source[receipt.source] += 1
    return {
        "expected": len(window),
        "received": len(latencies),
        "missing": len(window) - len(latencies),
        "first_source": dict(first_source.most_common()),
        **summary_ms(latencies),
        "p90_ms": round(percentile(sorted(latencies), 90) * 1000, 2) if latencies else None,
    }
