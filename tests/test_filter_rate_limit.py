"""The ``rate_limit`` filter kind: token buckets per client, route or header,
bounded memory, the WebSocket message hook, option errors, and the kind at
work in a real ``twistd -n chatproxy`` process."""

from __future__ import annotations

import gc
import http.client
import textwrap
import time
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pytest

from chatproxy.config import ConfigError, load_config
from chatproxy.proxy.validate import validate
from chatproxy.filters import CloseSession, FilterOptionError, IFilterFactory, IRequestFilter, Refuse, \
    installed_filter_kinds
from chatproxy.filters.rate_limit import RateLimit, TokenBuckets, parse_rate, rate_limit, retry_after
from chatproxy.http.messages import RequestHead
from chatproxy.testing import request_head
from conftest import basic_config, free_port

# ---------------------------------------------------------------------------
# Helpers


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def head(client: str = "192.0.2.1", headers: dict[str, str] | None = None, route: str | None = None,
         path: str = "/chat") -> RequestHead:
    """A request head from ``client`` with ``headers`` (and the ``route`` it matched)."""
    return request_head(path, headers=list((headers or {}).items()), host="chat.example.test", client=client,
                        route=route or "")


def build(options: dict[str, str], clock: FakeClock | None = None) -> RateLimit:
    """Build a rate_limit filter from section options with a fake clock."""
    return rate_limit.build(options, clock=clock or FakeClock())


PASS = "pass"


class Step(NamedTuple):
    """One request at time ``at`` (seconds after the start) and what it should get:
    PASS, or a refusal with that ``Retry-After``."""

    at: float
    expect: str | int
    client: str = "192.0.2.1"
    headers: dict[str, str] | None = None
    route: str | None = None


A, B, C = "192.0.2.1", "192.0.2.2", "2001:db8::3"

CASES = [
    ("burst-then-refuse", {"rate": "1", "burst": "3"},
     [Step(0, PASS), Step(0, PASS), Step(0, PASS), Step(0, 1)]),
    ("refill-one-token-per-interval", {"rate": "2", "burst": "1"},
     [Step(0, PASS), Step(0.1, 1), Step(0.5, PASS), Step(0.6, 1), Step(1.0, PASS)]),
    ("refused-requests-spend-nothing", {"rate": "1", "burst": "1"},
     [Step(0, PASS), Step(0.5, 1), Step(0.9, 1), Step(1.0, PASS)]),
    ("retry-after-rounds-up-slow-rate", {"rate": "0.25", "burst": "1"},
     [Step(0, PASS), Step(0, 4), Step(1, 3), Step(3.5, 1), Step(4, PASS), Step(4, 4)]),
    ("rate-per-minute", {"rate": "30/min", "burst": "2"},
     [Step(0, PASS), Step(0, PASS), Step(0, 2), Step(1.9, 1), Step(2.0, PASS), Step(2.0, 2)]),
    ("rate-per-hour", {"rate": "60/h", "burst": "1"},
     [Step(0, PASS), Step(0, 60), Step(59.5, 1), Step(60, PASS)]),
    ("refill-capped-at-burst", {"rate": "1", "burst": "2"},
     [Step(0, PASS), Step(0, PASS), Step(100, PASS), Step(100, PASS), Step(100, 1)]),
    ("default-burst-is-rate-rounded-up", {"rate": "2.5"},
     [Step(0, PASS), Step(0, PASS), Step(0, PASS), Step(0, 1)]),
    ("default-burst-at-least-one", {"rate": "0.1"},
     [Step(0, PASS), Step(0, 10), Step(10, PASS)]),
    ("per-client-isolation", {"rate": "1", "burst": "1"},
     [Step(0, PASS, A), Step(0, PASS, B), Step(0, 1, A), Step(0, 1, B), Step(0, PASS, C), Step(1, PASS, A)]),
    ("route-key-shares-across-clients", {"rate": "1", "burst": "2", "key": "route"},
     [Step(0, PASS, A, route="chat"), Step(0, PASS, B, route="chat"), Step(0, 1, C, route="chat"),
      Step(0, PASS, A, route="api"), Step(0, PASS, A, route="api"), Step(0, 1, B, route="api")]),
    ("header-key-shares-across-clients", {"rate": "1", "burst": "1", "key": "header:X-Chat-User"},
     [Step(0, PASS, A, {"X-Chat-User": "alice"}), Step(0, 1, B, {"x-chat-user": "alice"}),
      Step(0, PASS, A, {"X-Chat-User": "bob"}), Step(1, PASS, B, {"X-Chat-User": "alice"})]),
    ("header-key-missing-header-uses-client", {"rate": "1", "burst": "1", "key": "header:X-Chat-User"},
     [Step(0, PASS, A), Step(0, 1, A), Step(0, PASS, B),
      # a header value equal to a client address is a different key from that client
      Step(0, PASS, C, {"X-Chat-User": A}), Step(0, 1, A)]),
    ("key-option-is-case-insensitive", {"rate": "1", "burst": "1", "key": "CLIENT"},
     [Step(0, PASS, A), Step(0, 1, A), Step(0, PASS, B)]),
]


