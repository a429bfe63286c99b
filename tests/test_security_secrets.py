"""No secret leaks: the whole pipeline runs with a distinctive value for every secret it holds,
is pushed through the paths where secrets tend to escape (auth refusals, dropped sockets, 429s,
oversized frames, failing webhooks, wrong tokens), and then every log line, every /metrics,
/health and /api/status answer, and every key the services wrote to Redis is searched for each
secret, as is and URL-encoded.

The secrets: the Dome key (in the WebSocket URL path), a polynode key (in the query string, with
characters that change when URL-encoded), the key of the REST backfill (a bearer header), the
Redis and Postgres passwords (in their URLs), the store's API token, the notifier's WebSocket
tokens, a webhook's signing secret and the secrets inside webhook URLs (a path and a query, as
Discord and Slack URLs carry). Settings objects are checked in process too (repr, str, JSON dump),
as are the startup errors of bad settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import connect

from chaos.receiver import WebhookReceiver
from chaos.redis_server import ThrowawayRedis
from devtools.processes import ROOT, ServiceProcess, start_all
from devtools.servers import create_database, drop_database, free_port
from services.ingestor.settings import IngestorSettings
from services.notifier.settings import NotifierSettings
from services.notifier.webhooks.config import load_webhooks
from services.simulator.settings import SimulatorSettings
from services.store.settings import StoreSettings
from shared.streams import Streams

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

# A directory of this run's own: several test runs may share the checkout at once.
OUTPUT = ROOT / "tests" / "output" / "security" / f"{os.getpid()}-{secrets.token_hex(3)}"
WALLETS = ROOT / "config" / "wallets.example.json"
NEW_WALLET = "0x" + "5ec" * 13 + "0"


@dataclass(frozen=True)
class Secrets:
    dome_key: str = "dk" + secrets.token_hex(14)
    # '+', '/' and '=' change under URL encoding: both spellings must stay out of sight.
    polynode_key: str = "pk+" + secrets.token_hex(12) + "/="
    rest_key: str = "rk" + secrets.token_hex(14)
    redis_password: str = "rp" + secrets.token_hex(12)
    postgres_password: str = "pp" + secrets.token_hex(12)
    store_token: str = "st" + secrets.token_hex(14)
    ws_tokens: tuple[str, str] = ("wa" + secrets.token_hex(14), "wb" + secrets.token_hex(14))
    hook_query: str = "hq" + secrets.token_hex(12)
    hook_path: str = "hp" + secrets.token_hex(12)

    def all(self) -> dict[str, str]:
        values = {
            "dome_key": self.dome_key,
            "polynode_key": self.polynode_key,
            "rest_key": self.rest_key,
            "redis_password": self.redis_password,
            "postgres_password": self.postgres_password,
            "store_token": self.store_token,
            "ws_token_1": self.ws_tokens[0],
            "ws_token_2": self.ws_tokens[1],
            "hook_query": self.hook_query,
            "hook_path": self.hook_path,
        }
        spelled = {f"{k} (url-encoded)": quote(v, safe="") for k, v in values.items()}
        spelled |= {f"{k} (form-encoded)": urlencode({"k": v})[2:] for k, v in values.items()}
        return values | {k: v for k, v in spelled.items() if v not in values.values()}


@dataclass
class Evidence:
    texts: dict[str, str] = field(default_factory=dict)
    access: dict[str, Any] = field(default_factory=dict)
    oversized_dead_letters: int = 0
    ingestors_alive_after_oversized: bool = False
    webhook_deliveries: int = 0


def _with_password(url: str, password: str, database: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = f"{parts.hostname}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", f"/{database}", "", ""))


class Run:
    """The pipeline with every secret set, driven through the leaky paths."""

    def __init__(self, s: Secrets, redis: ThrowawayRedis, database_url: str) -> None:
        self.s = s
        self.redis = redis
        self.namespace = f"sec{secrets.token_hex(4)}:"
        self.streams = Streams(self.namespace)
        self.sim_port, self.notifier_port = free_port(), free_port()
        self.receiver = WebhookReceiver()
        self.database_url = database_url
        self.services: dict[str, ServiceProcess] = {}
        self.evidence = Evidence()

    @property
    def sim(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    def _add(self, name: str, module: str, env: dict[str, str], port: int | None = None) -> None:
        port = port or free_port()
        base = {
            "REDIS_URL": self.redis.url,
            "STREAM_NAMESPACE": self.namespace,
            "WALLETS_FILE": str(WALLETS),
            "LOG_LEVEL": "DEBUG",
            "OPS_PORT": str(port),
        }
        self.services[name] = ServiceProcess(
            name,
            f"services.{module}",
            {**base, **env},
            f"http://127.0.0.1:{port}/health",
            OUTPUT / f"{name}.log",
        )

    def _webhooks_file(self) -> Path:
        dead_port = free_port()
        hooks = [
            {
                "name": "desk",
                "url": f"{self.receiver.url}?sig={self.s.hook_query}",
                "secret": self.receiver.secret,
            },
            {
                "name": "gone",
                "url": f"http://127.0.0.1:{dead_port}/hooks/{self.s.hook_path}",
                "secret": "g" + secrets.token_hex(12),
            },
        ]
        path = OUTPUT / "webhooks.json"
        path.write_bytes(orjson.dumps({"webhooks": hooks}))
        return path

    def declare(self) -> None:
        s = self.s
        ingestor = {
            "DOME_WS_URL": f"ws://127.0.0.1:{self.sim_port}",
            "DOME_API_URL": f"{self.sim}/v1",
            "DOME_RECONNECT_MIN_S": "0.2",
            "DOME_RECONNECT_MAX_S": "1",
            "DOME_MAX_FRAME_BYTES": "1024",
        }
        self._add(
            "simulator",
            "simulator",
            {
                "SIM_HOST": "127.0.0.1",
                "SIM_PORT": str(self.sim_port),
                "SIM_SPEED": "300",
                "SIM_LOOP": "false",
                "SIM_API_KEY": "",
            },
            self.sim_port,
        )
        self._add(
            "store",
            "store",
            {
                "DATABASE_URL": self.database_url,
                "STORE_API_TOKEN": s.store_token,
            },
        )
        self._add("detector", "detector", {})
        self._add(
            "notifier",
            "notifier",
            {
                "NOTIFIER_HOST": "127.0.0.1",
                "NOTIFIER_PORT": str(self.notifier_port),
                "NOTIFIER_TOKENS": ",".join(s.ws_tokens),
                # The store's token, which the dashboard's history reads send server-side.
                "STORE_API_TOKEN": s.store_token,
                "WEBHOOKS_FILE": str(self._webhooks_file()),
                "WEBHOOK_MAX_ATTEMPTS": "2",
                "WEBHOOK_BACKOFF_S": "0.05",
                "WEBHOOK_BACKOFF_MAX_S": "0.1",
            },
            self.notifier_port,
        )
        self._add("ingestor-dome", "ingestor", {**ingestor, "DOME_API_KEY": s.dome_key})
        self._add(
            "ingestor-polynode",
            "ingestor",
            {
                **ingestor,
                "DOME_DIALECT": "polynode",
                "DOME_WS_URL": f"ws://127.0.0.1:{self.sim_port}/ws",
                "POLYNODE_API_KEY": s.polynode_key,
                "DOME_API_KEY": s.rest_key,
            },
        )

    async def run(self) -> Evidence:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        await self.receiver.start()
        self.declare()
        try:
            await self._start()
            async with httpx.AsyncClient(base_url=self.sim, timeout=10) as sim:
                await self._until(sim, lambda st: st["started"] and st["clients"] == 2)
                await self._leaky_paths(sim)
                await self._access_attempts()
                await self._until(sim, lambda st: st["tape_done"])
                await asyncio.sleep(2)
            await self._collect_answers()
            await self._collect_redis()
        finally:
            for service in reversed(self.services.values()):
                await service.astop()
            await self.receiver.stop()
        for name, service in self.services.items():
            self.evidence.texts[f"log of {name}"] = service.log_text()
        self.evidence.webhook_deliveries = sum(self.receiver.delivered.values())
        return self.evidence

    async def _start(self) -> None:
        await start_all([v for k, v in self.services.items() if not k.startswith("ingestor")])
        await start_all([v for k, v in self.services.items() if k.startswith("ingestor")])

    async def _until(self, sim: httpx.AsyncClient, check: Any, within_s: float = 60) -> None:
        async with asyncio.timeout(within_s):
            while True:
                if check((await sim.get("/_sim/status")).json()):
                    return
                await asyncio.sleep(0.1)

    async def _leaky_paths(self, sim: httpx.AsyncClient) -> None:
        """Refused keys, dropped sockets, 429s on the backfill, and an oversized frame."""
        await sim.post("/_sim/rate_limit", json={"requests": 4, "retry_after": 0.2})
        await sim.post("/_sim/auth", json={"reject": True, "drop": True})
        await asyncio.sleep(1.5)
        await sim.post("/_sim/auth", json={"reject": False})
        await self._until(sim, lambda st: st["clients"] == 2)
        await sim.post("/_sim/drop")
        await self._until(sim, lambda st: st["clients"] == 2)
        await asyncio.sleep(0.5)
        # Over DOME_MAX_FRAME_BYTES (1 KiB): rejected and dead-lettered, the socket kept.
        await sim.post("/_sim/inject", content=orjson.dumps({"type": "event", "pad": "x" * 2000}))
        async with asyncio.timeout(20):
            while True:
                dead = await self._redis().xrange(self.streams.orders_dead)
                oversized = [d for _, d in dead if b"exceeds the limit" in d[b"reason"]]
                if len(oversized) >= 2:
                    break
                await asyncio.sleep(0.1)
        self.evidence.oversized_dead_letters = len(oversized)
        # Over the socket's hard limit (4x): the connection is closed, and replaced.
        await sim.post("/_sim/inject", content=orjson.dumps({"type": "event", "pad": "x" * 9000}))
        await asyncio.sleep(0.5)
        await self._until(sim, lambda st: st["clients"] == 2)
        self.evidence.ingestors_alive_after_oversized = all(
            self.services[n].running for n in ("ingestor-dome", "ingestor-polynode")
        )

    def _redis(self) -> Any:
        if not hasattr(self, "_client"):
            import redis.asyncio as aioredis

            self._client = aioredis.Redis.from_url(self.redis.url)
        return self._client

    async def _access_attempts(self) -> None:
        ws = f"ws://127.0.0.1:{self.notifier_port}/ws"
        access = self.evidence.access
        access["ws_wrong_token"] = await _ws_outcome(ws, first={"type": "subscribe", "token": "no"})
        access["ws_wrong_query_token"] = await _ws_outcome(f"{ws}?token=wrong")
        access["ws_first_message_token"] = await _ws_outcome(
            ws, first={"type": "subscribe", "token": self.s.ws_tokens[1]}
        )
        access["ws_query_token"] = await _ws_outcome(f"{ws}?token={self.s.ws_tokens[0]}")
        access["ws_header_token"] = await _ws_outcome(
            ws, headers={"Authorization": f"Bearer {self.s.ws_tokens[1]}"}
        )
        store = self.services["store"].health_url.removesuffix("/health")
        body = {"label": "security test", "score": 0.5}
        async with httpx.AsyncClient(base_url=store, timeout=10) as http:
            for name, headers in (
                ("store_no_token", {}),
                ("store_wrong_token", {"Authorization": "Bearer " + "w" * 32}),
                ("store_token", {"Authorization": f"Bearer {self.s.store_token}"}),
            ):
                response = await http.put(f"/wallets/{NEW_WALLET}", json=body, headers=headers)
                access[name] = response.status_code
            big = {"label": "x" * 40_000}
            response = await http.put(
                f"/wallets/{NEW_WALLET}",
                json=big,
                headers={"Authorization": f"Bearer {self.s.store_token}"},
            )
            access["store_big_body"] = response.status_code

    async def _collect_answers(self) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            for name, service in self.services.items():
                base = service.health_url.removesuffix("/health")
                for path in ("/health", "/metrics"):
                    with contextlib.suppress(httpx.HTTPError):
                        answer = await http.get(base + path)
                        self.evidence.texts[f"{name} {path}"] = answer.text
            notifier = f"http://127.0.0.1:{self.notifier_port}"
            self.evidence.texts["notifier /api/status"] = (
                await http.get(f"{notifier}/api/status")
            ).text
            store = self.services["store"].health_url.removesuffix("/health")
            self.evidence.texts["store /signals"] = (await http.get(f"{store}/signals")).text

    async def _collect_redis(self) -> None:
        client = self._redis()
        dump: list[str] = []
        async for key in client.scan_iter(match=f"*{self.namespace}*", count=1000):
            kind = (await client.type(key)).decode()
            if kind == "stream":
                value: Any = await client.xrange(key)
            elif kind == "hash":
                value = await client.hgetall(key)
            elif kind == "string":
                value = await client.get(key)
            else:
                value = kind
            dump.append(f"{key!r}: {value!r}")
        self.evidence.texts["redis keys"] = "\n".join(dump)
        await client.aclose()


async def _ws_outcome(
    url: str, first: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> str:
    """'pong' when the feed is open to this client (it answers a ping after `first`), else the
    close code (or the HTTP status of a refused handshake)."""
    try:
        async with connect(url, additional_headers=headers, open_timeout=5) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 15))
            assert hello["type"] == "hello", hello
            if first is not None:
                await ws.send(json.dumps(first))
            await ws.send(json.dumps({"type": "ping"}))
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 15))
                if message["type"] not in ("subscribed", "signal", "gap"):
                    return str(message["type"])
    except websockets.ConnectionClosed as closed:
        return str(closed.rcvd.code if closed.rcvd else "closed")
    except websockets.InvalidStatus as refused:
        return f"http {refused.response.status_code}"


def _database(admin_url: str, password: str) -> Iterator[str]:
    name = f"bb_sec_{secrets.token_hex(6)}"
    asyncio.run(create_database(admin_url, name))
    yield _with_password(admin_url, password, name)
    asyncio.run(drop_database(admin_url, name))


@pytest.fixture(scope="module")
def secret_values() -> Secrets:
    return Secrets()


@pytest.fixture(scope="module")
def evidence(postgres_admin_url: str, secret_values: Secrets) -> Iterator[Evidence]:
    redis = ThrowawayRedis(OUTPUT, password=secret_values.redis_password)
    redis.start()
    database = _database(postgres_admin_url, secret_values.postgres_password)
    try:
        run = Run(secret_values, redis, next(database))
        yield asyncio.run(run.run())
    finally:
        redis.stop()
        next(database, None)
        # The evidence holds every text; a leak's assertion names the secret and where it was.
        shutil.rmtree(OUTPUT, ignore_errors=True)


def _leaks(texts: dict[str, str], values: dict[str, str]) -> list[str]:
    return [
        f"{secret} in {where}"
        for where, text in texts.items()
        for secret, value in values.items()
        if value in text
    ]


def test_the_run_went_through_the_leaky_paths(evidence: Evidence) -> None:
    logs = "\n".join(t for k, t in evidence.texts.items() if k.startswith("log of"))
    assert (
        logs.count('"event":"connection_lost"')
        + logs.count("connect_failed")
        + logs.count("reconnect")
        > 0
    ), "the ingestors never lost their connection: the test exercised nothing"
    assert evidence.webhook_deliveries > 0, "no webhook delivered: signals did not flow"
    assert "gone" in logs, "the failing webhook was never tried"


def test_no_secret_in_any_log(evidence: Evidence, secret_values: Secrets) -> None:
    texts = {k: v for k, v in evidence.texts.items() if k.startswith("log of")}
    assert len(texts) == 6 and all(texts.values())
    assert _leaks(texts, secret_values.all()) == []


def test_no_secret_in_metrics_health_or_status(evidence: Evidence, secret_values: Secrets) -> None:
    texts = {k: v for k, v in evidence.texts.items() if not k.startswith(("log of", "redis"))}
    assert sum(k.endswith("/metrics") for k in texts) == 6
    assert _leaks(texts, secret_values.all()) == []


def test_no_secret_in_what_the_services_wrote_to_redis(
    evidence: Evidence, secret_values: Secrets
) -> None:
    assert "webhooks.dead" in evidence.texts["redis keys"], "the dead webhook left no letter"
    assert _leaks({"redis": evidence.texts["redis keys"]}, secret_values.all()) == []


def test_oversized_frames_are_dead_lettered_and_the_ingestors_go_on(evidence: Evidence) -> None:
    assert evidence.oversized_dead_letters >= 2
    assert evidence.ingestors_alive_after_oversized


def test_tokens_are_required(evidence: Evidence) -> None:
    assert evidence.access == {
        "ws_wrong_token": "4401",
        "ws_wrong_query_token": "4401",
        "ws_first_message_token": "pong",
        "ws_query_token": "pong",
        "ws_header_token": "pong",
        "store_no_token": 401,
        "store_wrong_token": 401,
        "store_token": 201,
        "store_big_body": 413,
    }


def test_settings_never_show_a_secret(secret_values: Secrets, tmp_path: Path) -> None:
    s = secret_values
    redis_url = f"redis://:{s.redis_password}@127.0.0.1:1/0"
    hooks = tmp_path / "hooks.json"
    hooks.write_text(
        json.dumps(
            [
                {
                    "name": "x",
                    "url": f"https://example.com/{s.hook_path}?q={s.hook_query}",
                    "secret": "s" * 16 + s.store_token,
                }
            ]
        )
    )
    objects: list[Any] = [
        IngestorSettings(
            dome_api_key=s.dome_key,
            polynode_api_key=s.polynode_key,
            dome_dialect="polynode",
            redis_url=redis_url,
        ),
        StoreSettings(
            store_api_token=s.store_token,
            redis_url=redis_url,
            database_url=f"postgresql://u:{s.postgres_password}@h/db",
        ),
        NotifierSettings(notifier_tokens=",".join(s.ws_tokens), redis_url=redis_url),
        SimulatorSettings(sim_api_key=s.dome_key),
        *load_webhooks(hooks),
    ]
    shown = {}
    for n, obj in enumerate(objects):
        shown[f"repr {n}"] = repr(obj)
        shown[f"str {n}"] = str(obj)
        # A webhook's URL is plain data in its model (serialized if dumped); settings hold
        # SecretStr, which even a JSON dump masks.
        if n < 4:
            shown[f"json {n}"] = obj.model_dump_json()
    assert _leaks(shown, s.all()) == []


def _startup_output(module: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0, "bad settings were accepted"
    return done.stdout + done.stderr


def test_a_bad_store_or_detector_setting_does_not_echo_a_secret(secret_values: Secrets) -> None:
    s = secret_values
    redis_url = f"redis://:{s.redis_password}@127.0.0.1:1/0"
    store = _startup_output(
        "services.store",
        {
            "STORE_API_TOKEN": s.store_token,
            "REDIS_URL": redis_url,
            "DATABASE_URL": f"postgresql://u:{s.postgres_password}@127.0.0.1:1/x",
            "STORE_RETRY_MIN_S": "5",
            "STORE_RETRY_MAX_S": "1",
        },
    )
    detector = _startup_output(
        "services.detector",
        {
            "REDIS_URL": redis_url,
            "DETECTOR_BATCH_SIZE": "0",
        },
    )
    assert _leaks({"store": store, "detector": detector}, s.all()) == []


def test_a_bad_ingestor_setting_does_not_echo_the_key(secret_values: Secrets) -> None:
    key = secret_values.dome_key
    out = _startup_output(
        "services.ingestor",
        {
            "DOME_API_KEY": key,
            "DOME_RECONNECT_MIN_S": "10",
            "DOME_RECONNECT_MAX_S": "1",
        },
    )
    assert "startup_failed" in out
    prefixes = {key[:n] for n in range(6, len(key) + 1)}
    assert not any(p in out for p in prefixes), "a prefix of the Dome key is in the output"


def test_a_bad_notifier_setting_does_not_echo_a_token(secret_values: Secrets) -> None:
    token = secret_values.ws_tokens[0]
    out = _startup_output("services.notifier", {"NOTIFIER_TOKENS": f'["{token}"'})
    assert token not in out
