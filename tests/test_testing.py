"""chatproxy.testing, the helpers the project's tests and a plugin's tests use:
request heads, WebSocket messages, building a kind's filter, and a route's
filter chain run synchronously."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from chatproxy.filters import DROP, Answer, CloseSession, Filter, FilterOptionError, Refuse, Rewrite
from chatproxy.filters.chain import RouteFilter
from chatproxy.filters.jwt_verify import jwt_kind
from chatproxy.filters.rate_limit import rate_limit
from chatproxy.filters.request_limits import request_limits
from chatproxy.testing import (
    ChainRunner,
    Outcome,
    PendingDecision,
    build_filter,
    request_head,
    send_message,
    websocket_head,
)


def test_request_head_defaults() -> None:
    """Without arguments: GET / over TLS on listener main, from 192.0.2.10 (also the TCP peer),
    with only a Host header naming chat.example.com."""
    head = request_head()
    assert (head.method, head.target, head.path, head.query, head.version) == ("GET", "/", "/", "", "1.1")
    assert head.headers == ((b"Host", b"chat.example.com"),)
    assert (head.host, head.authority, head.client, head.peer) == ("chat.example.com", "chat.example.com",
                                                                    "192.0.2.10", "192.0.2.10")
    assert head.tls and head.listener == "main" and head.route == ""


def test_request_head_overrides_and_headers() -> None:
    """The target gives path and query unless they are given; headers keep their order, text
    values are UTF-8 and bytes are taken as they are; a given Host is not doubled."""
    head = request_head("/chat/../a?x=1&y", method="POST", path="/a", headers=[("Host", "other:8443"),
                        ("X-Name", "Zoë"), (b"X-Raw", b"\xff")], host="other", authority="other:8443",
                        client="203.0.113.9", peer="10.0.0.1", tls=False, listener="inside", route="api")
    assert (head.method, head.target, head.path, head.query) == ("POST", "/chat/../a?x=1&y", "/a", "x=1&y")
    assert head.headers == ((b"Host", b"other:8443"), (b"X-Name", "Zoë".encode()), (b"X-Raw", b"\xff"))
    assert (head.client, head.peer, head.tls, head.listener, head.route) == ("203.0.113.9", "10.0.0.1", False,
                                                                             "inside", "api")
    assert request_head(path="/p", query="q=1").target == "/p?q=1"
    assert request_head("http://chat.example.com/p?q").path == "/p"


def test_websocket_head_is_a_handshake() -> None:
    """websocket_head is a GET with the Upgrade headers, the given ones after them."""
    head = websocket_head("/ws", headers=[("Origin", "https://www.example.com")], client="192.0.2.7")
    assert head.method == "GET" and head.path == "/ws" and head.client == "192.0.2.7"
    assert head.header("upgrade") == "websocket" and head.header("origin") == "https://www.example.com"


class Recording:
    """A kind that records the options it was built with."""

    name = "recording"

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}

    def build(self, options: Any) -> object:
        """Keep the options."""
        self.options = dict(options)
        return object()


def test_build_filter_gives_options_as_the_loader_does(tmp_path: Path) -> None:
    """build_filter passes OptionText values carrying the directory relative file names are
    resolved against; a kind's option error comes through."""
    kind = Recording()
    build_filter(kind, {"file": "secret"}, directory=tmp_path)
    assert kind.options == {"file": "secret"} and kind.options["file"].directory == tmp_path
    (tmp_path / "secret").write_text("s3cret-s3cret-s3cret-s3cret-s3cret!\n")
    assert build_filter(jwt_kind, {"secret_file": "secret"}, directory=tmp_path).key == \
        b"s3cret-s3cret-s3cret-s3cret-s3cret!"
    with pytest.raises(FilterOptionError) as info:
        build_filter(jwt_kind, {"secret_file": "secret"})
    assert info.value.option == "secret_file" and "absolute path" in info.value.message


