"""The store API's input types: what a time, an address or a text parameter must look like.

Bad input is a 422 naming the problem (FastAPI's validation list), never a guess: a time without
an offset, an address that is not 0x + 40 hex digits, a NUL or a control character in text.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, PlainValidator, StringConstraints, WithJsonSchema

from shared.models import normalize_address

UNIX_MAX = 20_000_000_000  # Unix seconds (year 2603); larger numbers are more likely mistakes
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"  # date, time, fraction
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))$"  # offset: Z or +hh:mm
)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_time(value: Any) -> datetime:
    """An RFC 3339 date-time with its offset, or Unix seconds; always returned in UTC.

    Strict on purpose: a time without an offset would be a guess about its zone.
    """
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).strip()
    if _NUMBER.match(text):
        seconds = float(text)
        if not 0 <= seconds < UNIX_MAX:
            raise ValueError(f"Unix seconds must be in [0, {UNIX_MAX})")
        return datetime.fromtimestamp(seconds, UTC)
    match = _RFC3339.match(text)
    if match is None:
        raise ValueError(
            "not a time: give RFC 3339 with an offset (2025-11-06T20:53:11Z) or Unix seconds"
        )
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zulu, sign, off_h, off_m = match.groups()[6:]
    try:
        zone = (
            UTC
            if zulu
            else timezone(
                (1 if sign == "+" else -1) * timedelta(hours=int(off_h), minutes=int(off_m))
            )
        )
        moment = datetime(
            year,
            month,
            day,
            hour,
            minute,
            min(second, 59),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=zone,
        )
        return moment.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"not a valid time: {exc}") from exc


def _encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid Unicode (lone surrogate)") from exc
    return value


ADDRESS_PATTERN = "^0x[0-9a-fA-F]{40}$"
# The pattern is for the OpenAPI document; the validator gives the clearer message.
Wallet = Annotated[str, AfterValidator(normalize_address)]
Time = Annotated[
    datetime,
    PlainValidator(parse_time),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "number", "minimum": 0, "exclusiveMaximum": UNIX_MAX},
            ]
        }
    ),
]
# Printable text only: a NUL cannot be stored in Postgres, and nothing needs control characters.
Text = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"),
    AfterValidator(_encodable),
]
Label = Annotated[
    str,
    StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$"),
    AfterValidator(_encodable),
]
