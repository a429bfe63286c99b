"""`betterbot lag`: every stream's length, and per consumer group its lag and pending entries.

- lag: entries not yet delivered to the group (work waiting). A lag that keeps growing means the
  group's consumers are too few or stuck; it must stay well below STREAM_MAXLEN, or trimming
  could drop entries the group never read. `~` marks an estimate (see shared.stream_metrics).
- pending: delivered, not acknowledged (work in flight, or left by a consumer that died: those
  are reclaimed after their idle time). `--consumers` shows who holds them and for how long.
The same numbers are on every service's /metrics (`betterbot_stream_group_*`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import redis.asyncio as aioredis

from shared.stream_metrics import stream_stats


async def collect(
    client: aioredis.Redis, streams: list[str], with_consumers: bool
) -> list[dict[str, Any]]:
    """Stats of each stream as plain data (what `--json` prints)."""
    report = []
    for stream in streams:
        stats = await stream_stats(client, stream)
        item = asdict(stats)
        if with_consumers:
            for group in item["groups"]:
                group["consumer_list"] = await _consumers(client, stream, group["group"])
        report.append(item)
    return report


async def _consumers(client: aioredis.Redis, stream: str, group: str) -> list[dict[str, Any]]:
    rows = await client.xinfo_consumers(stream, group)
    return [
        {"name": _text(r["name"]), "pending": int(r["pending"]), "idle_ms": int(r["idle"])}
        for r in rows
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def render(report: list[dict[str, Any]]) -> list[str]:
    """A table: one line per stream and group, consumers indented under their group."""
    lines = [
        f"{'STREAM':<24} {'LENGTH':>9}  {'GROUP':<16} {'CONSUMERS':>9} {'PENDING':>9} {'LAG':>10}"
    ]
    for item in report:
        stream, length = item["stream"], item["length"]
        if not item["groups"]:
            lines.append(f"{stream:<24} {length:>9}  {'-':<16}")
        for index, group in enumerate(item["groups"]):
            name = stream if index == 0 else ""
            shown_len = str(length) if index == 0 else ""
            lag = f"{'' if group['lag_exact'] else '~'}{group['lag']}"
            lines.append(
                f"{name:<24} {shown_len:>9}  {group['group']:<16} {group['consumers']:>9} "
                f"{group['pending']:>9} {lag:>10}"
            )
            for consumer in group.get("consumer_list", []):
                lines.append(
                    f"{'':<24} {'':>9}    {consumer['name']:<40} pending {consumer['pending']}"
                    f"  idle {consumer['idle_ms'] / 1000:.1f}s"
                )
    return lines
