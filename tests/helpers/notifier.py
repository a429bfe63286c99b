"""Test support for the notifier: valid Signals, an in-process notifier, a WebSocket reader, a
local webhook receiver, and a stand-in for Telegram's Bot API with a checker of its HTML."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection

from devtools.servers import free_port
from services.notifier.main import Notifier
from services.notifier.settings import NotifierSettings
from shared.models import FillStatus, Side, Signal, SignalKind, Source, signal_id
from shared.redis_streams import encode

RECV_TIMEOUT_S = 10.0


def make_signal(n: int, *, title: str = "Who wins the 2025 Nobel Peace Prize?") -> Signal:
    now = time.time()
    key = f"{n:032x}"
    return Signal(
        signal_id=signal_id(SignalKind.WHALE_ORDER, key),
        kind=SignalKind.WHALE_ORDER,
        wallet="0x" + f"{n:040x}"[-40:],
        wallet_label=f"wallet {n}",
        market_slug="nobel-peace-prize-2025",
        title=title,
        condition_id="0x" + "c" * 64,
        token_id=str(10**20 + n),
        token_label="Yes",
        side=Side.BUY,
        price=0.42,
        shares=1000.0 + n,
        notional_usd=0.42 * (1000.0 + n),
        confidence=0.9,
        reasons=["notional above whale threshold"],
        order_keys=[key],
        source=Source.DOME_WS,
        exchange_ts=int(now) - 1,
        received_at=now,
        detected_at=now,
    )


async def publish(client: aioredis.Redis, stream: str, signals: list[Signal]) -> list[str]:
    """XADD the signals as plain entries, in order; their stream ids."""
    async with client.pipeline(transaction=False) as pipe:
        for signal in signals:
            pipe.xadd(stream, cast(Any, encode(signal)))
        ids = await pipe.execute()
    return [entry_id.decode() for entry_id in ids]


@contextlib.asynccontextmanager
async def running_notifier(
    redis_url: str, namespace: str, **overrides: Any
) -> AsyncIterator[Notifier]:
    """A notifier serving on a free loopback port in this event loop, its reader positioned."""
    settings = NotifierSettings(
        redis_url=redis_url,
        stream_namespace=namespace,
        notifier_port=free_port(),
        notifier_block_ms=500,
        **overrides,
    )
    notifier = Notifier(settings)
    stop = asyncio.Event()
    task = asyncio.ensure_future(notifier.run(stop))
    try:
        await asyncio.wait_for(_until_serving(notifier), 10)
        yield notifier
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def _until_serving(notifier: Notifier) -> None:
    await notifier.fanout.ready.wait()
    if notifier.webhooks is not None:
        await notifier.webhooks.ready.wait()
    # uvicorn offers a flag, not an event, for "listening".
    while not notifier.server.started:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def ws_url(notifier: Notifier, query: str = "") -> str:
    return f"ws://127.0.0.1:{notifier.settings.notifier_port}/ws{query}"


def http_url(notifier: Notifier, path: str) -> str:
    return f"http://127.0.0.1:{notifier.settings.notifier_port}{path}"


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))
    return message


async def recv_hello(ws: ClientConnection) -> None:
    hello = await recv_json(ws)
    assert hello == {"type": "hello", "server": "betterbot-notifier", "v": 1}


async def recv_signals(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next `count` messages, each of which must be a signal."""
    messages = [await recv_json(ws) for _ in range(count)]
    assert [m["type"] for m in messages] == ["signal"] * count, messages
    return messages


async def assert_nothing_more(ws: ClientConnection) -> None:
    """Nothing is queued before a pong: no extra or repeated signal was sent."""
    await ws.send('{"type":"ping"}')
    assert await recv_json(ws) == {"type": "pong"}


def variant(n: int, **changes: Any) -> Signal:
    """`make_signal(n)` with some fields changed (validated again, like a real entry)."""
    return Signal.model_validate(make_signal(n).model_dump() | changes)


