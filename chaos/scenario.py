"""One scenario: the tape through a fresh pipeline, its faults injected while trades flow, then
the comparison with the ground truth once everything has settled (or the settle time is up).

Timeline: faults start when the simulator has emitted `fault_at` of the tape; several faults
("together") start `STAGGER_S` apart and overlap. Each is held `hold_s`, then recovered. After the
tape ends the run waits until every expected order and signal is stored and delivered and no
consumer group has anything pending, up to `settle_s`, and measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from chaos.faults import Fault
from chaos.pipeline import Pipeline, PipelineConfig
from chaos.redis_server import ThrowawayRedis
from chaos.truth import (
    base_key_of,
    expected_order_keys,
    fill_base_key,
    quirk_trades,
    read_stream,
    stream_truth,
)
from devtools.cluster import Cluster
from shared.models import TrackedWallet
from shared.orders_raw import watermark_key
from shared.streams import DETECTOR_GROUP, STORE_GROUP, WEBHOOKS_GROUP, Streams
from shared.wallets import load_wallets

log = logging.getLogger(__name__)

FAULT_AT = 0.3
STAGGER_S = 1.2
POLL_S = 1.0
DIAGNOSE = 20
# Waiting for the end of the tape: past its real duration, or since the last trade emitted.
TAPE_SLACK_S = 120.0
# A watermark this far past the wall clock is in the future (a wrongly stamped fill moved it).
FUTURE_SLACK_S = 5


@dataclass
class Scenario:
    name: str
    faults: list[Fault]
    settle_s: float = 60.0
    # The part of the tape emitted when the (first) fault starts.
    fault_at: float = FAULT_AT
    # Settings of every service for this scenario, over the pipeline's.
    env: dict[str, str] = field(default_factory=dict)
    # A control: the pipeline is broken on purpose, and the suite must see the loss.
    control: bool = False
    # On the suite's Redis Cluster instead of its single Redis (REDIS_CLUSTER=true).
    cluster: bool = False


@dataclass
class Measure:
    orders_expected: int = 0
    orders_stored: int = 0
    orders_unexpected: int = 0
    signals_expected: int = 0
    signals_stored: int = 0
    signals_ws: int = 0
    signals_webhook: int = 0
    signals_unexpected: int = 0
    webhook_redelivered: int = 0
    # The first few signals at fault, for diagnosis: unexpected ones as the detector wrote them.
    unexpected_signals: list[dict[str, Any]] = field(default_factory=list)
    missing_signals: list[dict[str, Any]] = field(default_factory=list)
    lost: dict[str, int] = field(default_factory=dict)
    duplicated: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    # Checks of the simulator's quirks: wrongly stamped trades of tracked wallets (each must be
    # in `orders.dead`, none on the order streams) and watermarks in the future. Any nonzero
    # count fails the row.
    quirk_trades: int = 0
    anomalies: dict[str, int] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        return (
            not any(self.lost.values())
            and not any(self.pending.values())
            and not any(self.anomalies.values())
        )


async def _wait(pipe: Pipeline, what: str, predicate_key: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if (await pipe.status())[predicate_key]:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out after {within_s:.0f}s waiting for {what}")


async def _wait_tape_done(pipe: Pipeline, config: PipelineConfig) -> None:
    """Until the simulator has played the whole tape: its real duration (the tape's span at the
    chosen speed) from now, at most, plus `TAPE_SLACK_S`; and longer as long as the simulator
    still makes progress (a loaded machine plays late, never a sparse tape's fault)."""
    deadline = time.monotonic() + config.tape_span_s / config.speed + TAPE_SLACK_S
    emitted = -1
    while True:
        with contextlib.suppress(Exception):
            status = await pipe.status()
            if status["tape_done"]:
                return
            if int(status["emitted"]) != emitted:
                emitted = int(status["emitted"])
                # Progress: wait at least the slack past the last trade emitted.
                deadline = max(deadline, time.monotonic() + TAPE_SLACK_S)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the tape was not done {config.tape_span_s / config.speed:.0f}s (its span at "
                f"speed {config.speed:g}) + {TAPE_SLACK_S:.0f}s after the faults; "
                f"{emitted} trades emitted"
            )
        await asyncio.sleep(POLL_S)


async def _apply(pipe: Pipeline, fault: Fault, at_emitted: int, delay_s: float) -> None:
    # Polling the simulator over HTTP: there is no event to wait on in this process.
    while True:
        if await pipe.emitted() >= at_emitted:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(delay_s)
    started = time.monotonic()
    await fault.inject(pipe)
    await asyncio.sleep(fault.hold_s)
    await fault.recover(pipe)
    fault.note(f"injected at {at_emitted}+ trades, lasted {time.monotonic() - started:.1f}s")


def consumer_groups(streams: Streams) -> list[tuple[str, str]]:
    """Every (stream, group) the services read: the detector on each lane, the store on each
    order stream and on `signals`, the notifier's webhooks."""
    return [
        *((lane.stream, DETECTOR_GROUP) for lane in streams.lanes()),
        *((stream, STORE_GROUP) for stream in streams.order_streams()),
        (streams.signals, STORE_GROUP),
        (streams.signals, WEBHOOKS_GROUP),
    ]


async def _group_pending(pipe: Pipeline) -> dict[str, int]:
    """Entries delivered and not acknowledged, per group. (A signal stuck in a lane's outbox
    needs no count of its own: it is missing from `signals`, which the lost counts show.)"""
    pending = {}
    for stream, group in consumer_groups(pipe.streams):
        name = f"{stream.removeprefix(pipe.namespace)}/{group}"
        try:
            summary = await pipe.redis_client.xpending(stream, group)
            pending[name] = int(summary["pending"])
        except Exception:  # a missing group counts as everything pending: unknown is not zero
            pending[name] = -1
    return pending


async def tracked_wallets(pipe: Pipeline) -> list[TrackedWallet]:
    """The wallets file's wallets and those added to the live registry while running (a scenario
    may add one mid-tape: its trades are then expected too)."""
    wallets = {w.address: w for w in load_wallets(pipe.services["ingestor"].env["WALLETS_FILE"])}
    for raw in (await pipe.redis_client.hgetall(pipe.streams.wallets_key())).values():
        wallet = TrackedWallet.model_validate_json(raw)
        wallets.setdefault(wallet.address, wallet)
    return list(wallets.values())


async def _anomalies(
    pipe: Pipeline, quirks: list[dict[str, Any]], on_stream: set[str]
) -> dict[str, int]:
    client = pipe.redis_client
    dead = b"\n".join(
        fields.get(b"raw", b"") for _, fields in await read_stream(client, pipe.streams.orders_dead)
    ).lower()
    now = time.time() + FUTURE_SLACK_S
    future = 0
    for stream in pipe.streams.order_streams():
        marks = await client.hgetall(watermark_key(pipe.streams, stream))
        future += sum(1 for value in marks.values() if int(value) > now)
    return {
        "quirk_trades_not_dead_lettered": sum(
            1 for t in quirks if str(t["tx_hash"]).lower().encode() not in dead
        ),
        "quirk_trades_on_stream": sum(1 for t in quirks if base_key_of(t) in on_stream),
        "watermarks_in_future": future,
    }


async def measure(pipe: Pipeline, db: asyncpg.Connection) -> Measure:
    wallets = await tracked_wallets(pipe)
    trades = await pipe.trades()
    expected_orders = expected_order_keys(trades, wallets)
    stored_orders = {r["order_key"] for r in await db.fetch("SELECT order_key FROM orders")}
    truth = await stream_truth(pipe.redis_client, pipe.streams)
    rules = truth.expected_signals(wallets)
    expected = set(rules)
    stored = {r["signal_id"] for r in await db.fetch("SELECT signal_id FROM signals")}
    ws = [signal_id for _, signal_id in pipe.subscriber.received]
    hooks = pipe.receiver.delivered
    m = Measure(
        orders_expected=len(expected_orders),
        orders_stored=len(stored_orders & expected_orders),
        orders_unexpected=len(stored_orders - expected_orders),
        signals_expected=len(expected),
        signals_stored=len(stored & expected),
        signals_ws=len(set(ws) & expected),
        signals_webhook=len(set(hooks) & expected),
        signals_unexpected=len((stored | set(ws) | set(hooks) | set(truth.signal_ids)) - expected),
    )
    unexpected = (stored | set(ws) | set(hooks) | set(truth.signal_ids)) - expected
    m.unexpected_signals = [truth.describe(sid) for sid in sorted(unexpected)[:DIAGNOSE]]
    m.missing_signals = [
        truth.describe(sid, rules[sid].model_dump(mode="json"))
        for sid in sorted(expected - (stored & set(ws) & set(hooks)))[:DIAGNOSE]
    ]
    m.lost = {
        "orders_not_stored": len(expected_orders - stored_orders),
        "orders_not_on_stream": len(expected_orders - {o.order_key for o in truth.orders}),
        "signals_not_stored": len(expected - stored),
        "signals_not_on_ws": len(expected - set(ws)),
        "signals_not_on_webhook": len(expected - set(hooks)),
    }
    m.duplicated = {
        "orders_on_stream": truth.order_key_repeats,
        "signals_on_stream": len(truth.signal_ids) - len(set(truth.signal_ids)),
        "signals_on_ws": len(ws) - len(set(ws)),
    }
    # At least once by contract (docs/notifier.md): receivers drop repeats by Idempotency-Key, as
    # this one does; so a repeat is counted here, apart from the duplicated effects above.
    m.webhook_redelivered = sum(n - 1 for n in hooks.values())
    m.pending = await _group_pending(pipe)
    quirks = quirk_trades(trades, wallets)
    m.quirk_trades = len(quirks)
    m.anomalies = await _anomalies(pipe, quirks, {fill_base_key(o) for o in truth.orders})
    for name in ("orders_dead", "signals_dead", "webhooks_dead"):
        m.dead_letters[name] = int(await pipe.redis_client.xlen(getattr(pipe.streams, name)))
    return m


async def _settle(pipe: Pipeline, db: asyncpg.Connection, within_s: float) -> Measure:
    deadline = time.monotonic() + within_s
    while True:
        try:
            result = await measure(pipe, db)
        except Exception as exc:  # Redis or Postgres still coming back: try again
            log.debug("measure_failed", extra={"error": repr(exc)})
            result = None
        if result is not None and (result.settled or time.monotonic() > deadline):
            return result
        if time.monotonic() > deadline:
            return await measure(pipe, db)
        await asyncio.sleep(POLL_S)


def log_findings(pipe: Pipeline, secret: str) -> dict[str, Any]:
    """What the logs say: the key (must never appear), tracebacks and error lines per service."""
    found: dict[str, Any] = {"key_in_logs": [], "tracebacks": {}, "errors": {}}
    for name, service in pipe.services.items():
        text = service.log_text()
        if secret in text:
            found["key_in_logs"].append(name)
        if n := text.count("Traceback"):
            found["tracebacks"][name] = n
        if n := text.count('"level":"error"'):
            found["errors"][name] = n
    return found


async def run_scenario(
    scenario: Scenario,
    config: PipelineConfig,
    redis: ThrowawayRedis,
    database_url: str,
    namespace: str,
    tape_trades: int,
    cluster: Cluster | None = None,
) -> dict[str, Any]:
    if scenario.cluster and cluster is None:
        raise ValueError(f"{scenario.name} runs on a Redis Cluster and none was started")
    on = cluster if scenario.cluster else None
    pipe = Pipeline(config, redis, database_url, namespace, scenario.env, cluster=on)
    started = time.monotonic()
    db: asyncpg.Connection | None = None
    try:
        await pipe.start()
        await _wait(pipe, "the tape to start", "started", 30)
        at = int(tape_trades * scenario.fault_at)
        await asyncio.gather(
            *(_apply(pipe, fault, at, n * STAGGER_S) for n, fault in enumerate(scenario.faults))
        )
        await _wait_tape_done(pipe, config)
        db = await asyncpg.connect(database_url)
        result = await _settle(pipe, db, scenario.settle_s)
        for fault in scenario.faults:
            await fault.conclude(pipe)
    finally:
        if db is not None:
            await db.close()
        exit_codes = await pipe.stop()
    return {
        "fault": scenario.name,
        "control": scenario.control,
        "on_cluster": scenario.cluster,
        "settings": scenario.env,
        "faults": [
            {
                "name": f.name,
                "description": f.description,
                "supported": f.supported,
                "notes": f.notes,
                **({"figures": f.figures} if f.figures else {}),
            }
            for f in scenario.faults
        ],
        **{k: v for k, v in vars(result).items()},
        "lost_total": sum(result.lost.values()),
        "duplicated_total": sum(result.duplicated.values()),
        "supervisor_restarts": [
            {"service": r.service, "exit_code": r.exit_code} for r in pipe.supervisor.restarts
        ],
        "exit_codes": exit_codes,
        "subscriber": {
            "connections": pipe.subscriber.connections,
            "gaps": pipe.subscriber.gaps,
            "out_of_order": pipe.subscriber.out_of_order,
            "closes": sorted(set(pipe.subscriber.closes)),
        },
        "webhook_receiver": {
            "first_attempts_refused_on_purpose": pipe.receiver.refused_first_attempts,
            "bad_signatures": pipe.receiver.bad_signatures,
            "bad_bodies": pipe.receiver.bad_bodies,
        },
        "logs": log_findings(pipe, config.api_key),
        "log_dir": str(config.log_dir),
        "seconds": round(time.monotonic() - started, 1),
    }
