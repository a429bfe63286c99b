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
so with a warning). A token is at least `MIN_TOKEN_LENGTH` characters: an empty one in the list
would let in every `?token=` left empty.

`Site` keeps other web sites out. Browsers let any page open a WebSocket to any address, the
operator's own 127.0.0.1 included, and send the page's `Origin` with it: `/ws` accepts only its own
origin (the dashboard's) and the listed ones. A request with no `Origin` comes from a program,
not a page, and is let through (programs are held off by tokens, not by headers they choose).
The `Host` must name this server, or a site whose name the attacker re-points at 127.0.0.1
(DNS rebinding) would be "same-origin".

`ClientLimits` caps the connections of one replica, in all and per client address, so that no
one can hold every connection (or every replay) of an open feed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Iterable, Mapping

from pydantic import SecretStr

from services.notifier.protocol import Close, server_full, too_many_from_address

_BEARER = "bearer "
MIN_TOKEN_LENGTH = 16
ANY = "*"


def token_is_strong(token: str) -> bool:
    """Long enough to be guessed by no one, and free of spaces that a header would lose."""
    unpadded = len(token.strip()) == len(token)
    return unpadded and len(token) >= MIN_TOKEN_LENGTH


class Tokens:
    def __init__(self, tokens: Iterable[SecretStr]) -> None:
        values = [token.get_secret_value() for token in tokens]
        if not all(token_is_strong(value) for value in values):
            raise ValueError(f"every token must be at least {MIN_TOKEN_LENGTH} characters")
        self._digests = [_digest(value) for value in values]

    @property
    def open(self) -> bool:
        return not self._digests

    def identify(self, presented: str) -> str | None:
        """The id (`token-<n>`) of the configured token equal to `presented`, else None."""
        if not presented:
            return None
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


class ClientLimits:
    """WebSocket connections held on this replica: at most `total`, `per_address` from one IP."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self._by_address = ConnectionSlots(per_address)
        self.held = 0

    def admit(self, address: str) -> Close | None:
        """Take a place for a connection from `address`; the close to send when there is none."""
        if self.held >= self.total:
            return server_full(self.total)
        if not self._by_address.acquire(address):
            return too_many_from_address(self._by_address.limit)
        self.held += 1
        return None

    def leave(self, address: str) -> None:
        self._by_address.release(address)
        self.held -= 1


class Site:
    """The `Host` names this server answers to and the `Origin`s allowed on `/ws` (`*`: any)."""

    def __init__(self, hosts: Iterable[str], origins: Iterable[str]) -> None:
        self._hosts = frozenset(host.lower() for host in hosts)
        self._origins = frozenset(origin.lower().rstrip("/") for origin in origins)

    def host_problem(self, host: str | None) -> str | None:
        """Why a request with this `Host` header must be refused; None when it may go on."""
        if ANY in self._hosts or (host and _host_name(host) in self._hosts):
            return None
        return f"host {(host or '')[:80]!r} is not served here: add it to NOTIFIER_ALLOWED_HOSTS"

    def origin_problem(self, origin: str | None, host: str | None) -> str | None:
        """Why a WebSocket handshake from this `Origin` must be refused; None when it may go on."""
        if origin is None or ANY in self._origins:
            return None
        wanted = origin.lower().rstrip("/")
        if wanted in self._origins or _same_origin(wanted, host):
            return None
        return f"origin {origin[:80]!r} may not read the feed: add it to NOTIFIER_ALLOWED_ORIGINS"


def _host_name(host: str) -> str:
    """`example.com:8080` -> `example.com`, `[::1]:8080` -> `[::1]`, lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _same_origin(origin: str, host: str | None) -> bool:
    # The page was served by the server it connects to: its host[:port] is the request's Host.
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and host is not None and rest == host.strip().lower()
