"""`betterbot partitions status|move`: the partition count of `orders.raw` changed as an operation.

A fill's partition is a function of its wallet (and token) and of N, so a new N moves every
wallet's state to another slot. `move` does that, once the pipeline is drained (docs/operations.md,
"Changing the partition count", gives the whole procedure):
- detector units: `wm:<wallet>:<market>` to the new wallet lane of the wallet, `tok:<token>` to
  the new token lane of the token (one lane holds both with N = 1);
- decisions (done keys): each one decided within `--recent-s` (the window in which a fill can
  still change status: pending -> confirmed, a reorg), split into the wallet and token shares of
  its effect, each share to every new lane of its kind, since a done key does not say its wallet;
  lanes where the fill never comes keep an inert copy until DETECTOR_DONE_TTL_S;
- dedupe keys: to every new partition, for the same reason, with the time they had left;
- watermarks: each `<feed>:<wallet>` to the new wallet partition of the wallet (the larger mark
  wins).
The old layout's keys that were not written again are deleted last (a later move back would find
them stale otherwise). The old streams are left as they are: drained, read by no one, their
history still there.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.detector.forward import unforwarded
from services.detector.rules import SEED_UNIT, TOKEN_UNIT, WALLET_UNIT, Effect
from shared.orders_raw import watermark_key
from shared.streams import Lane, Scope, Streams

DONE = "done:"
SCAN_COUNT = 1000


@dataclass
class MoveReport:
    units: int = 0
    decisions: int = 0
    decisions_too_old: int = 0
    dedupe_keys: int = 0
    watermarks: int = 0
    # Keys of the old layout deleted once moved.
    removed: int = 0


async def status(
    client: aioredis.Redis, streams: Streams, problems: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """The layout's lanes and their lengths, with what is not drained (for `status`)."""
    lanes = streams.lanes()
    lengths = [int(await client.xlen(lane.stream)) for lane in lanes]
    data = {
        "partitions": streams.partitions,
        "lanes": [
            {"stream": lane.stream, "scope": lane.scope.value, "length": length}
            for lane, length in zip(lanes, lengths, strict=True)
        ],
        "undrained": problems,
    }
    lines = [f"STREAM_PARTITIONS={streams.partitions}"]
    lines += [
        f"  {lane.stream} ({lane.scope.value}): {length} entries"
        for lane, length in zip(lanes, lengths, strict=True)
    ]
    lines += [f"not drained: {p}" for p in problems] or ["drained: nothing waits"]
    return data, lines


async def undrained(client: aioredis.Redis, streams: Streams) -> list[str]:
    """What still waits in the layout `streams`: unread or pending entries of any group on any
    lane, and signals not yet forwarded from an outbox. Empty when it is safe to move."""
    problems: list[str] = []
    lanes = streams.lanes()
    names = dict.fromkeys([*streams.order_streams(), *(lane.stream for lane in lanes)])
    for stream in names:
        problems += await _stream_problems(client, stream)
    for lane in lanes:
        if lane.outbox and (length := await unforwarded(client, streams, lane.signals)):
            problems.append(f"{lane.signals}: {length} signals not forwarded yet")
    return problems


async def _stream_problems(client: aioredis.Redis, stream: str) -> list[str]:
    if not await client.exists(stream):
        return []
    groups: Any = await client.xinfo_groups(stream)
    found = []
    last: Any = None
    for group in groups:
        name = group["name"].decode()
        lag, pending = group.get("lag"), int(group["pending"])
        if lag is None:
            # Redis cannot count the lag after deletions: compare the ids instead.
            last = last or (await client.xinfo_stream(stream))["last-generated-id"]
            lag = 0 if group["last-delivered-id"] == last else "unknown"
        if pending or lag:
            found.append(f"{stream}: group {name} has lag {lag} and {pending} pending")
    return found


async def move(
    client: aioredis.Redis,
    old: Streams,
    new: Streams,
    *,
    recent_s: int,
    done_ttl_s: int,
) -> MoveReport:
    """Copy the state of layout `old` into layout `new` (see the module docstring), then delete
    what of the old layout was not written again: a key left behind would come back, stale, when
    a later move returns to a layout it shares prefixes with (1 -> 4 -> 1, 2 -> 4)."""
    report = MoveReport()
    before = await _state_keys(client, old)
    written: set[str] = set()
    report.units = await _move_units(client, old, new, written)
    await _move_decisions(client, old, new, recent_s, done_ttl_s, report, written)
    report.dedupe_keys = await _copy_dedupe(client, old, new, written)
    report.watermarks = await _move_watermarks(client, old, new)
    stale = sorted(before - written)
    for start in range(0, len(stale), SCAN_COUNT):
        await client.unlink(*stale[start : start + SCAN_COUNT])
    report.removed = len(stale)
    return report


async def _state_keys(client: aioredis.Redis, streams: Streams) -> set[str]:
    """Every detector and dedupe key of a layout."""
    prefixes = [lane.state_prefix for lane in streams.lanes()]
    prefixes += [
        streams.seen_order_prefix(stream)
        for stream in [*streams.order_streams(), *streams.token_streams()]
    ]
    return {key.decode() for prefix in prefixes for key in await _keys(client, prefix)}


