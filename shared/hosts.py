"""Host names a service answers to (its `Host` check against DNS rebinding): one rule for the
notifier's and the store's settings."""

from __future__ import annotations

import re

NAME = r"(?:\[[0-9a-f:.]+\]|[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)"
HOST = re.compile(rf"^(?:\*|{NAME})$")
# Listening on every interface names no host a client would use.
ANY_ADDRESS = frozenset({"", "0.0.0.0", "[::]"})


def entries(value: str) -> list[str]:
    """A comma-separated list, trimmed and lower-cased (host names and origins ignore case)."""
    return [part.strip().lower() for part in value.split(",") if part.strip()]


def host_names(value: str, setting: str) -> str:
    """The list, checked: each entry a host name (no scheme or port; IPv6 in brackets) or `*`."""
    names = entries(value)
    if not names:
        raise ValueError(f"{setting} is empty: list host names, or * for any")
    for name in names:
        if not HOST.match(name):
            raise ValueError(
                f"{setting}: {name[:60]!r} is not a host name "
                "(no scheme or port; IPv6 in brackets, like [::1]; * for any)"
            )
    return ",".join(names)


def served_names(listed: str, listening_on: str) -> tuple[str, ...]:
    """The listed names, plus the address the service listens on when it names one: clients
    reach it by that."""
    names = listed.split(",")
    own = listening_on.lower()
    own = f"[{own}]" if ":" in own and not own.startswith("[") else own
    if own not in ANY_ADDRESS and HOST.match(own) and own not in names:
        names.append(own)
    return tuple(names)