@pytest.mark.parametrize("options, steps", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_token_bucket_table(options: dict[str, str], steps: list[Step]) -> None:
    """Each request (at a fake time) passes or is refused with 429, ``rate limit
    exceeded`` and the expected Retry-After, per the key's token bucket."""
    clock = FakeClock()
    start = clock.now
    flt = build(options, clock)
    for number, step in enumerate(steps):
        clock.now = start + step.at
        result = flt.request(head(step.client, step.headers, step.route))
        if step.expect == PASS:
            assert result is None, f"step {number} {step}: {result}"
        else:
            assert isinstance(result, Refuse), f"step {number} {step}: passed"
            assert result.status == 429
            assert result.reason == "rate limit exceeded"
            assert result.headers == ((b"Retry-After", str(step.expect).encode()),), f"step {number} {step}"


def test_kind_is_a_plugin_providing_the_interfaces() -> None:
    """The kind is installed under ``rate_limit`` and builds an IRequestFilter."""
    kinds = installed_filter_kinds()
    assert kinds["rate_limit"] is rate_limit
    assert IFilterFactory.providedBy(rate_limit)
    assert IRequestFilter.providedBy(rate_limit.build({"rate": "5"}))


@pytest.mark.parametrize("text, expected", [
    ("5", 5.0), ("0.5", 0.5), (".5", 0.5), ("10/s", 10.0), ("300/min", 5.0), ("300 / m", 5.0),
    ("3600/h", 1.0), ("90/minute", 1.5),
])
def test_parse_rate(text: str, expected: float) -> None:
    """Rates are per second, optionally written per second, minute or hour."""
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("wait, seconds", [(0.001, 1), (0.5, 1), (1.0, 1), (1.0000001, 2), (59.2, 60),
                                           (3 + 1e-12, 3)])
def test_retry_after_rounds_up(wait: float, seconds: int) -> None:
    """Retry-After is the wait rounded up to whole seconds (at least 1), ignoring
    floating-point dust."""
    assert retry_after(wait) == seconds


# ---------------------------------------------------------------------------
# Bounded memory


def test_million_distinct_keys_stay_within_max_keys() -> None:
    """A flood of 1,000,000 distinct keys (no time passing, so nothing expires)
    never holds more than ``max_keys`` buckets, and every new key is served
    (the least recently used bucket makes room)."""
    clock = FakeClock()
    buckets = TokenBuckets(rate=1.0, burst=5, max_keys=1000, clock=clock)
    largest = 0
    for n in range(1_000_000):
        assert buckets.take(n) == 0.0
        if n % 1000 == 0:
            largest = max(largest, len(buckets))
    assert len(buckets) <= 1000 and largest <= 1000
    assert buckets.evicted == 1_000_000 - 1000


def test_distinct_client_addresses_through_the_filter_stay_bounded() -> None:
    """20,000 requests from distinct client addresses with ``max_keys = 1000``
    keep at most 1000 buckets in the filter."""
    clock = FakeClock()
    flt = build({"rate": "1", "burst": "1", "max_keys": "1000"}, clock)
    template = head()
    for n in range(20_000):
        assert flt.request(attrs.evolve(template, client=f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")) is None
        assert len(flt.buckets) <= 1000


def test_least_recently_used_bucket_is_evicted_first() -> None:
    """When full, the bucket used least recently goes: a key that keeps coming
    back keeps its (drained) bucket."""
    clock = FakeClock()
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        buckets.take(key)
    assert buckets.take("a") > 0  # "a" is now the most recently used
    buckets.take("d")  # evicts "b"
    assert "b" not in buckets and "a" in buckets and "c" in buckets and "d" in buckets
    assert buckets.take("a") > 0  # still drained: it was not evicted


def test_idle_buckets_expire_once_full() -> None:
    """A bucket idle long enough to be full again is dropped (it is the same as
    no bucket); one still refilling is kept."""
    clock = FakeClock()
    buckets = TokenBuckets(rate=2.0, burst=4, max_keys=100, clock=clock)  # full again after 2 s
    for key in range(10):
        buckets.take(key)
    clock.now += 1.0
    buckets.take("late")
    assert len(buckets) == 11
    clock.now += 1.0  # the first ten are full again; "late" is not
    buckets.take("new")
    assert not any(key in buckets for key in range(10))
    assert "late" in buckets and "new" in buckets and len(buckets) == 2
    assert buckets.evicted == 0


# ---------------------------------------------------------------------------
# The WebSocket message hook


def test_messages_over_the_rate_close_the_session_with_1008() -> None:
    """A session's client-to-upstream messages beyond the burst (no time
    passing) get CloseSession(1008, "rate limit exceeded"); after refill they pass."""
    clock = FakeClock()
    flt = build({"rate": "2", "burst": "3"}, clock)
    session = head()
    assert [flt.message(session, b"hi", False, True) for _ in range(3)] == [None, None, None]
    assert flt.message(session, b"hi", False, True) == CloseSession(1008, "rate limit exceeded")
    clock.now += 0.5
    assert flt.message(session, b"hi", False, True) is None


def test_messages_from_the_upstream_are_not_limited() -> None:
    """Messages towards the client (``upward`` False) never count."""
    flt = build({"rate": "1", "burst": "1"})
    session = head()
    assert all(flt.message(session, b"x", True, False) is None for _ in range(100))
    assert flt.message(session, b"x", True, True) is None


def test_each_session_has_its_own_message_bucket() -> None:
    """Two sessions with equal heads (same client, same headers) are limited
    separately: the bucket belongs to the head object, not its value."""
    flt = build({"rate": "1", "burst": "1"})
    first, second = head(), head()
    assert first == second and first is not second
    assert flt.message(first, b"x", False, True) is None
    assert isinstance(flt.message(first, b"x", False, True), CloseSession)
    assert flt.message(second, b"x", False, True) is None


def test_session_bucket_goes_with_its_head() -> None:
    """When a session's head object is gone, its message bucket is dropped too."""
    flt = build({"rate": "1", "burst": "5"})
    session = head()
    flt.message(session, b"x", False, True)
    assert flt.sessions is not None and len(flt.sessions) == 1
    del session
    gc.collect()
    assert len(flt.sessions) == 0 and not flt._session_refs


def test_session_buckets_stay_within_max_keys() -> None:
    """Many live sessions keep at most ``max_keys`` message buckets (and references)."""
    flt = build({"rate": "1", "burst": "1", "max_keys": "100"})
    sessions = [head() for _ in range(1000)]
    for session in sessions:
        assert flt.message(session, b"x", False, True) is None
    assert flt.sessions is not None and len(flt.sessions) <= 100 and len(flt._session_refs) <= 100


@pytest.mark.parametrize("options, allowed", [
    ({"rate": "1", "burst": "1", "message_rate": "10", "message_burst": "4"}, 4),
    ({"rate": "1", "burst": "1", "message_rate": "3"}, 3),
    ({"rate": "1", "burst": "2"}, 2),
    ({"rate": "1", "message_rate": "off"}, None),
])
def test_message_rate_options(options: dict[str, str], allowed: int | None) -> None:
    """``message_rate``/``message_burst`` set the per-session message bucket
    (default: ``rate`` and ``burst``); ``message_rate = off`` turns it off."""
    flt = build(options)
    session = head()
    results = [flt.message(session, b"x", False, True) for _ in range(20)]
    if allowed is None:
        assert results == [None] * 20
    else:
        assert results[:allowed] == [None] * allowed
        assert results[allowed] == CloseSession(1008, "rate limit exceeded")


# ---------------------------------------------------------------------------
# Option errors


ERRORS = [
    ({}, "rate", "required option is missing"),
    ({"rate": "fast"}, "rate", "expected a rate per second"),
    ({"rate": "0"}, "rate", "greater than zero"),
    ({"rate": "-1"}, "rate", "expected a rate per second"),
    ({"rate": "5/fortnight"}, "rate", "expected a rate per second"),
    ({"rate": "5", "burst": "0"}, "burst", "at least 1"),
    ({"rate": "5", "burst": "1.5"}, "burst", "whole number"),
    ({"rate": "5", "key": "ip"}, "key", "expected client, route or header:NAME"),
    ({"rate": "5", "key": "header:"}, "key", "header:NAME needs a header name"),
    ({"rate": "5", "key": "header:X Chat"}, "key", "header:NAME needs a header name"),
    ({"rate": "5", "max_keys": "0"}, "max_keys", "at least 1"),
    ({"rate": "5", "max_keys": "lots"}, "max_keys", "whole number"),
    ({"rate": "5", "message_rate": "often"}, "message_rate", "expected a rate per second"),
    ({"rate": "5", "message_burst": "0"}, "message_burst", "at least 1"),
    ({"rate": "5", "message_rate": "off", "message_burst": "3"}, "message_burst", "message_rate = off"),
    ({"rate": "5", "colour": "red"}, "colour", "unknown option (rate_limit takes: rate, burst, key"),
]


@pytest.mark.parametrize("options, option, fragment", ERRORS, ids=[f"{e[1]}-{i}" for i, e in enumerate(ERRORS)])
def test_build_errors_name_the_option(options: dict[str, str], option: str, fragment: str) -> None:
    """A bad or missing option raises FilterOptionError naming that option."""
    with pytest.raises(FilterOptionError) as info:
        rate_limit.build(options)
    assert info.value.option == option
    assert fragment in info.value.message


def test_config_error_names_file_section_and_option(tmp_path: Path) -> None:
    """Through load_config and validate, a bad rate_limit option is reported with the file,
    the ``[filter:NAME]`` section and the option."""
    path = tmp_path / "chatproxy.ini"
    path.write_text(basic_config("http://127.0.0.1:9", 8080, route="filters = limit",
                                 extra="[filter:limit]\nuse = rate_limit\nrate = 5\nburst = none\n"))
    with pytest.raises(ConfigError) as info:
        validate(load_config([path]), {"rate_limit": rate_limit})
    error = info.value
    assert (error.file, error.section, error.option) == (str(path), "filter:limit", "burst")
    assert str(path) in str(error) and "[filter:limit]" in str(error) and "burst" in str(error)
    assert "whole number" in str(error)


# ---------------------------------------------------------------------------
# Through twistd


def get(port: int, path: str = "/echo") -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection: (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


LIMIT = """
[filter:limit]
use = rate_limit
rate = 1/min
burst = 3
"""


def test_request_over_the_burst_gets_429_and_never_reaches_upstream(proxy: Any, upstream: Any) -> None:
    """With ``burst = 3`` (refilling at 1/min, so no refill during the test),
    four quick requests: three are forwarded, the fourth gets 429 with a
    Retry-After of about a minute and the upstream never sees it."""
    port = free_port()
    proxy.start(basic_config(upstream.url, port, route="filters = limit", extra=LIMIT), port=port)
    results = [get(port, f"/echo/{n}") for n in range(4)]
    assert [status for status, _, _ in results] == [200, 200, 200, 429]
    status, headers, body = results[3]
    assert 1 <= int(headers["retry-after"]) <= 60
    assert body == b"rate limit exceeded\n"
    assert [r["path"] for r in upstream.requests] == ["/echo/0", "/echo/1", "/echo/2"]


def test_report_mode_lets_the_request_through_and_logs(proxy: Any, upstream: Any) -> None:
    """With ``mode = report`` the fourth request is forwarded too, and the log
    says the filter would have refused it with 429."""
    port = free_port()
    process = proxy.start(basic_config(upstream.url, port, route="filters = limit",
                                       extra=LIMIT + "mode = report\n"), port=port)
    assert [get(port, f"/echo/{n}")[0] for n in range(4)] == [200, 200, 200, 200]
    assert len(upstream.requests) == 4
    deadline = time.monotonic() + 10
    while "would have refused" not in process.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in process.output().splitlines() if "would have refused" in line]
    assert len(lines) == 1, process.output()
    assert "filter limit (report mode)" in lines[0] and "/echo/3" in lines[0] and "429" in lines[0]


def test_header_key_gives_each_user_a_budget(proxy: Any, upstream: Any) -> None:
    """``key = header:X-Chat-User``: one user over the limit is refused while
    another user from the same address is still served."""
    port = free_port()
    proxy.start(basic_config(upstream.url, port, route="filters = per-user", extra=textwrap.dedent("""
        [filter:per-user]
        use = rate_limit
        rate = 1/min
        burst = 1
        key = header:X-Chat-User
        """)), port=port)

    def as_user(user: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", f"/echo/{user}", headers={"X-Chat-User": user})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    assert [as_user("alice"), as_user("alice"), as_user("bob")] == [200, 429, 200]
    assert [r["path"] for r in upstream.requests] == ["/echo/alice", "/echo/bob"]


def test_websocket_messages_over_the_rate_close_the_session(proxy: Any) -> None:
    """On a bridge route, the client's messages beyond ``message_burst`` close
    the session with 1008 "rate limit exceeded"; the upstream got only the
    messages within the burst."""
    pytest.importorskip("websockets")
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from ws_peers import WsUpstream

    ws_upstream = WsUpstream()
    try:
        port = free_port()
        proxy.start(textwrap.dedent(f"""\
            [chatproxy]
            access_log = off

            [listen:main]
            endpoint = tcp:{port}:interface=127.0.0.1

            [upstream:ws]
            servers = http://127.0.0.1:{ws_upstream.port}

            [filter:limit]
            use = rate_limit
            rate = 1/min
            burst = 5
            message_rate = 1/min
            message_burst = 3

            [route:ws]
            path = /
            upstream = ws
            websocket = bridge
            filters = limit
            """), port=port)
        with connect(f"ws://127.0.0.1:{port}/chat?sid=limited", open_timeout=10, close_timeout=10) as ws:
            for n in range(3):
                ws.send(f"message {n}")
                assert ws.recv(timeout=10) == f"message {n}"
            ws.send("one too many")
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "rate limit exceeded")
        session = ws_upstream.session("limited").wait_ended()
        assert session.received == ["message 0", "message 1", "message 2"]
    finally:
        ws_upstream.stop()
