"""Stopping a task for sure.

redis-py's asyncio client can swallow a cancellation that lands in the middle of a command
(upstream redis/redis-py#2028 and #2551; how often: bench/README.md): the task then runs on as if
nothing happened, and whoever awaits its end waits forever. So a task is cancelled again until it
has really ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

RECANCEL_EVERY_S = 0.1


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` (again and again if need be) and wait until it has ended.

    A cancellation of the caller meanwhile is held back until the task has ended (then raised), so
    cleanup that cancels children never leaves one running."""
    interrupted = False
    while not task.done():
        task.cancel()
        try:
            await asyncio.wait([task], timeout=RECANCEL_EVERY_S)
        except asyncio.CancelledError:
            interrupted = True
    if not task.cancelled():
        # Retrieved so that asyncio does not warn about an exception nobody saw.
        with contextlib.suppress(BaseException):
            task.exception()
    if interrupted:
        raise asyncio.CancelledError
