"""One frame of Polymarket's RTDS `activity` firehose -> what it means for us. No I/O, no clock.

RTDS is undocumented (feeds.md, "Polymarket RTDS activity"); what it sends, and how each quirk is
handled:
- `{"connection_id":..,"topic":"activity","type":"trades"|"orders_matched","timestamp":<ms>,
  "payload":{..}}`. The payload carries the Data API's `/trades` fields, so it becomes an order
  through the same mapping (`shared.data_api.order_from_data_api`): the same fill read here and
  from the Data API, Dome or the chain gets the same order_key.
- The exchange time is the payload's `timestamp`, in seconds; the envelope's is the server's send
  time in milliseconds and is never taken for it (a payload in milliseconds is rejected by
  `ExchangeTimeBounds`, as on every source).
- `proxyWallet` comes checksum-cased: compared and stored lower-cased.
- `outcomeIndex` is sometimes the sentinel 999: it is never read (the label comes from `outcome`,
  the token from `asset`).
- `fee` is on some frames only: never read.
- An empty frame (the first one of a socket), the text `pong` (the answer to our `ping`) and
  frames without a payload are `Skipped`, as are other topics or types.
- There is no wallet filter: every trade of the exchange arrives. A payload of a wallet that is
  not tracked is `Skipped` as `untracked` before anything else is checked (the firehose is mostly
  such trades; dead-lettering them would flood `orders.dead`).
- The same trade comes once on `trades` and once on `orders_matched`: both give one fill with one
  order_key, deduplicated by the publisher. Identical fills of one transaction (the Data API tells
  them apart by their order in its answer, `shared.models.occurrences`) are told apart by
  counting them per type (`TypeOccurrences`): each type sends each fill once, so the n-th
  identical fill of a transaction on `trades` and the n-th on `orders_matched` are the same one,
  and get the same occurrence.

Anything else (not JSON, not an object, a payload that is not a valid order of a tracked wallet,
an implausible time) is `Rejected` with a reason, and dead-lettered by the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from services.ingestor.frames import Rejected, RejectKind, json_object, oversized
from shared.data_api import order_from_data_api
from shared.errors import validation_reason
from shared.models import DomeOrder, ExchangeTimeBounds, OrderFill, Source, base_key

TOPIC = "activity"
TYPES = ("trades", "orders_matched")
# Transactions remembered per type for counting identical fills; the oldest are forgotten first,
# long after their frames stopped coming.
OCCURRENCE_MEMORY = 20_000
DEFAULT_BOUNDS = ExchangeTimeBounds()


class SkipKind(StrEnum):
    """Frames that carry no fill and are not an error (a fixed set: metric labels)."""

    EMPTY = "empty"
    PONG = "pong"
    NO_PAYLOAD = "no_payload"
    OTHER_TOPIC = "other_topic"
    UNTRACKED = "untracked"


@dataclass(frozen=True, slots=True)
class RtdsFill:
    fill: OrderFill
    type: str


@dataclass(frozen=True, slots=True)
class Skipped:
    kind: SkipKind


RtdsFrame = RtdsFill | Skipped | Rejected


class TypeOccurrences:
    """The occurrence of each fill among the identical ones of its transaction, counted per type
    (see the module docstring). One per socket: a new socket replays nothing."""

    def __init__(self, max_keys: int = OCCURRENCE_MEMORY) -> None:
        self._max = max_keys
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()

    def next(self, kind: str, order: DomeOrder) -> int:
        key = (kind, base_key(order))
        count = self._seen.get(key, 0)
        self._seen[key] = count + 1
        self._seen.move_to_end(key)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return count


def parse_rtds_frame(
    raw: bytes | str,
    *,
    tracked: Container[str],
    received_at: float,
    max_bytes: int,
    occurrences: TypeOccurrences,
    bounds: ExchangeTimeBounds = DEFAULT_BOUNDS,
) -> RtdsFrame:
    """Classify one frame; `tracked` holds lower-case wallet addresses."""
    if (too_big := oversized(raw, max_bytes)) is not None:
        return too_big
    text = raw.strip()
    if not text:
        return Skipped(SkipKind.EMPTY)
    if text in ("pong", b"pong"):
        return Skipped(SkipKind.PONG)
    message = json_object(raw)
    if isinstance(message, Rejected):
        return message
    if message.get("payload") is None:
        return Skipped(SkipKind.NO_PAYLOAD)
    kind = message.get("type")
    if message.get("topic") != TOPIC or kind not in TYPES:
        return Skipped(SkipKind.OTHER_TOPIC)
    return _payload(message["payload"], kind, tracked, received_at, bounds, occurrences)


def _payload(
    payload: Any,
    kind: str,
    tracked: Container[str],
    received_at: float,
    bounds: ExchangeTimeBounds,
    occurrences: TypeOccurrences,
) -> RtdsFrame:
    if not isinstance(payload, dict):
        return Rejected(RejectKind.INVALID_EVENT, f"{kind} payload is not an object")
    wallet = payload.get("proxyWallet")
    if not isinstance(wallet, str):
        return Rejected(RejectKind.INVALID_EVENT, f"{kind} payload without a string proxyWallet")
    if wallet.lower() not in tracked:
        return Skipped(SkipKind.UNTRACKED)
    try:
        order = order_from_data_api(payload)
    except ValidationError as exc:
        reason = f"invalid {kind} payload: " + validation_reason(exc, whole="payload")
        return Rejected(RejectKind.INVALID_EVENT, reason)
    except ValueError as exc:
        return Rejected(RejectKind.INVALID_EVENT, f"invalid {kind} payload: {str(exc)[:300]}")
    problem = bounds.problem(order.timestamp, received_at)
    if problem is not None:
        return Rejected(RejectKind.IMPLAUSIBLE_TIMESTAMP, problem)
    occurrence = occurrences.next(kind, order)
    return RtdsFill(OrderFill.from_dome(order, Source.RTDS, received_at, occurrence), kind)
