"""One batch of `orders.raw` entries, from raw fields to decided orders and dead letters.

Broker-neutral: it gets the entries (id + fields) and returns which of them are settled — decided
(signals XADDed by the state step), skipped (nothing to decide) or dead-lettered — so the caller
acks exactly those. An entry that cannot be read or validated (no `data` field, not JSON, not an
order fill, an implausible size) or whose rules fail is dead-lettered with the reason, never
retried: it would fail again. Redis being unreachable makes `process` raise (after
`DETECTOR_STATE_RETRY_S`), leaving the batch unacked for redelivery, which the done keys make
harmless. The consumer runtime (shared/consumer.py) reads, acks, reclaims and dead-letters around
it.

Ordering across replicas (docs/signals.md): the decisions must be those of one detector reading the
stream in order. Replicas read disjoint, ordered slices of the stream, so the only thing that can
differ is the order in which two orders touching the same state unit are decided. Before deciding
an order, the batch looks at the group's pending list: every earlier entry of the stream is either
acked (settled) or pending there. Each earlier pending entry (held by any consumer) on one of the
order's units is a prerequisite: the state step applies the order only once that entry's done key
exists. Until then the order waits (round after round, re-reading the pending list, whose settled
entries drop out) while the runtime keeps this consumer's entries from being reclaimed. Orders on
other units go ahead meanwhile.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import orjson
from pydantic import ValidationError

from services.detector import metrics, rules
from services.detector.rules import (
    Decision,
    Effect,
    Plan,
    RuleSettings,
    UnitState,
    WalletMarketState,
)
from services.detector.state import (
    CONFLICT,
    DUPLICATE,
    READ_ONLY,
    TRANSIENT,
    WAITING,
    ApplyStep,
    DetectorState,
    Rejection,
    UnitWrite,
)
from shared.errors import describe, validation_reason
from shared.models import FillStatus, OrderFill, TrackedWallet
from shared.redis_streams import DATA_FIELD, decode, entry_position
from shared.streams import DETECTOR_GROUP

log = logging.getLogger(__name__)

DEAD_LETTER_ORIGIN = "detector"
FIRST_DELAY_S = 0.005
MAX_DELAY_S = 0.1
# Footprints are looked up for the entries other consumers hold pending, a few batches each: 20,000
# covers 40 replicas at the default batch size, and keeps the cache a small part of the process'
# memory (bench/README.md).
FOOTPRINT_CACHE = 20_000

Position = tuple[int, int]


@dataclass(frozen=True)
class RawEntry:
    """One stream entry as read: its id and its fields."""

    entry_id: str
    fields: Mapping[bytes, bytes]

    def raw(self) -> bytes:
        """The payload to keep in a dead letter: `data` when present, else every field as JSON."""
        if (data := self.fields.get(DATA_FIELD)) is not None:
            return data
        return orjson.dumps(
            {k.decode(errors="replace"): v.decode(errors="replace") for k, v in self.fields.items()}
        )


@dataclass
class BatchOutcome:
    orders: int = 0
    duplicates: int = 0
    signals: Counter[str] = field(default_factory=Counter)
    suppressed: Counter[str] = field(default_factory=Counter)
    dead_lettered: int = 0
    waits: int = 0
    settled: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    # Entries that failed on their own (kept pending), with why.
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """An order of this batch that has state to change or signals to emit."""

    entry_id: str
    position: Position
    plan: Plan


@dataclass(frozen=True)
class Footprint:
    """What a pending entry touches, as far as ordering goes."""

    position: Position
    order_key: str
    units: tuple[str, ...]


def parse_entry(entry: RawEntry) -> OrderFill | Rejection:
    """The order fill of an entry, or why there is none."""
    try:
        payload = decode(entry.fields)
    except ValueError as exc:
        category = "no_data" if DATA_FIELD not in entry.fields else "not_json"
        return Rejection(entry.entry_id, entry.raw(), str(exc), category)
    try:
        order = OrderFill.model_validate(payload)
    except ValidationError as exc:
        return Rejection(
            entry.entry_id, entry.raw(), f"invalid order: {validation_reason(exc)}", "invalid"
        )
    return order


class BatchProcessor:
    """Decides batches for one consumer of the group; `wallets` follows the wallet registry."""

    def __init__(
        self,
        state: DetectorState,
        wallets: Iterable[TrackedWallet],
        settings: RuleSettings,
        *,
        consumer: str,
        group: str = DETECTOR_GROUP,
        wait_s: float = 60.0,
        touch_every_s: float = 10.0,
    ) -> None:
        self.state = state
        # The rules of this processor's lane (shared/streams.py): all, or a partition's share.
        self.scope = state.lane.scope
        self.settings = settings
        self.consumer = consumer
        self.group = group
        self.wait_s = wait_s
        self.touch_every_s = touch_every_s
        self.wallets: dict[str, TrackedWallet] = {}
        self._footprints: OrderedDict[str, Footprint | None] = OrderedDict()
        self.set_wallets(wallets)

    # --- wallets --------------------------------------------------------------------------------

    def set_wallets(self, wallets: Iterable[TrackedWallet]) -> None:
        self.wallets = {wallet.address: wallet for wallet in wallets}
        self._footprints.clear()
        metrics.WALLETS.set(len(self.wallets))

    def upsert_wallet(self, wallet: TrackedWallet) -> None:
        self.wallets[wallet.address] = wallet
        self._footprints.clear()
        metrics.WALLETS.set(len(self.wallets))

    def remove_wallet(self, address: str) -> None:
        self.wallets.pop(address, None)
        self._footprints.clear()
        metrics.WALLETS.set(len(self.wallets))

    # --- one batch ------------------------------------------------------------------------------

    async def process(
        self, entries: Sequence[RawEntry], *, wait_s: float | None = None
    ) -> BatchOutcome:
        """Decide the batch; the outcome lists the entries to ack (`settled`).

        Raises when Redis stays unreachable: nothing is settled, all stay pending. Any other
        failure may be one entry's (a rule bug, a damaged state key): the entries are then
        decided one by one, so the valid ones settle now and only the failing one stays pending
        (`failed`, with why) until it is dead-lettered."""
        wait = self.wait_s if wait_s is None else wait_s
        try:
            return await self._process(entries, wait)
        except TRANSIENT:
            raise
        except Exception:
            if len(entries) == 1:
                raise
            log.warning("batch_failed_deciding_alone", extra={"entries": len(entries)})
            return await self._one_by_one(entries, wait)

    async def _one_by_one(self, entries: Sequence[RawEntry], wait_s: float) -> BatchOutcome:
        outcome = BatchOutcome()
        for entry in entries:
            try:
                alone = await self._process([entry], wait_s)
            except TRANSIENT:
                raise
            except Exception as exc:
                reason = describe(exc)
                log.warning("entry_failed", extra={"entry_id": entry.entry_id, "error": reason})
                outcome.unsettled.append(entry.entry_id)
                outcome.failed[entry.entry_id] = reason
                continue
            _merge(outcome, alone)
        return outcome

    async def _process(self, entries: Sequence[RawEntry], wait_s: float) -> BatchOutcome:
        metrics.BATCH_SIZE.observe(len(entries))
        outcome = BatchOutcome()
        steps, rejections = self._plan(entries, outcome)
        if rejections:
            await self._dead_letter(rejections, outcome)
        if steps:
            await self._decide(steps, outcome, wait_s, held=len(entries))
        _record(outcome)
        return outcome

    def _plan(
        self, entries: Sequence[RawEntry], outcome: BatchOutcome
    ) -> tuple[list[Step], list[Rejection]]:
        steps: list[Step] = []
        rejections: list[Rejection] = []
        for entry in entries:
            parsed = parse_entry(entry)
            if isinstance(parsed, Rejection):
                rejections.append(parsed)
                self._remember(entry.entry_id, None)
                continue
            try:
                # `seeded_at` is read with the units, when deciding (`_round`).
                planned = rules.plan(
                    parsed, self.wallets.get(parsed.user), self.settings, self.scope
                )
            except Exception as exc:
                # A rule bug on one odd order must not hold up the stream behind it.
                log.exception("rule_failed", extra={"entry_id": entry.entry_id})
                rejections.append(
                    Rejection(entry.entry_id, entry.raw(), f"rule error: {exc!r}", "rule_error")
                )
                continue
            outcome.orders += 1
            if planned is None:
                outcome.settled.append(entry.entry_id)
                self._remember(entry.entry_id, None)
                continue
            step = Step(entry.entry_id, entry_position(entry.entry_id), planned)
            steps.append(step)
            self._remember(step.entry_id, _footprint(step))
        steps.sort(key=lambda s: s.position)
        return steps, rejections

    async def _dead_letter(self, rejections: list[Rejection], outcome: BatchOutcome) -> None:
        await self.state.dead_letter(rejections, origin=DEAD_LETTER_ORIGIN)
        for rejection in rejections:
            log.warning(
                "entry_dead_lettered",
                extra={"entry_id": rejection.entry_id, "reason": rejection.reason[:500]},
            )
            metrics.DEAD_LETTERED.labels(rejection.category).inc()
        outcome.dead_lettered += len(rejections)
        outcome.settled += [r.entry_id for r in rejections]

    async def _decide(
        self, steps: list[Step], outcome: BatchOutcome, wait_s: float, *, held: int
    ) -> None:
        """Rounds of decide + apply until every step is applied (or `wait_s` runs out).

        `held` is the number of entries of this batch, all pending here until the caller acks.
        When the group's pending entries are exactly those `held` here, no other entry is
        pending: nothing to wait for, and the pending list need not be read (the one-replica
        case, every batch). Trusted only while the batch is younger than `touch_every_s`: until
        then none of its entries can have been claimed (and acked) elsewhere, which could make
        the counts match while another entry is pending. While it waits, the consumer runtime
        keeps the batch claimed (shared/consumer.py)."""
        start = time.monotonic()
        delay = FIRST_DELAY_S
        remaining = steps
        while True:
            # The wallets' seedings (services/detector/positions.py) with the units: every input
            # of a decision is read here and compared when it is applied.
            units = sorted(
                {unit for step in remaining for unit in step.plan.units}
                | {step.plan.seed_unit for step in remaining if step.plan.seed_unit is not None}
            )
            holders, current = await self.state.look(self.group, units)
            young = time.monotonic() - start < self.touch_every_s
            alone = young and holders == {self.consumer: held}
            prerequisites = {} if alone else await self._prerequisites(remaining)
            codes = await self._round(remaining, prerequisites, current, outcome)
            for step, code in zip(remaining, codes, strict=True):
                if code not in (WAITING, CONFLICT):
                    outcome.settled.append(step.entry_id)
            remaining = [
                step
                for step, code in zip(remaining, codes, strict=True)
                if code in (WAITING, CONFLICT)
            ]
            if not remaining:
                return
            outcome.waits += 1
            metrics.WAITS.inc()
            now = time.monotonic()
            if now - start >= wait_s:
                outcome.unsettled = [s.entry_id for s in remaining]
                metrics.UNSETTLED.inc(len(remaining))
                log.warning(
                    "orders_left_pending",
                    extra={"count": len(remaining), "waited_s": round(now - start, 3)},
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S, self.touch_every_s / 2)

    async def _round(
        self,
        steps: list[Step],
        prerequisites: Mapping[str, tuple[str, ...]],
        current: Mapping[str, bytes | None],
        outcome: BatchOutcome,
    ) -> list[int]:
        """Decide every step from `current` (each on the state left by the ones before it), then
        apply them in one go; returns the state step's code for each."""
        local: dict[str, tuple[bytes, UnitState | None]] = {
            unit: (raw or b"", rules.load_unit(unit, raw))
            for unit, raw in current.items()
            if not unit.startswith(rules.SEED_UNIT)
        }
        effects = await self._effects(steps)
        detected_at = time.time()
        decisions: list[Decision] = []
        applies: list[ApplyStep] = []
        decided: set[str] = set()
        for step in steps:
            order = step.plan.order
            if order.status is FillStatus.RETRACTED and order.order_key in decided:
                # Its fill is decided in this very round: undo it next round, from what it kept.
                break
            before = {unit: local[unit][1] for unit in step.plan.units}
            writes = []
            if (seeding := step.plan.seed_unit) is not None:
                # The wallet's seeding, as read with the units: compared, never written, when
                # applied (a seeding landed meanwhile makes the step decided again).
                seen = current.get(seeding) or b""
                step = replace(step, plan=replace(step.plan, seeded_at=rules.seeding_time(seen)))
                writes.append(UnitWrite(seeding, seen, seen, READ_ONLY))
            decision = self._decision(step, before, effects, detected_at)
            decided.add(order.order_key)
            for unit in step.plan.units:
                expected = local[unit][0]
                if unit in decision.states:
                    after = decision.states[unit]
                    value = after.dump() if after is not None else b""
                    local[unit] = (value, after)
                else:
                    after, value = before[unit], expected
                writes.append(UnitWrite(unit, expected, value, self._ttl(after)))
            decisions.append(decision)
            applies.append(_apply_step(step, prerequisites, writes, decision))
        codes = await self.state.apply(applies)
        codes += [WAITING] * (len(steps) - len(applies))
        await self._confirm_pending(steps, codes, detected_at)
        for step, decision, code in zip(steps, decisions, codes, strict=False):
            if code == DUPLICATE:
                outcome.duplicates += 1
            elif code == CONFLICT:
                metrics.CONFLICTS.inc()
            elif code >= 0:
                metrics.LATENCY.observe(max(0.0, detected_at - step.plan.order.received_at))
                outcome.signals.update(s.kind.value for s in decision.signals)
                outcome.suppressed.update(kind.value for kind in decision.suppressed)
        return codes

    async def _confirm_pending(
        self, steps: Sequence[Step], codes: Sequence[int], detected_at: float
    ) -> None:
        """A confirmed fill that was decided already (a repeat) may have been decided while
        pending: its signals then go out once more, as confirmed (docs/streams.md, "Status").
        Repeats are rare, so only they cost the extra read."""
        repeats = [
            step
            for step, code in zip(steps, codes, strict=True)
            if code == DUPLICATE and step.plan.order.status is FillStatus.CONFIRMED
        ]
        if not repeats:
            return
        effects = await self.state.effects([step.plan.order.order_key for step in repeats])
        confirmations = []
        for step in repeats:
            effect = Effect.load(effects.get(step.plan.order.order_key))
            signals = rules.confirm(effect, detected_at) if effect is not None else ()
            if signals:
                key = rules.confirmation_key(step.plan.order)
                payloads = tuple(signal.to_json() for signal in signals)
                confirmations.append(ApplyStep(key, (), (), payloads, position=step.entry_id))
        if confirmations:
            await self.state.apply(confirmations)

    def _decision(
        self,
        step: Step,
        before: Mapping[str, UnitState | None],
        effects: Mapping[str, bytes | None],
        detected_at: float,
    ) -> Decision:
        order = step.plan.order
        if order.status is not FillStatus.RETRACTED:
            return rules.decide(step.plan, before, self.settings, detected_at)
        effect = Effect.load(effects.get(order.order_key))
        if effect is None:
            # Never decided here (or so long ago its record expired): nothing to undo.
            return Decision((), {})
        return rules.undo(step.plan, before, effect, detected_at)

    async def _effects(self, steps: Sequence[Step]) -> dict[str, bytes | None]:
        """What each fill retracted in these steps did when it was decided (its done key)."""
        keys = [
            s.plan.order.order_key for s in steps if s.plan.order.status is FillStatus.RETRACTED
        ]
        return await self.state.effects(keys) if keys else {}

    def _ttl(self, state: UnitState | None) -> int:
        """Positions are kept until sold; state that only serves cooldowns and windows expires."""
        if isinstance(state, WalletMarketState) and state.positions:
            return 0
        return self.state.done_ttl_s

    # --- ordering against the other replicas ----------------------------------------------------

    async def _prerequisites(self, steps: list[Step]) -> dict[str, tuple[str, ...]]:
        """For each step, the order keys of the pending entries outside `steps` that come before
        it on one of its units: all of them, as a repeated fill's done key exists from its first
        decision and so says nothing about the entries before it. A step needs only those after
        the previous step of `steps` on the same unit: the state step applies a step only after
        the previous one on its units, which itself waited for the ones before."""
        mine = {step.entry_id for step in steps}
        pending = await self.state.pending_upto(self.group, steps[-1].entry_id)
        others = [entry_id for entry_id in pending if entry_id not in mine]
        if not others:
            return {}
        footprints = await self._footprints_of(others)
        positions: dict[str, list[Position]] = {}
        keys: dict[str, list[str]] = {}
        for entry_id in others:
            footprint = footprints.get(entry_id)
            if footprint is None:
                continue
            for unit in footprint.units:
                positions.setdefault(unit, []).append(footprint.position)
                keys.setdefault(unit, []).append(footprint.order_key)
        found: dict[str, tuple[str, ...]] = {}
        covered: dict[str, int] = {}  # unit -> index in its list up to which steps already wait
        for step in steps:
            before: list[str] = []
            for unit in step.plan.units:
                end = bisect.bisect_left(positions.get(unit, []), step.position)
                before += keys.get(unit, [])[covered.get(unit, 0) : end]
                covered[unit] = max(end, covered.get(unit, 0))
            if before:
                found[step.entry_id] = tuple(dict.fromkeys(before))
        return found

    async def _footprints_of(self, entry_ids: list[str]) -> dict[str, Footprint | None]:
        missing = [entry_id for entry_id in entry_ids if entry_id not in self._footprints]
        if missing:
            for entry_id, fields in (await self.state.read_entries(missing)).items():
                self._remember(entry_id, self._footprint_of(entry_id, fields))
        return {entry_id: self._footprints.get(entry_id) for entry_id in entry_ids}

    def _footprint_of(
        self, entry_id: str, fields: Mapping[bytes, bytes] | None
    ) -> Footprint | None:
        if fields is None:
            return None
        parsed = parse_entry(RawEntry(entry_id, fields))
        if isinstance(parsed, Rejection):
            return None
        try:
            planned = rules.plan(parsed, self.wallets.get(parsed.user), self.settings, self.scope)
        except Exception:
            return None
        if planned is None or not planned.units:
            return None
        key = rules.decision_key(parsed, entry_id)
        return Footprint(entry_position(entry_id), key, planned.units)

    def _remember(self, entry_id: str, footprint: Footprint | None) -> None:
        self._footprints[entry_id] = footprint
        while len(self._footprints) > FOOTPRINT_CACHE:
            self._footprints.popitem(last=False)


