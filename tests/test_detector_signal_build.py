"""The detector writes signals with `Signal.to_json` (orjson), five times cheaper than pydantic's
`model_dump_json`. These properties hold that shortcut to the contract: whatever orders and wallets
the rules see, every signal they build is the same JSON document `model_dump_json` writes, and it
validates back into the same `Signal`."""

from __future__ import annotations

import uuid

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from services.detector.rules import RuleSettings
from services.detector.serial import SerialDetector
from shared.models import DomeOrder, OrderFill, Side, Signal, Source, TrackedWallet

WALLETS = [
    TrackedWallet(address="0x" + f"{n:02x}" * 20, label=label, score=score)
    for n, (label, score) in enumerate([("sharp", 0.9), ("", None), ('Ünïcode "q"', 0.0)])
]
RULES = RuleSettings(
    whale_min_notional_usd=50,
    signal_max_price=0.99,
    signal_cooldown_s=0,
    consensus_min_wallets=2,
)

fills = st.tuples(
    st.sampled_from([w.address for w in WALLETS] + ["0x" + "ee" * 20]),
    st.sampled_from(["tok-1", "tok-2", str(2**255 + 7)]),
    st.sampled_from([Side.BUY, Side.SELL]),
    st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False),
    st.floats(min_value=0, max_value=1),
    st.text(max_size=30),
    st.integers(min_value=1, max_value=2**40),
)


def order(fill: tuple[str, str, Side, float, float, str, int]) -> OrderFill:
    user, token, side, shares, price, title, ts = fill
    dome = DomeOrder(
        token_id=token,
        token_label="Yes",
        side=side,
        market_slug="m",
        condition_id="0x" + "11" * 32,
        shares_normalized=shares,
        price=price,
        tx_hash="0x" + uuid.uuid4().hex,
        title=title,
        timestamp=ts,
        user=user,
    )
    return OrderFill.from_dome(dome, Source.DOME_WS, 1_760_000_000.25)


@settings(max_examples=150, deadline=None)
@given(st.lists(fills, min_size=1, max_size=12))
def test_written_signals_are_what_pydantic_writes_and_validate(
    batch: list[tuple[str, str, Side, float, float, str, int]],
) -> None:
    detector = SerialDetector(WALLETS, RULES)
    built = [s for fill in batch for s in detector.process(order(fill))]
    for signal in built:
        written = signal.to_json()
        assert orjson.loads(written) == orjson.loads(signal.model_dump_json())
        assert Signal.model_validate_json(written) == signal
        assert Signal.model_validate(signal.model_dump()) == signal


def test_a_whale_from_an_untracked_wallet_is_a_valid_signal() -> None:
    detector = SerialDetector(WALLETS, RULES)
    fill = ("0x" + "ee" * 20, "tok-1", Side.BUY, 1_000.0, 0.5, "t", 1_760_000_000)
    (signal,) = detector.process(order(fill))
    assert signal.kind == "whale_order" and signal.wallet_label == ""
    assert Signal.model_validate_json(signal.to_json()) == signal
