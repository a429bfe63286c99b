"""Late fills (issue 16): a fill that reached the ingestor long after it traded (a backfill after
an outage) still moves positions and consensus, and its signals are marked `late`, with a reason
saying how late. Lateness is `received_at - timestamp`, both in the fill, so three detector
processes still emit exactly what the serial reference emits, late marks included."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.detector import rules
from services.detector.rules import RuleSettings
from services.detector.serial import SerialDetector, run
from services.detector.settings import DetectorSettings
from shared.models import OrderFill, Signal, SignalKind
from shared.streams import Streams
from tests.test_detector_replicas import drained, identities, replicas
from tests.test_detector_rules import make_order, wallet
from tests.test_detector_service import read_signals, xadd_all

TRACKED = [wallet(0x51 + i, score) for i, score in enumerate([0.9, 0.6, 0.4, None])]
TS = 1_760_086_772
HOUR = 3600.0
RULES = RuleSettings(signal_cooldown_s=0)


def kinds(signals: list[Signal]) -> list[str]:
    return [s.kind.value for s in signals]


def test_a_late_buy_still_opens_the_position_and_its_entry_is_marked_late() -> None:
    detector = SerialDetector(TRACKED, RULES)
    who = TRACKED[0].address
    late_buy = make_order(user=who, shares=100, timestamp=TS, received_at=TS + 2 * HOUR)
    (entry,) = detector.process(late_buy)
    assert entry.kind is SignalKind.TRADER_ENTRY and entry.late
    assert any(
        r.startswith("late: the fill reached BetterBot 2.0 h after it traded")
        for r in entry.reasons
    )
    # The formula stays the last line.
    assert entry.reasons[-1].startswith("confidence ")
    # The position moved: a live sell of it is an exit, and not late.
    live_sell = make_order(
        user=who, side="SELL", shares=100, timestamp=TS + 7300, received_at=TS + 7300.4
    )
    (exit_,) = detector.process(live_sell)
    assert exit_.kind is SignalKind.TRADER_EXIT and not exit_.late
    assert not any(r.startswith("late:") for r in exit_.reasons)


def test_the_bound_is_exclusive_and_zero_turns_it_off() -> None:
    at_bound = make_order(shares=5000, timestamp=TS, received_at=TS + 900.0)
    past_bound = make_order(shares=5000, timestamp=TS, received_at=TS + 900.5)
    assert not rules.is_late(at_bound, RuleSettings())
    assert rules.is_late(past_bound, RuleSettings())
    assert not rules.is_late(past_bound, RuleSettings(signal_max_age_s=0))
    # A fill stamped a little ahead of our clock is not late either.
    assert not rules.is_late(make_order(timestamp=TS, received_at=TS - 30.0), RuleSettings())


def test_lateness_comes_from_the_fill_never_from_the_detectors_clock() -> None:
    order = make_order(user=TRACKED[1].address, shares=5000, timestamp=TS, received_at=TS + HOUR)
    planned = rules.plan(order, TRACKED[1], RULES)
    assert planned is not None
    decided = [rules.decide(planned, {}, RULES, detected_at=at).signals for at in (0.0, 9e9)]
    assert [kinds(list(d)) for d in decided] == [["whale_order", "trader_entry"]] * 2
    assert all(s.late for d in decided for s in d)
    assert [s.reasons for s in decided[0]] == [s.reasons for s in decided[1]]


def test_a_late_buy_joins_the_consensus_and_the_consensus_it_completes_is_late() -> None:
    detector = SerialDetector(TRACKED, RULES)
    live = [
        make_order(user=w.address, token_id="tok-c", timestamp=TS + i, received_at=TS + i + 0.2)
        for i, w in enumerate(TRACKED[:2])
    ]
    for order in live:
        assert not any(s.late for s in detector.process(order))
    late = make_order(
        user=TRACKED[2].address, token_id="tok-c", timestamp=TS + 5, received_at=TS + 5 + HOUR
    )
    signals = detector.process(late)
    assert kinds(signals) == ["trader_entry", "consensus"]
    assert all(s.late for s in signals)


def test_the_setting_is_read_from_the_environment_and_the_rules_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SIGNAL_MAX_AGE_S", raising=False)
    monkeypatch.delenv("DETECTOR_RULES_FILE", raising=False)
    assert DetectorSettings(_env_file=None).rules().signal_max_age_s == 900
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("signal_max_age_s: 60\n")
    assert DetectorSettings(_env_file=None, detector_rules_file=str(rules_file)).rules() == (
        RuleSettings(signal_max_age_s=60)
    )
    monkeypatch.setenv("SIGNAL_MAX_AGE_S", "0")
    assert DetectorSettings(_env_file=None).rules().signal_max_age_s == 0


def mixed_lateness(seed: int = 16) -> list[OrderFill]:
    """Bursts of buys and sells by tracked wallets on a few tokens, a third of them read an hour
    or more late (as a backfill delivers them), interleaved with live ones and whales."""
    rnd = random.Random(seed)
    orders: list[OrderFill] = []
    ts = TS
    for _ in range(60):
        ts += rnd.choice([0, 2, 30, 400])
        who = rnd.choice(TRACKED).address
        token = rnd.choice(["tok-a", "tok-b", "tok-c"])
        delay = rnd.choice([0.3, 0.3, 5.0, 1200.0, 5 * HOUR])
        for step in range(rnd.randint(1, 4)):
            orders.append(
                make_order(
                    user=who,
                    token_id=token,
                    side="BUY" if step % 2 == 0 else "SELL",
                    shares=rnd.choice([20.0, 400.0, 4000.0]),
                    price=rnd.choice([0.3, 0.6]),
                    timestamp=ts + step,
                    received_at=ts + step + delay,
                )
            )
    return orders


async def test_three_replicas_mark_late_signals_exactly_as_the_serial_reference(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    orders = mixed_lateness()
    expected = run(orders, TRACKED, RuleSettings())
    assert {s.late for s in expected} == {True, False}
    reference = with_late(identities([s.model_dump(mode="json") for s in expected]), expected)
    streams = Streams(f"{namespace}late:")
    async with replicas(redis_url, streams.namespace, TRACKED, tmp_path, "late-") as group:
        await xadd_all(redis_client, streams, orders)
        await drained(redis_client, streams)
    assert set(group.stop().values()) == {0}
    found = await read_signals(redis_client, streams)
    assert len(found) == len({s["signal_id"] for s in found}), "a signal was emitted twice"
    assert with_late(identities(found), found) == reference


def with_late(ids: set[tuple[Any, ...]], signals: list[Any]) -> set[tuple[Any, ...]]:
    """The identities plus each signal's late mark (by signal id)."""
    late = {
        (s.signal_id if isinstance(s, Signal) else s["signal_id"]): (
            s.late if isinstance(s, Signal) else s.get("late", False)
        )
        for s in signals
    }
    return {(*identity, late[identity[0]]) for identity in ids}
