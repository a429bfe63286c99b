"""`betterbot validate [--by kind|wallet|source] [--since WHEN] [--until WHEN]`: does following the
signals pay?

Reads what the store's validator recorded (table `signal_validation`, in the Postgres of
`DATABASE_URL`) and prints the report of `services/store/validation_report.py`, the same as
`GET /signals/validation` and the tape replay's `--validate`: per group and horizon the count,
the mean markout net of fees in cents per share, the fee counted, the hit rate with its 95% Wilson
interval, and "not significant" where the interval includes 50% or n < 10. Retracted signals are
left out. `--since` / `--until` select signals by `detected_at`: RFC 3339 with an offset, Unix
seconds, or a duration back from now (`30m`, `24h`, `7d`).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.store.api_inputs import parse_time
from services.store.markouts import LABELS
from services.store.validation_report import RULE, Grouping, Tally, render, to_json
from services.store.validation_summary import summary

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
CONNECT_TIMEOUT_S = 10.0


class ValidateError(Exception):
    """Postgres could not answer: nothing to report."""


def parse_when(text: str, now: float | None = None) -> datetime:
    """A time (RFC 3339 with offset, Unix seconds) or a duration ago (`7d`); ValueError if none."""
    match = _DURATION.match(text.strip())
    if match:
        ago = float(match[1]) * _UNIT_S[match[2]]
        return datetime.fromtimestamp((time.time() if now is None else now) - ago, UTC)
    return parse_time(text)


async def collect(
    database_url: str, by: Grouping, since: datetime | None, until: datetime | None
) -> list[Tally]:
    try:
        conn = await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ValidateError(f"Postgres unreachable: {type(exc).__name__}") from None
    try:
        return await summary(conn, by, since, until)
    except asyncpg.UndefinedTableError:
        raise ValidateError(
            "no validation in this database: start the store (it creates signal_validation and "
            "records markouts as their horizons pass)"
        ) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ValidateError(f"Postgres failed: {type(exc).__name__}") from None
    finally:
        await conn.close()


def report(
    tallies: list[Tally], by: Grouping, since: datetime | None, until: datetime | None
) -> tuple[dict[str, Any], list[str]]:
    """The JSON (`--json`) and the text of the report."""
    span = " ".join(
        f"{name} {moment.isoformat()}"
        for name, moment in (("since", since), ("until", until))
        if moment is not None
    )
    data = {
        "by": by,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "horizons": list(LABELS),
        "rule": RULE,
        "rows": [to_json(t) for t in tallies],
    }
    lines = [
        "Markouts and settlements of the stored signals (retracted ones left out), in cents per "
        "share, net of the taker fee recorded with each"
        + (f"; signals detected {span}" if span else ""),
        f"Rule: {RULE}.",
        "",
        *render(tallies, by),
    ]
    return data, lines
