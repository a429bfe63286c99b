"""The pipeline on a Redis Cluster, against one Redis, in the same session (section `cluster`).

Three backends, each a private set of `redis-server` processes on this host started for the
section (same binary, same options; nothing else writes to them, so `INFO cpu` of each node is
this section's work alone):

- `single node`: one Redis, one partition: the suite's usual layout;
- `cluster N=1`: `devtools/cluster.py`'s 3 masters + 3 replicas, `REDIS_CLUSTER=true`, one
  partition (`orders.raw` in one slot, `signals` and the detector state in another);
- `cluster N=4`: the same cluster, `STREAM_PARTITIONS=4` (4 wallet + 4 token lanes, each its own
  slot, forwarded to `signals` through their outboxes).

Each backend runs the same two measurements as the single-node sections, with the default
namespace (so keys land on the nodes a default deployment's do) and Redis emptied before each:
the detector stage (the same pre-built orders everywhere, the same replicas) and the pipeline at
fixed rates. CPU is read per process and per Redis node, and each backend is set against the
single node: orders/s, and CPU per 1,000 orders split into services and Redis, with the busiest
master on its own. On one host the cluster cannot be faster (its nodes share the same cores); the
busiest master's CPU per order is what bounds a cluster whose nodes have machines of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import stages, throughput
from bench.environment import BenchEnv
from bench.fixtures import SPREAD_MARKETS, dome_orders
from bench.pipeline import Pipeline
from devtools.cluster import Cluster, redis_cluster
from devtools.servers import free_port, port_open
from shared.redis_streams import connect
from shared.streams import Streams

SINGLE = "single node"
SERVICES = ("ingestor", "detector", "store", "notifier")
START_TIMEOUT_S = 20.0
# Services just healthy may still be settling (heap freeze, registry load, first reads).
IDLE_SETTLE_S = 1.0


@dataclass(frozen=True)
class ClusterPlan:
    # Detector stage: pre-built orders (the same on every backend) and detector replicas.
    items: int
    replicas: int
    # Pipeline: the rates stepped through (until one is not sustained), each for step_s.
    rates: tuple[float, ...]
    step_s: float
    drain_s: float
    # How long the idle CPU is read before the first step (see `idle_cpu`).
    idle_s: float = 3.0
    partitions: tuple[int, ...] = (1, 4)


def _log(text: str) -> None:
    print(f"[bench] cluster: {text}", flush=True)


@contextlib.contextmanager
def standalone_redis() -> Iterator[int]:
    """A private redis-server with the cluster nodes' options (no persistence), on a free port."""
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("redis-server is not installed: the cluster section starts its own")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bb-bench-redis-") as directory:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", directory]
        command += ["--logfile", str(Path(directory) / "redis.log")]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            _wait_listening(proc, port)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the bench's private redis-server did not listen on {port}")
        time.sleep(0.02)


def cluster_nodes(cluster: Cluster) -> dict[int, str]:
    return {
        **dict.fromkeys(cluster.masters(), "master"),
        **dict.fromkeys(cluster.replicas(), "replica"),
    }


def placement(cluster: Cluster, streams: Streams) -> dict[str, int]:
    """Master port of each lane's slot and of `signals`: where the load should land."""
    names = [lane.stream for lane in streams.lanes()] + [streams.signals]
    return {name: cluster.master_of(name) for name in names}


async def _flush(env: BenchEnv) -> None:
    """Empty a private Redis between scenarios (each uses the default namespace)."""
    for port, role in env.redis_nodes.items():
        if role == "master":
            client = connect(f"redis://127.0.0.1:{port}/0")
            try:
                await client.flushall()
            finally:
                await client.aclose()


async def idle_cpu(pipe: Pipeline, seconds: float) -> dict[str, float]:
    """CPU ms per second each process and node uses with the services up and no feed: their
    polling, timeouts and the cluster's own gossip, paid whatever the rate."""
    await asyncio.sleep(IDLE_SETTLE_S)
    first, start = await pipe.cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    last, elapsed = await pipe.cpu(), time.monotonic() - start
    return {name: round(1000 * (last[name] - first[name]) / elapsed, 2) for name in first}


