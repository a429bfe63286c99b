"""The validation summary read from Postgres: what `GET /signals/validation` and
`betterbot validate` show (the report itself is `validation_report.py`).

One query sums `signal_validation` per group and horizon in Postgres, so the answer is as small
as the report whatever the number of signals. Retracted signals are left out (their fill did not
happen), and so are rows without a price (nothing was measured). `since` / `until` select on the
signal's `detected_at`, as the listings do.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from services.store.validation_report import Grouping, Tally, complete, ordered
from shared.models import SignalKind

# The group's key and its label for people, as SQL over `signals s`.
_GROUPS: dict[Grouping, tuple[str, str]] = {
    "kind": ("s.kind", "''"),
    "wallet": ("s.wallet", "max(s.wallet_label)"),
    "source": ("s.source", "''"),
}


def summary_sql(
    by: Grouping, since: datetime | None, until: datetime | None
) -> tuple[str, list[Any]]:
    key, label = _GROUPS[by]
    conditions = ["s.status <> 'retracted'", "v.markout_cents IS NOT NULL"]
    params: list[Any] = []
    for value, comparison in ((since, ">="), (until, "<")):
        if value is not None:
            params.append(value)
            conditions.append(f"s.detected_at {comparison} ${len(params)}")
    sql = f"""
SELECT {key} AS grp, {label} AS label, v.horizon,
       count(*) AS n,
       count(*) FILTER (WHERE v.markout_cents > 0) AS hits,
       count(*) FILTER (WHERE v.markout_cents = 0) AS flat,
       sum(v.markout_cents) AS total_cents,
       sum(v.fee_cents) AS total_fee_cents
FROM signal_validation v JOIN signals s ON s.signal_id = v.signal_id
WHERE {" AND ".join(conditions)}
GROUP BY {key}, v.horizon
"""
    return sql, params


async def summary(
    conn: asyncpg.Connection,
    by: Grouping,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Tally]:
    """Every group's tallies, each horizon present ("not measured" where nothing was); by kind,
    every kind is listed."""
    sql, params = summary_sql(by, since, until)
    tallies = [
        Tally(
            r["grp"],
            r["label"] or "",
            r["horizon"],
            r["n"],
            r["hits"],
            r["flat"],
            r["total_cents"],
            r["total_fee_cents"],
        )
        for r in await conn.fetch(sql, *params)
    ]
    every = [kind.value for kind in SignalKind] if by == "kind" else []
    return ordered(complete(tallies, every), by)
