"""A wallet's history as the HTTP APIs list it (newest first), read page by page so that no fill is
skipped or doubled at a page boundary, identical fills keep identities of their own, and an item
that cannot be used is dead-lettered once.

Ties. Offset and cursor pages are cut at a count, not at a time. When the API orders the fills of
one second differently from one request to the next (nothing promises it does not), a boundary
inside that second shows some of its fills twice and others never. So a page is taken as groups of
one second each: every group the page holds whole goes on; the group at the end of the page, which
may go on in the next one, is held back, and the next request starts at that group's first row
(the Data API: its offset; Dome REST: `end_time` = that second, inclusive). That group is then read
whole from one answer, in whatever order the API chose. A group larger than a page is read again
with a larger page, up to the API's maximum; past that it goes on as read (logged): the one case
left to the API's order.

Identity. The fills of one transaction share its block's second, so they sit in one group, read
from one answer: the occurrences of identical fills (`shared.models.occurrences`) are counted
there, and come out the same on every read and from every source.

Dead letters. An item the walk cannot use (invalid, an implausible time, another wallet's) is
handed on once, and the caller (`backfill.CatchUp`) dead-letters it; the same item in a later page
or poll is dropped, so a bad item inside the overlap window does not flood `orders.dead` poll after
poll. The memory is bounded (`DEAD_MEMORY` items, the oldest forgotten first) and lives in the
process: after a restart such an item is dead-lettered once more.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from services.ingestor.http_api import ApiError
from shared.errors import validation_reason
from shared.models import DomeOrder, ExchangeTimeBounds, occurrences

log = logging.getLogger(__name__)

DEAD_MEMORY = 10_000
DEFAULT_BOUNDS = ExchangeTimeBounds()


class Listed(dict[str, Any]):
    """One item as the API listed it, kept verbatim (a dead letter holds exactly these fields),
    with the order the walk made of it or the reason it could not."""

    __slots__ = ("error", "order")

    def __init__(
        self, item: dict[str, Any], order: DomeOrder | None = None, error: str | None = None
    ) -> None:
        super().__init__(item)
        self.order = order
        self.error = error

    def to_order(self) -> DomeOrder:
        if self.order is None:
            raise ValueError(self.error or "unusable item")
        return self.order


@dataclass(frozen=True, slots=True)
class Row:
    item: Any  # what is handed on: a `Listed` for an object, else the item as read
    stamp: int | None  # its exchange second when usable, None when it has none
    dead: bool  # the caller will dead-letter it


@dataclass(frozen=True, slots=True)
class Cut:
    """What one page gives: the rows to hand on now, the second held back for the next request
    (None: nothing) and where its group starts in the page, whether `since` was reached, and
    whether the page is `stuck`: every dated row in it is of the held-back second, so holding
    it back would read the same second again and again."""

    out: list[Row]
    edge: int | None
    edge_at: int
    reached: bool
    stuck: bool


def cut_page(rows: Sequence[Row], *, since: int, above: int | None, hold: bool) -> Cut:
    """The rows of one page to hand on.

    Rows older than `since` end the walk; rows newer than `above` went on from an earlier page
    (or arrived since and are left to the next walk); with `hold`, the group of the page's last
    second is held back. Rows without a usable second always go on, to the dead letters."""
    reached = any(row.stamp is not None and row.stamp < since for row in rows)
    stamps = [row.stamp for row in rows if row.stamp is not None]
    edge = stamps[-1] if hold and not reached and stamps else None
    out = [row for row in rows if _goes_on(row.stamp, since, above, edge)]
    if edge is None:
        return Cut(out, None, len(rows), reached, stuck=False)
    edge_at = next(i for i, row in enumerate(rows) if row.stamp == edge)
    return Cut(out, edge, edge_at, reached, stuck=all(stamp == edge for stamp in stamps))


def settle(
    rows: Sequence[Row],
    *,
    since: int,
    above: int | None,
    hold: bool,
    limit: int,
    limit_max: int,
    where: dict[str, Any],
) -> tuple[Cut | None, int]:
    """The cut of a page and the page limit to go on with; no cut (and a larger limit) when one
    second fills the page, which must then be read again, larger. At the API's largest page
    the second goes on as read (logged as `tie_group_exceeds_page` with `where`)."""
    cut = cut_page(rows, since=since, above=above, hold=hold)
    if not cut.stuck:
        return cut, limit
    if limit < limit_max:
        return None, min(limit_max, limit * 2)
    log.warning("tie_group_exceeds_page", extra={**where, "second": cut.edge, "limit": limit})
    return cut_page(rows, since=since, above=above, hold=False), limit


def next_request(
    path: str, end: int | None, cut: Cut, pagination: dict[str, Any], cursor_field: str
) -> tuple[int | None, str | None]:
    """The (end bound, cursor) of the next request: the second held back, else (a second larger
    than the largest page went on whole) the server's cursor, named `cursor_field`."""
    if cut.edge is None:
        cursor = pagination.get(cursor_field)
        if not isinstance(cursor, str) or not cursor:
            raise ApiError(f"{path}: has_more without a {cursor_field}")
        return end, cursor
    if end is not None and cut.edge >= end:
        # Rows after the end bound came back: a server ignoring it would be read from the same
        # second forever.
        raise ApiError(f"{path}: an end bound of {end} answered with later rows")
    return cut.edge, None