def _lane_for(new: Streams, scope: Scope, key: str) -> Lane:
    """The new lane that holds the unit of `key` (a wallet or a token) of that scope."""
    if not new.partitioned:
        return new.lanes()[0]
    stream = new.wallet_stream(key) if scope is Scope.WALLET else new.token_stream(key)
    return next(lane for lane in new.lanes() if lane.stream == stream)


async def _keys(client: aioredis.Redis, prefix: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=_glob(prefix) + "*", count=SCAN_COUNT)]


def _glob(prefix: str) -> str:
    """`prefix` as a literal SCAN pattern (hash tags are braces; ? * [ are glob characters)."""
    return "".join("\\" + c if c in "?*[]\\" else c for c in prefix)


async def _move_units(client: aioredis.Redis, old: Streams, new: Streams, written: set[str]) -> int:
    moved = 0
    for lane in old.lanes():
        for key in await _keys(client, lane.state_prefix):
            unit = key.decode()[len(lane.state_prefix) :]
            target = _unit_lane(new, unit)
            if target is None:
                continue
            value, ttl = await _read(client, key)
            if value is None:
                continue
            await _set(client, target.state_prefix + unit, value, ttl, written)
            moved += 1
    return moved


def _unit_lane(new: Streams, unit: str) -> Lane | None:
    if unit.startswith(WALLET_UNIT):
        wallet = unit[len(WALLET_UNIT) :].split(":", 1)[0]
        return _lane_for(new, Scope.WALLET, wallet)
    if unit.startswith(TOKEN_UNIT):
        return _lane_for(new, Scope.TOKEN, unit[len(TOKEN_UNIT) :])
    if unit.startswith(SEED_UNIT):  # a wallet's positions seeding goes with its units
        return _lane_for(new, Scope.WALLET, unit[len(SEED_UNIT) :])
    return None  # a done key, or nothing of ours


async def _move_decisions(
    client: aioredis.Redis,
    old: Streams,
    new: Streams,
    recent_s: int,
    done_ttl_s: int,
    report: MoveReport,
    written: set[str],
) -> None:
    found: dict[str, list[tuple[bytes, int]]] = defaultdict(list)
    for lane in old.lanes():
        for key in await _keys(client, lane.state_prefix + DONE):
            value, ttl = await _read(client, key)
            if value is None:
                continue
            if ttl > 0 and done_ttl_s * 1000 - ttl > recent_s * 1000:
                report.decisions_too_old += 1
                continue
            found[key.decode()[len(lane.state_prefix) :]].append((value, ttl))
    for name, copies in found.items():
        ttl = max(t for _, t in copies)
        for lane in new.lanes():
            value = _share(lane.scope, [v for v, _ in copies])
            await _set(client, lane.state_prefix + name, value, ttl, written)
        report.decisions += 1


def _share(scope: Scope, values: Iterable[bytes]) -> bytes:
    """The done value a lane of `scope` keeps of one decision's copies: a tombstone or "decided,
    no effect" as it is, else the merged effect's share."""
    effects: list[Effect] = []
    for value in values:
        effect = Effect.load(value)
        if effect is None:
            return value  # a tombstone: the fill was retracted
        effects.append(effect)
    merged = effects[0]
    for effect in effects[1:]:
        merged = merged.merge(effect)
    return merged.part(scope).dump()


async def _copy_dedupe(
    client: aioredis.Redis, old: Streams, new: Streams, written: set[str]
) -> int:
    sources = [*old.order_streams(), *old.token_streams()]
    targets = [*new.order_streams(), *new.token_streams()]
    copied = 0
    for stream in sources:
        prefix = old.seen_order_prefix(stream)
        for key in await _keys(client, prefix):
            ttl = await client.pttl(key)
            name = key.decode()[len(prefix) :]
            for target in targets:
                copy = new.seen_order_prefix(target) + name
                await _set(client, copy, b"1", ttl, written, only_new=True)
            copied += 1
    return copied


async def _move_watermarks(client: aioredis.Redis, old: Streams, new: Streams) -> int:
    moved = 0
    for stream in old.order_streams():
        marks: Any = await client.hgetall(watermark_key(old, stream))
        for field_name, value in marks.items():
            feed_wallet = field_name.decode()
            wallet = feed_wallet.split(":", 1)[1] if ":" in feed_wallet else feed_wallet
            target = watermark_key(new, new.wallet_stream(wallet))
            current = await client.hget(target, feed_wallet)
            if current is None or int(current) < int(value):
                await client.hset(target, feed_wallet, value)
            moved += 1
    return moved


async def _read(client: aioredis.Redis, key: bytes) -> tuple[bytes | None, int]:
    value: Any = await client.get(key)
    return value, int(await client.pttl(key))


async def _set(
    client: aioredis.Redis,
    key: str,
    value: bytes,
    ttl_ms: int,
    written: set[str],
    *,
    only_new: bool = False,
) -> None:
    """SET keeping the time to live it had (PTTL -1: none; -2: gone meanwhile, then skipped)."""
    if ttl_ms == -2:
        return
    await client.set(key, value, px=ttl_ms if ttl_ms > 0 else None, nx=only_new)
    written.add(key)
