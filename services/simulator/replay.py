"""The simulated clock: emits scheduled trades when they are due, and injected trades at once.

Pacing uses absolute due times (offset from the clock's start), emitting every trade already due
in one burst and then sleeping until the next one: late wake-ups are caught up, never accumulated,
so the rate does not drift. Long bursts yield to the event loop now and then so client writers keep
flowing.

Emitting a trade stamps it with the real current time (`timestamp`, integer Unix seconds as at
Dome, and `emitted_at`, the float the ground truth keeps) and a block number, appends it to the
history, and fans it out to the WebSocket subscriptions. While the mempool is on
(`successors.Mempool`), a trade is first announced as pending and emitted `lead_s` later (or
never: a dropped one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter

from services.simulator.chain import ChainNode
from services.simulator.feed import Hub
from services.simulator.history import History
from services.simulator.successors import Mempool
from services.simulator.tape import Scheduled
from services.simulator.trades import BlockClock, Trade, TradeTemplate

log = logging.getLogger(__name__)

MIN_SLEEP = 0.001
BURST_YIELD = 256

EMITTED = Counter("betterbot_sim_trades_emitted_total", "Trades emitted by the simulator")


class Emitter:
    def __init__(
        self,
        schedule: Iterator[Scheduled],
        history: History,
        hub: Hub,
        start_gate: asyncio.Event | None = None,
        chain: ChainNode | None = None,
    ) -> None:
        self._schedule = schedule
        self._history = history
        self._hub = hub
        self._gate = start_gate
        self._chain = chain
        self._blocks = BlockClock()
        # The pending stage (services/simulator/successors.py); off unless switched on.
        self.mempool = Mempool()
        self.emitted = 0
        self.started = False
        self.done = False
        # Completed passes over the tape (the synthetic stream never completes one).
        self.loops = 0

    def emit(
        self,
        template: TradeTemplate,
        timestamp: int | None = None,
        block_number: int | None = None,
        log_index: int | None = None,
    ) -> Trade:
        now = time.time()
        ts = int(now) if timestamp is None else timestamp
        block, index = self._blocks.next(ts)
        trade = Trade.stamp(
            template,
            seq=self.emitted,
            timestamp=ts,
            block_number=block if block_number is None else block_number,
            log_index=index if log_index is None else log_index,
            emitted_at=now,
        )
        self.emitted += 1
        self._history.append(trade)
        self._hub.publish(trade)
        if self._chain is not None:
            self._chain.include(trade)
        EMITTED.inc()
        return trade

    def submit(
        self, template: TradeTemplate, *, pending: bool | None = None, drop: bool | None = None
    ) -> dict[str, Any] | None:
        """Emit the trade now, or while the mempool is on (or `pending`), announce it as pending
        and emit it `lead_s` later, unless it is dropped (`drop`, or the mempool's every n-th):
        then it never confirms. Returns the pending event's truth, None when emitted at once."""
        mempool = self.mempool
        if not (mempool.enabled if pending is None else pending):
            self.emit(template)
            return None
        now = time.time()
        seen = Trade.stamp(
            template, seq=-1, timestamp=int(now), block_number=0, log_index=0, emitted_at=now
        )
        dropped = mempool.dropping() if drop is None else drop
        self._hub.publish(seen, pending=True)
        if not dropped:
            asyncio.get_running_loop().call_later(mempool.lead_s, self.emit, template)
        return mempool.record(seen, dropped)

    async def run(self) -> None:
        """Wait for the start gate (the first subscription), then play the schedule to its end."""
        if self._gate is not None:
            await self._gate.wait()
        self.started = True
        log.info("clock_started")
        loop = asyncio.get_running_loop()
        start = loop.time()
        burst = 0
        for offset, template, n in self._schedule:
            self.loops = n
            delay = start + offset - loop.time()
            if delay > 0:
                burst = 0
                await asyncio.sleep(max(delay, MIN_SLEEP))
            elif burst >= BURST_YIELD:
                burst = 0
                await asyncio.sleep(0)
            self.submit(template)
            burst += 1
        self.loops += 1
        self.done = True
        log.info("tape_done", extra={"emitted": self.emitted})