class Words(Filter):
    """Refuses messages containing ``bad``; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bool, bool]] = []

    def message(self, head: Any, payload: bytes, binary: bool, upward: bool) -> Any:
        """Close the session with 4400 on ``bad``."""
        self.seen.append((payload, binary, upward))
        return CloseSession(4400, "bad word") if b"bad" in payload else None


def test_send_message() -> None:
    """Text goes as a UTF-8 text message, bytes as a binary one; the verdict is returned."""
    flt = Words()
    assert send_message(flt, "héllo") is None
    assert send_message(flt, b"bad", upward=False) == CloseSession(4400, "bad word")
    assert send_message(flt, b"x", binary=False) is None
    assert flt.seen == [("héllo".encode(), False, True), (b"bad", True, False), (b"x", False, True)]


class Scripted(Filter):
    """A request hook returning a given decision (or a Deferred of it)."""

    def __init__(self, decision: Any) -> None:
        self.decision = decision

    def request(self, head: Any) -> Any:
        """The decision."""
        return self.decision


def test_chain_runner_runs_filters_in_order() -> None:
    """Filters run in order: a Rewrite changes the head the next one sees, the first refusal ends
    the run; outcomes are counted under class names (repeats numbered)."""
    runner = ChainRunner(Scripted(Rewrite(set=((b"X-Tenant", b"acme"),))), Scripted(None),
                         Scripted(Refuse(403, "no")), Scripted(Answer(200)))
    outcome = runner.request(request_head(headers=[("X-Tenant", "evil")]))
    assert outcome.refused and outcome.status == 403 and not outcome.passed
    assert outcome.head.header("x-tenant") == "acme"
    assert [f.name for f in runner.filters] == ["Scripted", "Scripted-2", "Scripted-3", "Scripted-4"]
    assert runner.counters == {"Scripted:passed": 1, "Scripted-2:passed": 1, "Scripted-3:refused": 1}


def test_chain_runner_resolves_fired_deferreds_and_refuses_pending_ones() -> None:
    """A Deferred that has fired is the decision; one that has not raises PendingDecision."""
    assert ChainRunner(Scripted(defer.succeed(Answer(204)))).request() == \
        Outcome(Answer(204), request_head())
    with pytest.raises(PendingDecision):
        ChainRunner(Scripted(defer.Deferred())).request()


def test_chain_runner_of_kind_with_generic_options() -> None:
    """of_kind builds one filter of a kind; mode = report lets what it would refuse through
    (counted as reported); refused_message = drop turns a closing refusal into a drop."""
    options = {"methods": "GET"}
    assert ChainRunner.of_kind(request_limits, options).request(request_head(method="POST")).status == 405
    report = ChainRunner.of_kind(request_limits, options, name="limits", mode="report")
    assert report.request(request_head(method="POST")).passed
    assert report.counters == {"limits:reported": 1}
    dropping = ChainRunner.of_kind(rate_limit, {"rate": "1", "message_burst": "1"}, refused_message="drop")
    session = websocket_head()
    assert dropping.message("one", head=session) is None
    assert dropping.message("two", head=session) == DROP
    assert dropping.counters["rate_limit:refused"] == 1


class BodyPeek(Filter):
    """Reads the first 4 bytes of bodies; refuses ``EVIL``."""

    inspect_body_bytes = 4

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bool]] = []

    def request_body(self, head: Any, body: bytes, complete: bool) -> Any:
        """Record the bytes; refuse EVIL."""
        self.seen.append((body, complete))
        return Refuse(403, "evil") if body == b"EVIL" else None


class Stamp(Filter):
    """Adds X-Stamp to response heads."""

    def response(self, head: Any, status: int, headers: list[tuple[bytes, bytes]]) -> Any:
        """The headers and X-Stamp."""
        return headers + [(b"X-Stamp", b"%d" % status)]


def test_chain_runner_body_response_and_message_hooks() -> None:
    """The body hooks see only the bytes the chain asks for (complete only when that is the
    whole body); response hooks change headers; message hooks run in order."""
    peek = BodyPeek()
    runner = ChainRunner(peek, Stamp(), RouteFilter("words", Words(), drop_refused=True))
    assert runner.body(b"EVIL and more").status == 403
    assert runner.body(b"ok").passed
    assert peek.seen == [(b"EVIL", False), (b"ok", True)]
    assert runner.response(201, [(b"A", b"b")]) == [(b"A", b"b"), (b"X-Stamp", b"201")]
    assert runner.message("a bad word") == DROP and runner.message("fine") is None
