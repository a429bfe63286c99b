"""A webhook endpoint: checks every request's signature, counts deliveries per signal.

Like any receiver of an at-least-once webhook, it keeps one effect per `Idempotency-Key`; repeats
are counted (`delivered[signal_id] > 1`) and reported apart. It is flaky on purpose: the first
attempt for about one signal in seven (chosen by the signal id, so the same ones in every run) is
answered 503, which the notifier must retry. A request whose signature does not verify is refused
with 401 and counted: the notifier signs every request, so any such request is a finding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections import Counter
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devtools.servers import free_port
from services.notifier.webhooks.signing import (
    ATTEMPT_HEADER,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify,
)
from shared.ops import http_server

FLAKY_ONE_IN = 7


def flaky(signal_id: str) -> bool:
    return hashlib.sha256(signal_id.encode()).digest()[0] % FLAKY_ONE_IN == 0


class WebhookReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.secret = secrets.token_hex(16)
        self.delivered: Counter[str] = Counter()
        self.refused_first_attempts = 0
        self.bad_signatures = 0
        self.bad_bodies = 0
        self._server = http_server(
            Starlette(routes=[Route("/hook", self._hook, methods=["POST"])]), "127.0.0.1", self.port
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def write_config(self, path: Path) -> Path:
        hook = {"name": "chaos", "url": self.url, "secret": self.secret, "preset": "generic"}
        path.write_bytes(orjson.dumps({"webhooks": [hook]}))
        return path

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        headers = request.headers
        signed = verify(
            self.secret,
            body,
            headers.get(TIMESTAMP_HEADER),
            headers.get(SIGNATURE_HEADER),
            time.time(),
        )
        if not signed:
            self.bad_signatures += 1
            return Response(status_code=401)
        try:
            signal = orjson.loads(body)["signal"]
            signal_id, status = str(signal["signal_id"]), signal.get("status", "confirmed")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.bad_bodies += 1
            return Response(status_code=400)
        # A status change is its own delivery: `<signal_id>:<status>` (docs/notifier.md).
        expected = signal_id if status == "confirmed" else f"{signal_id}:{status}"
        if expected != headers.get(IDEMPOTENCY_HEADER):
            self.bad_bodies += 1
            return Response(status_code=400)
        if headers.get(ATTEMPT_HEADER) == "1" and flaky(signal_id):
            self.refused_first_attempts += 1
            return Response(status_code=503)
        self.delivered[signal_id] += 1
        return Response(status_code=204)
