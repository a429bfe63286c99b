"""Property-based fuzzing of the polygon source's decoding: chain logs and Gamma answers.

Whatever a JSON-RPC node sends as a log, `decode_log` returns a fill or raises `LogError` with a
bounded reason (the dead letter's), never anything else. Well-formed OrderFilled payloads with any
field values (sides, assets and amounts at every edge of their ABI types), with any Gamma answer
for the token's market, become an order the contract accepts or a ValidationError (dead-lettered),
and an accepted one is what the consumers of `orders.raw` read back.
"""

from __future__ import annotations

import pytest
from eth_abi import encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from chaos.garbage import json_values
from services.ingestor.chain.events import (
    V1_DATA,
    V1_TOPIC,
    V2_DATA,
    V2_TOPIC,
    ChainFill,
    LogError,
    decode_log,
    pad_address,
)
from services.ingestor.chain.markets import market_from_gamma
from services.ingestor.chain.source import chain_order
from shared.models import OrderFill, Source

pytestmark = pytest.mark.chaos

REASON_MAX_CHARS = 4000
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

hex_strings = st.binary(max_size=300).map(lambda b: "0x" + b.hex())
words = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())
addresses = st.binary(min_size=20, max_size=20).map(lambda b: pad_address("0x" + b.hex()))
topic0s = st.one_of(st.sampled_from([V2_TOPIC, V1_TOPIC, V2_TOPIC.upper()]), words, json_values)
quantities = st.one_of(
    st.integers(0, 2**70).map(hex), st.integers(-5, 2**70), st.text(max_size=12), json_values
)
uint256 = st.one_of(
    st.sampled_from([0, 1, 2**64 - 1, 2**64, 2**256 - 1]), st.integers(0, 2**256 - 1)
)
uint8 = st.one_of(st.sampled_from([0, 1, 2, 255]), st.integers(0, 255))
bytes32 = st.binary(min_size=32, max_size=32)


def _log(topic0: object, data: object, extra: dict[str, object]) -> dict[str, object]:
    return {
        "address": "0xe111180000d2663c0091e4f400237545b87b996b",
        "topics": [topic0, "0x" + "11" * 32, pad_address("0x" + "a1" * 20), "0x" + "00" * 32],
        "data": data,
        "transactionHash": "0x" + "ab" * 32,
        "logIndex": "0x1",
        "blockNumber": "0x10",
        "blockHash": "0x" + "cd" * 32,
        **extra,
    }


log_like = st.builds(
    _log,
    topic0s,
    st.one_of(hex_strings, json_values),
    st.dictionaries(
        st.sampled_from(
            ["topics", "transactionHash", "logIndex", "blockNumber", "removed", "address"]
        ),
        st.one_of(json_values, quantities, hex_strings, st.lists(words, max_size=6)),
        max_size=3,
    ),
)
v2_data = st.tuples(uint8, uint256, uint256, uint256, uint256, bytes32, bytes32).map(
    lambda values: "0x" + encode(list(V2_DATA), list(values)).hex()
)
v1_data = st.tuples(uint256, uint256, uint256, uint256, uint256).map(
    lambda values: "0x" + encode(list(V1_DATA), list(values)).hex()
)
encoded_logs = st.one_of(
    st.builds(
        lambda data, maker: _log(V2_TOPIC, data, _maker(V2_TOPIC, maker)), v2_data, addresses
    ),
    st.builds(
        lambda data, maker: _log(V1_TOPIC, data, _maker(V1_TOPIC, maker)), v1_data, addresses
    ),
)
gamma_markets = st.fixed_dictionaries(
    {},
    optional={
        "conditionId": st.one_of(words, st.text(max_size=80), json_values),
        "slug": st.one_of(st.text(max_size=300), json_values),
        "question": st.one_of(st.text(max_size=700), json_values),
        "outcomes": st.one_of(st.just('["Yes", "No"]'), st.lists(st.text(max_size=300))),
        "negRisk": json_values,
    },
)


def _maker(topic0: str, maker: str) -> dict[str, object]:
    return {"topics": [topic0, "0x" + "11" * 32, maker, "0x" + "00" * 32]}


def _classify(log: object) -> ChainFill | None:
    try:
        return decode_log(log)
    except LogError as exc:
        assert str(exc).strip() and len(str(exc)) <= REASON_MAX_CHARS
        return None


@FUZZ
@given(st.one_of(log_like, json_values))
def test_any_log_is_decoded_or_refused_with_a_reason(log: object) -> None:
    _classify(log)


@FUZZ
@given(encoded_logs, gamma_markets, st.integers(0, 2**40))
def test_a_decoded_fill_is_an_order_the_consumers_accept_or_a_dead_letter(
    log: dict[str, object], gamma: dict[str, object], timestamp: int
) -> None:
    fill = _classify(log)
    if fill is None:
        return
    market = market_from_gamma([{**gamma, "clobTokenIds": [fill.token_id, "1"]}], fill.token_id)
    try:
        order = chain_order(fill, market, timestamp)
    except ValidationError as exc:
        assert exc.errors()  # dead-lettered with its first error's message
        return
    assert order.user == fill.maker and 0 <= order.price <= 1 and order.shares_normalized > 0
    outgoing = OrderFill.from_dome(order, Source.POLYGON, 1.0, 0)
    assert OrderFill.model_validate_json(outgoing.model_dump_json()) == outgoing


def test_a_plain_fill_passes_every_step() -> None:
    """The properties above are not vacuous: a fill of 10 shares at 0.42 goes all the way."""
    data = encode(list(V2_DATA), [0, 7, 4_200_000, 10_000_000, 0, b"\0" * 32, b"\0" * 32])
    fill = decode_log(_log(V2_TOPIC, "0x" + data.hex(), {}))
    gamma = [
        {"conditionId": "0x" + "ef" * 32, "slug": "s", "question": "q?", "clobTokenIds": ["7"]}
    ]
    order = chain_order(fill, market_from_gamma(gamma, "7"), 1_760_000_000)
    assert (order.shares_normalized, order.price, order.token_id) == (10.0, 0.42, "7")