def restated(signal: Signal, status: FillStatus, reason: str = "") -> Signal:
    """`signal` repeated with a new status, as the detector publishes a status change: same
    `signal_id` and fields, `detected_at` the time the change was decided."""
    changes = {"status": status, "status_reason": reason, "detected_at": time.time()}
    return Signal.model_validate(signal.model_dump() | changes)


def wallet(n: int) -> str:
    return "0x" + f"{n:040x}"[-40:]


async def recv_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Messages up to and including the first one of type `kind`."""
    messages = [await recv_json(ws)]
    while messages[-1]["type"] != kind:
        messages.append(await recv_json(ws))
    return messages


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes the connection; its close code and reason."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
    except websockets.ConnectionClosed:
        return ws.close_code, ws.close_reason


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, limit_s: float = 10
) -> None:
    async def poll() -> None:
        # Conditions seen from outside (HTTP answers, Redis state): nothing to wait on but polling.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), limit_s)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records every request.

    `plan` maps a path to the statuses of the 1st, 2nd, ... request for one idempotency key (the
    last one repeats); paths not in it answer 200. `delay_s` holds every answer that long.
    """

    def __init__(self, plan: dict[str, list[int]] | None = None, delay_s: float = 0.0) -> None:
        self.plan = plan or {}
        self.delay_s = delay_s
        self.requests: list[Received] = []
        self.port = free_port()
        self._server = uvicorn.Server(
            uvicorn.Config(
                Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["POST"])]),
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
                lifespan="off",
            )
        )
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task: asyncio.Task[None] | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def to(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def _endpoint(self, request: Request) -> Response:
        path = request.path_params["path"]
        body = await request.body()
        key = request.headers.get("idempotency-key", "")
        tries = sum(
            1 for r in self.requests if r.path == path and r.headers.get("idempotency-key") == key
        )
        self.requests.append(Received(path, dict(request.headers), body, time.time()))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        statuses = self.plan.get(path, [200])
        status = statuses[min(tries, len(statuses) - 1)]
        return PlainTextResponse("ok" if status < 300 else f"no ({status})", status_code=status)

    async def __aenter__(self) -> Receiver:
        self._task = asyncio.ensure_future(self._server.serve())
        while not self._server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *_: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)


# Telegram: a checker of the Bot API's HTML, and a stand-in for the Bot API.

# The tags of Telegram's HTML parse mode and the attributes each may carry (Bot API, "Formatting
# options": "Only the tags mentioned above are currently supported").
TELEGRAM_TAGS: dict[str, frozenset[str]] = {
    **dict.fromkeys(("b", "strong", "i", "em", "u", "ins", "s", "strike", "del"), frozenset()),
    **dict.fromkeys(("tg-spoiler", "pre"), frozenset()),
    "span": frozenset({"class"}),
    "a": frozenset({"href"}),
    "code": frozenset({"class"}),
    "tg-emoji": frozenset({"emoji-id"}),
    "tg-time": frozenset({"unix", "format"}),
    "blockquote": frozenset({"expandable"}),
}
# "All numerical HTML entities are supported", and four named ones.
_TELEGRAM_ENTITY = re.compile(r"&(?:lt|gt|amp|quot|#[0-9]+|#[xX][0-9a-fA-F]+);")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
TELEGRAM_MAX_UNITS = 4096


