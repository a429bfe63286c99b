"""One logger setup: JSON lines on stderr, secrets scrubbed from every line.

`log.info("event", extra={"wallet": w})` becomes `{"ts":..,"level":"info","service":..,"event":..,
"wallet":..}`. Secrets registered with `register_secret` are replaced by `***` in the final text, so
a key that slips into a message, an exception or a URL never reaches the log.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

_SECRETS: set[str] = set()
_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def register_secret(value: str | None) -> None:
    """Scrub this value from every log line from now on (values under 4 characters are ignored)."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """A URL safe to print: no password, no path (Dome keeps its key there), no query (polynode)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    if parts.username:
        host = f"{parts.username}:***@{host}"
    path = "/***" if parts.path not in ("", "/") else parts.path
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, host, path, query, ""))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(time.time(), 6),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return scrub(orjson.dumps(entry, default=_printable).decode())


def _printable(value: Any) -> str:
    """A library's extra field as text; one that cannot print itself (a dead weakref proxy, as
    websockets attaches) must not cost the log line."""
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-message INFO lines from libraries would dominate the hot path and the log.
    for noisy in ("faststream", "faststream.access.redis", "uvicorn.access", "websockets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
