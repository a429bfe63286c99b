"""The results: ratios to the ceilings, the issue's goals, the printed table and the JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bench.stats import ratio

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CEILING_KEYS = {
    "xadd": "xadd_per_s",
    "readgroup_ack": "readgroup_ack_per_s",
    "copy": "copy_rows_per_s",
}
MEMORY_GOAL_MB = 150.0


def add_ratios(results: dict[str, Any]) -> None:
    """Every throughput figure also as a fraction of the ceiling that bounds it."""
    ceilings = results.get("ceilings", {})
    for stage in results.get("stages", []):
        stage["ratio"] = ratio(stage.get("per_s"), ceilings.get(CEILING_KEYS[stage["ceiling"]]))
    pipeline = results.get("pipeline")
    if pipeline:
        # Every order is read by two groups and makes at least one signal read by one more, so
        # one group's XREADGROUP + XACK rate is the loosest bound the whole pipeline can meet.
        pipeline["ceiling"] = "readgroup_ack"
        pipeline["ratio"] = ratio(
            pipeline.get("max_sustained_rate"), ceilings.get("readgroup_ack_per_s")
        )
        for step in pipeline.get("steps", []):
            step["ratio"] = ratio(step.get("ingested_per_s"), ceilings.get("readgroup_ack_per_s"))


def _latency_at(results: dict[str, Any], rate: float) -> dict[str, Any] | None:
    return next((r for r in results.get("latency", []) if r["rate"] == rate), None)


def _goal(name: str, figure: str, met: bool | None) -> dict[str, Any]:
    return {"goal": name, "figure": figure, "met": met}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Where the issue's goals stand in this run (None: not measured)."""
    out = []
    for rate, bound in ((1000, 10.0), (5000, 50.0)):
        run = _latency_at(results, rate)
        name = f"p99 <= {bound:g} ms at {rate:,}/s, every order signalled"
        if run is None or run.get("p99_ms") is None:
            out.append(_goal(name, "not measured", None))
            continue
        p99 = float(run["p99_ms"])
        figure = f"p99 {p99} ms, {run['received']:,}/{run['expected']:,} orders"
        out.append(_goal(name, figure, p99 <= bound and run["missing"] == 0))
    best = (results.get("pipeline") or {}).get("max_sustained_rate")
    out.append(
        _goal(
            ">= 20,000 orders/s sustained end to end",
            f"{best:,.0f}/s" if best else "none sustained",
            None if "pipeline" not in results else bool(best and best >= 20_000),
        )
    )
    detectors = [s for s in results.get("stages", []) if s["stage"] == "detector"]
    one = next((s for s in detectors if s["replicas"] == 1), None)
    out.append(
        _goal(
            "detector (1 replica, 1,000 markets) >= 0.5 of XREADGROUP+XACK ceiling",
            "not measured" if not one else f"{one.get('ratio')}",
            None if not one or one.get("ratio") is None else one["ratio"] >= 0.5,
        )
    )
    by_replicas = {s["replicas"]: s.get("per_s") or 0 for s in detectors}
    cores = (results.get("machine") or {}).get("cores") or 2
    # "Until the cores are full": compare one replica with as many replicas as there are cores.
    full = max((n for n in by_replicas if n <= cores), default=1)
    out.append(
        _goal(
            f"detector rate rises with replicas up to {cores} (the cores)",
            ", ".join(f"{n}x {r:,}/s" for n, r in sorted(by_replicas.items())) or "not measured",
            None if 1 not in by_replicas or full == 1 else by_replicas[full] > by_replicas[1],
        )
    )
    steady = (results.get("memory") or {}).get("steady", {})
    services = {k: v for k, v in steady.items() if k != "simulator"}
    worst = max(services.items(), key=lambda kv: kv[1]["rss_mb"], default=None)
    out.append(
        _goal(
            f"each service < {MEMORY_GOAL_MB:g} MB resident at steady state",
            "not measured" if worst is None else f"largest: {worst[0]} {worst[1]['rss_mb']} MB",
            None if worst is None else worst[1]["rss_mb"] < MEMORY_GOAL_MB,
        )
    )
    return out


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}" if isinstance(value, int | float) else str(value)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _stage_flag(stage: dict[str, Any]) -> str:
    if stage.get("error"):
        return f"  FAILED: {stage['error']}"
    return "" if stage.get("complete") else "  INCOMPLETE (timed out or rows missing)"


