"""A Polygon node as the polygon source sees one: JSON-RPC over WebSocket (`/rpc`, `/rpc/<key>`) and
HTTP (`POST /rpc`), serving the tape's trades as real ABI-encoded V2 `OrderFilled` logs of the
CTFExchangeV2 address, in blocks mined every SIM_BLOCK_TIME_S (about 2 s on Polygon), empty ones
included, as a real head moves.

Methods: `eth_subscribe` (`newHeads`, `logs` with an address/topics filter), `eth_unsubscribe`,
`eth_getLogs` (`fromBlock`/`toBlock` or `blockHash`), `eth_blockNumber`, `eth_getBlockByNumber`,
`eth_chainId`. Faults, each a switch (`/_sim/chain`): `stall` (no new block: the head stops),
`rate_limit` (every call answered with error 429), `max_range` (eth_getLogs over more blocks is
refused with a "block range" error, as providers cap it), `drop` (close every socket) and
`reorg` (the last `depth` blocks replaced by a longer fork: subscribers get their logs again with
`removed: true`, and only every `keep`-th of their trades is included again, in later blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from eth_abi import encode
from eth_hash.auto import keccak
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response

from services.simulator.trades import BlockClock, Trade

log = logging.getLogger(__name__)

CHAIN_ID = 137
# Written out here rather than imported from the ingestor's decoder, so the two can disagree and
# the tests notice (feeds.md, "Polygon chain").
CTF_EXCHANGE_V2 = "0xe111180000d2663c0091e4f400237545b87b996b"
V2_EVENT = (
    "OrderFilled(bytes32,address,address,uint8,uint256,uint256,uint256,uint256,bytes32,bytes32)"
)
V2_TOPIC = "0x" + keccak(V2_EVENT.encode()).hex()
V2_DATA = ["uint8", "uint256", "uint256", "uint256", "uint256", "bytes32", "bytes32"]
ZERO32 = b"\0" * 32


class RpcFault(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ChainFaults:
    stall: bool = False
    rate_limit: bool = False
    max_range: int | None = None


@dataclass
class Block:
    number: int
    hash: str
    parent_hash: str
    timestamp: int
    trades: list[Trade]
    logs: list[dict[str, Any]] = field(default_factory=list)
    # When it was mined (float Unix time): the start of block-to-delivered latency in the bench.
    mined_at: float = 0.0

    def header(self) -> dict[str, Any]:
        return {
            "number": hex(self.number),
            "hash": self.hash,
            "parentHash": self.parent_hash,
            "timestamp": hex(self.timestamp),
            "transactions": [],
        }


def amounts(trade: Trade) -> tuple[int, int]:
    """(makerAmountFilled, takerAmountFilled) of the maker's order: BUY pays collateral."""
    collateral = max(1, round(trade.shares * trade.price))
    return (collateral, trade.shares) if trade.side == "BUY" else (trade.shares, collateral)


def encode_log(trade: Trade, block: Block, index: int, exchange: str) -> dict[str, Any]:
    maker_amount, taker_amount = amounts(trade)
    side = 0 if trade.side == "BUY" else 1
    values = [side, int(trade.token_id), maker_amount, taker_amount, 0, ZERO32, ZERO32]
    data = encode(V2_DATA, values)
    return {
        "address": exchange,
        "topics": [V2_TOPIC, trade.order_hash, _word(trade.user), _word(trade.taker)],
        "data": "0x" + data.hex(),
        "blockNumber": hex(block.number),
        "blockHash": block.hash,
        "transactionHash": trade.tx_hash,
        "transactionIndex": hex(index),
        "logIndex": hex(index),
        "removed": False,
    }


def _word(address: str) -> str:
    return "0x" + "0" * 24 + address.lower()[2:]


def _matches(log_: dict[str, Any], query: dict[str, Any]) -> bool:
    addresses = query.get("address")
    if isinstance(addresses, str):
        addresses = [addresses]
    if addresses and log_["address"].lower() not in {a.lower() for a in addresses}:
        return False
    for position, wanted in enumerate(query.get("topics") or []):
        if wanted is None:
            continue
        options = {wanted.lower()} if isinstance(wanted, str) else {w.lower() for w in wanted}
        if position >= len(log_["topics"]) or log_["topics"][position].lower() not in options:
            return False
    return True


