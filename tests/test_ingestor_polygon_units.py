"""The polygon source's pure parts: the OrderFilled decoder and what it refuses, the settings and
their secrets, the order_key of identical fills, Gamma's answer, and JSON-RPC error classes."""

from __future__ import annotations

from typing import Any

import pytest
from eth_abi import encode
from pydantic import ValidationError

from services.ingestor.chain.events import (
    V1_TOPIC,
    V2_EXCHANGES,
    V2_TOPIC,
    LogError,
    decode_log,
    pad_address,
)
from services.ingestor.chain.markets import UNKNOWN, market_from_gamma
from services.ingestor.chain.rpc import RangeTooLarge, RateLimited, RpcError, classify
from services.ingestor.settings import IngestorSettings
from shared.models import Side, order_key

MAKER = "0x" + "ab" * 20
TAKER = "0x" + "cd" * 20
TX = "0x" + "12" * 32
ORDER_HASH = "0x" + "9f" * 32
TOKEN = 41582394514006358283904977545426180704223421959888008554250490906601013285995


def v2_log(side: int, maker_amount: int, taker_amount: int, **changes: Any) -> dict[str, Any]:
    data = encode(
        ["uint8", "uint256", "uint256", "uint256", "uint256", "bytes32", "bytes32"],
        [side, TOKEN, maker_amount, taker_amount, 0, b"\0" * 32, b"\0" * 32],
    )
    log = {
        "address": V2_EXCHANGES[0],
        "topics": [V2_TOPIC, ORDER_HASH, pad_address(MAKER), pad_address(TAKER)],
        "data": "0x" + data.hex(),
        "blockNumber": "0x10",
        "blockHash": "0x" + "aa" * 32,
        "transactionHash": TX,
        "logIndex": "0x3",
        "removed": False,
    }
    return log | changes


def v1_log(maker_asset: int, taker_asset: int, maker_amount: int, taker_amount: int) -> Any:
    data = encode(["uint256"] * 5, [maker_asset, taker_asset, maker_amount, taker_amount, 7])
    return v2_log(
        0, 1, 1, topics=[V1_TOPIC, ORDER_HASH, pad_address(MAKER), pad_address(TAKER)]
    ) | {"data": "0x" + data.hex()}


def test_v2_buy_pays_collateral_for_shares() -> None:
    fill = decode_log(v2_log(0, 560_000, 1_000_000))
    assert (fill.version, fill.side, fill.token_id) == (2, Side.BUY, str(TOKEN))
    assert (fill.shares, fill.price) == (1.0, 0.56)
    assert (fill.maker, fill.taker, fill.log_index, fill.block_number) == (MAKER, TAKER, 3, 16)
    assert fill.order_hash == ORDER_HASH and fill.tx_hash == TX


def test_v2_sell_gives_shares_for_collateral() -> None:
    fill = decode_log(v2_log(1, 2_500_000, 1_000_000))
    assert (fill.side, fill.shares, fill.price) == (Side.SELL, 2.5, 0.4)


def test_v1_asset_rule() -> None:
    buy = decode_log(v1_log(0, TOKEN, 300_000, 1_000_000))
    assert (buy.version, buy.side, buy.token_id, buy.price) == (1, Side.BUY, str(TOKEN), 0.3)
    sell = decode_log(v1_log(TOKEN, 0, 2_000_000, 1_400_000))
    assert (sell.side, sell.token_id, sell.shares, sell.price) == (Side.SELL, str(TOKEN), 2.0, 0.7)


@pytest.mark.parametrize(
    ("log", "reason"),
    [
        ("not a log", "not a JSON object"),
        (v2_log(0, 1, 1, topics=[V2_TOPIC]), "4 topics"),
        (v2_log(0, 1, 1, topics=["0x" + "00" * 32, ORDER_HASH, TX, TX]), "unknown event topic"),
        (v2_log(0, 1, 1, data="0x1234"), "bytes, got 2"),
        (v2_log(0, 1, 1, data="0xzz"), "not valid hex"),
        (v2_log(0, 5, 0), "zero shares"),
        (v2_log(2, 5, 5), "side must be 0 or 1"),
        (v2_log(0, 1, 1, logIndex="three"), "logIndex is not a quantity"),
        (v2_log(0, 2**70, 1), "beyond any real fill"),
        (
            v2_log(0, 1, 1, topics=[V2_TOPIC, ORDER_HASH, "0x" + "ff" * 32, pad_address(TAKER)]),
            "maker topic is not a left-padded address",
        ),
    ],
)
def test_malformed_logs_are_refused_with_a_reason(log: Any, reason: str) -> None:
    with pytest.raises(LogError, match=reason):
        decode_log(log)


def test_a_removed_log_is_decoded_as_removed() -> None:
    assert decode_log(v2_log(0, 1, 2, removed=True)).removed


