"""The feed-status hash (shared/feed_status.py): what the ingestor writes reads back as written, and
whatever an older, newer or broken writer left in the hash reads without raising, naming what it
could not read."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingestor.feed_status import ConnectionState, FeedStatus, feed_report
from shared.feed_status import FeedReport, SourceReport

DOME = SourceReport(
    source="dome_ws",
    state="connected",
    connected=True,
    subscriptions=3,
    wallets=20,
    pending_subscribes=1,
    last_event_at=1762480391.25,
    last_exchange_ts=1762480390,
    seconds_since_last_event=1.5,
    reconnects=2,
    last_error="",
)
DATA_API = SourceReport(
    source="data_api",
    state="disconnected",
    connected=False,
    subscriptions=0,
    wallets=20,
    pending_subscribes=0,
    seconds_since_last_event=12.75,
    reconnects=0,
    last_error="ReadTimeout",
)
FEED = FeedReport(
    **DOME.model_dump(),
    published=1234,
    duplicates=5,
    queued=0,
    updated_at=1762480392.75,
    sources={"dome_ws": DOME, "data_api": DATA_API},
)


def as_redis_gives_it(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {name.encode(): value.encode() for name, value in fields.items()}


def test_report_to_fields_and_back_is_the_same_report() -> None:
    fields = FEED.to_fields()
    assert all(isinstance(value, str) for value in fields.values())
    assert fields["connected"] == "1" and fields["last_event_at"] == "1762480391.250000"
    assert orjson.loads(fields["sources"])["data_api"]["last_event_at"] == ""
    assert FeedReport.from_fields(as_redis_gives_it(fields)) == FEED
    assert FeedReport.from_fields(fields) == FEED  # a client with decode_responses


def test_what_the_ingestor_writes_reads_back_field_for_field() -> None:
    dome = FeedStatus(source="dome_ws", wallets=3, started_at=1000.0)
    dome.mark_connected()
    dome.mark_event(1002.5, 1762480391)
    poller = FeedStatus(source="data_api", wallets=3, started_at=1000.0)
    poller.mark_down(ConnectionState.DISCONNECTED, "HTTPStatusError: 503", now=1003.0)
    written = feed_report([dome, poller], 1004.0, published=5, duplicates=1, queued=2)
    fields = written.to_fields()
    read = FeedReport.from_fields(as_redis_gives_it(fields))
    assert read == written and read.to_fields() == fields
    assert read.state == "disconnected" and not read.connected and read.queued == 2
    assert read.sources["dome_ws"].connected and read.sources["data_api"].last_error
    assert read.unreadable == ()


def test_an_older_writer_missing_fields_reads_as_not_reported() -> None:
    read = FeedReport.from_fields({b"state": b"connected", b"connected": b"1", b"future": b"x"})
    assert read.state == "connected" and read.connected
    assert read.wallets is None and read.published is None and read.updated_at is None
    assert read.source == "" and read.sources == {}
    assert read.unreadable == ()
    assert FeedReport.from_fields({}).state == "unknown"


def test_garbled_fields_do_not_raise_and_are_named() -> None:
    fields = FEED.to_fields() | {
        "wallets": "twenty",
        "connected": "yes",
        "last_event_at": "nan",
        "updated_at": "1e999",
        "reconnects": "9" * 5000,
        "published": "12.0",  # another writer's float: still read
        "sources": orjson.dumps(
            {"dome_ws": {"state": 7, "last_event_at": [1]}, "data_api": "down"}
        ).decode(),
    }
    raw = as_redis_gives_it(fields) | {b"last_error": b"\xff\xfe broken"}
    read = FeedReport.from_fields(raw)
    assert set(read.unreadable) == {
        "wallets",
        "connected",
        "last_event_at",
        "updated_at",
        "reconnects",
        "sources.dome_ws.last_event_at",
        "sources.data_api",
    }
    assert read.wallets is None and not read.connected and read.last_event_at is None
    assert read.published == 12 and read.subscriptions == 3 and read.state == "connected"
    assert read.last_error.endswith(" broken")
    assert list(read.sources) == ["dome_ws"] and read.sources["dome_ws"].state == "7"
    assert read.sources["dome_ws"].source == "dome_ws"
    for sources in ("{not json", "[1, 2]", '"dome_ws"', "[" * 5000):
        assert FeedReport.from_fields({"sources": sources}).unreadable == ("sources",)


FIELD_NAMES = [*FEED.to_fields(), "v", "unknown"]
SMALL_INTEGERS = st.integers(-(2**63), 2**63 - 1)  # what JSON (orjson) can hold
JSON_VALUES = (
    st.none()
    | st.booleans()
    | SMALL_INTEGERS
    | st.floats()
    | st.text(max_size=8)
    | st.lists(SMALL_INTEGERS, max_size=2)
)
SOURCES_JSON = st.dictionaries(
    st.sampled_from(["dome_ws", ""]),
    st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES) | JSON_VALUES,
).map(orjson.dumps)
HASH_VALUES = (
    st.binary(max_size=40)
    | st.sampled_from(["", "1", "0", "-3", "1e309", "inf", "0x10", "[]", "{}"]).map(str.encode)
    | SOURCES_JSON
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(FIELD_NAMES).map(str.encode) | st.binary(max_size=8),
        HASH_VALUES,
        max_size=12,
    )
)
def test_no_hash_content_makes_the_reader_raise(fields: dict[bytes, bytes]) -> None:
    read = FeedReport.from_fields(fields)
    assert isinstance(read.to_fields(), dict)
