"""The benchmark's cluster section, its pure parts: the CPU split per node, the ratios to the single
node, the printed table, and the run's settings on a private Redis. The section itself runs with
`make bench` (`python -m bench --only cluster`)."""

from __future__ import annotations

from typing import Any

from bench.cluster import SINGLE, net_of_idle, split_cpu, summarise
from bench.environment import BenchEnv
from bench.report import cluster_lines

CLUSTER_NODES = {"7001": "master", "7002": "master", "7003": "master", "7004": "replica"}


def _run(
    backend: str, nodes: dict[str, str], stage_cpu: dict[str, float], **extra: Any
) -> dict[str, Any]:
    return {
        "backend": backend,
        "nodes": nodes,
        "detector": {
            "per_s": extra.get("per_s", 1000),
            "complete": True,
            "signals": 10,
            "cpu_ms_per_1000_items": stage_cpu,
        },
        "pipeline": {
            "max_sustained_rate": 500,
            "idle_ms_per_s": {},
            "steps": [
                {
                    "rate": 500,
                    "cpu_orders": 5000,
                    "cpu_window_s": 10,
                    "cpu_ms_per_1000_orders": extra.get("pipe_cpu", stage_cpu),
                }
            ],
            "consistency": extra.get(
                "consistency",
                {
                    "orders_ingested": 5,
                    "postgres_orders_added": 5,
                    "signals_written": 6,
                    "postgres_signals_added": 6,
                    "signals_delivered": 6,
                },
            ),
        },
    }


def _runs() -> list[dict[str, Any]]:
    single = _run(SINGLE, {"6001": "master"}, {"detector#1": 300.0, "redis:6001": 60.0})
    cluster_cpu = {
        "detector#1": 200.0,
        "detector#2": 200.0,
        "redis:7001": 30.0,
        "redis:7002": 20.0,
        "redis:7003": 10.0,
        "redis:7004": 15.0,
    }
    cluster = _run("cluster N=4", CLUSTER_NODES, cluster_cpu, per_s=800)
    return [single, cluster]


def test_split_cpu_separates_services_masters_and_replicas() -> None:
    cpu = {
        "store": 100.0,
        "detector": 200.0,
        "simulator": 50.0,
        "postgres": 40.0,
        "bench": 10.0,
        "redis:7001": 30.0,
        "redis:7002": 20.0,
        "redis:7003": 10.0,
        "redis:7004": 15.0,
    }
    split = split_cpu(cpu, CLUSTER_NODES)
    assert split["services"] == 300
    assert split["redis"] == 75
    assert split["redis_masters"] == {"7001": 30.0, "7002": 20.0, "7003": 10.0}
    assert split["redis_busiest"] == 30
    assert split["redis_replicas"] == 15
    assert split["other"] == 100  # the feed, Postgres and the bench


def test_net_of_idle_takes_off_what_the_idle_processes_use_per_order() -> None:
    # 20 ms/s idle at 500 orders/s is 40 ms of every 1,000 orders' 100.
    assert net_of_idle({"redis:7001": 100.0, "store": 50.0}, {"redis:7001": 20.0}, 500) == {
        "redis:7001": 60.0,
        "store": 50.0,
    }
    assert net_of_idle({"store": 10.0}, {"store": 20.0}, 500) == {"store": 0.0}
    assert net_of_idle({"store": 10.0}, {"store": 20.0}, 0) == {"store": 10.0}


def test_summary_sets_each_backend_against_the_single_node() -> None:
    summary = summarise(_runs())
    single, cluster = summary[SINGLE]["detector"], summary["cluster N=4"]["detector"]
    assert single["ratios"] == dict.fromkeys(
        ("per_s", "services", "redis", "redis_busiest", "redis_ceiling_per_s"), 1.0
    )
    assert cluster["services"] == 400 and cluster["redis"] == 75
    assert cluster["ratios"]["per_s"] == 0.8
    assert cluster["ratios"]["redis_busiest"] == 0.5  # 30 ms against the single node's 60
    # One core per node: the busiest node's 30 ms per 1,000 orders caps Redis at 33,333/s.
    assert cluster["redis_ceiling_per_s"] == 33_333
    assert cluster["ratios"]["redis_ceiling_per_s"] == 2.0
    assert summary["cluster N=4"]["pipeline"]["cpu_rate"] == 500


