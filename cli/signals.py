"""`betterbot signals tail`: follow the `signals` stream, filtered, as text or JSON lines.

Reads with plain XREAD (no consumer group: tailing acknowledges nothing and takes nothing from
any consumer). `--from $` (the default) starts after the newest entry; `--from 0` starts at the
oldest kept one; any stream id starts after that id. Entries that are not valid Signals are
counted on stderr and skipped.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import ValidationError

from shared.models import Signal, SignalKind, normalize_address
from shared.redis_streams import decode
from shared.terminal import printable


@dataclass(frozen=True)
class SignalFilter:
    kinds: frozenset[SignalKind] = field(default_factory=frozenset)
    wallets: frozenset[str] = field(default_factory=frozenset)
    min_confidence: float = 0.0

    @classmethod
    def build(
        cls, kinds: Iterable[str], wallets: Iterable[str], min_confidence: float
    ) -> SignalFilter:
        """Raises ValueError naming the bad kind or address."""
        try:
            parsed_kinds = frozenset(SignalKind(k) for k in kinds)
        except ValueError as exc:
            known = ", ".join(k.value for k in SignalKind)
            raise ValueError(f"{exc}; known kinds: {known}") from None
        return cls(parsed_kinds, frozenset(normalize_address(w) for w in wallets), min_confidence)

    def matches(self, signal: Signal) -> bool:
        return (
            (not self.kinds or signal.kind in self.kinds)
            and (not self.wallets or signal.wallet in self.wallets)
            and signal.confidence >= self.min_confidence
        )


def format_signal(signal: Signal, stream_id: str) -> str:
    when = dt.datetime.fromtimestamp(signal.detected_at, dt.UTC).isoformat(timespec="milliseconds")
    who = signal.wallet + (f" ({signal.wallet_label})" if signal.wallet_label else "")
    outcome = f" {signal.token_label}" if signal.token_label else ""
    return printable(
        f"{when.removesuffix('+00:00')}Z {signal.kind.value:<12} {signal.side.value:<4} "
        f"{signal.shares:,.2f}{outcome} @ {signal.price:.3f} = ${signal.notional_usd:,.2f} "
        f"conf {signal.confidence:.2f}  {who}  {signal.market_slug or signal.condition_id}  "
        f"[{stream_id}]"
    )


def format_json(signal: Signal, stream_id: str) -> str:
    return orjson.dumps({**signal.model_dump(mode="json"), "stream_id": stream_id}).decode()


async def resolve_start(client: aioredis.Redis, stream: str, start: str) -> str:
    """`$` as the id of the newest entry now, so nothing added between two reads is missed."""
    if start != "$":
        return start
    newest: Any = await client.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


async def tail(
    client: aioredis.Redis,
    stream: str,
    matcher: SignalFilter,
    *,
    start: str = "$",
    limit: int = 0,
    as_json: bool = False,
    write: Callable[[str], None] = print,
    block_ms: int = 1000,
) -> int:
    """Write matching signals until `limit` of them (0: forever); returns how many were written."""
    last = await resolve_start(client, stream, start)
    shown = 0
    render = format_json if as_json else format_signal
    while limit == 0 or shown < limit:
        reply: Any = await client.xread({stream: last}, count=500, block=block_ms)
        for _, entries in reply or []:
            for raw_id, fields in entries:
                last = raw_id.decode()
                try:
                    signal = Signal.model_validate(decode(fields))
                except (ValueError, ValidationError):
                    print(f"skipped entry {last}: not a valid Signal", file=sys.stderr)
                    continue
                if matcher.matches(signal):
                    write(render(signal, last))
                    shown += 1
                    if shown == limit:
                        return shown
    return shown
