"""Pure parts of who gets what: filters, tokens, connection slots and limits, the Host and Origin
checks, settings, the status view."""

from __future__ import annotations

import orjson
import pytest
from pydantic import SecretStr

from services.notifier.auth import ClientLimits, ConnectionSlots, Site, Tokens, presented_token
from services.notifier.filters import MATCH_ALL, FilterError, filters_from_query, parse_filters
from services.notifier.settings import NotifierSettings
from services.notifier.status import describe_feed
from shared.models import SignalKind
from tests.helpers.notifier import variant, wallet


def test_filters_match_on_every_field_together() -> None:
    filters = parse_filters(
        {
            "wallets": [wallet(1).upper().replace("0X", "0x"), wallet(2)],
            "markets": ["Nobel-Peace-Prize-2025", "0x" + "C" * 64],
            "kinds": ["whale_order"],
            "min_confidence": 0.8,
        },
        max_values=10,
    )
    base = {
        "wallet": wallet(1),
        "market_slug": "nobel-peace-prize-2025",
        "kind": SignalKind.WHALE_ORDER,
        "confidence": 0.8,
    }
    assert filters.matches(variant(1, **base))
    by_condition = {"market_slug": "other", "condition_id": "0x" + "c" * 64}
    assert filters.matches(variant(1, **base | by_condition))
    for change in (
        {"wallet": wallet(3)},
        {"market_slug": "other", "condition_id": ""},
        {"kind": SignalKind.TRADER_ENTRY},
        {"confidence": 0.79},
    ):
        assert not filters.matches(variant(1, **base | change)), change
    assert MATCH_ALL.matches(variant(1, confidence=0.0)) and MATCH_ALL.matches_all
    assert parse_filters({}, max_values=1).matches_all
    assert parse_filters(None, max_values=1).matches_all