@dataclass(eq=False)
class Subscriber:
    """One WebSocket client: its subscriptions and its outgoing queue."""

    queue: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    subscriptions: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class ChainNode:
    def __init__(self, block_time_s: float, gate: asyncio.Event | None = None) -> None:
        self.block_time_s = block_time_s
        self.exchange = CTF_EXCHANGE_V2
        self.faults = ChainFaults()
        self.blocks: list[Block] = []
        self.pending: list[Trade] = []
        self.orphaned: list[Trade] = []
        self.subscribers: set[Subscriber] = set()
        self._gate = gate
        self._ids = itertools.count(1)
        self._forks = 0
        self.reorgs = 0
        self.mine()

    @property
    def head(self) -> Block:
        return self.blocks[-1]

    def include(self, trade: Trade) -> None:
        """A trade emitted by the simulator's clock: it goes into the next block."""
        self.pending.append(trade)

    def canonical_trades(self) -> Iterator[Trade]:
        for block in self.blocks:
            yield from block.trades

    # --- blocks ------------------------------------------------------------------------------

    def mine(self) -> Block:
        number = self.blocks[-1].number + 1 if self.blocks else BlockClock.BASE_BLOCK
        parent = self.blocks[-1].hash if self.blocks else "0x" + "00" * 32
        digest = hashlib.sha256(f"{number}|{parent}|{self._forks}".encode()).hexdigest()
        trades, self.pending = self.pending, []
        now = time.time()
        block = Block(number, "0x" + digest, parent, int(now), trades, mined_at=now)
        block.logs = [encode_log(t, block, i, self.exchange) for i, t in enumerate(trades)]
        self.blocks.append(block)
        self._announce(block)
        return block

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.block_time_s)
            if not self.faults.stall:
                self.mine()

    def reorg(self, depth: int, keep: int) -> dict[str, int]:
        """Replace the last `depth` blocks by a longer fork; every `keep`-th of their trades is
        included again (0: none), the others are orphaned for good."""
        depth = max(1, min(depth, len(self.blocks) - 1))
        dropped, self.blocks = self.blocks[-depth:], self.blocks[:-depth]
        self._forks += 1
        self.reorgs += 1
        again: list[Trade] = []
        orphaned_before = len(self.orphaned)
        for block in reversed(dropped):
            for entry in reversed(block.logs):
                self._notify_logs(entry | {"removed": True})
        for n, trade in enumerate(t for block in dropped for t in block.trades):
            (again if keep and n % keep == 0 else self.orphaned).append(trade)
        self.pending = again + self.pending
        for _ in range(depth + 1):
            self.mine()
        log.info("chain_reorg", extra={"depth": depth, "again": len(again)})
        orphaned = len(self.orphaned) - orphaned_before
        return {"depth": depth, "included_again": len(again), "orphaned": orphaned}

    # --- JSON-RPC ----------------------------------------------------------------------------

    def answer(self, message: Any, subscriber: Subscriber | None) -> dict[str, Any]:
        request_id = message.get("id") if isinstance(message, dict) else None
        try:
            if not isinstance(message, dict) or not isinstance(message.get("method"), str):
                raise RpcFault(-32600, "invalid request")
            if self.faults.rate_limit:
                raise RpcFault(429, "Too Many Requests")
            params = message.get("params") or []
            result = self._call(message["method"], params, subscriber)
        except RpcFault as fault:
            error = {"code": fault.code, "message": fault.message}
            return {"jsonrpc": "2.0", "id": request_id, "error": error}
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            error = {"code": -32602, "message": f"invalid params: {type(exc).__name__}"}
            return {"jsonrpc": "2.0", "id": request_id, "error": error}
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    def _call(self, method: str, params: list[Any], subscriber: Subscriber | None) -> Any:
        if method == "eth_blockNumber":
            return hex(self.head.number)
        if method == "eth_chainId":
            return hex(CHAIN_ID)
        if method == "eth_getBlockByNumber":
            block = self._block(params[0])
            return None if block is None else block.header()
        if method == "eth_getLogs":
            return self._get_logs(params[0])
        if method in ("eth_subscribe", "eth_unsubscribe") and subscriber is None:
            raise RpcFault(-32601, "subscriptions need a WebSocket")
        if method == "eth_subscribe" and subscriber is not None:
            kind = params[0]
            if kind not in ("newHeads", "logs"):
                raise RpcFault(-32602, f"unsupported subscription {kind!r}")
            sub_id = hex(next(self._ids))
            subscriber.subscriptions[sub_id] = (kind, params[1] if len(params) > 1 else {})
            if self._gate is not None:
                self._gate.set()
            return sub_id
        if method == "eth_unsubscribe" and subscriber is not None:
            return subscriber.subscriptions.pop(params[0], None) is not None
        raise RpcFault(-32601, f"method {method} not supported")

    def _block(self, tag: Any) -> Block | None:
        number = self._number(tag)
        first = self.blocks[0]
        if number > self.head.number or number < 0:
            return None
        if number < first.number:
            # The chain is older than this node's first block: empty blocks 2 s apart.
            digest = hashlib.sha256(f"before|{number}".encode()).hexdigest()
            ts = first.timestamp - 2 * (first.number - number)
            return Block(number, "0x" + digest, "0x" + "00" * 32, ts, [], mined_at=ts)
        return self.blocks[number - first.number]

    def _get_logs(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        if "blockHash" in query:
            blocks = [b for b in self.blocks if b.hash == query["blockHash"]]
        else:
            start = self._number(query.get("fromBlock", "latest"))
            end = self._number(query.get("toBlock", "latest"))
            if end > self.head.number or start > end:
                raise RpcFault(-32000, "invalid block range: beyond the head or reversed")
            span = end - start + 1
            if self.faults.max_range is not None and span > self.faults.max_range:
                raise RpcFault(-32005, f"exceed maximum block range: {self.faults.max_range}")
            first = self.blocks[0].number
            # Blocks before this node's first one hold no exchange logs (the chain is older).
            blocks = self.blocks[max(0, start - first) : end - first + 1]
        return [entry for block in blocks for entry in block.logs if _matches(entry, query)]

    def _number(self, tag: Any) -> int:
        if tag in ("latest", "safe", "finalized", "pending"):
            return self.head.number
        return int(tag, 16) if isinstance(tag, str) else int(tag)

    # --- pushing -----------------------------------------------------------------------------

    def _announce(self, block: Block) -> None:
        for subscriber in self.subscribers:
            for sub_id, (kind, _) in subscriber.subscriptions.items():
                if kind == "newHeads":
                    self._push(subscriber, sub_id, block.header())
        for entry in block.logs:
            self._notify_logs(entry)

    def _notify_logs(self, entry: dict[str, Any]) -> None:
        for subscriber in self.subscribers:
            for sub_id, (kind, query) in subscriber.subscriptions.items():
                if kind == "logs" and _matches(entry, query):
                    self._push(subscriber, sub_id, entry)

    @staticmethod
    def _push(subscriber: Subscriber, sub_id: str, result: Any) -> None:
        params = {"subscription": sub_id, "result": result}
        message = {"jsonrpc": "2.0", "method": "eth_subscription", "params": params}
        subscriber.queue.put_nowait(orjson.dumps(message))

    def drop_all(self) -> int:
        count = len(self.subscribers)
        for subscriber in self.subscribers:
            subscriber.closed.set()
        return count


async def serve_socket(node: ChainNode, receive: Any, send: Any) -> None:
    """One WebSocket client: `receive()` gives text frames, `send(text)` writes one."""
    subscriber = Subscriber()
    node.subscribers.add(subscriber)

    async def writer() -> None:
        while True:
            await send((await subscriber.queue.get()).decode())

    async def reader() -> None:
        while True:
            frame = await receive()
            try:
                message = orjson.loads(frame)
            except orjson.JSONDecodeError:
                message = None
            await send(orjson.dumps(node.answer(message, subscriber)).decode())

    tasks = [asyncio.create_task(t) for t in (writer(), reader(), subscriber.closed.wait())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        node.subscribers.discard(subscriber)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)


def add_chain_routes(app: FastAPI, node: ChainNode) -> None:
    """`/rpc` (WebSocket and HTTP, a key in the path accepted and ignored, as on public nodes) and
    the control route `/_sim/chain` (GET: the chain's state; POST: faults, see the docstring)."""

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            await serve_socket(node, websocket.receive_text, websocket.send_text)
        with contextlib.suppress(Exception):
            await websocket.close()

    already = len(app.router.routes)
    app.add_api_websocket_route("/rpc", socket)
    app.add_api_websocket_route("/rpc/{key:path}", socket)
    # Ahead of the Dome feed's `/{api_key_path}`, which would take `rpc` for a Dome key.
    app.router.routes[:0] = [app.router.routes.pop() for _ in range(2)][::-1]
    assert len(app.router.routes) == already + 2

    async def http_call(request: Request) -> Response:
        try:
            message = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            message = None
        return Response(orjson.dumps(node.answer(message, None)), media_type="application/json")

    app.add_api_route("/rpc", http_call, methods=["POST"])
    app.add_api_route("/rpc/{key:path}", http_call, methods=["POST"])

    async def state() -> Response:
        body = {
            "head": node.head.number,
            "reorgs": node.reorgs,
            "pending": len(node.pending),
            "orphaned": [t.tx_hash for t in node.orphaned],
            "subscribers": len(node.subscribers),
            "faults": {
                "stall": node.faults.stall,
                "rate_limit": node.faults.rate_limit,
                "max_range": node.faults.max_range,
            },
        }
        return Response(orjson.dumps(body), media_type="application/json")

    async def control(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
            if not isinstance(body, dict):
                raise ValueError("a JSON object is expected")
            result: dict[str, Any] = {}
            for name in ("stall", "rate_limit"):
                if name in body:
                    setattr(node.faults, name, bool(body[name]))
            if "max_range" in body:
                value = body["max_range"]
                node.faults.max_range = None if value is None else max(1, int(value))
            if body.get("drop"):
                result["dropped"] = node.drop_all()
            if isinstance(body.get("reorg"), dict):
                reorg = body["reorg"]
                result["reorg"] = node.reorg(int(reorg.get("depth", 1)), int(reorg.get("keep", 2)))
        except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
            message = orjson.dumps({"error": "bad_request", "message": str(exc)[:200]})
            return Response(message, status_code=400, media_type="application/json")
        return Response(orjson.dumps(result), media_type="application/json")

    async def mined() -> Response:
        """Each canonical trade's tx hash -> the float time its block was mined."""
        times = {t.tx_hash: b.mined_at for b in node.blocks for t in b.trades}
        return Response(orjson.dumps(times), media_type="application/json")

    app.add_api_route("/_sim/chain/mined", mined, methods=["GET"])
    app.add_api_route("/_sim/chain", state, methods=["GET"])
    app.add_api_route("/_sim/chain", control, methods=["POST"])