def _footprint(step: Step) -> Footprint | None:
    units = step.plan.units
    key = rules.decision_key(step.plan.order, step.entry_id)
    return Footprint(step.position, key, units) if units else None


def _apply_step(
    step: Step,
    prerequisites: Mapping[str, tuple[str, ...]],
    writes: list[UnitWrite],
    decision: Decision,
) -> ApplyStep:
    order = step.plan.order
    retraction = order.status is FillStatus.RETRACTED
    return ApplyStep(
        rules.decision_key(order, step.entry_id),
        prerequisites.get(step.entry_id, ()),
        tuple(writes),
        tuple(s.to_json() for s in decision.signals),
        # A fill keeps its effect for a retraction; the retraction leaves a tombstone in its
        # place, so a block that includes the fill again has it decided afresh, while a
        # redelivered entry of the fill is still a repeat.
        b"1" if retraction else decision.effect.dump(),
        (order.order_key,) if retraction else (),
        step.entry_id,
    )


def _merge(total: BatchOutcome, part: BatchOutcome) -> None:
    total.orders += part.orders
    total.duplicates += part.duplicates
    total.signals.update(part.signals)
    total.suppressed.update(part.suppressed)
    total.dead_lettered += part.dead_lettered
    total.waits += part.waits
    total.settled += part.settled
    total.unsettled += part.unsettled
    total.failed.update(part.failed)


def _record(outcome: BatchOutcome) -> None:
    metrics.ORDERS.inc(outcome.orders)
    metrics.DUPLICATES.inc(outcome.duplicates)
    for kind, count in outcome.signals.items():
        metrics.SIGNALS.labels(kind).inc(count)
    for kind, count in outcome.suppressed.items():
        metrics.SUPPRESSED.labels(kind).inc(count)
    log.debug(
        "batch_done",
        extra={
            "orders": outcome.orders,
            "duplicates": outcome.duplicates,
            "signals": dict(outcome.signals),
            "suppressed": dict(outcome.suppressed),
            "dead_lettered": outcome.dead_lettered,
            "waits": outcome.waits,
            "unsettled": len(outcome.unsettled),
        },
    )