def test_filters_describe_themselves_normalized() -> None:
    filters = parse_filters({"markets": ["B", "a"], "kinds": ["consensus"]}, max_values=10)
    assert filters.describe() == {
        "wallets": None,
        "markets": ["a", "b"],
        "kinds": ["consensus"],
        "min_confidence": 0.0,
        "min_notional_usd": 0.0,
        "min_price": 0.0,
        "max_price": 1.0,
        "sides": None,
        "tags": None,
        "only_new_positions": False,
    }


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ([], "filters must be a JSON object"),
        ({"kinds": "whale_order"}, "kinds: must be a list"),
        ({"wallets": []}, "wallets: empty list matches nothing; leave the field out to match any"),
        ({"wallets": ["0xnope"]}, "wallets.0: not a 0x wallet address of 40 hex digits"),
        ({"markets": ["x" * 201]}, "markets.0: String should have at most 200 characters"),
        ({"min_confidence": -0.1}, "min_confidence: Input should be greater than or equal to 0"),
        (
            {"wallet": [wallet(1)]},
            "wallet: unknown field (did you mean wallets?)",
        ),
        ({"markets": ["a", "b", "c"], "kinds": ["consensus"]}, "4 values, limit 3"),
    ],
)
def test_bad_filters_are_refused_with_the_reason(payload: object, problem: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filters(payload, max_values=3)
    assert str(caught.value) == problem


def test_filters_from_the_query_string() -> None:
    filters = filters_from_query(
        {
            "markets": ["a, b", "c"],
            "kinds": ["whale_order,"],
            "min_confidence": ["0.5"],
        },
        max_values=10,
    )
    assert filters.describe() == {
        "wallets": None,
        "markets": ["a", "b", "c"],
        "kinds": ["whale_order"],
        "min_confidence": 0.5,
        "min_notional_usd": 0.0,
        "min_price": 0.0,
        "max_price": 1.0,
        "sides": None,
        "tags": None,
        "only_new_positions": False,
    }
    with pytest.raises(FilterError, match="min_confidence given more than once"):
        filters_from_query({"min_confidence": ["0.1", "0.2"]}, max_values=10)


def test_tokens_identify_by_position_and_refuse_near_misses() -> None:
    tokens = Tokens([SecretStr("first-token-value"), SecretStr("second-token-value")])
    assert not tokens.open and Tokens([]).open
    assert tokens.identify("second-token-value") == "token-2"
    assert tokens.identify("first-token-value") == "token-1"
    for wrong in ("", "first-token-valu", "first-token-value ", "FIRST-TOKEN-VALUE"):
        assert tokens.identify(wrong) is None


def test_token_from_header_then_query() -> None:
    assert presented_token({"authorization": "Bearer abc"}, {"token": "q"}) == "abc"
    assert presented_token({"authorization": "bearer  abc "}, {}) == "abc"
    assert presented_token({"authorization": "Basic abc"}, {"token": "q"}) == "q"
    assert presented_token({}, {}) is None


def test_connection_slots_per_token() -> None:
    slots = ConnectionSlots(2)
    assert slots.acquire("token-1") and slots.acquire("token-1")
    assert not slots.acquire("token-1")
    assert slots.acquire("token-2")
    slots.release("token-1")
    assert slots.held("token-1") == 1 and slots.acquire("token-1")


def test_client_limits_in_all_and_per_address() -> None:
    limits = ClientLimits(total=3, per_address=2)
    assert limits.admit("10.0.0.1") is None and limits.admit("10.0.0.1") is None
    refused = limits.admit("10.0.0.1")
    assert refused is not None and (refused.code, refused.label) == (1008, "address_limit")
    assert limits.admit("10.0.0.2") is None
    full = limits.admit("10.0.0.3")
    assert full is not None and (full.code, full.label) == (1013, "server_full")
    limits.leave("10.0.0.1")
    assert limits.held == 2 and limits.admit("10.0.0.3") is None


def test_host_header_must_name_an_allowed_host() -> None:
    site = Site(["localhost", "127.0.0.1", "[::1]", "notifier"], [])
    for host in ("127.0.0.1:8080", "LOCALHOST", "[::1]:8080", "notifier:8080", "localhost:1"):
        assert site.host_problem(host) is None, host
    for foreign in (None, "", "evil.test", "evil.test:8080", "127.0.0.1.evil.test", "[::2]:80"):
        problem = site.host_problem(foreign)
        assert problem is not None and "NOTIFIER_ALLOWED_HOSTS" in problem, foreign
    assert Site(["*"], []).host_problem("anything.example:1") is None


def test_origin_must_be_the_servers_own_or_listed() -> None:
    site = Site(["*"], ["https://desk.example.com"])
    host = "127.0.0.1:8080"
    for origin in (
        None,
        "http://127.0.0.1:8080",
        "https://127.0.0.1:8080",
        "HTTPS://Desk.Example.com/",
    ):
        assert site.origin_problem(origin, host) is None, origin
    for origin in (
        "null",
        "http://127.0.0.1:8081",
        "http://127.0.0.1",
        "ftp://127.0.0.1:8080",
        "https://desk.example.com:8443",
        "http://127.0.0.1:8080.evil.test",
    ):
        problem = site.origin_problem(origin, host)
        assert problem is not None and "NOTIFIER_ALLOWED_ORIGINS" in problem, origin
    assert site.origin_problem("http://127.0.0.1:8080", None) is not None
    assert Site(["*"], ["*"]).origin_problem("null", host) is None


def test_tokens_setting_takes_a_list_or_commas_and_never_shows_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alpha, beta = "alpha-token-0123456789", "beta-token-0123456789"
    monkeypatch.setenv("NOTIFIER_TOKENS", f" {alpha} , {beta},, ")
    settings = NotifierSettings()
    assert [t.get_secret_value() for t in settings.notifier_tokens] == [alpha, beta]
    assert alpha not in repr(settings)
    monkeypatch.setenv("NOTIFIER_TOKENS", f'["with,comma-0123456789", "{beta}"]')
    assert [t.get_secret_value() for t in NotifierSettings().notifier_tokens] == [
        "with,comma-0123456789",
        beta,
    ]
    monkeypatch.setenv("NOTIFIER_TOKENS", "")
    assert NotifierSettings().notifier_tokens == ()


def test_feed_status_as_the_dashboard_sees_it() -> None:
    # The ingestor's status hash, as services/ingestor/feed_status.py documents its fields.
    fields = {
        "source": "dome_ws,data_api",
        "state": "connected",
        "connected": "1",
        "subscriptions": "20",
        "wallets": "20",
        "pending_subscribes": "0",
        "last_event_at": "995.500000",
        "last_exchange_ts": "995",
        "seconds_since_last_event": "2.500",
        "reconnects": "1",
        "published": "7",
        "duplicates": "1",
        "queued": "0",
        "last_error": "",
        "updated_at": "998.000000",
        "sources": orjson.dumps(
            {
                "dome_ws": {"state": "connected", "connected": "1", "last_event_at": "995.5"},
                "data_api": {"state": "disconnected", "connected": "0", "last_event_at": ""},
            }
        ).decode(),
    }
    raw = {key.encode(): value.encode() for key, value in fields.items()}
    assert describe_feed(raw, now=1000.0) == {
        "source": "dome_ws,data_api",
        "state": "connected",
        "connected": True,
        "wallets": 20,
        "subscriptions": 20,
        "last_event_age_s": 4.5,
        "last_exchange_ts": 995,
        "reconnects": 1,
        "published": 7,
        "duplicates": 1,
        "last_error": "",
        "status_age_s": 2.0,
        "sources": [
            {
                "source": "data_api",
                "state": "disconnected",
                "connected": False,
                "last_event_age_s": None,
            },
            {"source": "dome_ws", "state": "connected", "connected": True, "last_event_age_s": 4.5},
        ],
    }
    sparse = describe_feed({b"state": b"starting", b"last_event_at": b"", b"sources": b"[1"}, 1.0)
    assert sparse is not None
    assert (
        sparse["connected"],
        sparse["last_event_age_s"],
        sparse["wallets"],
        sparse["sources"],
    ) == (False, None, None, [])
    assert describe_feed({}, now=1000.0) is None
