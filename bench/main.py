"""`python -m bench`: run the benchmark, print the table, write `bench/results/latest.json`.

    python -m bench              # the full run (about 9-12 minutes on 2 cores)
    python -m bench --quick      # a smoke run of about 4 minutes: same scenarios, shorter
    python -m bench --only ceilings,stages
    python -m bench --only cluster   # one Redis against a Redis Cluster, 1 and 4 partitions
    python -m bench profile detector --rate 5000 --seconds 10
    python -m bench profile detector --stage 40000 --seconds 5

Order: ceilings, stages alone, then the whole pipeline (latency at each rate, then the rate
step-up), then memory and consistency, the Polygon source, and last the cluster comparison.
Sections run one after another, never side by side, so each has the machine to itself (apart from
whatever else runs on it: see the load averages).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import traceback
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import ceilings, chain, cluster, latency, profiling, sources, stages, throughput
from bench.cluster import ClusterPlan
from bench.environment import (
    BenchEnv,
    backing_servers,
    bench_environment,
    load_average,
    machine_facts,
    other_test_runs,
)
from bench.pipeline import Pipeline
from bench.report import RESULTS_DIR, add_ratios, goals, table, write

SECTIONS = ("ceilings", "stages", "latency", "pipeline", "chain", "cluster", "sources")


@dataclass(frozen=True)
class Plan:
    mode: str
    ceiling_s: float
    copy_rows: int
    latency_rates: tuple[float, ...]
    latency_s: float
    pipeline_rates: tuple[float, ...]
    step_s: float
    drain_s: float
    ingest_items: int
    burst_items: int
    detector_items: int
    replicas: tuple[int, ...]
    hot_replicas: tuple[int, ...]
    store_items: int
    budget_s: float
    # The same detector stage and pipeline on one Redis and on a Redis Cluster (bench/cluster.py).
    cluster: ClusterPlan
    # Tracked fills per second into 2 s blocks: a few per block (20/s), and a burst of 400.
    chain_rates: tuple[float, ...] = (20.0, 200.0)
    chain_s: float = 20.0
    chain_confirmations: tuple[int, ...] = (0, 2)
    # Fill-to-signal latency per source (bench/sources.py): a trader-like rate, long enough for a
    # polled source's cycles.
    sources_rate: float = 5.0
    sources_s: float = 30.0


FULL = Plan(
    mode="full",
    ceiling_s=3,
    copy_rows=50_000,
    latency_rates=(1000, 5000),
    latency_s=15,
    pipeline_rates=(2000, 5000, 10_000, 15_000, 20_000, 30_000),
    step_s=12,
    drain_s=30,
    ingest_items=60_000,
    burst_items=30_000,
    detector_items=80_000,
    replicas=(1, 2, 4),
    hot_replicas=(1, 2),
    store_items=40_000,
    budget_s=570,
    cluster=ClusterPlan(items=40_000, replicas=2, rates=(500, 1000, 2000), step_s=10, drain_s=30),
)
QUICK = Plan(
    mode="quick",
    ceiling_s=1,
    copy_rows=20_000,
    latency_rates=(1000, 5000),
    latency_s=4,
    pipeline_rates=(2000, 5000, 10_000),
    step_s=4,
    drain_s=15,
    ingest_items=20_000,
    burst_items=10_000,
    detector_items=20_000,
    replicas=(1, 2, 4),
    hot_replicas=(1, 2),
    store_items=10_000,
    budget_s=150,
    cluster=ClusterPlan(items=10_000, replicas=2, rates=(500,), step_s=4, drain_s=15),
    chain_s=6,
    sources_s=12.0,
)


def _log(text: str) -> None:
    print(f"[bench] {text}", flush=True)


async def run_ceilings(env: BenchEnv, plan: Plan) -> dict[str, Any]:
    _log("ceilings")
    redis_figures = await ceilings.xadd_and_readgroup(env, plan.ceiling_s)
    return {**redis_figures, **await ceilings.copy_rows(env, plan.copy_rows)}


def _failure(exc: BaseException) -> str:
    traceback.print_exception(exc)
    return f"{type(exc).__name__}: {exc}"[:300]


async def _stage(
    name: str, ceiling: str, items: int, run: Awaitable[dict[str, Any]], replicas: int = 1
) -> dict[str, Any]:
    """One stage's result, or a row saying it failed and why: one broken stage (say a service
    mid-change) must not take the other figures down with it."""
    _log(f"stages: {name}" + (f" x{replicas}" if replicas > 1 else ""))
    try:
        return await run
    except Exception as exc:
        return {
            "stage": name,
            "replicas": replicas,
            "items": items,
            "seconds": None,
            "per_s": None,
            "ceiling": ceiling,
            "complete": False,
            "error": _failure(exc),
        }


async def run_stages(env: BenchEnv, plan: Plan) -> list[dict[str, Any]]:
    results = [
        await _stage(
            "ingestor (in-process parse+dedupe+publish)",
            "xadd",
            plan.ingest_items,
            stages.ingestor_inprocess(env, plan.ingest_items),
        ),
        await _stage(
            "ingestor process (WebSocket burst)",
            "xadd",
            plan.burst_items,
            stages.ingestor_burst(env, plan.burst_items),
        ),
    ]
    for replicas in plan.replicas:
        results.append(
            await _stage(
                "detector",
                "readgroup_ack",
                plan.detector_items,
                stages.detector(env, plan.detector_items, replicas),
                replicas,
            )
        )
    for replicas in plan.hot_replicas:
        results.append(
            await _stage(
                stages.HOT_DETECTOR,
                "readgroup_ack",
                plan.detector_items,
                stages.detector(env, plan.detector_items, replicas, markets=1),
                replicas,
            )
        )
    results.append(
        await _stage(
            "store (orders + signals rows)",
            "copy",
            2 * plan.store_items,
            stages.store(env, plan.store_items),
        )
    )
    return results


def _merge_peaks(peaks: dict[str, dict[str, float]], memory: dict[str, dict[str, float]]) -> None:
    for name, mem in memory.items():
        known = peaks.get(name)
        if known is None or mem["peak_mb"] > known["peak_mb"]:
            peaks[name] = mem


async def run_pipeline(
    env: BenchEnv, plan: Plan, sections: set[str], deadline: float
) -> dict[str, Any]:
    _log("pipeline: starting the services")
    pipe = Pipeline(env)
    out: dict[str, Any] = {}
    peaks: dict[str, dict[str, float]] = {}
    steady: dict[str, dict[str, float]] = {}
    try:
        await pipe.start()
        if "latency" in sections:
            out["latency"] = []
            for rate in plan.latency_rates:
                _log(f"latency at {rate:,.0f}/s for {plan.latency_s:g}s")
                result = await latency.measure(pipe, rate, plan.latency_s)
                out["latency"].append(result)
                _merge_peaks(peaks, result["memory"])
                steady = result["memory"]
        if "pipeline" in sections:
            _log("pipeline: stepping the rate up")
            out["pipeline"] = await throughput.step_up(
                pipe, list(plan.pipeline_rates), plan.step_s, plan.drain_s, deadline
            )
            for step in out["pipeline"]["steps"]:
                _merge_peaks(peaks, step["memory"])
                if step["sustained"]:
                    steady = step["memory"]
        _merge_peaks(peaks, {name: vars(m) for name, m in pipe.memory().items()})
        out["memory"] = {"steady": steady, "peak": peaks}
        out["consistency"] = await pipe.consistency()
    finally:
        await pipe.stop()
    return out


async def run_chain(env: BenchEnv, plan: Plan) -> list[dict[str, Any]]:
    out = []
    for rate in plan.chain_rates:
        for confirmations in plan.chain_confirmations:
            _log(
                f"chain: block-to-delivered at {rate:,.0f}/s for {plan.chain_s:g}s, "
                f"{confirmations} confirmation(s)"
            )
            out.append(await chain.measure(env, rate, plan.chain_s, confirmations))
    return out


async def run_sources(env: BenchEnv, plan: Plan) -> list[dict[str, Any]]:
    out = []
    for profile in sources.PROFILES:
        _log(f"sources: {profile.name}, match -> subscriber receipt at {plan.sources_rate:g}/s")
        out.append(await sources.measure(env, profile, plan.sources_rate, plan.sources_s))
    return out


async def run(plan: Plan, sections: set[str], note: str, out_path: Path) -> dict[str, Any]:
    started = time.monotonic()
    with backing_servers() as (redis_url, server_url):
        async with bench_environment(redis_url, server_url) as env:
            results: dict[str, Any] = {
                "mode": plan.mode,
                "note": note,
                "machine": await machine_facts(env),
                "plan": vars(plan),
            }
            errors: dict[str, str] = {}
            if "ceilings" in sections:
                try:
                    results["ceilings"] = await run_ceilings(env, plan)
                except Exception as exc:
                    errors["ceilings"] = _failure(exc)
            if "stages" in sections:
                results["stages"] = await run_stages(env, plan)
            if sections & {"latency", "pipeline"}:
                deadline = started + plan.budget_s
                try:
                    results.update(await run_pipeline(env, plan, sections, deadline))
                except Exception as exc:
                    errors["pipeline"] = _failure(exc)
            if "chain" in sections:
                try:
                    results["chain"] = await run_chain(env, plan)
                except Exception as exc:
                    errors["chain"] = _failure(exc)
            if "sources" in sections:
                try:
                    results["sources"] = await run_sources(env, plan)
                except Exception as exc:
                    errors["sources"] = _failure(exc)
            if "cluster" in sections:
                try:
                    results["cluster"] = await cluster.measure(env, plan.cluster)
                except Exception as exc:
                    errors["cluster"] = _failure(exc)
            results["errors"] = errors
    results["load_average_at_end"] = load_average()
    results["pytest_processes_at_end"] = other_test_runs()
    results["duration_s"] = round(time.monotonic() - started, 1)
    add_ratios(results)
    results["goals"] = goals(results)
    print(table(results), flush=True)
    write(results, out_path)
    _log(f"results written to {out_path} in {results['duration_s']:.0f}s")
    return results


async def run_profile(service: str, rate: float, seconds: float, stage_items: int) -> None:
    with backing_servers() as (redis_url, server_url):
        async with bench_environment(redis_url, server_url) as env:
            if stage_items:
                text = await profiling.profile_stage(
                    env, service, stage_items, seconds, RESULTS_DIR
                )
                print(text)
                return
            pipe = Pipeline(env, tag="profile-")
            try:
                await pipe.start()
                print(await profiling.profile_service(pipe, service, rate, seconds, RESULTS_DIR))
            finally:
                await pipe.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 4 minutes")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--note", default="", help="kept in the results, e.g. 'under contention'")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.json")
    sub = parser.add_subparsers(dest="command")
    prof = sub.add_parser("profile", help="py-spy profile of one service under load")
    prof.add_argument("service", choices=profiling.SERVICES)
    prof.add_argument("--rate", type=float, default=5000)
    prof.add_argument("--seconds", type=float, default=10)
    prof.add_argument(
        "--stage",
        type=int,
        default=0,
        metavar="N",
        help="profile the detector or store stage alone on N pre-filled entries",
    )
    args = parser.parse_args()
    if args.command == "profile":
        asyncio.run(run_profile(args.service, args.rate, args.seconds, args.stage))
        return
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if unknown := sections - set(SECTIONS):
        sys.exit(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    asyncio.run(run(QUICK if args.quick else FULL, sections, args.note, args.out))
