"""Polymarket's `OrderFilled` logs (V2 and V1 exchange contracts) -> fills, decoded with eth-abi.

A log's topics are `[topic0, orderHash, maker, taker]`; its data holds the non-indexed fields. The
maker (topic 2) is the wallet whose order filled: filtering on it delivers each fill of a tracked
wallet's own orders exactly once, maker or taker side (feeds.md, "Who is who").

- V2: `side` 0 = BUY (maker pays collateral `makerAmountFilled` for `takerAmountFilled` shares of
  `tokenId`), 1 = SELL (the reverse).
- V1: no side field; `makerAssetId == 0` means the maker BUYs `takerAssetId`, otherwise it SELLs
  `makerAssetId`.

Amounts have 6 decimals on both sides; price = collateral / shares. Anything that is not one of
these two events with a well-formed payload raises `LogError` naming why, for the dead letter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi import decode
from eth_abi.exceptions import DecodingError
from eth_hash.auto import keccak

from shared.models import SHARE_DECIMALS, Side

V2_SIGNATURE = (
    "OrderFilled(bytes32,address,address,uint8,uint256,uint256,uint256,uint256,bytes32,bytes32)"
)
V1_SIGNATURE = "OrderFilled(bytes32,address,address,uint256,uint256,uint256,uint256,uint256)"
V2_TOPIC = "0x" + keccak(V2_SIGNATURE.encode()).hex()
V1_TOPIC = "0x" + keccak(V1_SIGNATURE.encode()).hex()
ORDER_FILLED_TOPICS = (V2_TOPIC, V1_TOPIC)

V2_DATA = ("uint8", "uint256", "uint256", "uint256", "uint256", "bytes32", "bytes32")
V1_DATA = ("uint256", "uint256", "uint256", "uint256", "uint256")

# CLOB V2, live since 2026-04-28 (feeds.md): CTFExchangeV2 and NegRiskCtfExchangeV2.
V2_EXCHANGES = (
    "0xe111180000d2663c0091e4f400237545b87b996b",
    "0xe2222d279d744050d28e00520010520000310f59",
)
V1_EXCHANGES = (
    "0x4bfb41d5b3570defd03c39a9a4d8de6bd8b8982e",
    "0xc5d563a36ae78145c45a50134d48a1215220f80a",
)

_UNIT = 10**SHARE_DECIMALS
_MAX_UINT64 = 2**64


class LogError(ValueError):
    """A log that is not a decodable OrderFilled fill; the message is the dead letter's reason."""


@dataclass(frozen=True, slots=True)
class ChainFill:
    """One decoded OrderFilled log, with where it sits on the chain."""

    version: int
    exchange: str
    order_hash: str
    maker: str
    taker: str
    side: Side
    token_id: str
    shares_raw: int
    collateral_raw: int
    fee_raw: int
    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str
    removed: bool

    @property
    def shares(self) -> float:
        return self.shares_raw / _UNIT

    @property
    def price(self) -> float:
        return self.collateral_raw / self.shares_raw

    @property
    def identity(self) -> tuple[str, int]:
        """The log's place on chain, unique within one fork."""
        return self.tx_hash, self.log_index


def pad_address(address: str) -> str:
    """A wallet as a 32-byte topic, the form topic filters compare against."""
    return "0x" + address.lower().removeprefix("0x").rjust(64, "0")


def _hex_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise LogError(f"{what} is not a 0x hex string")
    try:
        return bytes.fromhex(value[2:])
    except ValueError as exc:
        raise LogError(f"{what} is not valid hex") from exc


def quantity(value: Any, what: str) -> int:
    """A JSON-RPC quantity (0x hex); some nodes send plain integers."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.startswith("0x"):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise LogError(f"{what} is not a quantity: {str(value)[:40]!r}")


def _topic_address(topic: bytes, what: str) -> str:
    if len(topic) != 32 or any(topic[:12]):
        raise LogError(f"{what} topic is not a left-padded address")
    return "0x" + topic[12:].hex()


def _amounts(side: Side, maker_amount: int, taker_amount: int) -> tuple[int, int]:
    """(shares, collateral) of the maker's order, by its side."""
    if side is Side.BUY:
        return taker_amount, maker_amount
    return maker_amount, taker_amount


def decode_log(log: Any) -> ChainFill:
    """Decode one `eth_subscription` / `eth_getLogs` log object, or raise LogError."""
    if not isinstance(log, dict):
        raise LogError("log is not a JSON object")
    topics = log.get("topics")
    if not isinstance(topics, list) or len(topics) != 4:
        raise LogError("OrderFilled has 4 topics; this log has a different count")
    topic0 = str(topics[0]).lower()
    if topic0 not in ORDER_FILLED_TOPICS:
        raise LogError(f"unknown event topic {topic0[:66]}")
    raw_topics = [_hex_bytes(topic, f"topic {i}") for i, topic in enumerate(topics)]
    data = _hex_bytes(log.get("data"), "data")
    version = 2 if topic0 == V2_TOPIC else 1
    layout = V2_DATA if version == 2 else V1_DATA
    if len(data) != 32 * len(layout):
        raise LogError(f"V{version} OrderFilled data is {32 * len(layout)} bytes, got {len(data)}")
    try:
        values = decode(list(layout), data)
    except DecodingError as exc:
        raise LogError(f"undecodable V{version} data: {exc}") from exc
    if version == 2:
        side_code, asset, maker_amount, taker_amount, fee = values[:5]
        if side_code not in (0, 1):
            raise LogError(f"V2 side must be 0 or 1, got {side_code}")
        side = Side.BUY if side_code == 0 else Side.SELL
    else:
        maker_asset, taker_asset, maker_amount, taker_amount, fee = values
        side = Side.BUY if maker_asset == 0 else Side.SELL
        asset = taker_asset if side is Side.BUY else maker_asset
    shares, collateral = _amounts(side, maker_amount, taker_amount)
    if shares == 0 or asset == 0:
        raise LogError("a fill of zero shares or of token 0 is not a trade")
    if shares >= _MAX_UINT64 or collateral >= _MAX_UINT64:
        raise LogError("amounts beyond any real fill (64-bit micro-units)")
    return ChainFill(
        version=version,
        exchange=str(log.get("address", "")).lower(),
        order_hash="0x" + raw_topics[1].hex(),
        maker=_topic_address(raw_topics[2], "maker"),
        taker=_topic_address(raw_topics[3], "taker"),
        side=side,
        token_id=str(asset),
        shares_raw=shares,
        collateral_raw=collateral,
        fee_raw=fee,
        tx_hash="0x" + _hex_bytes(log.get("transactionHash"), "transactionHash").hex(),
        log_index=quantity(log.get("logIndex"), "logIndex"),
        block_number=quantity(log.get("blockNumber"), "blockNumber"),
        block_hash=str(log.get("blockHash", "")).lower(),
        removed=bool(log.get("removed", False)),
    )
