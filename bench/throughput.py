"""End-to-end throughput: step the feed's rate up until the pipeline stops keeping up.

At each step the simulator emits R orders/s for a fixed time while the pipeline's counters are
sampled twice a second: orders emitted (simulator), ingested (`orders.raw` entries added),
signalled (`signals` entries added), stored (entries the store committed and acked, both streams),
delivered (signals the subscriber received). Each stage's backlog is sampled too: fed but not
ingested, unread or unacked by the detector and the store groups, signalled but not delivered.

A step is sustained when the simulator really emitted R/s (within 5%), everything it emitted was
ingested, and no stage's backlog grew over the second half of the step (least-squares slope below
2% of R and the backlog at the end below a quarter of a second's worth). After a step the feed
stops and the pipeline is given time to drain; the steps stop at the first one not sustained.
The CPU each process used is read over the step and its drain, per order ingested in that time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.pipeline import Pipeline, Snapshot
from bench.stats import slope

SAMPLE_EVERY_S = 0.5
GROWTH_TOLERANCE = 0.02
END_BACKLOG_S = 0.25
FEED_TOLERANCE = 0.95


def _per_s(first: Snapshot, last: Snapshot, field: str) -> float:
    elapsed = last.at - first.at
    return (getattr(last, field) - getattr(first, field)) / elapsed if elapsed > 0 else 0.0


def verdict(
    rate: float, rates: dict[str, float], growth: dict[str, float], final: dict[str, int]
) -> tuple[bool, str]:
    """Sustained or not, and every reason why not, in words."""
    problems = []
    if rates["emitted"] < FEED_TOLERANCE * rate:
        problems.append(f"feed emitted only {rates['emitted']:,.0f}/s (simulator short of CPU)")
    growing = [
        f"{stage} +{growth[stage]:,.0f}/s (at {final[stage]:,})"
        for stage in growth
        if growth[stage] > GROWTH_TOLERANCE * rate and final[stage] > END_BACKLOG_S * rate
    ]
    if growing:
        problems.append("lag growing: " + ", ".join(growing))
    return (False, "; ".join(problems)) if problems else (True, "sustained")


async def step(pipe: Pipeline, rate: float, seconds: float, drain_s: float) -> dict[str, Any]:
    await pipe.start_feed(rate, keep_history=False)
    first = await pipe.snapshot()
    cpu_first = await pipe.cpu()
    samples = [first]
    while time.monotonic() < first.at + seconds:
        await asyncio.sleep(SAMPLE_EVERY_S)
        samples.append(await pipe.snapshot())
    memory = pipe.memory()
    cpu_at_end = await pipe.cpu()
    last = samples[-1]
    rates = {
        name: _per_s(first, last, name)
        for name in ("emitted", "ingested", "signalled", "stored", "delivered")
    }
    backlogs = [(s.at, s.backlogs(first.ingested)) for s in samples]
    second_half = [b for b in backlogs if b[0] >= first.at + seconds / 2]
    stages = list(backlogs[-1][1])
    growth = {stage: slope([(t, b[stage]) for t, b in second_half]) for stage in stages}
    final = backlogs[-1][1]
    ok, why = verdict(rate, rates, growth, final)
    await pipe.stop_feed()
    drained_at = time.monotonic()
    drained = await pipe.drained(drain_s)
    # The CPU window closes once the stages have caught up: an order still queued at the step's
    # end is worked on after it, and counting its orders without that work would flatter a stage
    # that fell behind. The feed's own reading is the one at the step's end (it is stopped).
    cpu_last = {**cpu_at_end, **await pipe.cpu()}
    window_end = await pipe.snapshot()  # orders the ingestor still added after the step count too
    return {
        "rate": rate,
        "seconds": round(last.at - first.at, 2),
        **{f"{name}_per_s": round(value) for name, value in rates.items()},
        "backlog_end": final,
        "backlog_max": {stage: max(b[stage] for _, b in backlogs) for stage in stages},
        "backlog_growth_per_s": {stage: round(g) for stage, g in growth.items()},
        "sustained": ok,
        "verdict": why,
        "drained": drained,
        "drain_s": round(time.monotonic() - drained_at, 2),
        "subscriber_closed": pipe.subscriber.closed,
        "memory": {name: vars(m) for name, m in memory.items()},
        "cpu_orders": window_end.ingested - first.ingested,
        "cpu_window_s": round(window_end.at - first.at, 2),
        "cpu_ms_per_1000_orders": cpu_per_order(
            cpu_first, cpu_last, window_end.ingested - first.ingested
        ),
    }


def cpu_per_order(first: dict[str, float], last: dict[str, float], orders: int) -> dict[str, float]:
    """CPU milliseconds per 1,000 orders ingested, by process, over one step: where the machine's
    cores go, and so what bounds the end-to-end rate."""
    if orders <= 0:
        return {}
    used = {name: last[name] - first[name] for name in last if name in first}
    return {name: round(1e6 * seconds / orders, 1) for name, seconds in used.items()}


async def step_up(
    pipe: Pipeline, rates: list[float], seconds: float, drain_s: float, deadline: float
) -> dict[str, Any]:
    """Steps until one is not sustained, or the run's time budget (monotonic `deadline`) is
    spent: the steps left are listed as skipped rather than dropped silently."""
    steps: list[dict[str, Any]] = []
    skipped: list[float] = []
    # Whatever an earlier scenario left behind must not count against the first step.
    await pipe.drained(drain_s)
    for rate in rates:
        if time.monotonic() + seconds + drain_s > deadline:
            skipped = rates[len(steps) :]
            print(f"  pipeline: time budget spent, skipping {skipped}", flush=True)
            break
        result = await step(pipe, rate, seconds, drain_s)
        steps.append(result)
        print(f"  pipeline {rate:>8,.0f}/s: {result['verdict']}", flush=True)
        if not result["sustained"] or not result["drained"]:
            break
    sustained = [s["rate"] for s in steps if s["sustained"]]
    return {
        "steps": steps,
        "max_sustained_rate": max(sustained) if sustained else None,
        "skipped_for_time": skipped,
    }
