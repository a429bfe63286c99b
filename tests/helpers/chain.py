"""A real local EVM node for the polygon source: deploy the test exchanges (devtools/chain),
emit the tape's fills as real transactions, and a JSON-RPC WebSocket proxy in front of the node
that injects the faults real providers show (dropped sockets, 429s, refused log ranges, a head
that stops).

The call data is encoded here with eth-abi from the Solidity signature, and the logs are encoded by
the compiled contract in the EVM: the source's decoder shares neither, so a test can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import websockets
from eth_abi import encode
from eth_hash.auto import keccak
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from services.simulator.trades import TradeTemplate

FILL_V2 = "(bytes32,address,address,uint8,uint256,uint256,uint256,uint256)"
EXCHANGE_TAKER = "0x" + "e1" * 20


def selector(signature: str) -> bytes:
    return keccak(signature.encode())[:4]


@dataclass(frozen=True)
class Emitted:
    """A fill as we put it on the chain, for comparison with what the source publishes."""

    wallet: str
    side: str
    token_id: str
    shares_raw: int
    collateral_raw: int
    block_number: int
    version: int

    @property
    def price(self) -> float:
        return self.collateral_raw / self.shares_raw


def amounts(template: TradeTemplate) -> tuple[int, int]:
    shares = template.shares
    return shares, max(1, round(shares * template.price))


class Chain:
    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self._http = httpx.AsyncClient(base_url=ws_url.replace("ws://", "http://"), timeout=30)
        self._ids = itertools.count(1)
        self.account = ""

    async def aclose(self) -> None:
        await self._http.aclose()

    async def rpc(self, method: str, *params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        reply = (await self._http.post("/", json=body)).json()
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def _transact(self, to: str | None, data: bytes) -> dict[str, Any]:
        if not self.account:
            self.account = (await self.rpc("eth_accounts"))[0]
        tx: dict[str, Any] = {
            "from": self.account,
            "data": "0x" + data.hex(),
            "gas": hex(6_000_000),
        }
        if to:
            tx["to"] = to
        tx_hash = await self.rpc("eth_sendTransaction", tx)
        for _ in range(200):
            receipt = await self.rpc("eth_getTransactionReceipt", tx_hash)
            if receipt is not None:
                if int(receipt["status"], 16) != 1:
                    raise RuntimeError(f"transaction reverted: {tx_hash}")
                return dict(receipt)
            await asyncio.sleep(0.05)
        raise RuntimeError(f"transaction never mined: {tx_hash}")

    @contextlib.asynccontextmanager
    async def heartbeat(self, every_s: float = 0.3) -> AsyncIterator[None]:
        """Empty blocks at a steady pace, as a real chain's head moves without our transactions."""

        async def mine() -> None:
            while True:
                await self.rpc("evm_mine")
                await asyncio.sleep(every_s)

        task = asyncio.create_task(mine())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def deploy(self, bytecode: str) -> str:
        receipt = await self._transact(None, bytes.fromhex(bytecode.removeprefix("0x")))
        return str(receipt["contractAddress"]).lower()

    async def head(self) -> int:
        return int(await self.rpc("eth_blockNumber"), 16)

    async def block_time(self, number: int) -> int:
        return int((await self.rpc("eth_getBlockByNumber", hex(number), False))["timestamp"], 16)

    async def fill_v2(self, exchange: str, trades: list[TradeTemplate]) -> list[Emitted]:
        """One transaction emitting one V2 OrderFilled per trade (maker = the trade's wallet)."""
        rows = []
        for trade in trades:
            shares, collateral = amounts(trade)
            buy = trade.side == "BUY"
            rows.append(
                (
                    bytes.fromhex(trade.order_hash[2:]),
                    trade.user,
                    EXCHANGE_TAKER,
                    0 if buy else 1,
                    int(trade.token_id),
                    collateral if buy else shares,
                    shares if buy else collateral,
                    0,
                )
            )
        data = selector(f"fill({FILL_V2}[])") + encode([f"{FILL_V2}[]"], [rows])
        receipt = await self._transact(exchange, data)
        block = int(receipt["blockNumber"], 16)
        return [self._emitted(trade, block, 2) for trade in trades]

    async def fill_v1(self, exchange: str, trade: TradeTemplate) -> Emitted:
        shares, collateral = amounts(trade)
        buy = trade.side == "BUY"
        token = int(trade.token_id)
        args = (
            bytes.fromhex(trade.order_hash[2:]),
            trade.user,
            EXCHANGE_TAKER,
            0 if buy else token,
            token if buy else 0,
            collateral if buy else shares,
            shares if buy else collateral,
        )
        types = ["bytes32", "address", "address", "uint256", "uint256", "uint256", "uint256"]
        signature = f"fill({','.join(types)})"
        receipt = await self._transact(exchange, selector(signature) + encode(types, list(args)))
        return self._emitted(trade, int(receipt["blockNumber"], 16), 1)

    @staticmethod
    def _emitted(trade: TradeTemplate, block: int, version: int) -> Emitted:
        shares, collateral = amounts(trade)
        return Emitted(trade.user, trade.side, trade.token_id, shares, collateral, block, version)


@dataclass
class Faults:
    refuse_429: bool = False
    stall_heads: bool = False
    max_log_blocks: int | None = None
    refused_ranges: int = 0
    connections: int = 0
    requests: list[str] = field(default_factory=list)


class RpcProxy:
    """A WebSocket JSON-RPC proxy to the node, with switchable faults; any path is accepted (real
    URLs carry a key in the path)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults = Faults()
        self.port = 0
        self._clients: set[ServerConnection] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def drop(self) -> None:
        for client in list(self._clients):
            client.transport.abort()

    def _handshake(self, _conn: ServerConnection, _request: Request) -> Response | None:
        if self.faults.refuse_429:
            return Response(429, "Too Many Requests", Headers(), b"rate limited")
        return None

    async def _serve(self, client: ServerConnection) -> None:
        self.faults.connections += 1
        self._clients.add(client)
        try:
            async with websockets.connect(self.upstream, max_size=None) as node:
                await asyncio.gather(self._up(client, node), self._down(node, client))
        except (websockets.ConnectionClosed, OSError):
            pass
        finally:
            self._clients.discard(client)

    async def _up(self, client: ServerConnection, node: Any) -> None:
        async for frame in client:
            message = orjson.loads(frame)
            self.faults.requests.append(str(message.get("method")))
            refusal = self._refusal(message)
            if refusal is not None:
                await client.send(orjson.dumps(refusal).decode())
                continue
            await node.send(frame)
        await node.close()

    async def _down(self, node: Any, client: ServerConnection) -> None:
        async for frame in node:
            message = orjson.loads(frame)
            result = message.get("params", {}).get("result") if isinstance(message, dict) else None
            if self.faults.stall_heads and isinstance(result, dict) and "parentHash" in result:
                continue
            await client.send(frame)
        await client.close()

    def _refusal(self, message: dict[str, Any]) -> dict[str, Any] | None:
        limit = self.faults.max_log_blocks
        if message.get("method") != "eth_getLogs" or limit is None:
            return None
        query = message["params"][0]
        span = int(query["toBlock"], 16) - int(query["fromBlock"], 16) + 1
        if span <= limit:
            return None
        self.faults.refused_ranges += 1
        error = {"code": -32005, "message": f"block range is too wide (max {limit} blocks)"}
        return {"jsonrpc": "2.0", "id": message["id"], "error": error}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RpcProxy]:
        async with websockets.serve(
            self._serve, "127.0.0.1", 0, process_request=self._handshake, max_size=None
        ) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            yield self
            self.drop()
