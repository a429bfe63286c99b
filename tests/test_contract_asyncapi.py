"""The committed stream contract (docs/asyncapi.*, docs/schemas/) against the code.

- The files are exactly what `cli.docs_gen` generates now (`make docs` after a model change).
- Every payload schema in the document is the pydantic model's JSON Schema.
- Every FastStream subscriber the services really build (detector, store) is in the document with
  its stream and group.
- What the code writes validates against the declared models: a wallet-registry change, a dead
  letter, and an OrderFill and a Signal as encoded on their streams.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import yaml
from pydantic import BaseModel

from cli import docs_gen
from services.detector.main import Detector
from services.detector.settings import DetectorSettings
from services.store.main import Store
from services.store.settings import StoreSettings
from shared import wallet_registry
from shared.models import (
    DomeOrder,
    OrderFill,
    Side,
    Signal,
    SignalKind,
    Source,
    TrackedWallet,
    signal_id,
)
from shared.redis_streams import dead_letter, decode, encode
from shared.streams import Streams

ROOT = Path(__file__).resolve().parent.parent
REF = "#/components/schemas/{model}"
WALLET = "0x" + "ab" * 20


def test_committed_files_are_what_the_code_generates() -> None:
    for path, text in docs_gen.rendered().items():
        assert path.exists(), f"{path.relative_to(ROOT)} missing: run `make docs`"
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `make docs`"


def test_yaml_and_json_documents_agree() -> None:
    from_yaml = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
    from_json = json.loads((ROOT / "docs" / "asyncapi.json").read_text())
    assert from_yaml == from_json
    assert from_json["asyncapi"] == "3.0.0"


def _expected_schemas(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    return {model.__name__: schema, **defs}


@pytest.mark.parametrize(
    "model", [OrderFill, Signal, docs_gen.WalletChange, docs_gen.DeadLetter, TrackedWallet]
)
def test_payload_schemas_are_the_models_json_schemas(model: type[BaseModel]) -> None:
    components = docs_gen.document()["components"]["schemas"]
    for name, schema in _expected_schemas(model).items():
        assert components[name] == schema, f"{name} differs from {model.__name__}'s JSON Schema"


def test_every_stream_message_names_its_model_and_plain_layout() -> None:
    doc = docs_gen.document()
    payloads = {}
    for name, channel in doc["channels"].items():
        (ref,) = channel["messages"].values()
        message = doc["components"]["messages"][ref["$ref"].rsplit("/", 1)[-1]]
        payloads[name] = message["payload"]["$ref"].rsplit("/", 1)[-1]
        assert "correlationId" not in message
        assert "`data`" in message["description"] or "flat fields" in message["description"]
    assert payloads["signals:detector"] == "Signal"
    assert payloads["orders.raw:ingestor"] == "OrderFill"
    assert payloads["wallets.control:wallet-registry"] == "WalletChange"
    assert payloads["orders.dead:store"] == "DeadLetter"


def test_signal_json_schema_file() -> None:
    committed = json.loads((ROOT / "docs" / "schemas" / "signal.schema.json").read_text())
    assert committed["$schema"] == docs_gen.JSON_SCHEMA_DIALECT
    assert {k: v for k, v in committed.items() if k != "$schema"} == Signal.model_json_schema()
    payload = orjson.loads(encode(_signal())[b"data"])
    assert set(committed["required"]) <= set(payload) <= set(committed["properties"])


def _declared(doc: dict[str, Any]) -> set[tuple[str, str | None]]:
    found = set()
    for channel in doc["channels"].values():
        binding = channel["bindings"]["redis"]
        found.add((binding["channel"], binding.get("groupName")))
    return found


def test_the_services_real_groups_are_in_the_document() -> None:
    detector = Detector(DetectorSettings(), []).group.config
    store = [group.config for group in Store(StoreSettings()).groups]
    real = {(config.stream, config.group) for config in [detector, *store]}
    assert len(real) == 3, real
    assert real <= _declared(docs_gen.document()), real - _declared(docs_gen.document())


def _signal() -> Signal:
    return Signal(
        signal_id=signal_id("trader_entry", "k1"),
        kind=SignalKind.TRADER_ENTRY,
        wallet=WALLET,
        wallet_label="w",
        market_slug="m",
        token_id="1",
        side=Side.BUY,
        price=0.4,
        shares=10,
        notional_usd=4,
        confidence=0.5,
        reasons=["first buy"],
        order_keys=["k1"],
        source=Source.DOME_WS,
        exchange_ts=1760086772,
        received_at=1760086773.1,
        detected_at=1760086773.2,
    )


def test_stream_payloads_round_trip_through_the_declared_models() -> None:
    order = DomeOrder(
        token_id="1",
        side=Side.SELL,
        shares_normalized=2.5,
        price=0.3,
        tx_hash="0xab",
        timestamp=1760086772,
        user=WALLET,
    )
    fill = OrderFill.from_dome(order, Source.DOME_WS, 1760086773.0)
    assert OrderFill.model_validate(decode(encode(fill))) == fill
    assert Signal.model_validate(decode(encode(_signal()))) == _signal()


@pytest.mark.integration
async def test_what_the_code_writes_matches_the_documented_models(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=WALLET, label="x"))
    await wallet_registry.remove(redis_client, streams, WALLET)
    changes = await redis_client.xrange(streams.wallets_control)
    assert [docs_gen.WalletChange.model_validate(decode(f)).op for _, f in changes] == [
        "upsert",
        "remove",
    ]

    await dead_letter(redis_client, streams.orders_dead, b"{bad", "not JSON", origin="store")
    ((_, fields),) = await redis_client.xrange(streams.orders_dead)
    entry = docs_gen.DeadLetter.model_validate({k.decode(): v.decode() for k, v in fields.items()})
    assert entry.origin == "store" and entry.raw == "{bad"