def test_the_pipeline_figures_are_net_of_idle() -> None:
    runs = _runs()
    # 5 ms/s idle on the busiest master, 5,000 orders in 10 s: 10 of its 30 ms per 1,000.
    runs[1]["pipeline"]["idle_ms_per_s"] = {"redis:7001": 5.0, "redis:7002": 1.0}
    pipeline = summarise(runs)["cluster N=4"]["pipeline"]
    assert pipeline["redis_masters"]["7001"] == 20
    assert pipeline["redis_busiest"] == 20
    assert pipeline["idle_redis_ms_per_s"] == 6


def test_a_failed_backend_is_left_out_of_the_summary() -> None:
    runs = [*_runs(), {"backend": "cluster N=1", "error": "RuntimeError: no"}]
    assert set(summarise(runs)) == {SINGLE, "cluster N=4"}
    # A stage that timed out gives no figure (its CPU covers part of the orders only).
    runs[1]["detector"]["complete"] = False
    assert set(summarise(runs)["cluster N=4"]) == {"pipeline"}
    lines = cluster_lines(
        {"items": 1, "replicas": 2, "runs": runs, "summary": summarise(runs), "placement": {}}
    )
    assert "  cluster N=4: the detector stage did not drain in time" in lines


def test_the_table_lists_backends_in_run_order_with_ratios_and_placement() -> None:
    runs = _runs()
    runs[1]["detector"]["signals"] = 9
    runs[1]["pipeline"]["consistency"]["postgres_orders_added"] = 4
    cluster = {
        "items": 10_000,
        "replicas": 2,
        "runs": [runs[1], runs[0]],  # as a JSON file with sorted keys might hold them
        "summary": summarise(runs),
        "placement": {"cluster N=4": {"orders.raw.0": 7001, "signals": 7002}},
    }
    lines = cluster_lines(cluster)
    text = "\n".join(lines)
    rows = [line.split()[:3] for line in lines if line.startswith(("  cluster", "  single"))]
    # Stage rows then pipeline rows, each in the order the backends ran.
    assert [" ".join(row[:2]) for row in rows] == ["cluster N=4", "single node"] * 2
    assert "SIGNALS DIFFER" in text  # 9 signals on the cluster, 10 on the single node
    pipeline_rows = [line for line in lines if line.endswith(("  yes", "  NO"))]
    assert [row.split()[-1] for row in pipeline_rows] == ["NO", "yes"]  # the cluster lost one
    assert "30 [raw.0], 20 [signals], 10 []" in text
    assert "cluster N=4 33,333 (x2.00)" in text


def test_a_private_redis_gets_the_default_namespace_and_its_own_settings() -> None:
    env = BenchEnv("redis://127.0.0.1:6379/0", "postgresql://x/y", "ab12")
    first = env.namespace("det")
    assert first.startswith("benchab12-1det")
    cluster = env.on("redis://127.0.0.1:7001/0", {7001: "master"}, cluster=True, partitions=4)
    assert cluster.namespace("det") == ""  # keys where a default deployment's land
    assert cluster.streams("").partitions == 4
    assert cluster.redis_settings() == {
        "REDIS_URL": "redis://127.0.0.1:7001/0",
        "REDIS_CLUSTER": "true",
        "STREAM_PARTITIONS": "4",
    }
    # The copies share the scenario count: feed seeds never repeat within a run.
    assert env.scenario() == 3
    assert env.redis_settings()["REDIS_CLUSTER"] == "false"
