"""Property-based fuzzing of the ingestor's frame parser (services/ingestor/frames.py).

Whatever arrives on the feed socket, `parse_frame` returns one of its outcomes and never raises;
a rejection carries a reason class and a readable reason of bounded size (no echo of a huge
input); a frame over the size limit is refused before it is parsed; and a frame it accepts as a
fill is exactly what the consumers of `orders.raw` accept back: a tracked wallet's order, valid
under the contract, with the order_key every source computes.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaos.garbage import dumps, json_values, order_like
from services.ingestor.frames import (
    Ack,
    Fill,
    Ignored,
    Rejected,
    RejectKind,
    ServerError,
    parse_frame,
)
from shared.models import OrderFill, order_key
from shared.wallets import load_wallets

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parent.parent
TRACKED = frozenset(w.address for w in load_wallets(ROOT / "config" / "wallets.example.json"))
USER = sorted(TRACKED)[0]
MAX_BYTES = 64 * 1024
REASON_MAX_CHARS = 4000

frame_types = st.one_of(st.sampled_from(["event", "ack", "error"]), json_values)
events = st.fixed_dictionaries(
    {"type": frame_types, "data": st.one_of(order_like(USER), json_values)},
    optional={"subscription_id": json_values},
).map(dumps)
# Events carrying near-valid orders: random objects alone rarely get past the first checks.
order_events = st.fixed_dictionaries(
    {"type": st.just("event"), "data": order_like(USER)},
    optional={"subscription_id": st.one_of(st.text(max_size=120), json_values)},
).map(dumps)
frames = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=3000),
    json_values.map(dumps),
    events,
    events.map(lambda raw: raw.decode()),
)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse(raw: bytes | str, max_bytes: int = MAX_BYTES) -> object:
    return parse_frame(raw, tracked=TRACKED, received_at=time.time(), max_bytes=max_bytes)


@FUZZ
@given(frames)
def test_any_frame_is_classified_never_raised(raw: bytes | str) -> None:
    result = parse(raw)
    assert isinstance(result, Ack | Fill | ServerError | Ignored | Rejected)
    if isinstance(result, Rejected):
        assert result.kind in RejectKind
        assert result.reason.strip()
        assert len(result.reason) <= REASON_MAX_CHARS


@FUZZ
@given(order_events)
def test_an_accepted_fill_is_what_consumers_accept(raw: bytes) -> None:
    result = parse(raw)
    if not isinstance(result, Fill):
        return
    fill = result.fill
    assert fill.user in TRACKED
    assert 0 <= fill.price <= 1 and fill.shares_normalized > 0 and fill.timestamp > 0
    assert fill.order_key == order_key(
        fill.tx_hash, fill.user, fill.token_id, fill.side, fill.shares_normalized, fill.price
    )
    # What the ingestor publishes, read back as the detector and the store read it.
    assert OrderFill.model_validate_json(fill.model_dump_json()) == fill


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4096), st.binary(min_size=1, max_size=64))
def test_an_oversized_frame_is_refused_unparsed(extra: int, unit: bytes) -> None:
    limit = 1024
    raw = (unit * (limit // len(unit) + 1))[: limit + extra]
    result = parse(raw, max_bytes=limit)
    assert isinstance(result, Rejected) and result.kind is RejectKind.OVERSIZED


@settings(max_examples=30, deadline=None)
@given(st.integers(10_000, 200_000))
def test_a_huge_field_is_not_echoed_into_the_reason(size: int) -> None:
    raw = orjson.dumps({"type": "event", "data": {"user": USER, "token_id": "x" * size}})
    result = parse(raw, max_bytes=1 << 20)
    assert isinstance(result, Rejected)
    assert len(result.reason) <= REASON_MAX_CHARS
