"""Source `polygon`: every fill of a tracked wallet, from the exchange contracts' `OrderFilled` logs
over a Polygon JSON-RPC WebSocket. Keyless, pushed, and read by block so nothing is skipped.

One connection at a time, to the first endpoint of POLYGON_WS_URLS that works:
1. subscribe to `newHeads` (and, with POLYGON_CONFIRMATIONS=0, to the filtered `logs` for speed);
2. catch up with `eth_getLogs` from the block watermark to the head minus the confirmations, in
   ranges of at most POLYGON_GETLOGS_MAX_BLOCKS, halving a range the provider calls too large;
3. on every new head, read the newly settled blocks the same way; the watermark (in Redis, beside
   the other sources' marks) moves only past blocks fully read and published.
Live `logs` notifications (confirmations 0) publish at once; the block read that follows finds
them again and the order_key dedupe absorbs them, so the subscription buys speed, the block read
completeness. Every block read first checks that the last block read is still on the chain: when
its hash changed (a reorg under the watermark) the read steps back to the fork and reads again.

The filter is the exchanges, the two OrderFilled topics and, up to POLYGON_MAX_WALLETS_PER_FILTER
wallets, topic 2 (the maker) = the tracked wallets; above that, every fill is read and the tracked
ones kept here. A wallet added live is read back POLYGON_NEW_WALLET_LOOKBACK_BLOCKS blocks on its
own, then joins the filter, so no block is lost between. An error, a 429, a dropped socket or a
head that stops moving for POLYGON_STALL_TIMEOUT_S moves to the next endpoint; after
POLYGON_FAILBACK_AFTER_S on a fallback the first endpoint is tried again. Endpoints are named by
their position only: the URLs carry provider keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from services.ingestor import metrics
from services.ingestor.chain.events import (
    ORDER_FILLED_TOPICS,
    ChainFill,
    LogError,
    decode_log,
    pad_address,
    quantity,
)
from services.ingestor.chain.markets import MarketDirectory, TokenMarket
from services.ingestor.chain.rpc import (
    ConnectionLost,
    RangeTooLarge,
    RateLimited,
    RpcError,
    RpcSocket,
)
from services.ingestor.feed_status import ConnectionState, FeedStatus
from services.ingestor.publisher import Publisher
from shared.backoff import Backoff
from shared.models import (
    DomeOrder,
    ExchangeTimeBounds,
    FeedOrder,
    FillStatus,
    OrderFill,
    Source,
    order_key,
)

log = logging.getLogger(__name__)

# Blocks read again when Redis may have lost writes (~2 minutes of Polygon): a failover loses at
# most the last second or so of what its master acknowledged.
REREAD_AFTER_REDIS_LOSS_BLOCKS = 60

SOURCE = Source.POLYGON.value
WATERMARK_FEED = "polygon"
WATERMARK_FIELD = "block"
HEADER_CACHE = 4096
REORG_MAX_DEPTH = 128
TX_MEMORY = 20_000


@dataclass(frozen=True)
class ChainSettings:
    urls: tuple[str, ...]
    exchanges: tuple[str, ...]
    confirmations: int
    max_wallets_per_filter: int
    getlogs_max_blocks: int
    stall_timeout_s: float
    failback_after_s: float
    initial_lookback_blocks: int
    new_wallet_lookback_blocks: int
    open_timeout_s: float
    call_timeout_s: float
    reconnect_min_s: float
    reconnect_max_s: float
    max_frame_bytes: int
    max_lag_blocks: int
    # Block times outside are dead-lettered: a node with a broken clock must not move watermarks.
    time_bounds: ExchangeTimeBounds = field(default_factory=ExchangeTimeBounds)


class Stalled(Exception):
    pass


class Failback(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Header:
    number: int
    hash: str
    timestamp: int


class PolygonSource:
    def __init__(
        self,
        settings: ChainSettings,
        wallets: list[str],
        publisher: Publisher,
        markets: MarketDirectory,
    ) -> None:
        self.settings = settings
        self.wallets: set[str] = set(wallets)
        self.publisher = publisher
        self.markets = markets
        self._status = FeedStatus(source=SOURCE, wallets=len(self.wallets))
        self._headers: OrderedDict[int, Header] = OrderedDict()
        self._cursor: int | None = None  # the last block fully read and published
        self._recheck_watermark = False
        # Hash of each block the cursor stood on, as read: the reference a reorg is detected by
        # (the header cache follows newHeads, which already shows the new fork).
        self._read_hashes: OrderedDict[int, str] = OrderedDict()
        self._new_wallets: set[str] = set()
        self._filter_changed = asyncio.Event()
        # tx hash -> {log index: what makes fills identical}, for `occurrence` (recent txs only).
        self._tx_fills: OrderedDict[tuple[str, str], dict[int, str]] = OrderedDict()
        # What went out per block, kept as deep as a reorg is looked for: a block replaced under
        # the watermark retracts its fills.
        self._published: OrderedDict[int, list[tuple[str, OrderFill]]] = OrderedDict()
        # The fork of a reorg whose retractions are not all out yet (a failure meanwhile).
        self._retract_from: int | None = None
        self.endpoint = 0
        self.head = 0
        self.head_seen_at = time.time()
        self.reorgs = 0
        self.ranges_split = 0

    @property
    def cursor(self) -> int | None:
        """The last block fully read and published (None before the first connection)."""
        return self._cursor

    @property
    def status(self) -> FeedStatus:
        self._status.wallets = len(self.wallets)
        return self._status

    def chain_health(self, now: float) -> tuple[list[str], dict[str, Any]]:
        """Problems (empty when healthy) and the figures `/health` shows for the chain."""
        read = self._cursor or 0
        lag = max(0, self.head - self.settings.confirmations - read) if self.head else 0
        silent = now - self.head_seen_at
        problems = []
        if lag > self.settings.max_lag_blocks:
            problems.append(f"polygon: {lag} settled blocks not read yet")
        if silent > 2 * self.settings.stall_timeout_s:
            problems.append(f"polygon: no new head for {silent:.0f}s on any endpoint")
        details = {
            "endpoint": self.endpoint,
            "head_block": self.head,
            "read_block": read,
            "lag_blocks": lag,
            "seconds_since_head": round(silent, 3),
            "reorgs": self.reorgs,
            "ranges_split": self.ranges_split,
            "confirmations": self.settings.confirmations,
        }
        metrics.CHAIN_LAG.set(lag)
        return problems, details

    # --- wallets -------------------------------------------------------------------------------

    def add_wallet(self, wallet: str) -> bool:
        if wallet not in self.wallets:
            self._new_wallets.add(wallet)
            self._filter_changed.set()
        return True

    def remove_wallet(self, wallet: str) -> None:
        self.wallets.discard(wallet)
        self._new_wallets.discard(wallet)
        self._filter_changed.set()

    def log_filter(self, wallets: set[str] | None = None) -> dict[str, Any]:
        """The `logs` filter: exchanges, OrderFilled, and the makers while they fit one filter."""
        chosen = self.wallets if wallets is None else wallets
        topics: list[Any] = [list(ORDER_FILLED_TOPICS)]
        if len(chosen) <= self.settings.max_wallets_per_filter:
            topics += [None, sorted(pad_address(wallet) for wallet in chosen)]
        return {"address": list(self.settings.exchanges), "topics": topics}

    # --- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        retry = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        first = True
        while True:
            if not first:
                metrics.RECONNECTS.labels(SOURCE).inc()
                self._status.reconnects += 1
            first = False
            self._status.state = ConnectionState.CONNECTING
            started = time.monotonic()
            error = await self._session_outcome()
            self._status.mark_down(ConnectionState.DISCONNECTED, error, time.time())
            metrics.CHAIN_ENDPOINT.set(self.endpoint)
            if error == "failback":
                retry.reset()
                continue
            log.warning("polygon_disconnected", extra={"endpoint": self.endpoint, "error": error})
            if time.monotonic() - started > self.settings.stall_timeout_s:
                retry.reset()
            self.endpoint = (self.endpoint + 1) % len(self.settings.urls)
            # A full turn over the endpoints without success waits before the next turn.
            if self.endpoint == 0 or len(self.settings.urls) == 1:
                await asyncio.sleep(retry.next_delay())

    async def _session_outcome(self) -> str:
        """Run one connection until it fails; the reason, safe to log (no URL)."""
        socket = RpcSocket(
            self.settings.urls[self.endpoint],
            open_timeout=self.settings.open_timeout_s,
            call_timeout=self.settings.call_timeout_s,
            max_bytes=self.settings.max_frame_bytes,
        )
        try:
            await socket.open()
            await self._session(socket)
            return "ended"
        except Failback:
            return "failback"
        except RateLimited as exc:
            metrics.RATE_LIMITED.labels(SOURCE).inc()
            return f"rate limited: {exc}"
        except Stalled as exc:
            metrics.SILENCE_TIMEOUTS.labels(SOURCE).inc()
            return f"stalled: {exc}"
        except (ConnectionLost, RpcError, LogError) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            await socket.close()

    async def _session(self, socket: RpcSocket) -> None:
        heads = await socket.call("eth_subscribe", ["newHeads"])
        logs = await self._subscribe_logs(socket)
        self.head = quantity(await socket.call("eth_blockNumber", []), "eth_blockNumber")
        await self._load_cursor()
        await self._catch_up(socket)
        self._status.mark_connected()
        self._status.connections = 1
        self._status.subscriptions = 2 if logs else 1
        log.info("polygon_connected", extra={"endpoint": self.endpoint, "head": self.head})
        connected_at = last_head_at = time.monotonic()
        while True:
            if self.endpoint and time.monotonic() - connected_at > self.settings.failback_after_s:
                self.endpoint = 0
                raise Failback
            if self._filter_changed.is_set():
                logs = await self._apply_wallet_changes(socket, logs)
            # Checked on every pass: a steady flow of log notifications must not hide a head
            # that stopped.
            if time.monotonic() - last_head_at > self.settings.stall_timeout_s:
                raise Stalled(f"no new head for {self.settings.stall_timeout_s}s")
            try:
                subscription, result = await asyncio.wait_for(socket.notifications.get(), 1.0)
            except TimeoutError:
                if socket.closed.is_set():
                    raise ConnectionLost("connection closed") from None
                continue
            if subscription == heads:
                header = self._remember_header(result)
                if header is not None and header.number > self.head:
                    self.head, last_head_at = header.number, time.monotonic()
                    self.head_seen_at = time.time()
                    metrics.CHAIN_HEAD.set(self.head)
                    await self._catch_up(socket)
            elif subscription == logs:
                await self._publish(socket, result, self.wallets, live=True)

    async def _subscribe_logs(self, socket: RpcSocket) -> str | None:
        if self.settings.confirmations > 0 or not self.wallets:
            return None
        return str(await socket.call("eth_subscribe", ["logs", self.log_filter()]))

    async def _apply_wallet_changes(self, socket: RpcSocket, logs: str | None) -> str | None:
        """Read the new wallets' recent blocks, then put them in the filter. On a failure they
        stay queued (the next session tries again): a wallet is never dropped on the way."""
        self._filter_changed.clear()
        added = set(self._new_wallets)
        try:
            if added and self._cursor is not None:
                start = max(0, self._cursor - self.settings.new_wallet_lookback_blocks) + 1
                await self._read_chunks(socket, start, self._cursor, added)
            # A wallet removed during the read is not put back.
            added &= self._new_wallets
            self.wallets |= added
            self._new_wallets -= added
            if logs is not None:
                await socket.call("eth_unsubscribe", [logs])
            return await self._subscribe_logs(socket)
        except BaseException:
            self._filter_changed.set()
            raise

    # --- reading blocks ------------------------------------------------------------------------

    async def _load_cursor(self) -> None:
        if self._cursor is not None:
            return
        stored = await self.publisher.watermark(WATERMARK_FEED, WATERMARK_FIELD)
        if stored is None:
            stored = max(0, self.head - self.settings.initial_lookback_blocks)
        self._cursor = stored

    def catch_up_again(self) -> None:
        """Read the last blocks again (Redis may have lost recent writes)."""
        self._recheck_watermark = True

    async def _rewind_after_redis_loss(self) -> None:
        """Step the cursor back by REREAD_AFTER_REDIS_LOSS_BLOCKS, or to the stored watermark if
        it fell further behind. Whatever the watermark says: with partitions it sits in one
        partition's slot while the lost fills may be in another's; the dedupe keeps the re-read
        blocks' fills from going out twice."""
        assert self._cursor is not None
        self._recheck_watermark = False
        stored = await self.publisher.watermark(WATERMARK_FEED, WATERMARK_FIELD)
        start = self._cursor - REREAD_AFTER_REDIS_LOSS_BLOCKS
        if stored is not None:
            start = min(start, stored)
        log.warning(
            "chain_reread_after_redis_loss",
            extra={"from_block": max(0, start), "cursor": self._cursor, "watermark": stored},
        )
        self._cursor = max(0, start)

    async def _catch_up(self, socket: RpcSocket) -> None:
        """Read every settled block after the cursor, then move the watermark past them."""
        assert self._cursor is not None
        if self._recheck_watermark:
            await self._rewind_after_redis_loss()
        await self._step_back_over_reorg(socket)
        if self._retract_from is not None:
            await self._retract_after(socket, self._retract_from)
        target = self.head - self.settings.confirmations
        while self._cursor < target:
            end = min(target, self._cursor + self.settings.getlogs_max_blocks)
            await self._read_range(socket, self._cursor + 1, end, set(self.wallets))
            self._cursor = end
            self._read_hashes[end] = (await self._header(socket, end)).hash
            while len(self._read_hashes) > REORG_MAX_DEPTH:
                self._read_hashes.popitem(last=False)
            await self.publisher.advance_watermark(WATERMARK_FEED, WATERMARK_FIELD, end)
            metrics.CHAIN_BLOCK.set(end)

    async def _read_chunks(
        self, socket: RpcSocket, start: int, end: int, wallets: set[str]
    ) -> None:
        for first in range(start, end + 1, self.settings.getlogs_max_blocks):
            last = min(end, first + self.settings.getlogs_max_blocks - 1)
            await self._read_range(socket, first, last, wallets)

    async def _step_back_over_reorg(self, socket: RpcSocket) -> None:
        """When the last block read is no longer on the chain, move the cursor to the fork."""
        assert self._cursor is not None
        depth = 0
        while depth < REORG_MAX_DEPTH and self._cursor > 0:
            read = self._read_hashes.get(self._cursor)
            if read is None:
                # Nothing to compare here: fine before any mismatch; after one, this block was
                # read inside a longer range, so keep stepping back to a block that can be checked.
                if depth == 0:
                    break
            elif (await self._fetch_header(socket, self._cursor)).hash == read:
                break
            else:
                del self._read_hashes[self._cursor]
            self._cursor -= 1
            depth += 1
        if depth:
            self.reorgs += 1
            metrics.CHAIN_REORGS.inc()
            log.warning("polygon_reorg", extra={"depth": depth, "fork_after": self._cursor})
            fork = self._cursor
            self._retract_from = (
                fork if self._retract_from is None else min(fork, self._retract_from)
            )

    async def _retract_after(self, socket: RpcSocket, fork: int) -> None:
        """Retract what went out from blocks after the fork that the chain no longer holds; the
        re-read of the new chain publishes again those of their fills it still includes."""
        for number in [n for n in self._published if n > fork]:
            block = await socket.call("eth_getBlockByNumber", [hex(number), False])
            header = self._remember_header(block)
            canonical = header.hash if header is not None else ""  # none: the chain is shorter
            published = self._published[number]
            reason = f"chain reorg: block {number} was replaced (fork after block {fork})"
            for block_hash, fill in published:
                if block_hash != canonical:
                    metrics.CHAIN_REMOVED.inc()
                    retraction = {"status": FillStatus.RETRACTED, "status_reason": reason}
                    await self.publisher.publish_now([fill.model_copy(update=retraction)])
            # Dropped only once out: a failure above leaves them for the next pass.
            kept = [(h, fill) for h, fill in published if h == canonical]
            if kept:
                self._published[number] = kept
            else:
                del self._published[number]
        self._retract_from = None

    async def _read_range(self, socket: RpcSocket, start: int, end: int, wallets: set[str]) -> None:
        if start > end or not wallets:
            return
        query = self.log_filter(wallets) | {"fromBlock": hex(start), "toBlock": hex(end)}
        try:
            found = await socket.call("eth_getLogs", [query])
        except RangeTooLarge:
            if start == end:
                raise
            self.ranges_split += 1
            metrics.CHAIN_RANGES_SPLIT.inc()
            middle = (start + end) // 2
            await self._read_range(socket, start, middle, wallets)
            await self._read_range(socket, middle + 1, end, wallets)
            return
        if not isinstance(found, list):
            # Never read as "no logs": the watermark would move past fills.
            raise RpcError(0, f"eth_getLogs answered {type(found).__name__}, not a list")
        metrics.CHAIN_RANGES_READ.inc()
        for raw in found:
            await self._publish(socket, raw, wallets, live=False)

    async def _publish(self, socket: RpcSocket, raw: Any, wallets: set[str], *, live: bool) -> None:
        received_at = time.time()
        try:
            fill = decode_log(raw)
        except LogError as exc:
            await self._dead(raw, str(exc))
            return
        if fill.maker not in wallets:
            return  # The wallet filter was too wide to send, or the wallet was just removed.
        header = await self._header(socket, fill.block_number)
        try:
            order = await self._order(fill, header.timestamp)
        except ValidationError as exc:
            await self._dead(raw, f"invalid fill: {exc.errors()[0].get('msg', 'invalid')}")
            return
        problem = self.settings.time_bounds.problem(order.timestamp, received_at)
        if problem is not None:
            await self._dead(raw, f"implausible block time: {problem}")
            return
        occurrence = self._occurrence(fill)
        outgoing = OrderFill.from_dome(order, Source.POLYGON, received_at, occurrence)
        if fill.removed:
            # Confirmations 0 only (the block reads skip orphaned blocks): what was published is
            # retracted, and the block that includes the fill again publishes it afresh.
            metrics.CHAIN_REMOVED.inc()
            reason = f"chain reorg: block {fill.block_number} ({fill.block_hash[:18]}) was replaced"
            outgoing = outgoing.model_copy(
                update={"status": FillStatus.RETRACTED, "status_reason": reason}
            )
        else:
            metrics.EVENTS_RECEIVED.labels(SOURCE).inc()
            self._status.mark_event(received_at, order.timestamp)
            self._remember_published(fill, outgoing)
        if live:
            await self.publisher.submit(outgoing)
        else:
            await self.publisher.publish_now([outgoing])

    def _remember_published(self, fill: ChainFill, published: OrderFill) -> None:
        block = fill.block_number
        self._published.setdefault(block, []).append((fill.block_hash, published))
        self._published.move_to_end(block)
        while len(self._published) > REORG_MAX_DEPTH:
            self._published.popitem(last=False)

    async def _order(self, fill: ChainFill, timestamp: int) -> DomeOrder:
        return chain_order(fill, await self.markets.describe(fill.token_id), timestamp)

    def _occurrence(self, fill: ChainFill) -> int:
        """How many identical fills come before this one in its transaction (log order).

        A taker matched against two resting orders of one wallet at one price and size gives two
        identical fills in one transaction; without this they would share an order_key and one
        would be lost. Logs of a transaction always arrive in order and together (one block), in
        the live feed as in a block read, so both count the same. Identical means the same key
        before counting, as every other source counts (`shared.models.base_key`): amounts that
        differ only below the key's rounding are identical fills too.
        """
        # Per block as well: a reorg may put the transaction in another block at other indexes.
        where = (fill.block_hash, fill.tx_hash)
        seen = self._tx_fills.setdefault(where, {})
        self._tx_fills.move_to_end(where)
        while len(self._tx_fills) > TX_MEMORY:
            self._tx_fills.popitem(last=False)
        same = order_key(
            fill.tx_hash, fill.maker, fill.token_id, fill.side, fill.shares, round(fill.price, 6)
        )
        seen[fill.log_index] = same
        return sum(1 for index, other in seen.items() if other == same and index < fill.log_index)

    async def _dead(self, raw: Any, reason: str) -> None:
        metrics.REJECTED.labels(SOURCE, "log").inc()
        log.warning("polygon_log_rejected", extra={"reason": reason})
        await self.publisher.submit_dead(orjson.dumps(raw, default=str)[:4096], reason, SOURCE)

    # --- block headers -------------------------------------------------------------------------

    async def _header(self, socket: RpcSocket, number: int) -> Header:
        known = self._headers.get(number)
        return known if known is not None else await self._fetch_header(socket, number)

    async def _fetch_header(self, socket: RpcSocket, number: int) -> Header:
        block = await socket.call("eth_getBlockByNumber", [hex(number), False])
        header = self._remember_header(block)
        if header is None:
            raise ConnectionLost(f"the node has no block {number}")
        return header

    def _remember_header(self, block: Any) -> Header | None:
        if not isinstance(block, dict):
            return None
        try:
            header = Header(
                quantity(block["number"], "number"),
                str(block["hash"]).lower(),
                quantity(block["timestamp"], "timestamp"),
            )
        except (KeyError, LogError):
            return None
        self._headers[header.number] = header
        self._headers.move_to_end(header.number)
        while len(self._headers) > HEADER_CACHE:
            self._headers.popitem(last=False)
        return header


def chain_order(fill: ChainFill, market: TokenMarket, timestamp: int) -> DomeOrder:
    """The fill in the order contract (raises ValidationError, for the dead letter)."""
    return FeedOrder(
        token_id=fill.token_id,
        side=fill.side,
        market_slug=market.market_slug,
        condition_id=market.condition_id,
        token_label=market.token_label,
        title=market.title,
        shares=fill.shares_raw,
        shares_normalized=fill.shares,
        price=round(fill.price, 6),
        tx_hash=fill.tx_hash,
        timestamp=timestamp,
        order_hash=fill.order_hash,
        user=fill.maker,
        taker=fill.taker,
        block_number=fill.block_number,
        log_index=fill.log_index,
    )