async def _pipeline(env: BenchEnv, plan: ClusterPlan, tag: str) -> dict[str, Any]:
    pipe = Pipeline(env, tag=tag)
    try:
        await pipe.start()
        idle = await idle_cpu(pipe, plan.idle_s)
        rates = list(plan.rates)
        stepped = await throughput.step_up(pipe, rates, plan.step_s, plan.drain_s, float("inf"))
        stepped["idle_ms_per_s"] = idle
        stepped["consistency"] = await pipe.consistency()
    finally:
        await pipe.stop()
    return stepped


async def _detector(
    env: BenchEnv, label: str, plan: ClusterPlan, orders: list[dict[str, Any]]
) -> dict[str, Any]:
    _log(f"{label}: detector stage, {len(orders):,} orders, {plan.replicas} replica(s)")
    await _flush(env)
    return await stages.detector(env, len(orders), plan.replicas, orders=orders)


async def _pipeline_on(env: BenchEnv, label: str, plan: ClusterPlan) -> dict[str, Any]:
    _log(f"{label}: pipeline at {', '.join(f'{r:,.0f}' for r in plan.rates)}/s")
    await _flush(env)
    return await _pipeline(env, plan, "cl-" + label.replace(" ", "").replace("=", "") + "-")


async def _guarded(
    run: Awaitable[dict[str, Any]], label: str, errors: dict[str, list[str]]
) -> dict[str, Any] | None:
    """One measurement's failure is a line saying why, not the end of the section."""
    try:
        return await run
    except Exception as exc:
        traceback.print_exception(exc)
        _log(f"{label} FAILED: {type(exc).__name__}: {exc}")
        errors.setdefault(label, []).append(f"{type(exc).__name__}: {exc}"[:300])
        return None


async def _measure_all(backends: dict[str, BenchEnv], plan: ClusterPlan) -> list[dict[str, Any]]:
    """Each measurement on every backend back to back, so that paired figures are taken minutes
    apart at most (the load of a shared machine drifts)."""
    orders = dome_orders(plan.items, secrets.token_hex(8), SPREAD_MARKETS)
    errors: dict[str, list[str]] = {}
    stage = {
        b: await _guarded(_detector(e, b, plan, orders), b, errors) for b, e in backends.items()
    }
    piped = {b: await _guarded(_pipeline_on(e, b, plan), b, errors) for b, e in backends.items()}
    return [
        {
            "backend": label,
            "cluster": env.cluster,
            "partitions": env.partitions,
            "nodes": {str(port): role for port, role in env.redis_nodes.items()},
            "detector": stage[label],
            "pipeline": piped[label],
            **({"error": "; ".join(errors[label])} if label in errors else {}),
        }
        for label, env in backends.items()
    ]


async def measure(env: BenchEnv, plan: ClusterPlan) -> dict[str, Any]:
    """Every backend on the same orders; the figures and their ratios to the single node."""
    with standalone_redis() as port, redis_cluster() as cluster:
        nodes = cluster_nodes(cluster)
        single = f"redis://127.0.0.1:{port}/0"
        backends = {SINGLE: env.on(single, {port: "master"}, cluster=False, partitions=1)}
        for partitions in plan.partitions:
            label = f"cluster N={partitions}"
            backends[label] = env.on(cluster.url, nodes, cluster=True, partitions=partitions)
        layouts = {
            label: placement(cluster, backend.streams(""))
            for label, backend in backends.items()
            if backend.cluster
        }
        runs = await _measure_all(backends, plan)
    return {
        "items": plan.items,
        "replicas": plan.replicas,
        "masters": [str(p) for p, role in nodes.items() if role == "master"],
        "placement": layouts,
        "runs": runs,
        "summary": summarise(runs),
    }


