"""Fault injection state, driven by tests through the `/_sim` control API (see `app`).

- Auth rejection: while on, every WebSocket handshake and REST request is refused with 401, as if
  the key had been revoked (optionally the open sockets are closed with `AUTH_CLOSE_CODE`).
- Rate limiting: the next N REST requests (Dome orders and Data API trades) are answered 429 with
  a `Retry-After` header and Dome's error body.
- A log of REST requests (path, query, status, time; never headers, so never a key), so tests
  can check what a client asked for and how it paced itself.
- Per-wallet REST failures (`RestFailure`, route `POST /_sim/rest_fail`): the orders endpoint
  answers one wallet (or every wallet, `*`) with an HTTP status, holds its answer for a while (a
  client's timeout on a long history), or says `has_more` without a `pagination_key`; until
  cleared. Every other wallet is answered normally.
- REST indexing lag (`rest_lag_s`, route `POST /_sim/rest_lag`, setting SIM_REST_INDEX_LAG_S): a
  trade shows up in the orders endpoint only this long after its live event, as at a provider
  whose REST index trails its feed.

Stalling and dropping sockets, and updates applied late (`Hub.update_delay_s`), live in
`feed.Hub` (they act on connections).
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


ALL_USERS = "*"


@dataclass(frozen=True, slots=True)
class RestFailure:
    """How the orders endpoint misbehaves for one wallet."""

    # Answer with this HTTP status (and Dome's error body) instead of the orders.
    status: int | None = None
    # Hold the answer this long first: a client whose timeout is shorter gives up.
    hang_s: float = 0.0
    # Say `has_more: true` with a null `pagination_key` on every page (a broken page chain).
    no_pagination_key: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "hang_s": self.hang_s,
            "no_pagination_key": self.no_pagination_key,
        }


@dataclass(frozen=True, slots=True)
class RequestRecord:
    at: float
    path: str
    params: dict[str, str]
    status: int
    # The Data API CDN's cf-cache-status of the answer (HIT, MISS, DYNAMIC); empty elsewhere.
    cache: str = ""

    def to_json(self) -> dict[str, Any]:
        record = {"at": self.at, "path": self.path, "params": self.params, "status": self.status}
        return {**record, "cache": self.cache} if self.cache else record


def parse_rest_failure(body: Mapping[str, Any]) -> tuple[str, RestFailure | None]:
    """The wallet and failure of a `POST /_sim/rest_fail` body (None: clear); ValueError if bad.

    `{"user": "0x..", "status": 500}`, `{"user": .., "hang_s": 30}`,
    `{"user": .., "no_pagination_key": true}` (combinable), `{"user": .., "clear": true}`;
    `user` may be `*` (every wallet)."""
    user = body.get("user")
    if not isinstance(user, str) or not user:
        raise ValueError("user must be a wallet address or *")
    if body.get("clear") is True:
        return user, None
    status, hang_s = body.get("status"), body.get("hang_s", 0)
    no_key = body.get("no_pagination_key", False)
    if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
        raise ValueError("status must be an HTTP error status (400..599)")
    if isinstance(hang_s, bool) or not isinstance(hang_s, int | float) or hang_s < 0:
        raise ValueError("hang_s must be a number of seconds, at least 0")
    if not isinstance(no_key, bool):
        raise ValueError("no_pagination_key must be a boolean")
    if status is None and not hang_s and not no_key:
        raise ValueError("give status, hang_s or no_pagination_key (or clear)")
    return user, RestFailure(status, float(hang_s), no_key)


class Faults:
    def __init__(self, rest_lag_s: float = 0.0, prices_lag_s: float = 0.0) -> None:
        self.reject_auth = False
        self._throttle_left = 0
        self._retry_after = "1"
        self.requests: deque[RequestRecord] = deque(maxlen=REQUEST_LOG_MAX)
        self.rest_lag_s = rest_lag_s
        # How far the CLOB price history trails the trades (`prices.price_history`).
        self.prices_lag_s = prices_lag_s
        # wallet (lower case) or ALL_USERS -> how the orders endpoint fails for it.
        self.rest_failures: dict[str, RestFailure] = {}

    def fail_rest(self, user: str, failure: RestFailure | None) -> None:
        """Make the orders endpoint fail for `user` (`*`: everyone); None clears it."""
        if failure is None:
            self.rest_failures.pop(user.lower(), None)
        else:
            self.rest_failures[user.lower()] = failure

    def rest_failure(self, user: str | None) -> RestFailure | None:
        """The failure to play for a request about `user`, if any."""
        if user is not None and (failure := self.rest_failures.get(user.lower())) is not None:
            return failure
        return self.rest_failures.get(ALL_USERS)

    def prices_known_before(self, now: float) -> float | None:
        """Trades emitted after this are not in the price history yet (None: no lag)."""
        return now - self.prices_lag_s if self.prices_lag_s > 0 else None

    def indexed_before(self, now: float) -> float | None:
        """Trades emitted after this are not in the REST index yet (None: no lag)."""
        return now - self.rest_lag_s if self.rest_lag_s > 0 else None

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

    def record(self, path: str, params: Mapping[str, str], status: int, cache: str = "") -> None:
        self.requests.append(RequestRecord(time.time(), path, dict(params), status, cache))

    def state(self) -> dict[str, Any]:
        return {
            "reject_auth": self.reject_auth,
            "throttle_left": self._throttle_left,
            "retry_after": self._retry_after,
            "rest_lag_s": self.rest_lag_s,
            "prices_lag_s": self.prices_lag_s,
            "rest_failures": {user: f.to_json() for user, f in self.rest_failures.items()},
        }
