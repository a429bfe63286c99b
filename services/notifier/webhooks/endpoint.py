"""One endpoint's queue: consumer group `webhooks` on `{signals}:webhook:<name>`.

The hand-off (see `handoff`) appends each signal meant for the endpoint to its queue. Every replica
joins the queue's group under its own name, so each queued signal goes to one replica at a time,
which POSTs it (with its retries, see `delivery`) and, on the final outcome (delivered, or
dead-lettered on `webhooks.dead`), acks and deletes it from the queue in one MULTI. The queue thus
holds exactly the signals this endpoint still owes: its length is the endpoint's backlog
(`betterbot_notifier_webhook_backlog{webhook}`). Up to `WEBHOOK_CONCURRENCY` signals are in
delivery at once per endpoint and replica, so the endpoint may receive signals out of stream order
(each carries its stream id and times). Nothing here waits on any other endpoint.

The queue's group starts at its beginning (`0`): whatever is queued is delivered, including what
was queued while no replica ran, and a queue or group deleted by hand is recreated the same way.

The queue's group runs on the shared consumer runtime (`shared/consumer.py`), one signal per
handler call and up to `WEBHOOK_CONCURRENCY` calls at once, settled entries deleted with their
ack. A replica that dies leaves its entries pending: a delivery that is merely slow (retries,
backoff) stays claimed by its replica, and entries idle longer than `WEBHOOK_CLAIM_IDLE_MS` are
taken over. An entry claimed more than `WEBHOOK_MAX_DELIVERIES` times (replicas keep dying on it)
is dead-lettered for this endpoint instead of being tried again.

Delivery is at least once: the endpoint sees a signal again when a replica dies between the 2xx
and the ack (the new owner delivers it again), or when a response is lost and the POST retried.
Every request carries the signal's `signal_id` in `Idempotency-Key` for receivers to deduplicate
(with `:<status>` appended for a pending or retracted signal: a status change is not a repeat).
"""

from __future__ import annotations

import logging
import time

import httpx

from services.notifier.metrics import WEBHOOK_LATENCY, WEBHOOK_OUTCOMES
from services.notifier.webhooks.dead import DeadLetters
from services.notifier.webhooks.delivery import RetryPolicy, deliver
from services.notifier.webhooks.handoff import Route
from services.notifier.webhooks.presets import render
from shared.consumer import Entry, Fields, Handled
from shared.models import Signal
from shared.redis_streams import DATA_FIELD, decode, entry_payload

log = logging.getLogger(__name__)


class Endpoint:
    """The handler of one endpoint's queue: each queued signal delivered or dead-lettered."""

    def __init__(
        self, route: Route, http: httpx.AsyncClient, policy: RetryPolicy, dead: DeadLetters
    ) -> None:
        self.hook = route.hook
        self.queue = route.queue
        self._http = http
        self._policy = policy
        self._dead = dead
        # Queued signals this replica brought to an outcome.
        self.settled = 0

    async def __call__(self, batch: list[Entry]) -> Handled:
        for queue_id, fields in batch:
            try:
                entry_id, data, signal = _queued(fields)
            except ValueError as exc:
                # Only the hand-off writes here, and only Signals: a stray entry is dropped.
                log.warning(
                    "webhook_queue_entry_skipped",
                    extra={"webhook": self.hook.name, "queue_id": queue_id, "reason": str(exc)},
                )
                continue
            await self._deliver(entry_id, signal, data)
        self.settled += len(batch)
        return Handled([queue_id for queue_id, _ in batch])

    async def dead_letter(self, entry: Entry, reason: str, deliveries: int) -> None:
        """An entry claimed too often: dead for this endpoint, with the signal's own ids."""
        try:
            entry_id, data, signal = _queued(entry[1])
        except ValueError:
            # Trimmed from the queue while pending (or foreign): what is left is its id and why.
            await self._dead.add(self.hook, entry[0], "", entry_payload(entry[1]), reason, 0)
            return
        await self._dead.add(self.hook, entry_id, signal.signal_id, data, reason, 0)

    async def _deliver(self, entry_id: str, signal: Signal, data: bytes) -> None:
        body = render(self.hook.preset, entry_id, signal, data, chat_id=self.hook.chat_id)
        outcome = await deliver(
            self._http, self.hook, body, signal.signal_id, self._policy, status=signal.status
        )
        if outcome.delivered:
            WEBHOOK_OUTCOMES.labels(self.hook.name, "delivered").inc()
            WEBHOOK_LATENCY.observe(time.time() - signal.received_at)
            return
        await self._dead.add(
            self.hook, entry_id, signal.signal_id, data, outcome.reason, outcome.attempts
        )


def _queued(fields: Fields | None) -> tuple[str, bytes, Signal]:
    """The signal's id on `signals`, its JSON, and the Signal, of a queue entry."""
    if not fields or DATA_FIELD not in fields or b"entry_id" not in fields:
        raise ValueError("not a queued signal (deleted, or written by something else)")
    return fields[b"entry_id"].decode(), fields[DATA_FIELD], Signal.model_validate(decode(fields))