def split_cpu(cpu_ms: Mapping[str, float], nodes: Mapping[str, str]) -> dict[str, Any]:
    """CPU ms per 1,000 orders: the services, Redis (every node; each master; the busiest
    master; the replicas together) and the rest (feed, Postgres, the bench itself)."""
    masters = {p: cpu_ms.get(f"redis:{p}", 0.0) for p, role in nodes.items() if role == "master"}
    replicas = sum(cpu_ms.get(f"redis:{p}", 0.0) for p, role in nodes.items() if role == "replica")
    services = sum(ms for name, ms in cpu_ms.items() if name.split("#")[0] in SERVICES)
    redis = sum(masters.values()) + replicas
    return {
        "services": round(services, 1),
        "redis": round(redis, 1),
        "redis_masters": masters,
        "redis_busiest": round(max(masters.values(), default=0.0), 1),
        "redis_replicas": round(replicas, 1),
        "other": round(sum(cpu_ms.values()) - services - redis, 1),
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 2) if value and base else None


def _figures(run: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per measurement: throughput (orders/s) and the CPU split per 1,000 orders."""
    nodes = run.get("nodes", {})
    out: dict[str, dict[str, Any]] = {}
    stage = run.get("detector") or {}
    # A stage that timed out has its CPU over part of the orders: no figure rather than a low one.
    if stage.get("complete") and stage.get("cpu_ms_per_1000_items"):
        out["detector"] = {
            "per_s": stage.get("per_s"),
            **split_cpu(stage["cpu_ms_per_1000_items"], nodes),
        }
    pipeline = run.get("pipeline") or {}
    if (pipeline.get("steps") or [{}])[0].get("cpu_ms_per_1000_orders"):
        out["pipeline"] = _pipeline_figures(pipeline, nodes)
    return out


def _pipeline_figures(pipeline: Mapping[str, Any], nodes: Mapping[str, str]) -> dict[str, Any]:
    # At the first rate, which every backend ran: per-order CPU compared at equal load.
    first = pipeline["steps"][0]
    idle = pipeline.get("idle_ms_per_s", {})
    orders_per_s = first.get("cpu_orders", 0) / first.get("cpu_window_s", 1)
    return {
        "per_s": pipeline.get("max_sustained_rate"),
        "cpu_rate": first["rate"],
        "idle_redis_ms_per_s": round(sum(v for k, v in idle.items() if k.startswith("redis")), 1),
        **split_cpu(net_of_idle(first["cpu_ms_per_1000_orders"], idle, orders_per_s), nodes),
    }


def net_of_idle(
    cpu_ms: Mapping[str, float], idle_ms_per_s: Mapping[str, float], orders_per_s: float
) -> dict[str, float]:
    """CPU ms per 1,000 orders less what each process uses idle over the time those orders took:
    at a low rate that fixed share (six cluster nodes' gossip, every lane's blocking reads) would
    pass for a cost per order; at saturation it is mostly gone."""
    if orders_per_s <= 0:
        return dict(cpu_ms)
    return {
        name: round(max(0.0, ms - 1000 * idle_ms_per_s.get(name, 0.0) / orders_per_s), 1)
        for name, ms in cpu_ms.items()
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each backend's figures and their ratios to the single node's; the Redis-bound ceiling
    (orders/s one core per node carries: 1e6 / the busiest node's CPU ms per 1,000 orders)."""
    # A backend whose measurement failed keeps the figures of the one that did not.
    figures = {r["backend"]: found for r in runs if (found := _figures(r))}
    base = figures.get(SINGLE, {})
    for per_run in figures.values():
        for kind, fig in per_run.items():
            ref = base.get(kind, {})
            fig["redis_ceiling_per_s"] = (
                round(1e6 / fig["redis_busiest"]) if fig["redis_busiest"] else None
            )
            fig["ratios"] = {
                key: _ratio(fig.get(key), ref.get(key))
                for key in ("per_s", "services", "redis", "redis_busiest", "redis_ceiling_per_s")
            }
    return figures
