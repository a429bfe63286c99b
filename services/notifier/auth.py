"""Who may connect to `/ws`, and how many connections each token may hold.

Tokens come from `NOTIFIER_TOKENS`. A client presents one in, by order of precedence:
the `Authorization: Bearer <token>` header, the `?token=` query parameter, or the `token` field of
its first message (`{"type":"subscribe","token":...}`). The first message keeps the token out of
URLs (which proxies log) and works from browsers, which cannot set headers on a WebSocket.

Every configured token is compared, without stopping at the first match, on SHA-256 digests of
equal length with `hmac.compare_digest`, so the time taken reveals neither which token matched nor
how much of one was right. Tokens are identified in logs and limits only by their position
(`token-1`, `token-2`, ...), never by value.

With no tokens configured the feed is open to anyone who can reach the port (the startup log says
so with a warning).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Iterable, Mapping

from pydantic import SecretStr

_BEARER = "bearer "


class Tokens:
    def __init__(self, tokens: Iterable[SecretStr]) -> None:
        self._digests = [_digest(token.get_secret_value()) for token in tokens]

    @property
    def open(self) -> bool:
        return not self._digests

    def identify(self, presented: str) -> str | None:
        """The id (`token-<n>`) of the configured token equal to `presented`, else None."""
        digest = _digest(presented)
        found: str | None = None
        for n, known in enumerate(self._digests, start=1):
            if hmac.compare_digest(known, digest) and found is None:
                found = f"token-{n}"
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def presented_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token of a WebSocket upgrade request (header first, then `?token=`), if any."""
    authorization = headers.get("authorization", "")
    if authorization[: len(_BEARER)].lower() == _BEARER:
        return authorization[len(_BEARER) :].strip()
    return query.get("token")


class ConnectionSlots:
    """Connections held per token id on this replica, up to `limit` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[str] = Counter()

    def acquire(self, token_id: str) -> bool:
        if self._held[token_id] >= self.limit:
            return False
        self._held[token_id] += 1
        return True

    def release(self, token_id: str) -> None:
        self._held[token_id] -= 1
        if self._held[token_id] <= 0:
            del self._held[token_id]

    def held(self, token_id: str) -> int:
        return self._held[token_id]
