"""`betterbot replay-tape` against a real Redis: Data-API trades into orders.raw through the
ingestor's dedupe, oldest first, tracked wallets only, and idempotent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from shared.data_api import order_from_data_api as data_api_order
from shared.models import OrderFill, Source, order_key
from shared.redis_streams import decode
from shared.streams import Streams
from shared.wallets import load_wallets
from tests.helpers.cli import Cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
TAPE = orjson.loads((ROOT / "data" / "polymarket_trades_nobel2025.json").read_bytes())[:60]
TRACKED = {w.address for w in load_wallets(ROOT / "config" / "wallets.example.json")}


def _key(item: dict[str, Any]) -> str:
    return order_key(
        item["transactionHash"],
        item["proxyWallet"],
        item["asset"],
        item["side"],
        item["size"],
        item["price"],
    )


@pytest.fixture
def cli(redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(redis_url, namespace, capsys)


@pytest.fixture
def tape(tmp_path: Path) -> Path:
    path = tmp_path / "tape.json"
    path.write_bytes(orjson.dumps([*TAPE, {**TAPE[0], "price": "0.5"}]))
    return path


async def _stored(client: aioredis.Redis, streams: Streams) -> list[OrderFill]:
    return [OrderFill.model_validate(decode(f)) for _, f in await client.xrange(streams.orders_raw)]


async def test_tracked_trades_go_in_once_oldest_first(
    cli: Cli, tape: Path, redis_client: aioredis.Redis, streams: Streams
) -> None:
    expected = {_key(t) for t in TAPE if t["proxyWallet"].lower() in TRACKED}
    assert 5 < len(expected) < len(TAPE)

    code, out, err = await cli("replay-tape", str(tape))
    assert code == 1 and "item 60: price: " in err, "the bad item is named, the rest go in"
    assert (out["read"], out["invalid"], out["added"]) == (61, 1, len(expected))
    fills = await _stored(redis_client, streams)
    assert {f.order_key for f in fills} == expected
    assert all(f.source == Source.DATA_API for f in fills)
    assert [f.timestamp for f in fills] == sorted(f.timestamp for f in fills)

    code, out, _ = await cli("replay-tape", str(tape))
    assert (out["added"], out["duplicates"]) == (0, len(expected))
    assert await redis_client.xlen(streams.orders_raw) == len(expected)

    code, out, _ = await cli("replay-tape", str(tape), "--all-wallets")
    assert out["added"] == len({_key(t) for t in TAPE}) - len(expected)


async def test_missing_or_malformed_file_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    code, _, err = await cli("replay-tape", str(tmp_path / "nope.json"))
    assert code == 2 and "not found" in err
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    code, _, err = await cli("replay-tape", str(tmp_path / "bad.json"))
    assert code == 2 and "JSON list" in err


def test_mapping_follows_the_data_api_fields() -> None:
    item = TAPE[0]
    order = data_api_order(item)
    assert order.user == item["proxyWallet"].lower() and order.token_id == item["asset"]
    assert order.shares_normalized == item["size"] and order.shares == round(item["size"] * 1e6)
    assert (order.market_slug, order.token_label, order.tx_hash) == (
        item["slug"],
        item["outcome"],
        item["transactionHash"],
    )
    assert order.order_hash is None
    with pytest.raises(ValueError, match="side"):
        data_api_order({**item, "side": "HOLD"})