def _cpu_lines(steps: list[dict[str, Any]]) -> list[str]:
    """CPU per 1,000 orders by process, for the highest step that was sustained (else the first)."""
    chosen = [s for s in steps if s.get("sustained")] or steps[:1]
    cpu = chosen[-1].get("cpu_ms_per_1000_orders") if chosen else None
    if not cpu:
        return []
    total = sum(cpu.values())
    ranked = sorted(cpu.items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{name} {ms:,.0f}" for name, ms in ranked)
    return [
        f"  CPU ms per 1,000 orders at {_n(chosen[-1]['rate'])}/s: {parts}; total {total:,.0f} "
        f"(so {1e6 / total if total else 0:,.0f} orders/s per fully used core)"
    ]


def _x(ratio: Any) -> str:
    return "-" if ratio is None else f"x{ratio:.2f}"


def _consistent(consistency: dict[str, Any] | None) -> str:
    if not consistency:
        return "-"
    c = consistency
    orders_ok = c["orders_ingested"] == c["postgres_orders_added"]
    signals = {c["signals_written"], c["postgres_signals_added"], c["signals_delivered"]}
    return "yes" if orders_ok and len(signals) == 1 else "NO"


def _masters_line(label: str, fig: dict[str, Any], placement: dict[str, int]) -> str:
    """Each master's CPU, busiest first, with the lanes (and `signals`) its slots hold."""
    held: dict[str, list[str]] = {}
    for stream, port in placement.items():
        held.setdefault(str(port), []).append(stream.replace("orders.", ""))
    ranked = sorted(fig["redis_masters"].items(), key=lambda kv: -kv[1])
    shares = [f"{ms:,.0f} [{' '.join(held.get(port, []))}]" for port, ms in ranked]
    return f"{label}: " + ", ".join(shares)


def _in_order(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each backend's figures in the order they ran (the JSON file sorts keys)."""
    summary = cluster["summary"]
    return [
        (r["backend"], summary[r["backend"]]) for r in cluster["runs"] if r["backend"] in summary
    ]


def _cluster_stage(cluster: dict[str, Any]) -> list[str]:
    runs = {r["backend"]: r for r in cluster["runs"]}
    lines = [
        f"  detector stage: {_n(cluster['items'])} orders over 1,000 markets, "
        f"{cluster['replicas']} replicas; CPU ms per 1,000 orders",
        f"  {'backend':<12} {'orders/s':>9} {'':>6} {'services':>9} {'Redis':>7} "
        f"{'busiest node':>12} {'':>6} {'replicas':>8} {'signals':>8}",
    ]
    base_signals = (runs.get("single node") or {}).get("detector", {}).get("signals")
    for backend, per_run in _in_order(cluster):
        fig = per_run.get("detector")
        if not fig:
            continue
        signals = runs[backend]["detector"].get("signals")
        lines.append(
            f"  {backend:<12} {_n(fig['per_s']):>9} {_x(fig['ratios']['per_s']):>6} "
            f"{_n(fig['services']):>9} {_n(fig['redis']):>7} {_n(fig['redis_busiest']):>12} "
            f"{_x(fig['ratios']['redis_busiest']):>6} {_n(fig['redis_replicas']):>8} "
            f"{_n(signals):>8}" + ("" if signals == base_signals else "  SIGNALS DIFFER")
        )
    return lines


def _cluster_pipeline(cluster: dict[str, Any]) -> list[str]:
    runs = {r["backend"]: r for r in cluster["runs"]}
    rates = {f["pipeline"]["cpu_rate"] for _, f in _in_order(cluster) if "pipeline" in f}
    idle = ", ".join(
        f"{backend} {f['pipeline']['idle_redis_ms_per_s']:g}"
        for backend, f in _in_order(cluster)
        if "pipeline" in f
    )
    lines = [
        f"  pipeline: CPU ms per 1,000 orders at {', '.join(_n(r) for r in sorted(rates))}/s, "
        f"net of what each process uses idle (Redis idle, ms/s: {idle})",
        f"  {'backend':<12} {'sustained':>9} {'':>6} {'services':>9} {'Redis':>7} "
        f"{'busiest node':>12} {'':>6} {'replicas':>8} {'other':>8}  consistent",
    ]
    for backend, per_run in _in_order(cluster):
        fig = per_run.get("pipeline")
        if not fig:
            continue
        lines.append(
            f"  {backend:<12} {_n(fig['per_s']):>9} {'':>6} {_n(fig['services']):>9} "
            f"{_n(fig['redis']):>7} {_n(fig['redis_busiest']):>12} "
            f"{_x(fig['ratios']['redis_busiest']):>6} {_n(fig['redis_replicas']):>8} "
            f"{_n(fig['other']):>8}  {_consistent(runs[backend]['pipeline'].get('consistency'))}"
        )
    return lines


def _cluster_gain(cluster: dict[str, Any]) -> list[str]:
    """The Redis-bound ceiling of each backend, and what the cluster lifts it by."""
    lines = ["  Redis CPU per master, ms per 1,000 orders, busiest first [what its slots hold]:"]
    for kind in ("detector", "pipeline"):
        lines += [
            f"    {kind}, " + _masters_line(backend, per_run[kind], cluster["placement"][backend])
            for backend, per_run in _in_order(cluster)
            if kind in per_run and backend in cluster["placement"]
        ]
    lines.append(
        "  Across machines, each Redis node a core of its own: orders/s Redis can carry "
        "(1e6 / busiest node's ms per 1,000)"
    )
    for kind in ("detector", "pipeline"):
        parts = [
            f"{backend} {_n(fig['redis_ceiling_per_s'])}"
            + (f" ({_x(fig['ratios']['redis_ceiling_per_s'])})" if backend != "single node" else "")
            for backend, per_run in _in_order(cluster)
            if (fig := per_run.get(kind))
        ]
        if parts:
            lines.append(f"    {kind}: " + "; ".join(parts))
    return lines


def cluster_lines(cluster: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Redis Cluster (3 masters + 3 replicas) vs one Redis: private redis-servers on this host, "
        "the same orders, x = ratio to the single node",
    ]
    lines += _cluster_stage(cluster) + _cluster_pipeline(cluster) + _cluster_gain(cluster)
    for run in cluster["runs"]:
        if run.get("error"):
            lines.append(f"  {run['backend']} FAILED: {run['error']}")
        if run.get("detector") and not run["detector"].get("complete"):
            lines.append(f"  {run['backend']}: the detector stage did not drain in time")
    return lines


def source_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Fill-to-signal latency per source, then who was first and the others' lag with all on."""
    lines = [
        "",
        "Sources: trade matched -> subscriber receipt (ms), the feeds' documented delays",
        f"  {'source':>10} {'expected':>8} {'received':>8} {'p50':>7} {'p90':>7} {'p99':>7} "
        f"{'max':>7}   first to deliver",
    ]
    for r in rows:
        firsts = ", ".join(f"{name} {count}" for name, count in r["first_source"].items())
        lines.append(
            f"  {r['source']:>10} {_n(r['expected']):>8} {_n(r['received']):>8} "
            f"{_ms(r.get('p50_ms')):>7} {_ms(r.get('p90_ms')):>7} {_ms(r.get('p99_ms')):>7} "
            f"{_ms(r.get('max_ms')):>7}   {firsts}"
            + ("" if r["missing"] == 0 else f"  MISSING {r['missing']}")
        )
    for r in rows:
        behind = [lag for lag in r["lag_behind_first"] if lag["behind"]]
        if r["source"] != "all" or not behind:
            continue
        lines.append("  with every source on, each one's lag behind the first (s): p50 / p90 / max")
        for lag in behind:
            lines.append(
                f"  {lag['source']:>10} behind {lag['behind']:>5} times, first {lag['first']:>5}: "
                f"{lag['lag_p50_s']} / {lag['lag_p90_s']} / {lag['lag_max_s']}"
            )
    return lines


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"BetterBot bench ({results['mode']}), {m['date']}: {m['cores']} cores ({m['cpu']}), "
        f"Python {m['python']}, Redis {m['redis']}, Postgres {m['postgres']}, commit {m['commit']}",
        f"load average start {m['load_average_at_start']} "
        f"end {results.get('load_average_at_end')}; "
        f"pytest processes start {m.get('pytest_processes_at_start')} "
        f"end {results.get('pytest_processes_at_end')}"
        + (f"; note: {results['note']}" if results.get("note") else ""),
    ]
    c = results.get("ceilings")
    if c:
        lines += [
            "",
            "Ceilings (one Python process, redis.asyncio / asyncpg)",
            f"  XADD, pipelined              {_n(c['xadd_per_s']):>10} /s      "
            f"({c['xadd_detail']})",
            f"  XREADGROUP COUNT 500 + XACK  {_n(c['readgroup_ack_per_s']):>10} /s      "
            f"({c['readgroup_detail']})",
            f"  asyncpg COPY                 {_n(c['copy_rows_per_s']):>10} rows/s "
            f"({c['copy_detail']})",
        ]
    if results.get("latency"):
        lines += [
            "",
            "Latency, simulator send -> subscriber receipt (ms); p99 split feed/detect/deliver",
            f"  {'rate/s':>7} {'secs':>5} {'emitted/s':>9} {'expected':>8} {'received':>8} "
            f"{'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7}   feed/detect/deliver p99",
        ]
        for r in results["latency"]:
            b = r["breakdown"]
            lines.append(
                f"  {_n(r['rate']):>7} {r['seconds']:>5g} {_n(r['emitted_per_s']):>9} "
                f"{_n(r['expected']):>8} {_n(r['received']):>8} {_ms(r['p50_ms']):>7} "
                f"{_ms(r['p99_ms']):>7} {_ms(r['p999_ms']):>7} {_ms(r['max_ms']):>7}   "
                f"{_ms(b['feed']['p99_ms'])}/{_ms(b['detect']['p99_ms'])}/"
                f"{_ms(b['deliver']['p99_ms'])}"
                + ("" if r["missing"] == 0 else f"  MISSING {r['missing']}")
                + ("" if r.get("drained", True) else "  did not drain")
                + (f"  subscriber {r['subscriber_closed']}" if r.get("subscriber_closed") else "")
            )
    if results.get("chain"):
        lines += [
            "",
            "Polygon source: block mined -> subscriber receipt (ms), blocks every 2 s",
            f"  {'confirm.':>8} {'rate/s':>7} {'secs':>5} {'expected':>8} {'received':>8} "
            f"{'p50':>7} {'p99':>7} {'max':>7}",
        ]
        for r in results["chain"]:
            lines.append(
                f"  {r['confirmations']:>8} {_n(r['rate']):>7} {r['seconds']:>5g} "
                f"{_n(r['expected']):>8} {_n(r['received']):>8} {_ms(r['p50_ms']):>7} "
                f"{_ms(r['p99_ms']):>7} {_ms(r['max_ms']):>7}"
                + ("" if r["missing"] == 0 else f"  MISSING {r['missing']}")
                + ("" if r.get("drained", True) else "  did not drain")
            )
    if results.get("sources"):
        lines += source_lines(results["sources"])
    p = results.get("pipeline")
    if p:
        lines += [
            "",
            "Throughput, end to end (all services; per second over each step)",
            f"  {'target':>7} {'emitted':>8} {'ingested':>8} {'signals':>8} {'stored':>8} "
            f"{'delivered':>9} {'ratio':>6}  verdict",
        ]
        for s in p["steps"]:
            lines.append(
                f"  {_n(s['rate']):>7} {_n(s['emitted_per_s']):>8} {_n(s['ingested_per_s']):>8} "
                f"{_n(s['signalled_per_s']):>8} {_n(s['stored_per_s']):>8} "
                f"{_n(s['delivered_per_s']):>9} {_n(s.get('ratio'), 3):>6}  {s['verdict']}"
                + ("" if s["drained"] else "; did not drain")
            )
        lines += _cpu_lines(p["steps"])
        if p.get("skipped_for_time"):
            lines.append(f"  not run (time budget spent): {p['skipped_for_time']}")
        lines.append(
            f"  highest sustained: {_n(p['max_sustained_rate'])}/s "
            f"(ratio to XREADGROUP+XACK ceiling {_n(p.get('ratio'), 3)})"
        )
    if results.get("stages"):
        lines += [
            "",
            "Stages alone, from a pre-filled input",
            f"  {'stage':<44} {'repl':>4} {'items':>8} {'secs':>7} {'per s':>9} {'ceiling':>14} "
            f"{'ratio':>6}",
        ]
        for s in results["stages"]:
            lines.append(
                f"  {s['stage']:<44} {s.get('replicas', 1):>4} {_n(s['items']):>8} "
                f"{_n(s['seconds'], 2):>7} {_n(s['per_s']):>9} {s['ceiling']:>14} "
                f"{_n(s.get('ratio'), 3):>6}" + _stage_flag(s)
            )
    if results.get("cluster"):
        lines += cluster_lines(results["cluster"])
    mem = results.get("memory")
    if mem:
        lines += ["", "Memory (MiB): resident at steady state / peak resident (VmHWM) over the run"]
        for name in sorted(set(mem.get("steady", {})) | set(mem.get("peak", {}))):
            steady = mem.get("steady", {}).get(name, {}).get("rss_mb")
            peak = mem.get("peak", {}).get(name, {}).get("peak_mb")
            lines.append(f"  {name:<10} {_ms(steady):>8} / {_ms(peak):>8}")
    if results.get("consistency"):
        lines += [
            "",
            "Consistency (pipeline, after draining): "
            + ", ".join(f"{k} {v:,}" for k, v in results["consistency"].items()),
        ]
    for section, error in (results.get("errors") or {}).items():
        lines += ["", f"{section} FAILED: {error}"]
    if results.get("goals"):
        lines += ["", "Goals (issue 7)"]
        for g in results["goals"]:
            mark = {True: "MET", False: "NOT MET", None: "n/a"}[g["met"]]
            lines.append(f"  {mark:<8} {g['goal']:<55} {g['figure']}")
    return "\n".join(lines)


def write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    )
