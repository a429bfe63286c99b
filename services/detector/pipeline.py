"""One batch of `orders.raw` entries, from raw fields to decided orders and dead letters.

Broker-neutral: it gets the entries (id + fields) and returns when every effect is in Redis —
signals XADDed by the state step, bad entries in `orders.dead` — so the caller may ack the whole
batch. An entry that cannot be read or validated (no `data` field, not JSON, not an order fill, an
implausible size) or whose rules fail is dead-lettered with the reason, never retried: it would
fail again. Only Redis being unreachable makes `process` raise (after `DETECTOR_STATE_RETRY_S`),
leaving the batch unacked for redelivery, which the done keys make harmless.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson
from pydantic import ValidationError

from services.detector import metrics, rules
from services.detector.rules import RuleSettings
from services.detector.state import DetectorState, Emission, OrderStep, Rejection
from shared.models import OrderFill, TrackedWallet
from shared.redis_streams import DATA_FIELD, decode

log = logging.getLogger(__name__)

DEAD_LETTER_ORIGIN = "detector"


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
    dead_lettered: int = 0


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
        return Rejection(entry.entry_id, entry.raw(), f"invalid order: {_errors(exc)}", "invalid")
    if order.shares_normalized > rules.MAX_SHARES:
        reason = (
            f"implausible size: shares_normalized {order.shares_normalized:g}"
            f" > {rules.MAX_SHARES:g}"
        )
        return Rejection(entry.entry_id, entry.raw(), reason, "invalid")
    return order


def plan(
    order: OrderFill,
    wallet: TrackedWallet | None,
    settings: RuleSettings,
    detected_at: float,
) -> OrderStep | None:
    """The state step for an order, or None when it can change nothing (untracked, no candidate)."""
    found = rules.candidates(order, wallet, settings, detected_at)
    if wallet is None and not found:
        return None
    return OrderStep(
        order_key=order.order_key,
        wallet=order.user,
        token_id=order.token_id,
        side=order.side,
        micro_shares=rules.micro_shares(order),
        tracked=wallet is not None,
        candidates=tuple(
            Emission(c.kind, c.condition, c.signal.model_dump_json().encode()) for c in found
        ),
    )


class BatchProcessor:
    def __init__(
        self, state: DetectorState, wallets: Iterable[TrackedWallet], settings: RuleSettings
    ) -> None:
        self.state = state
        self.wallets = {wallet.address: wallet for wallet in wallets}
        self.settings = settings

    async def process(self, entries: Sequence[RawEntry]) -> BatchOutcome:
        metrics.BATCH_SIZE.observe(len(entries))
        outcome = BatchOutcome()
        detected_at = time.time()
        steps: list[OrderStep] = []
        received: list[float] = []
        rejections: list[Rejection] = []
        for entry in entries:
            parsed = parse_entry(entry)
            if isinstance(parsed, Rejection):
                rejections.append(parsed)
                continue
            try:
                step = plan(parsed, self.wallets.get(parsed.user), self.settings, detected_at)
            except Exception as exc:
                # A rule bug on one odd order must not hold up the stream behind it.
                log.exception("rule_failed", extra={"entry_id": entry.entry_id})
                rejections.append(
                    Rejection(entry.entry_id, entry.raw(), f"rule error: {exc!r}", "rule_error")
                )
                continue
            outcome.orders += 1
            if step is not None:
                steps.append(step)
                received.append(parsed.received_at)

        for step_result, received_at in zip(await self.state.apply(steps), received, strict=True):
            if step_result.duplicate:
                outcome.duplicates += 1
                continue
            metrics.LATENCY.observe(max(0.0, detected_at - received_at))
            outcome.signals.update(kind.value for kind in step_result.emitted)

        if rejections:
            await self.state.dead_letter(rejections, origin=DEAD_LETTER_ORIGIN)
            for rejection in rejections:
                log.warning(
                    "entry_dead_lettered",
                    extra={"entry_id": rejection.entry_id, "reason": rejection.reason[:500]},
                )
                metrics.DEAD_LETTERED.labels(rejection.category).inc()
            outcome.dead_lettered = len(rejections)

        _record(outcome)
        return outcome


def _record(outcome: BatchOutcome) -> None:
    metrics.ORDERS.inc(outcome.orders)
    metrics.DUPLICATES.inc(outcome.duplicates)
    for kind, count in outcome.signals.items():
        metrics.SIGNALS.labels(kind).inc(count)
    log.debug(
        "batch_done",
        extra={
            "orders": outcome.orders, "duplicates": outcome.duplicates,
            "signals": dict(outcome.signals), "dead_lettered": outcome.dead_lettered,
        },
    )


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'payload'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    )