@dataclass
class TelegramText:
    """A `parse_mode: HTML` text as Telegram reads it."""

    shown: str = ""
    tags: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class _TelegramParser(HTMLParser):
    def __init__(self) -> None:
        # Entities reported one by one, so that only the four named ones Telegram knows pass.
        super().__init__(convert_charrefs=False)
        self.result = TelegramText()
        self.shown: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        problems = self.result.problems
        if tag not in TELEGRAM_TAGS:
            problems.append(f"unsupported tag <{tag}>")
        elif not {name for name, _ in attrs} <= TELEGRAM_TAGS[tag]:
            problems.append(f"unsupported attributes {attrs} on <{tag}>")
        if tag == "a":
            self._link(attrs)
        inner = self.open[-1] if self.open else ""
        # Entities may nest, but nothing goes inside code or pre (but code in pre), nor a in a.
        if inner in ("code", "pre") and (tag, inner) != ("code", "pre"):
            problems.append(f"<{tag}> inside <{inner}>")
        self.result.tags.append(tag)
        self.open.append(tag)

    def _link(self, attrs: list[tuple[str, str | None]]) -> None:
        hrefs = [value or "" for name, value in attrs if name == "href"]
        if len(hrefs) != 1 or not hrefs[0]:
            self.result.problems.append(f"<a> without exactly one href: {attrs}")
        if "a" in self.open:
            self.result.problems.append("a link inside a link")
        self.result.links += hrefs

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.result.problems.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
            return
        self.open.pop()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.result.problems.append(f"self-closing <{tag}/>")

    def handle_data(self, data: str) -> None:
        for char in "<>&":
            if char in data:
                self.result.problems.append(f"unescaped {char!r} in {data[:40]!r}")
        self.shown.append(data)

    def handle_entityref(self, name: str) -> None:
        if name not in _NAMED:
            self.result.problems.append(f"unsupported entity &{name};")
        self.shown.append(_NAMED.get(name, ""))

    def handle_charref(self, name: str) -> None:
        self.shown.append(chr(int(name[1:], 16) if name[:1] in "xX" else int(name)))

    def handle_comment(self, data: str) -> None:
        self.result.problems.append(f"comment <!--{data[:40]}-->")

    def handle_decl(self, decl: str) -> None:
        self.result.problems.append(f"declaration <!{decl[:40]}>")

    def unknown_decl(self, data: str) -> None:
        self.result.problems.append(f"declaration <![{data[:40]}")

    def handle_pi(self, data: str) -> None:
        self.result.problems.append(f"processing instruction <?{data[:40]}")


def parse_telegram_html(text: str) -> TelegramText:
    """What Telegram would show for `text` and what is wrong with it (`problems`, empty when
    Telegram would take it): only its tags, each closed in order, every `& < >` outside a tag
    escaped, entities that it knows, 1 to 4096 UTF-16 units once the entities are parsed.
    Written from the Bot API's rules, independently of the notifier's encoder."""
    parser = _TelegramParser()
    for amp in re.finditer("&", text):
        if not _TELEGRAM_ENTITY.match(text, amp.start()):
            parser.result.problems.append(f"bare & at {amp.start()}: {text[amp.start() :][:12]!r}")
    parser.feed(text)
    parser.close()
    result = parser.result
    result.problems += [f"<{tag}> never closed" for tag in parser.open]
    result.shown = "".join(parser.shown)
    units = len(result.shown.encode("utf-16-le")) // 2
    if not 1 <= units <= TELEGRAM_MAX_UNITS:
        result.problems.append(f"{units} UTF-16 units once parsed (1 to {TELEGRAM_MAX_UNITS})")
    return result


@dataclass(frozen=True)
class BotAnswer:
    """How the stand-in Bot API answers one sendMessage: ok, or an error as Telegram words it."""

    error_code: int = 0
    description: str = ""
    retry_after: int | None = None


BOT_OK = BotAnswer()
BOT_BLOCKED = BotAnswer(403, "Forbidden: bot was blocked by the user")
BOT_NO_CHAT = BotAnswer(400, "Bad Request: chat not found")


def bot_flood(seconds: int) -> BotAnswer:
    return BotAnswer(429, f"Too Many Requests: retry after {seconds}", seconds)


@dataclass(frozen=True)
class BotCall:
    chat_id: Any
    headers: dict[str, str]
    body: bytes
    payload: Any
    shown: str
    at: float


