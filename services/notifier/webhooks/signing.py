"""The signature on every webhook request, and how a receiver checks it.

Headers of each POST:
- `X-BetterBot-Timestamp`: Unix seconds when this attempt was sent.
- `X-BetterBot-Signature`: `sha256=<hex>`, the HMAC-SHA256, keyed with the endpoint's secret, of
  the bytes `<timestamp>.<body>` (the timestamp header's text, a dot, the raw request body).
- `Idempotency-Key`: the signal's `signal_id` for a confirmed signal, `<signal_id>:<status>` for
  the others (`pending`, `retracted`). The same signal may arrive more than once (a retry after a
  lost response, a replica that crashed mid-delivery): receivers drop repeats by this key. A
  status change is a new delivery, not a repeat, so it has a key of its own.
- `X-BetterBot-Status`: the signal's status (`confirmed`, `pending`, `retracted`).
- `X-BetterBot-Attempt`: 1 for the first try, 2 for the first retry, ...

A receiver recomputes the HMAC over the raw body it got (before any JSON parsing), compares in
constant time, and refuses timestamps too far from its clock so a captured request cannot be
replayed later: `verify` below does exactly that and is what docs/notifier.md shows.
"""

from __future__ import annotations

import hashlib
import hmac

from shared.models import FillStatus

SIGNATURE_HEADER = "X-BetterBot-Signature"
TIMESTAMP_HEADER = "X-BetterBot-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
ATTEMPT_HEADER = "X-BetterBot-Attempt"
STATUS_HEADER = "X-BetterBot-Status"
DEFAULT_TOLERANCE_S = 300


def idempotency_key(signal_id: str, status: FillStatus) -> str:
    """The key a receiver deduplicates on: one per signal and status.

    A confirmed signal keeps the bare `signal_id` it always had, so receivers keyed on it see no
    change; a pending or retracted one carries its status, so that a receiver that already holds
    the signal under its id does not drop the change as a repeat.
    """
    if status is FillStatus.CONFIRMED:
        return signal_id
    return f"{signal_id}:{status.value}"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    body: bytes,
    timestamp_header: str | None,
    signature_header: str | None,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """True when the request was signed with `secret` within `tolerance_s` of `now`."""
    if not timestamp_header or not signature_header or not timestamp_header.isdigit():
        return False
    timestamp = int(timestamp_header)
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), signature_header)
