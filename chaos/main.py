"""`python -m chaos`: run the scenarios, print the table, write `chaos/results/latest.json`.

    python -m chaos                       # every fault alone, then all together (about 20 minutes)
    python -m chaos --quick               # 400 trades, all faults together (about 1 minute)
    python -m chaos --only store_kill,postgres_cut --speed 60
    python -m chaos --tape my_trades.json --wallets my_wallets.json   # your own tape and wallets

Redis: a throwaway `redis-server` the suite starts itself (append-only, fsync always) on a free
port, so the Redis restart fault harms nobody; and, only when a cluster row is selected, a
throwaway Redis Cluster of 3 masters and 3 replicas (devtools/cluster.py) for those rows.
Postgres: as the tests find it (DATABASE_URL, the local server, a container or a throwaway one);
each scenario gets a database of its own, dropped afterwards. Logs of every process stay under
`.run/chaos/<run>/<scenario>/`.

The exit code is 0 only when every scenario lost nothing, doubled nothing and left nothing pending.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from chaos import report
from chaos.faults import CHAIN_FAULTS, CLUSTER_FAULTS, FAULTS, QUIRK_FAULTS
from chaos.pipeline import RECOVERY_ENV, WALLETS_FILE, PipelineConfig
from chaos.redis_server import ThrowawayRedis
from chaos.scenario import Scenario, run_scenario
from devtools.cluster import Cluster, redis_cluster
from devtools.processes import ROOT
from devtools.servers import postgres_server, throwaway_database

DEFAULT_TAPE = ROOT / "data" / "polymarket_trades_nobel2025.json"
RESULTS = ROOT / "chaos" / "results" / "latest.json"
RUNS = ROOT / ".run" / "chaos"
BASELINE, TOGETHER = "none", "together"
# Ingestor kill with the gap backfill turned off: trades emitted while it was down are lost, and
# the suite must say so (a check of the instrument, not of the pipeline).
CONTROL = "control_no_backfill"
# The polygon source on the simulator's chain: its faults alone, then with the kills and the Redis
# restart. Confirmations 3 (the reorgs are 2 deep): an orphaned trade must never be published.
CHAIN_TOGETHER = "chain_together"
CHAIN_ENV = {"INGEST_SOURCES": "polygon", "POLYGON_CONFIRMATIONS": "3"}
CHAIN_ALSO = ("detector_kill", "store_kill", "redis_restart", "ingestor_kill")
# The cluster rows: the services on a real Redis Cluster, fills spread over four wallet
# partitions (and four token partitions), so the partitions' slots spread over the masters.
CLUSTER_ENV = {"STREAM_PARTITIONS": "4"}
# Issue 16's rows: settings of the ingestor's recovery each needs (besides its fault's own SIM_*
# quirks): the REST index's lag re-read 5 s after a backfill's first pass (the lag is 3 s); an
# update's wallet read again once 4 s (the delay is 3 s) plus 2 s of lag have passed.
QUIRK_ENV = {
    "rest_index_lag": {"BACKFILL_INDEXING_LAG_S": "5"},
    "late_updates": {"DOME_UPDATE_APPLY_S": "4", "BACKFILL_INDEXING_LAG_S": "2"},
}
# The whole suite's budget: 24 rows at 30-65 s each, and the cluster's start.
BUDGET_S = 1500.0


@dataclass
class SuiteOptions:
    scenarios: list[str]
    tape: Path = DEFAULT_TAPE
    wallets: Path = WALLETS_FILE
    trades: int | None = None
    speed: float = 80.0
    detectors: int = 3
    log_dir: Path = field(
        default_factory=lambda: RUNS / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    settle_s: float = 60.0
    # The whole run stays within this: a scenario that would not fit is skipped, and says so.
    budget_s: float = BUDGET_S


def full_scenarios() -> list[str]:
    return [
        BASELINE,
        *FAULTS,
        TOGETHER,
        CONTROL,
        *QUIRK_FAULTS,
        *CHAIN_FAULTS,
        CHAIN_TOGETHER,
        *CLUSTER_FAULTS,
    ]


def build(name: str, settle_s: float) -> Scenario:
    if name == BASELINE:
        return Scenario(name, [], settle_s)
    if name == TOGETHER:
        # Earlier, so that the staggered faults still overlap the flow of trades.
        return Scenario(name, [cls() for cls in FAULTS.values()], settle_s, fault_at=0.15)
    if name == CONTROL:
        return Scenario(
            name,
            [FAULTS["ingestor_kill"]()],
            min(settle_s, 15.0),
            env={"BACKFILL_VIA": "off"},
            control=True,
        )
    if name == CHAIN_TOGETHER:
        faults = [cls() for cls in CHAIN_FAULTS.values()] + [FAULTS[n]() for n in CHAIN_ALSO]
        return Scenario(name, faults, settle_s, fault_at=0.15, env=CHAIN_ENV)
    if name in CHAIN_FAULTS:
        return Scenario(name, [CHAIN_FAULTS[name]()], settle_s, env=CHAIN_ENV)
    if name in QUIRK_FAULTS:
        quirk = QUIRK_FAULTS[name]()
        env = {**quirk.env, **QUIRK_ENV.get(name, {})}
        return Scenario(name, [quirk], settle_s, env=env)
    if name in CLUSTER_FAULTS:
        fault = CLUSTER_FAULTS[name]()
        return Scenario(name, [fault], settle_s, env=CLUSTER_ENV, cluster=True)
    return Scenario(name, [FAULTS[name]()], settle_s)


def tape_subset(tape: Path, trades: int | None, into: Path) -> tuple[Path, int, float]:
    """The first `trades` trades of the tape in playing order (oldest first), as a tape file; the
    file, its number of trades and the tape seconds it spans."""
    items: list[dict[str, Any]] = orjson.loads(tape.read_bytes())
    # The simulator's own order: the Data API lists newest first, then a stable sort by time.
    ordered = sorted(reversed(items), key=lambda t: t["timestamp"])[:trades]
    span = float(ordered[-1]["timestamp"] - ordered[0]["timestamp"])
    if len(ordered) == len(items):
        return tape, len(items), span
    into.parent.mkdir(parents=True, exist_ok=True)
    into.write_bytes(orjson.dumps(ordered))
    return into, len(ordered), span


async def _scenario_row(
    scenario: Scenario,
    options: SuiteOptions,
    redis: ThrowawayRedis,
    server_url: str,
    tape: Path,
    trades: int,
    span: float,
    run_id: str,
    cluster: Cluster | None,
) -> dict[str, Any]:
    config = PipelineConfig(
        tape=tape,
        speed=options.speed,
        detectors=options.detectors,
        api_key=f"chaoskey{secrets.token_hex(12)}",
        log_dir=options.log_dir / scenario.name,
        wallets=options.wallets,
        tape_span_s=span,
    )
    async with throwaway_database(server_url, f"chaos_{run_id}_{scenario.name}") as database:
        try:
            namespace = f"chaos{run_id}-{scenario.name}:"
            return await run_scenario(scenario, config, redis, database, namespace, trades, cluster)
        except Exception as exc:
            return {
                "fault": scenario.name,
                "error": f"{type(exc).__name__}: {exc}",
                "log_dir": str(config.log_dir),
            }


async def run_suite(
    options: SuiteOptions, server_url: str, progress: bool = True
) -> dict[str, Any]:
    """Every scenario of `options` in turn on one throwaway Redis; the results document."""
    run_id = uuid.uuid4().hex[:8]
    tape, trades, span = tape_subset(options.tape, options.trades, options.log_dir / "tape.json")
    redis = ThrowawayRedis(options.log_dir)
    redis.start()
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    # A scenario: startup, the tape, settling; a bad one also waits out settle_s.
    typical_s = span / options.speed + 20
    servers = contextlib.ExitStack()
    cluster: Cluster | None = None
    try:
        for name in options.scenarios:
            if time.monotonic() - started + typical_s > options.budget_s:
                rows.append(_skipped(name, options.budget_s))
                continue
            if progress:
                print(f"chaos: {name} ...", file=sys.stderr, flush=True)
            scenario = build(name, options.settle_s)
            if scenario.cluster and cluster is None:
                # Six processes that take seconds to form: only once a cluster row runs.
                cluster = servers.enter_context(redis_cluster())
            row = await _scenario_row(
                scenario, options, redis, server_url, tape, trades, span, run_id, cluster
            )
            rows.append(report.finish_row(row))
            if progress:
                print(f"chaos: {name}: {row['verdict']}", file=sys.stderr, flush=True)
    finally:
        servers.close()
        redis.stop()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "tape": str(
            options.tape.relative_to(ROOT) if options.tape.is_relative_to(ROOT) else options.tape
        ),
        "wallets": str(
            options.wallets.relative_to(ROOT)
            if options.wallets.is_relative_to(ROOT)
            else options.wallets
        ),
        "trades": trades,
        "tape_span_s": span,
        "speed": options.speed,
        "detector_replicas": options.detectors,
        "recovery_settings": RECOVERY_ENV,
        "seconds": round(time.monotonic() - started),
        "ok": all(row["verdict"].startswith("ok") for row in rows),
        "rows": rows,
    }


def _skipped(name: str, budget_s: float) -> dict[str, Any]:
    return {"fault": name, "skipped": f"time budget of {budget_s:.0f}s", "verdict": "skipped"}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def parse_args(argv: Sequence[str] | None) -> tuple[SuiteOptions, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="400 trades at speed 60, every fault together"
    )
    parser.add_argument("--only", help=f"comma-separated scenarios of {full_scenarios()}")
    parser.add_argument("--speed", type=float, help="tape seconds per real second (default 80)")
    parser.add_argument(
        "--tape",
        type=Path,
        default=DEFAULT_TAPE,
        help="a tape of your own: Data-API trades, a JSON list (default: the bundled tape)",
    )
    parser.add_argument(
        "--wallets",
        type=Path,
        default=WALLETS_FILE,
        help="the wallets tracked (a wallets file); the truth is the tape's trades of them",
    )
    parser.add_argument("--trades", type=int, help="play only the first N trades of the tape")
    parser.add_argument("--detectors", type=int, default=3, help="detector replicas (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument(
        "--budget",
        type=float,
        default=BUDGET_S,
        help="seconds the whole run may take; later scenarios are skipped",
    )
    args = parser.parse_args(argv)
    scenarios = [TOGETHER] if args.quick else full_scenarios()
    if args.only:
        scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(scenarios) - set(full_scenarios()))
        if unknown:
            parser.error(f"unknown scenario(s) {unknown}; known: {full_scenarios()}")
    options = SuiteOptions(
        scenarios=scenarios,
        tape=args.tape.resolve(),
        wallets=args.wallets.resolve(),
        detectors=args.detectors,
        budget_s=args.budget,
    )
    if args.quick:
        options.trades, options.speed = 400, 60.0
    options.trades = args.trades or options.trades
    options.speed = args.speed or options.speed
    return options, args.out


def main(argv: Sequence[str] | None = None) -> None:
    options, out = parse_args(argv)
    with postgres_server() as server_url:
        document = asyncio.run(run_suite(options, server_url))
    report.write_json(out, document)
    print(report.table(document["rows"]))
    print()
    print(report.details(document["rows"]))
    print(f"\nresults: {out}; logs: {options.log_dir}")
    sys.exit(0 if document["ok"] else 1)
