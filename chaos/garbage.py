"""Bad input, as hypothesis strategies: what a buggy producer could XADD to `orders.raw` and
`signals`, what a confused or hostile feed could send as a frame, and the good entries to send
after them (which must still flow).

Every bad entry here is bad under the published contract (shared.models) whoever reads it: no
`data` field, `data` that is not JSON, JSON that is not an object, an object missing a required
field or holding a value of the wrong type or out of range, or a huge object with none of the
fields. Unknown fields are not bad: consumers ignore them (`with_unknown_fields`).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import orjson
from hypothesis import strategies as st

from shared.models import (
    DomeOrder,
    OrderFill,
    Side,
    Signal,
    SignalKind,
    Source,
    signal_id,
)

Fields = dict[bytes, bytes]

ORDER_REQUIRED = (
    "token_id",
    "side",
    "shares_normalized",
    "price",
    "tx_hash",
    "timestamp",
    "user",
    "order_key",
    "source",
    "received_at",
)
SIGNAL_REQUIRED = (
    "signal_id",
    "kind",
    "wallet",
    "token_id",
    "side",
    "price",
    "shares",
    "notional_usd",
    "confidence",
    "source",
    "exchange_ts",
    "received_at",
    "detected_at",
)
# Values no reader may accept for the field (lax pydantic would take "0.5" for a float, say, so
# the wrong types here are ones that cannot be coerced).
# Hostile text: a spreadsheet formula, a Slack mention and link, markup, an escape sequence.
HOSTILE = [
    '=HYPERLINK("https://evil.example","x")',
    "+cmd|' /C calc'!A0",
    "<!channel> <https://evil.example|Polymarket>",
    "<script>alert(1)</script>",
    "\x1b]0;pwned\x07",
]
ORDER_WRONG: dict[str, list[Any]] = {
    "token_id": ["", None, [], {"id": 1}, "x" * 101, *HOSTILE, "12 34"],
    "condition_id": [*HOSTILE, "0x" + "z" * 64, 5],
    "market_slug": ["s" * 201, 5],
    "title": ["t" * 5001, []],
    "token_label": ["l" * 201, {}],
    "order_hash": [*HOSTILE, "0x"],
    "side": ["HOLD", 1, None, ""],
    "shares_normalized": ["5", 0, -3.5, None, {}],
    "price": ["0.5", -0.01, 1.5, None, []],
    "tx_hash": ["", None, "x" * 101, 7, *HOSTILE],
    "timestamp": ["soon", -5, 0, 1.5, None],
    "user": ["0xnope", 123, None, "0x" + "g" * 40],
    "order_key": [None, [], 5],
    "source": ["carrier_pigeon", None, 3],
    "received_at": ["yesterday", None, []],
}
SIGNAL_WRONG: dict[str, list[Any]] = {
    "signal_id": [None, 5, []],
    "kind": ["nonsense", None, 1],
    "wallet": ["0xnope", None, 42],
    "token_id": [None, [], 9, *HOSTILE],
    "condition_id": [*HOSTILE],
    "market_slug": ["s" * 201],
    "wallet_label": ["w" * 201],
    "side": ["HOLD", None, 0],
    "price": ["cheap", None, []],
    "shares": ["many", None, {}],
    "notional_usd": ["lots", None, []],
    "confidence": [1.5, -0.1, "high", None],
    "source": ["carrier_pigeon", None],
    "exchange_ts": ["then", 1.5, None],
    "received_at": ["now", None],
    "detected_at": ["later", None],
}

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=50),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


def _not_json(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return True
    return False


def good_order(user: str, *, notional_usd: float = 5000.0, price: float = 0.5) -> dict[str, Any]:
    """A valid `orders.raw` payload of a fresh fill (new tx hash, new market) by `user`."""
    tag = secrets.token_hex(8)
    shares = round(notional_usd / price, 2)
    order = DomeOrder(
        token_id=str(10**30 + int(tag, 16)),
        side=Side.BUY,
        market_slug=f"fuzz-{tag}",
        condition_id="0x" + tag * 8,
        token_label="Yes",
        shares=round(shares * 1e6),
        shares_normalized=shares,
        price=price,
        tx_hash="0x" + secrets.token_hex(32),
        title=f"Fuzz market {tag}?",
        timestamp=int(time.time()),
        user=user,
    )
    payload: dict[str, Any] = OrderFill.from_dome(order, Source.DOME_WS, time.time()).model_dump(
        mode="json"
    )
    return payload


def good_signal(user: str) -> dict[str, Any]:
    """A valid `signals` payload with an id of its own."""
    now = time.time()
    key = secrets.token_hex(16)
    payload: dict[str, Any] = Signal(
        signal_id=signal_id(SignalKind.WHALE_ORDER, key),
        kind=SignalKind.WHALE_ORDER,
        wallet=user,
        token_id="1",
        side=Side.BUY,
        price=0.5,
        shares=10_000.0,
        notional_usd=5000.0,
        confidence=0.9,
        reasons=["fuzz"],
        order_keys=[key],
        source=Source.DOME_WS,
        exchange_ts=int(now),
        received_at=now,
        detected_at=now,
    ).model_dump(mode="json")
    return payload


def with_unknown_fields(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "x_future_field": {"nested": [1, 2, 3]}, "v2_hint": "ignore me"}


def dumps(payload: Any) -> bytes:
    """JSON as any producer might write it: stdlib json, so integers past 64 bits too."""
    return json.dumps(payload).encode()


def entry(payload: Any) -> Fields:
    return {b"data": dumps(payload)}


def _bad_entries(
    required: tuple[str, ...], wrong: dict[str, list[Any]], template: dict[str, Any]
) -> st.SearchStrategy[Fields]:
    no_data = st.dictionaries(
        st.binary(min_size=1, max_size=12).filter(lambda k: k != b"data"),
        st.binary(max_size=60),
        min_size=1,
        max_size=3,
    )
    not_json = st.binary(min_size=1, max_size=300).filter(_not_json).map(lambda b: {b"data": b})
    not_object = st.one_of(json_scalars, st.lists(json_values, max_size=4)).map(entry)
    missing = st.sampled_from(required).map(
        lambda f: entry({k: v for k, v in template.items() if k != f})
    )
    wrong_type = st.sampled_from(sorted(wrong)).flatmap(
        lambda f: st.sampled_from(wrong[f]).map(lambda bad: entry({**template, f: bad}))
    )
    huge = st.integers(200_000, 1_000_000).map(lambda n: entry({"blob": "x" * n, "v": 1}))
    return st.one_of(no_data, not_json, not_object, missing, wrong_type, huge)


def bad_order_entries(user: str) -> st.SearchStrategy[Fields]:
    return _bad_entries(ORDER_REQUIRED, ORDER_WRONG, good_order(user))


def bad_signal_entries(user: str) -> st.SearchStrategy[Fields]:
    return _bad_entries(SIGNAL_REQUIRED, SIGNAL_WRONG, good_signal(user))


_DELETE = object()


def order_like(user: str) -> st.SearchStrategy[dict[str, Any]]:
    """Dome orders of `user`, a few fields deleted, given a wrong value or random JSON, plus
    unknown fields: near misses, which reach deeper into validation than random objects do."""
    template = {k: v for k, v in good_order(user).items() if k in DomeOrder.model_fields}

    def mutation(name: str) -> st.SearchStrategy[tuple[str, Any]]:
        wrong = ORDER_WRONG.get(name, [None])
        values = st.one_of(st.just(_DELETE), st.sampled_from(wrong), json_values)
        return values.map(lambda value: (name, value))

    def apply(changes: list[tuple[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        order = {**extra, **template}
        for name, value in changes:
            if value is _DELETE:
                order.pop(name, None)
            else:
                order[name] = value
        return order

    names = st.lists(st.sampled_from(sorted(template)), max_size=3, unique=True)
    changes = names.flatmap(lambda picked: st.tuples(*(mutation(n) for n in picked)).map(list))
    extras = st.dictionaries(
        st.text(max_size=12).filter(lambda k: k not in template), json_values, max_size=3
    )
    return st.builds(apply, changes, extras)