class BotApi:
    """Telegram's Bot API on 127.0.0.1, as far as `POST /bot<token>/sendMessage` with a JSON body
    goes, answering as Telegram does: `{"ok":true,"result":<Message>}`, or `{"ok":false,
    "error_code","description"[,"parameters":{"retry_after"}]}` with that HTTP status.

    Every request is checked against what the notifier must send: the token, the method, the
    JSON fields, and a text Telegram would parse (`parse_telegram_html`); whatever is wrong is in
    `problems` (and answered 400, as Telegram would). `plan` maps a chat id to the answers to the
    1st, 2nd, ... request for one idempotency key (the last one repeats); other chats get ok.
    """

    FIELDS = frozenset({"chat_id", "text", "parse_mode", "link_preview_options"})

    def __init__(self, token: str, plan: dict[Any, list[BotAnswer]] | None = None) -> None:
        self.token = token
        self.plan = plan or {}
        self.calls: list[BotCall] = []
        self.problems: list[str] = []
        self.port = free_port()
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
                lifespan="off",
            )
        )
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """What goes in the endpoint's `url`: the server, without the method's path."""
        return f"http://127.0.0.1:{self.port}"

    def to(self, chat_id: Any) -> list[BotCall]:
        return [call for call in self.calls if call.chat_id == chat_id]

    async def _endpoint(self, request: Request) -> Response:
        path = request.path_params["path"]
        if path != f"bot{self.token}/sendMessage" or request.method != "POST":
            self.problems.append(f"{request.method} to an unexpected path")  # not the path: a token
            return _bot_error(BotAnswer(404, "Not Found"))
        body = await request.body()
        headers = dict(request.headers)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        problems = self._check(headers, payload)
        if problems:
            self.problems += problems
            return _bot_error(BotAnswer(400, f"Bad Request: {problems[0]}"))
        shown = parse_telegram_html(payload["text"])
        self.calls.append(
            BotCall(payload["chat_id"], headers, body, payload, shown.shown, time.time())
        )
        if shown.problems:
            self.problems += shown.problems
            return _bot_error(
                BotAnswer(400, f"Bad Request: can't parse entities: {shown.problems[0]}")
            )
        answer = self._answer(payload["chat_id"], headers.get("idempotency-key", ""))
        if answer.error_code:
            return _bot_error(answer)
        message = _message(len(self.calls), payload["chat_id"], shown.shown)
        return _bot_json({"ok": True, "result": message})

    def _answer(self, chat_id: Any, key: str) -> BotAnswer:
        """The plan's answer to this request: the n-th for this chat and idempotency key."""
        tries = [
            c
            for c in self.calls
            if c.chat_id == chat_id and c.headers.get("idempotency-key") == key
        ]
        answers = self.plan.get(chat_id, [BOT_OK])
        return answers[min(len(tries) - 1, len(answers) - 1)]

    def _check(self, headers: dict[str, str], payload: Any) -> list[str]:
        if headers.get("content-type") != "application/json" or not isinstance(payload, dict):
            return ["not a JSON object"]
        problems = [f"unexpected field {name}" for name in set(payload) - self.FIELDS]
        problems += [f"missing field {name}" for name in self.FIELDS - set(payload)]
        chat_id = payload.get("chat_id")
        if not (type(chat_id) is int or (isinstance(chat_id, str) and chat_id.startswith("@"))):
            problems.append(f"chat_id {chat_id!r}")
        if payload.get("parse_mode") != "HTML":
            problems.append(f"parse_mode {payload.get('parse_mode')!r}")
        if payload.get("link_preview_options") != {"is_disabled": True}:
            problems.append(f"link_preview_options {payload.get('link_preview_options')!r}")
        if not isinstance(payload.get("text"), str):
            problems.append("text is not a string")
        return problems

    async def __aenter__(self) -> BotApi:
        self._task = asyncio.ensure_future(self._server.serve())
        while not self._server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *_: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)


def _message(message_id: int, chat_id: Any, text: str) -> dict[str, Any]:
    """A Bot API `Message`, the fields a sendMessage result always has."""
    if isinstance(chat_id, str):
        chat = {"id": -1001000000000 - message_id, "type": "channel", "username": chat_id[1:]}
    else:
        chat = {"id": chat_id, "type": "channel" if chat_id < 0 else "private"}
    return {"message_id": message_id, "date": int(time.time()), "chat": chat, "text": text}


def _bot_error(answer: BotAnswer) -> Response:
    body: dict[str, Any] = {
        "ok": False,
        "error_code": answer.error_code,
        "description": answer.description,
    }
    if answer.retry_after is not None:
        body["parameters"] = {"retry_after": answer.retry_after}
    return _bot_json(body, answer.error_code)


def _bot_json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
