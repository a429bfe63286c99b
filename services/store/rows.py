"""Stream entries -> table rows: decode, validate with the shared contract, convert to columns.

Pure functions, no I/O. An entry that is not our plain format (`data` holding JSON), fails the
`OrderFill` / `Signal` contract, or carries a time outside what a timestamp can hold becomes a
`Rejected` with a reason; everything else becomes a `Row` whose values follow `Table.columns`.

Every valid entry is a row of its own, a key repeated within the batch too: a status change is an
entry with the same key (docs/streams.md, "Status"), and the write applies each one in turn. Its
last columns (`STATUS_COLUMNS`) are the status, its reason and the entry's stream position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from shared.errors import validation_reason
from shared.models import FillStatus, OrderFill, Signal
from shared.redis_streams import decode, entry_payload, entry_position
from shared.stream_metrics import observe_signal_latency

REASON_MAX = 500

Values = tuple[Any, ...]
# (stream id, decoded payload, payload JSON text) -> (primary key, values in `Table.columns` order)
Converter = Callable[[str, Any, str], tuple[str, Values]]


@dataclass(frozen=True)
class Table:
    name: str
    key: str
    columns: tuple[str, ...]
    convert: Converter = field(repr=False, compare=False)


@dataclass(frozen=True)
class Row:
    stream_id: str
    raw: bytes  # the entry's payload as received, kept for dead-lettering
    key: str
    values: Values


@dataclass(frozen=True)
class Rejected:
    stream_id: str
    raw: bytes
    reason: str


@dataclass
class Prepared:
    rows: list[Row]  # one per valid entry, in-batch repeats of a key included, in batch order
    rejected: list[Rejected]

    @property
    def valid(self) -> int:
        return len(self.rows)


# The status and where it comes from: the entry that set it (`status_*`) and the newest entry
# applied to the row (`newest_*`), as stream id parts. A new row gets its entry's id in both;
# `database.py` says how an existing row changes.
STATUS_COLUMNS = (
    "status",
    "status_reason",
    "status_ms",
    "status_seq",
    "newest_ms",
    "newest_seq",
)


def status_values(stream_id: str, status: FillStatus, reason: str) -> Values:
    ms, seq = entry_position(stream_id)
    return (status.value, reason, ms, seq, ms, seq)


def utc(seconds: float, name: str) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f"{name} is not a usable Unix time: {seconds!r}") from exc


def order_values(stream_id: str, payload: Any, text: str) -> tuple[str, Values]:
    fill = OrderFill.model_validate(payload)
    return fill.order_key, (
        fill.order_key,
        fill.user,
        fill.token_id,
        fill.token_label,
        fill.side.value,
        fill.market_slug,
        fill.condition_id,
        fill.title,
        None if fill.shares is None else Decimal(fill.shares),
        fill.shares_normalized,
        fill.price,
        fill.notional_usd,
        fill.tx_hash,
        fill.order_hash,
        fill.taker,
        fill.block_number,
        fill.log_index,
        utc(fill.timestamp, "timestamp"),
        utc(fill.received_at, "received_at"),
        fill.source.value,
        fill.v,
        text,
        *status_values(stream_id, fill.status, fill.status_reason),
    )


def signal_values(stream_id: str, payload: Any, text: str) -> tuple[str, Values]:
    signal = Signal.model_validate(payload)
    # The store's group sees each signal once, so its latency is recorded here and summed across
    # store replicas without double counting. Only a confirmed signal is one to act on: a pending
    # one is not yet, and a retraction's `detected_at` is when it was retracted.
    if signal.status is FillStatus.CONFIRMED:
        observe_signal_latency(signal)
    return signal.signal_id, (
        signal.signal_id,
        signal.kind.value,
        signal.wallet,
        signal.wallet_label,
        signal.market_slug,
        signal.title,
        signal.condition_id,
        signal.token_id,
        signal.token_label,
        signal.side.value,
        signal.price,
        signal.shares,
        signal.notional_usd,
        signal.confidence,
        list(signal.reasons),
        list(signal.order_keys),
        signal.source.value,
        utc(signal.exchange_ts, "exchange_ts"),
        utc(signal.received_at, "received_at"),
        utc(signal.detected_at, "detected_at"),
        stream_id,
        signal.v,
        text,
        *status_values(stream_id, signal.status, signal.status_reason),
    )


ORDERS = Table(
    "orders",
    "order_key",
    (
        "order_key",
        "wallet",
        "token_id",
        "token_label",
        "side",
        "market_slug",
        "condition_id",
        "title",
        "shares",
        "shares_normalized",
        "price",
        "notional_usd",
        "tx_hash",
        "order_hash",
        "taker",
        "block_number",
        "log_index",
        "exchange_ts",
        "received_at",
        "source",
        "v",
        "payload",
        *STATUS_COLUMNS,
    ),
    order_values,
)

SIGNALS = Table(
    "signals",
    "signal_id",
    (
        "signal_id",
        "kind",
        "wallet",
        "wallet_label",
        "market_slug",
        "title",
        "condition_id",
        "token_id",
        "token_label",
        "side",
        "price",
        "shares",
        "notional_usd",
        "confidence",
        "reasons",
        "order_keys",
        "source",
        "exchange_ts",
        "received_at",
        "detected_at",
        "stream_id",
        "v",
        "payload",
        *STATUS_COLUMNS,
    ),
    signal_values,
)


def prepare(table: Table, entries: Sequence[tuple[str, Mapping[bytes, bytes]]]) -> Prepared:
    """Rows for the valid entries of one batch, rejections for the rest."""
    rows: list[Row] = []
    rejected: list[Rejected] = []
    for stream_id, fields in entries:
        raw = entry_payload(fields)
        try:
            payload = decode(fields)
            key, values = table.convert(stream_id, payload, raw.decode())
        except ValueError as exc:  # ValidationError and JSON errors are ValueErrors
            rejected.append(Rejected(stream_id, raw, _reason(exc)))
            continue
        rows.append(Row(stream_id, raw, key, values))
    return Prepared(rows, rejected)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return f"{exc.title} invalid: {validation_reason(exc)}"[:REASON_MAX]
    return (str(exc) or type(exc).__name__)[:REASON_MAX]
