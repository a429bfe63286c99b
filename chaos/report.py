"""The table of a run, as text for the terminal and as JSON for `chaos/results/latest.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

COLUMNS = (
    ("fault", "fault"),
    ("orders_expected", "orders exp"),
    ("orders_stored", "orders stored"),
    ("signals_expected", "signals exp"),
    ("signals_stored", "signals stored"),
    ("signals_ws", "to WS (resume)"),
    ("signals_webhook", "to webhook"),
    ("lost_total", "lost"),
    ("duplicated_total", "dup"),
    ("webhook_redelivered", "hook redeliv."),
    ("pending_total", "pending"),
    ("restarts", "restarts"),
    ("verdict", "verdict"),
)


def verdict(row: dict[str, Any]) -> str:
    if "error" in row:
        return "ERROR"
    if not all(f["supported"] for f in row["faults"]):
        return "not supported by this simulator"
    if row["control"]:
        # The instrument's own check: a pipeline broken on purpose must show as losing.
        return "ok (loss seen)" if row["lost_total"] > 0 else "FAIL (loss not seen)"
    clean = (
        row["lost_total"] == 0
        and row["duplicated_total"] == 0
        and row["pending_total"] == 0
        and row["orders_unexpected"] == 0
        and row["signals_unexpected"] == 0
        and not row["logs"]["key_in_logs"]
        and row["webhook_receiver"]["bad_signatures"] == 0
        and not any(row.get("anomalies", {}).values())
    )
    return "ok" if clean else "FAIL"


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    if "skipped" in row:
        return row
    if "error" not in row:
        row["pending_total"] = sum(abs(n) for n in row["pending"].values())
        row["restarts"] = len(row["supervisor_restarts"])
    row["verdict"] = verdict(row)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title in COLUMNS]]
    for row in rows:
        cells.append([str(row.get(key, "-")) for key, _ in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(str(r.get(k, "-")) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def details(rows: list[dict[str, Any]]) -> str:
    """Per row: what the faults did, and anything not zero that the table sums up."""
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"- {row['fault']}: ERROR {row['error']}")
            continue
        if "skipped" in row:
            lines.append(f"- {row['fault']}: skipped ({row['skipped']})")
            continue
        notes = "; ".join(n for f in row["faults"] for n in f["notes"])
        lines.append(f"- {row['fault']} ({row['seconds']}s): {notes or 'no fault'}")
        lines.append(
            f"    WebSocket subscriber: {row['subscriber']['connections']} connections, each "
            f"resumed with ?last_id; webhook: "
            f"{row['webhook_receiver']['first_attempts_refused_on_purpose']} first attempts "
            "answered 503 on purpose (the notifier must retry them)"
        )
        if row.get("quirk_trades"):
            lines.append(
                f"    {row['quirk_trades']} tracked trade(s) stamped wrongly on purpose "
                f"(dead letters on orders.dead: {row['dead_letters'].get('orders_dead')})"
            )
        for group in ("lost", "duplicated", "pending", "anomalies"):
            nonzero = {k: v for k, v in row.get(group, {}).items() if v}
            if nonzero:
                lines.append(f"    {group}: {nonzero}")
        if row["supervisor_restarts"]:
            lines.append(f"    supervisor restarts: {row['supervisor_restarts']}")
        for key in ("orders_unexpected", "signals_unexpected"):
            if row[key]:
                lines.append(f"    {key}: {row[key]}")
        if row["logs"]["key_in_logs"]:
            lines.append(f"    THE KEY IS IN THE LOGS OF {row['logs']['key_in_logs']}")
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
