"""Limits and credential checks, across services.

- Every input has a bound, on by default: feed frames, WebSocket client messages, filter sizes,
  connections per token, HTTP request bodies, the WebSocket frames of every HTTP server.
- No secret is ever compared with `==`: a scan of the services' source finds every comparison
  whose operand is named like a token, key, secret, signature or password (timing leaks), and the
  places that check credentials use `hmac.compare_digest`.
- Webhooks: a generic endpoint cannot be configured without a signing secret, and a signature
  fails on any change of body, timestamp or secret.
- Over the wire, on a notifier process: a message over NOTIFIER_MAX_MESSAGE_BYTES closes with 1009,
  a filter over NOTIFIER_MAX_FILTER_VALUES with 1008, a token's connection past
  NOTIFIER_MAX_CLIENTS_PER_TOKEN with 1008, and a missing or wrong token with 4401.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from devtools.servers import free_port
from services.detector.settings import DetectorSettings
from services.ingestor.settings import IngestorSettings
from services.notifier.settings import NotifierSettings
from services.notifier.webhooks.config import WebhookConfigError, load_webhooks
from services.notifier.webhooks.signing import signature, verify
from services.simulator.settings import SimulatorSettings
from services.store.settings import StoreSettings
from shared import ops
from tests.helpers.processes import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
SECRET_WORDS = ("token", "secret", "signature", "password", "api_key", "apikey", "digest")
# A market's `token_id` / `token_label` (Polymarket's outcome tokens) are not credentials.
NOT_SECRET_SUFFIXES = ("_id", "_ids", "_label", "_unit")


def test_every_input_has_a_bound_by_default() -> None:
    ingestor, notifier = IngestorSettings(), NotifierSettings()
    store, simulator, detector = StoreSettings(), SimulatorSettings(), DetectorSettings()
    bounds = {
        "DOME_MAX_FRAME_BYTES": ingestor.dome_max_frame_bytes,
        "PUBLISH_QUEUE_SIZE": ingestor.publish_queue_size,
        "NOTIFIER_MAX_MESSAGE_BYTES": notifier.notifier_max_message_bytes,
        "NOTIFIER_MAX_FILTER_VALUES": notifier.notifier_max_filter_values,
        "NOTIFIER_MAX_CLIENTS_PER_TOKEN": notifier.notifier_max_clients_per_token,
        "NOTIFIER_CLIENT_QUEUE": notifier.notifier_client_queue,
        "STORE_API_MAX_BODY_BYTES": store.store_api_max_body_bytes,
        "STORE_MAX_DELIVERIES": store.store_max_deliveries,
        "DETECTOR_MAX_DELIVERIES": detector.detector_max_deliveries,
        "SIM_MAX_FILTER_VALUES": simulator.sim_max_filter_values,
        "STREAM_MAXLEN": notifier.stream_maxlen,
    }
    assert all(isinstance(v, int) and 0 < v <= 10_000_000 for v in bounds.values()), bounds
    assert bounds["DOME_MAX_FRAME_BYTES"] <= 1 << 20
    assert bounds["NOTIFIER_MAX_MESSAGE_BYTES"] <= 1 << 16
    assert bounds["STORE_API_MAX_BODY_BYTES"] <= 1 << 16
    # Every HTTP server of the services (shared.ops.http_server) caps WebSocket frames.
    assert ops.http_server(object(), "127.0.0.1", 0).config.ws_max_size <= 1 << 20


def _secret_named(node: ast.expr) -> str | None:
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    if not isinstance(name, str) or name.lower().endswith(NOT_SECRET_SUFFIXES):
        return None
    return name if any(word in name.lower() for word in SECRET_WORDS) else None


def _equality_on_secrets(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            continue
        for operand in (node.left, *node.comparators):
            if isinstance(operand, ast.Constant) and operand.value is None:
                continue
            if name := _secret_named(operand):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares {name} with ==")
    return found


def test_no_secret_is_compared_with_equality() -> None:
    sources = sorted((ROOT / "services").rglob("*.py")) + sorted((ROOT / "shared").rglob("*.py"))
    assert len(sources) > 30
    assert [f for path in sources for f in _equality_on_secrets(path)] == []


@pytest.mark.parametrize(
    "module",
    [
        "services/notifier/auth.py",
        "services/store/api.py",
        "services/notifier/webhooks/signing.py",
        "services/simulator/app.py",
    ],
)
def test_credential_checks_compare_in_constant_time(module: str) -> None:
    tree = ast.parse((ROOT / module).read_text())
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "compare_digest"
    ]
    assert calls, f"{module} checks a credential without hmac.compare_digest"


def test_a_generic_webhook_needs_a_signing_secret(tmp_path: Path) -> None:
    path = tmp_path / "hooks.json"
    path.write_text(json.dumps([{"name": "desk", "url": "https://example.com/hook"}]))
    with pytest.raises(WebhookConfigError, match="secret"):
        load_webhooks(path)
    path.write_text(json.dumps([{"url": "https://example.com/h", "secret": "too-short"}]))
    with pytest.raises(WebhookConfigError, match="16"):
        load_webhooks(path)


@settings(max_examples=100, deadline=None)
@given(
    body=st.binary(max_size=500),
    flip=st.integers(0, 10_000),
    skew=st.integers(-10, 10),
)
def test_a_webhook_signature_fails_on_any_change(body: bytes, flip: int, skew: int) -> None:
    secret, now = "s" * 16 + secrets.token_hex(8), int(time.time())
    header = signature(secret, now, body)
    assert verify(secret, body, str(now), header, now)
    if body:
        changed = bytearray(body)
        changed[flip % len(body)] ^= 1 + flip % 255
        assert not verify(secret, bytes(changed), str(now), header, now)
    assert not verify(secret + "x", body, str(now), header, now)
    if skew:
        assert not verify(secret, body, str(now + skew), header, now)
    assert not verify(secret, body, str(now - 3600), signature(secret, now - 3600, body), now)


TOKENS = ("ta" + secrets.token_hex(12), "tb" + secrets.token_hex(12))


@pytest.fixture(scope="module")
def notifier(redis_url: str) -> Iterator[str]:
    port = free_port()
    proc = ServiceProcess(
        "notifier",
        {
            "REDIS_URL": redis_url,
            "STREAM_NAMESPACE": f"lim{secrets.token_hex(4)}:",
            "NOTIFIER_PORT": str(port),
            "NOTIFIER_TOKENS": ",".join(TOKENS),
            "NOTIFIER_MAX_MESSAGE_BYTES": "1024",
            "NOTIFIER_MAX_FILTER_VALUES": "10",
            "NOTIFIER_MAX_CLIENTS_PER_TOKEN": "2",
            "NOTIFIER_SETUP_TIMEOUT_S": "2",
        },
        f"http://127.0.0.1:{port}/health",
        tag="limits-",
    )
    try:
        proc.wait_healthy()
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        proc.stop()


async def _close_of(url: str, *messages: object) -> tuple[int, str]:
    """Send the messages once the server has spoken (hello); the close code and reason the server
    ends with (it may refuse before any hello)."""
    async with connect(url, open_timeout=5, max_size=None) as ws:
        try:
            assert json.loads(await ws.recv())["type"] == "hello"
            for message in messages:
                await ws.send(message if isinstance(message, str) else json.dumps(message))
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, closed.rcvd.reason


async def test_the_notifier_enforces_its_limits_over_the_wire(notifier: str) -> None:
    token = f"{notifier}?token={TOKENS[0]}"
    assert (await _close_of(notifier))[0] == 4401, "no token: refused after the setup timeout"
    assert (await _close_of(f"{notifier}?token=wrong"))[0] == 4401
    too_big = json.dumps({"type": "subscribe", "filters": {"markets": ["m" * 2000]}})
    assert (await _close_of(token, too_big))[0] == 1009
    wallets = [f"0x{n:040x}" for n in range(11)]
    code, reason = await _close_of(token, {"type": "subscribe", "filters": {"wallets": wallets}})
    assert code == 1008 and reason.startswith("bad filter"), reason
    held = [await connect(f"{notifier}?token={TOKENS[1]}", open_timeout=5) for _ in range(2)]
    try:
        code, reason = await _close_of(f"{notifier}?token={TOKENS[1]}")
        assert code == 1008 and "too many connections" in reason, reason
        assert (await _close_of(token, {"type": "ping"}, too_big))[0] == 1009, (
            "another token is not held back by the full one"
        )
    finally:
        for ws in held:
            await ws.close()


def test_security_md_cites_only_what_the_project_has() -> None:
    """Every file, document and test SECURITY.md names exists here (it once cited a document
    outside the project)."""
    text = (ROOT / "SECURITY.md").read_text()
    missing = []
    for ref in sorted(
        set(re.findall(r"\b(?:tests|docs|services|shared|chaos|cli)/[\w/.-]+\.\w+(?:::\w+)?", text))
    ):
        path, _, test = ref.partition("::")
        found = (ROOT / path).exists()
        if not found or (test and not re.search(rf"def {test}\b", (ROOT / path).read_text())):
            missing.append(ref)
    for name in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text):
        if not (ROOT / name).exists() and not list((ROOT / "docs").glob(name)):
            missing.append(name)
    assert missing == []