def test_identical_fills_of_one_transaction_get_distinct_keys_and_the_first_the_shared_one() -> (
    None
):
    args = (TX, MAKER, str(TOKEN), "BUY", 10.0, 0.5)
    assert order_key(*args, occurrence=0) == order_key(*args)
    assert order_key(*args, occurrence=1) != order_key(*args)
    assert order_key(*args, occurrence=1) != order_key(*args, occurrence=2)


def test_gamma_answer_with_json_text_fields() -> None:
    market = {
        "conditionId": "0xc0",
        "slug": "nobel",
        "question": "Who wins?",
        "outcomes": '["Yes", "No"]',
        "clobTokenIds": '["111", "222"]',
        "negRisk": True,
    }
    described = market_from_gamma([market], "222")
    assert (described.token_label, described.market_slug, described.neg_risk) == (
        "No",
        "nobel",
        True,
    )
    assert market_from_gamma([market], "333") is UNKNOWN
    assert market_from_gamma({"error": "x"}, "111") is UNKNOWN


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        (-32005, "query returned more than 10000 results", RangeTooLarge),
        (-32602, "block range is too wide", RangeTooLarge),
        (-32600, "exceed maximum block range: 2000", RangeTooLarge),
        (429, "Too Many Requests", RateLimited),
        (-32005, "daily request limit reached", RateLimited),
        (-32000, "header not found", RpcError),
    ],
)
def test_provider_errors_are_classified(code: int, message: str, kind: type) -> None:
    assert type(classify(code, message)) is kind


KEYED = "wss://polygon-mainnet.g.example.com/v2/sk-live-8d1f2a93c4b5e6f7a8b9"


def test_rpc_urls_are_secrets() -> None:
    settings = IngestorSettings(
        _env_file=None, ingest_sources="polygon", polygon_ws_urls=f"{KEYED}, ws://127.0.0.1:8545"
    )
    assert settings.polygon_urls() == (KEYED, "ws://127.0.0.1:8545")
    assert "sk-live-8d1f2a93c4b5e6f7a8b9" in settings.secrets()
    # Short words of the URL stay readable in logs: only key-like parts are scrubbed.
    assert not {"v2", "polygon-mainnet", "polygon"} & set(settings.secrets())
    assert "sk-live" not in repr(settings) and "sk-live" not in str(settings.model_dump())


def test_bad_rpc_urls_are_refused_without_echoing_them() -> None:
    with pytest.raises(ValidationError) as info:
        IngestorSettings(
            _env_file=None, polygon_ws_urls="https://host/sk-live-8d1f2a93c4b5e6f7a8b9"
        )
    assert "POLYGON_WS_URLS" in str(info.value) and "sk-live" not in str(info.value)


def test_exchanges_are_addresses() -> None:
    with pytest.raises(ValidationError, match="POLYGON_EXCHANGES"):
        IngestorSettings(_env_file=None, polygon_exchanges="0x1234")
    default = IngestorSettings(_env_file=None)
    assert default.polygon_exchanges.split(",") == list(V2_EXCHANGES)


def source_for_units() -> Any:
    from services.ingestor.chain.source import ChainSettings, PolygonSource

    settings = ChainSettings(
        urls=("ws://127.0.0.1:1",),
        exchanges=V2_EXCHANGES,
        confirmations=0,
        max_wallets_per_filter=2,
        getlogs_max_blocks=10,
        stall_timeout_s=1,
        failback_after_s=1,
        initial_lookback_blocks=0,
        new_wallet_lookback_blocks=0,
        open_timeout_s=1,
        call_timeout_s=1,
        reconnect_min_s=0.1,
        reconnect_max_s=0.2,
        max_frame_bytes=1 << 20,
        max_lag_blocks=5,
    )
    return PolygonSource(settings, [MAKER], None, None)  # type: ignore[arg-type]


def test_identical_fills_count_within_their_block_so_a_reorg_does_not_double_them() -> None:
    source = source_for_units()
    first = decode_log(v2_log(0, 560_000, 1_000_000, logIndex="0x28"))
    twin = decode_log(v2_log(0, 560_000, 1_000_000, logIndex="0x29"))
    assert [source._occurrence(first), source._occurrence(twin)] == [0, 1]
    # The same transaction re-included by a reorg in another block, at later indexes.
    moved = decode_log(v2_log(0, 560_000, 1_000_000, logIndex="0x78", blockHash="0x" + "bb" * 32))
    assert source._occurrence(moved) == 0
    assert source._occurrence(first) == 0  # a repeat of a log keeps its number


def test_the_filter_names_the_makers_until_there_are_too_many() -> None:
    source = source_for_units()
    assert source.log_filter()["topics"][2] == [pad_address(MAKER)]
    source.wallets |= {"0x" + "01" * 20, "0x" + "02" * 20}
    assert len(source.log_filter()["topics"]) == 1
