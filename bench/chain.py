"""Block-to-delivered latency of the polygon source: from the moment the simulator's node mines a
block to a WebSocket client's receipt of the signal of each tracked fill in it.

A pipeline of its own reads the simulator's chain (`/rpc`, blocks every 2 s as on Polygon) as
source `polygon`, for each POLYGON_CONFIRMATIONS value measured (0: on first sight, through the
`logs` subscription; 2: once the block has two successors, through `eth_getLogs`). The simulator
emits synthetic fills of the tracked wallets at a steady rate; every fill makes a signal (the bench
rules). Each trade is joined by order_key with its first signal, and its block's mined time
(`/_sim/chain/mined`) is the start: one clock, one machine. The block time itself is not in the
figure (the fill waits in the mempool for its block on the real chain too); the confirmations are.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.environment import BenchEnv
from bench.latency import first_receipts, trade_key
from bench.pipeline import Pipeline, chain_source
from bench.stats import summary_ms

DRAIN_TIMEOUT_S = 20.0
TAIL_S = 8.0


async def measure(env: BenchEnv, rate: float, seconds: float, confirmations: int) -> dict[str, Any]:
    pipe = Pipeline(env, tag=f"chain{confirmations}-")
    pipe.ingest = chain_source(pipe.sim_port, confirmations)
    try:
        await pipe.start()
        pipe.subscriber.record()
        await pipe.start_feed(rate, keep_history=True)
        # The tail covers the confirmations (2 s a block) so the window's last fills are read.
        await asyncio.sleep(1.0 + seconds + TAIL_S + 2.0 * confirmations)
        trades, mined = await pipe.sim_trades(), await pipe.mined_at()
        await pipe.stop_feed()
        drained = await pipe.drained(DRAIN_TIMEOUT_S)
        firsts = first_receipts(pipe.subscriber.take_recording())
    finally:
        await pipe.stop()
    start = min((t["emitted_at"] for t in trades), default=0.0)
    window = [t for t in trades if start + 1.0 <= t["emitted_at"] <= start + 1.0 + seconds]
    expected = [t for t in window if t["tx_hash"] in mined]
    latencies = [
        firsts[key].at - mined[t["tx_hash"]] for t in expected if (key := trade_key(t)) in firsts
    ]
    return {
        "confirmations": confirmations,
        "rate": rate,
        "seconds": seconds,
        "expected": len(expected),
        "received": len(latencies),
        "missing": len(expected) - len(latencies),
        "drained": drained,
        **summary_ms(latencies),
    }
