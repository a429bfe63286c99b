"""Fault injection state, driven by tests through the `/_sim` control API (see `app`).

- Auth rejection: while on, every WebSocket handshake and REST request is refused with 401, as if
  the key had been revoked (optionally the open sockets are closed with `AUTH_CLOSE_CODE`).
- Rate limiting: the next N REST requests (Dome orders and Data API trades) are answered 429 with
  a `Retry-After` header and Dome's error body.
- A log of REST requests (path, query, status, time; never headers, so never a key), so tests
  can check what a client asked for and how it paced itself.

Stalling and dropping sockets live in `feed.Hub` (they act on connections).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# 4001/4003 mirror HTTP 401/403 in the application range of close codes (RFC 6455 7.4.2).
AUTH_CLOSE_CODE, AUTH_CLOSE_REASON = 4001, "unauthorized: API key revoked"
REQUEST_LOG_MAX = 10_000


@dataclass(frozen=True, slots=True)
class RequestRecord:
    at: float
    path: str
    params: dict[str, str]
    status: int

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "path": self.path, "params": self.params, "status": self.status}


class Faults:
    def __init__(self) -> None:
        self.reject_auth = False
        self._throttle_left = 0
        self._retry_after = "1"
        self.requests: deque[RequestRecord] = deque(maxlen=REQUEST_LOG_MAX)

    def throttle(self, requests: int, retry_after: float) -> None:
        """Answer the next `requests` REST requests with 429 and this Retry-After (seconds)."""
        if requests < 0 or retry_after < 0:
            raise ValueError("requests and retry_after must not be negative")
        self._throttle_left = requests
        # Whole seconds are what RFC 9110 allows; fractions are a test convenience.
        self._retry_after = (
            str(int(retry_after)) if retry_after == int(retry_after) else str(retry_after)
        )

    def take_throttle(self) -> str | None:
        """The Retry-After value if this request is to be refused, else None."""
        if self._throttle_left <= 0:
            return None
        self._throttle_left -= 1
        return self._retry_after

    @property
    def throttle_left(self) -> int:
        return self._throttle_left

    def record(self, path: str, params: Mapping[str, str], status: int) -> None:
        self.requests.append(RequestRecord(time.time(), path, dict(params), status))

    def state(self) -> dict[str, Any]:
        return {
            "reject_auth": self.reject_auth,
            "throttle_left": self._throttle_left,
            "retry_after": self._retry_after,
        }