def _goes_on(stamp: int | None, since: int, above: int | None, edge: int | None) -> bool:
    if stamp is None:
        return True
    return since <= stamp and (above is None or stamp <= above) and stamp != edge


# One request of a listing: (end bound, page limit, cursor) -> (its items, its pagination).
Fetch = Callable[[int | None, int, str | None], Awaitable[tuple[list[Any], dict[str, Any]]]]


class Listing:
    """Rows from the raw items of one API, and what of a cut is handed on."""

    def __init__(
        self,
        parse: Callable[[Any], DomeOrder],
        bounds: ExchangeTimeBounds = DEFAULT_BOUNDS,
        *,
        clock: Callable[[], float] = time.time,
        dead_memory: int = DEAD_MEMORY,
    ) -> None:
        self._parse = parse
        self._bounds = bounds
        self._clock = clock
        self._dead: OrderedDict[bytes, None] = OrderedDict()
        self._dead_memory = dead_memory

    async def walk(
        self,
        wallet: str,
        since: int,
        fetch: Fetch,
        *,
        limit: int,
        limit_max: int,
        path: str,
        cursor_field: str,
        source: str,
    ) -> AsyncIterator[list[Any]]:
        """A wallet's listing back to `since`, newest first, one cut at a time: each page is cut
        at its oldest whole second (`settle`), and the next asked up to that second, or by the
        server's cursor (named `cursor_field`) when one second filled the largest page."""
        end: int | None = None
        cursor: str | None = None
        where = {"source": source, "wallet": wallet}
        while True:
            items, pagination = await fetch(end, limit, cursor)
            more = bool(pagination.get("has_more"))
            cut, limit = settle(
                self.rows(items, wallet),
                since=since,
                above=end,
                hold=more,
                limit=limit,
                limit_max=limit_max,
                where=where,
            )
            if cut is None:
                continue
            yield self.hand_on(cut)
            if cut.reached or not more:
                return
            end, cursor = next_request(path, end, cut, pagination, cursor_field)

    def rows(self, items: Sequence[Any], wallet: str) -> list[Row]:
        now = self._clock()
        return [self._row(item, wallet, now) for item in items]

    def _row(self, item: Any, wallet: str, now: float) -> Row:
        if not isinstance(item, dict):
            return Row(item, None, True)
        try:
            order = self._parse(item)
        except ValueError as exc:  # pydantic's ValidationError included
            return Row(Listed(item, error=_reason(exc)), self._raw_stamp(item, now), True)
        problem = self._bounds.problem(order.timestamp, now)
        if problem is not None:
            return Row(Listed(item, error=problem), None, True)
        return Row(Listed(item, order), order.timestamp, order.user != wallet)

    def _raw_stamp(self, item: dict[str, Any], now: float) -> int | None:
        # An item that fails for another reason still has its place in time, if it has one.
        value = item.get("timestamp")
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return value if self._bounds.problem(value, now) is None else None

    def hand_on(self, cut: Cut) -> list[Any]:
        """The items of the cut: fills with their occurrences counted, and the dead-letters not
        handed on before."""
        counted = [row.item for row in cut.out if not row.dead]
        orders = [item.to_order() for item in counted]
        for item, order, occurrence in zip(counted, orders, occurrences(orders), strict=True):
            if occurrence != order.occurrence:
                item.order = order.model_copy(update={"occurrence": occurrence})
        return [row.item for row in cut.out if not row.dead or self._first_time(row.item)]

    def _first_time(self, item: Any) -> bool:
        digest = hashlib.sha256(orjson.dumps(item, option=orjson.OPT_SORT_KEYS, default=str))
        key = digest.digest()
        if key in self._dead:
            self._dead.move_to_end(key)
            return False
        self._dead[key] = None
        while len(self._dead) > self._dead_memory:
            self._dead.popitem(last=False)
        return True


def to_order(item: Any, parse: Callable[[Any], DomeOrder]) -> DomeOrder:
    """The order of a handed-on item (raises ValueError for a dead letter, with its reason)."""
    return item.to_order() if isinstance(item, Listed) else parse(item)


def _reason(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return "invalid order: " + validation_reason(exc)
    return str(exc)[:300]
