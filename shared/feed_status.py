"""The feed-status hash: what the ingestor says about its feed, for the dashboard and health checks.

The ingestor HSETs `FeedReport.to_fields()` into `Streams.feed_status_key()` every
`STATUS_INTERVAL_S` and lets the hash expire when it stops refreshing it (no hash: no ingestor
running); the notifier's `/api/status` reads it with `FeedReport.from_fields()`. A Redis hash
holds strings: numbers are written in decimal, and a value not known yet ("no event so far") as
"". The top level is every source combined; `sources` holds each source on its own.

Fields (docs/streams.md has them as a table):
- `source`: the sources, comma-separated (in `sources`: that one source).
- `state`: a `ConnectionState`; combined, the first of auth_failed, disconnected, connecting,
  starting, connected, stopped that any source is in. `connected`: "1" when `state` is connected.
- `subscriptions`, `pending_subscribes` (subscribes not acknowledged yet), `reconnects`
  (connections lost since start): ints, summed over the sources; `wallets`: tracked wallets,
  int (the largest over the sources).
- `last_event_at`: Unix s (float) of the last valid event's receipt, "" when none came;
  `last_exchange_ts`: its exchange time, Unix s (int) or ""; `seconds_since_last_event`: float,
  since that event or, when none came, since start.
- `last_error`: why the feed last went down, "" once it is back up.
- Top level only: `published` (fills written to `orders.raw`) and `duplicates` (fills already
  written, dropped), ints counted since start; `queued`: fills waiting to be written, int;
  `updated_at`: Unix s (float) of this write; `sources`: JSON object, source name -> that
  source's fields above.

Readers meet older and newer writers, so `from_fields` never raises: it ignores fields it does
not know, leaves a missing one at its default (None for a number), and names every field it could
not read in `unreadable` (also left at its default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field


class ConnectionState(StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    AUTH_FAILED = "auth_failed"
    STOPPED = "stopped"


class SourceReport(BaseModel):
    """One source's state, or (as `FeedReport`) all of them combined. None: not reported."""

    model_config = ConfigDict(frozen=True)

    source: str = ""
    # A `ConnectionState` value; kept as text, so a newer writer's state is shown as it is.
    state: str = "unknown"
    connected: bool = False
    subscriptions: int | None = None
    wallets: int | None = None
    pending_subscribes: int | None = None
    last_event_at: float | None = None
    last_exchange_ts: int | None = None
    seconds_since_last_event: float | None = None
    reconnects: int | None = None
    last_error: str = ""
    # Read side only, never written: the fields `from_fields` could not read.
    unreadable: tuple[str, ...] = ()

    def to_fields(self) -> dict[str, str]:
        return {
            "source": self.source,
            "state": self.state,
            "connected": "1" if self.connected else "0",
            "subscriptions": _integer_text(self.subscriptions),
            "wallets": _integer_text(self.wallets),
            "pending_subscribes": _integer_text(self.pending_subscribes),
            "last_event_at": _number_text(self.last_event_at, 6),
            "last_exchange_ts": _integer_text(self.last_exchange_ts),
            "seconds_since_last_event": _number_text(self.seconds_since_last_event, 3),
            "reconnects": _integer_text(self.reconnects),
            "last_error": self.last_error,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any], *, default_source: str = "") -> SourceReport:
        """One source from its fields (text; a newer writer's JSON numbers are read too)."""
        reader = _Reader(fields)
        values = _source_values(reader, default_source)
        return cls(**values, unreadable=tuple(reader.unreadable))


class FeedReport(SourceReport):
    """The whole hash: the sources combined, the publisher's counters, and each source."""

    published: int | None = None
    duplicates: int | None = None
    queued: int | None = None
    updated_at: float | None = None
    sources: dict[str, SourceReport] = Field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        """What the ingestor HSETs."""
        fields = super().to_fields()
        fields.update(
            published=_integer_text(self.published),
            duplicates=_integer_text(self.duplicates),
            queued=_integer_text(self.queued),
            updated_at=_number_text(self.updated_at, 6),
            sources=orjson.dumps(
                {name: part.to_fields() for name, part in self.sources.items()}
            ).decode(),
        )
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any], *, default_source: str = "") -> FeedReport:
        """The hash as HGETALL returns it (bytes, or str with decode_responses). Never raises."""
        reader = _Reader(fields)
        values = _source_values(reader, default_source)
        sources = _read_sources(reader)
        return cls(
            **values,
            published=reader.integer("published"),
            duplicates=reader.integer("duplicates"),
            queued=reader.integer("queued"),
            updated_at=reader.number("updated_at"),
            sources=sources,
            unreadable=tuple(reader.unreadable),
        )


class _Reader:
    """Reads fields by type; a value it cannot read is noted in `unreadable`, never raised."""

    def __init__(self, fields: Mapping[Any, Any]) -> None:
        self.fields = {_text(name): _text(value) for name, value in fields.items()}
        self.unreadable: list[str] = []

    def text(self, name: str, default: str = "") -> str:
        value = self._raw(name)
        return default if value is None else value

    def flag(self, name: str) -> bool:
        value = self._raw(name)
        if value not in (None, "", "0", "1"):
            self.unreadable.append(name)
        return value == "1"

    def number(self, name: str) -> float | None:
        value = self._raw(name)
        if not value:
            return None
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
        self.unreadable.append(name)
        return None

    def integer(self, name: str) -> int | None:
        value = self._raw(name)
        if not value:
            return None
        try:
            return int(value)
        except ValueError:
            number = self.number(name)  # "20.0" from another writer
            return None if number is None else int(number)

    def _raw(self, name: str) -> str | None:
        value = self.fields.get(name)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        self.unreadable.append(name)
        return None


def _source_values(reader: _Reader, default_source: str) -> dict[str, Any]:
    return {
        "source": reader.text("source", default_source),
        "state": reader.text("state", "unknown"),
        "connected": reader.flag("connected"),
        "subscriptions": reader.integer("subscriptions"),
        "wallets": reader.integer("wallets"),
        "pending_subscribes": reader.integer("pending_subscribes"),
        "last_event_at": reader.number("last_event_at"),
        "last_exchange_ts": reader.integer("last_exchange_ts"),
        "seconds_since_last_event": reader.number("seconds_since_last_event"),
        "reconnects": reader.integer("reconnects"),
        "last_error": reader.text("last_error"),
    }


def _read_sources(reader: _Reader) -> dict[str, SourceReport]:
    """`sources` (JSON); what cannot be read is named `sources`, `sources.<name>[.<field>]`."""
    raw = reader.text("sources")
    if not raw:
        return {}
    try:
        parts = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parts = None
    if not isinstance(parts, dict):
        reader.unreadable.append("sources")
        return {}
    sources = {}
    for name, part in parts.items():
        if not isinstance(part, dict):
            reader.unreadable.append(f"sources.{name}")
            continue
        report = SourceReport.from_fields(part, default_source=name)
        reader.unreadable += [f"sources.{name}.{field}" for field in report.unreadable]
        sources[name] = report
    return sources


def _text(value: Any) -> Any:
    """Bytes from Redis as text; anything else (text, a JSON value) as it is."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _integer_text(value: int | None) -> str:
    return "" if value is None else str(value)


def _number_text(value: float | None, decimals: int) -> str:
    return "" if value is None else f"{value:.{decimals}f}"
