"""The filter chain: order, decisions, error isolation, report mode, counters, the
rewrite, response and body hooks — on in-memory transports with a fake filter kind."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproxy.config import load_config
from chatproxy.filters import DROP, Answer, CloseSession, Filter, IFilterFactory, IRequestFilter, Refuse, Rewrite
from chatproxy.filters.chain import FilterChain, RouteFilter
from chatproxy.http.messages import RequestHead
from chatproxy.testing import request_head
from chatproxy.proxy.validate import validate
from chatproxy.proxy.front import FrontFactory
from chatproxy.proxy.core import ProxyCore

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream: yes\r\n\r\nok"


@implementer(IRequestFilter)
class Scripted:
    """A filter whose request hook returns what its ``behaviour`` option says."""

    def __init__(self, name: str, behaviour: str, calls: list[str]) -> None:
        self.name = name
        self.behaviour = behaviour
        self.calls = calls
        self.pending: defer.Deferred[Any] | None = None

    def request(self, head: Any) -> Any:
        self.calls.append(self.name)
        match self.behaviour:
            case "pass":
                return None
            case "refuse":
                return Refuse(403, f"refused by {self.name}", ((b"X-Refused-By", self.name.encode()),))
            case "answer":
                return Answer(200, b"answered", ((b"Content-Type", b"text/plain"),))
            case "raise":
                raise RuntimeError("filter bug")
            case "garbage":
                return 42
            case "rewrite":
                return Rewrite(set=((b"X-Tenant", b"acme"),), remove=frozenset({b"x-secret"}))
            case "deferred":
                self.pending = defer.Deferred()
                return self.pending
        raise AssertionError(self.behaviour)


@implementer(IRequestFilter)
class BodyInspector:
    """Refuses requests whose first ``limit`` body bytes contain ``EVIL``; records what it saw."""

    def __init__(self, limit: int, seen: list[tuple[bytes, bool]]) -> None:
        self.inspect_body_bytes = limit
        self.seen = seen

    def request(self, head: Any) -> None:
        return None

    def request_body(self, head: Any, body: bytes, complete: bool) -> Any:
        self.seen.append((body, complete))
        return Refuse(403, "evil body") if b"EVIL" in body else None


@implementer(IRequestFilter)
class ResponseStamper:
    """Adds a header to every response head and removes ``X-Upstream``."""

    def request(self, head: Any) -> None:
        return None

    def response(self, head: Any, status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [h for h in headers if h[0].lower() != b"x-upstream"] + [(b"X-Stamped", b"%d" % status)]


class ResponseInspector(Filter):
    """Holds responses of ``types`` (all when empty) for their first ``limit`` body bytes;
    refuses those containing ``LEAK``; records what it saw; ``later``: decides when the
    test fires :attr:`pending`; ``raise``: its hook raises."""

    def __init__(self, limit: int, types: str, how: str, seen: list[tuple[bytes, bool]]) -> None:
        self.inspect_response_bytes = limit
        self.inspect_response_types = frozenset(t.encode() for t in types.split())
        self.how = how
        self.seen = seen
        self.pending: defer.Deferred[Any] | None = None

    def response_body(self, head: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                      complete: bool) -> Any:
        self.seen.append((body, complete))
        if self.how == "raise":
            raise RuntimeError("response body hook bug")
        decision = Refuse(403, "leak", note="outbound") if b"LEAK" in body else None
        if self.how == "later":
            self.pending = defer.Deferred()
            self.pending.addCallback(lambda _: decision)
            return self.pending
        return decision


class BrokenResponse(Filter):
    """A filter whose response hook raises (a bug)."""

    def response(self, head: Any, status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        raise RuntimeError("response hook bug")


@implementer(IFilterFactory)
class Kind:
    """A fake filter kind building the filters above from options."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.built: dict[str, Any] = {}
        self.seen: list[tuple[bytes, bool]] = []

    def build(self, options: Any) -> Any:
        label = options["label"]
        behaviour = options["behaviour"]
        if behaviour == "body":
            flt: Any = BodyInspector(int(options["limit"]), self.seen)
        elif behaviour == "stamp":
            flt = ResponseStamper()
        elif behaviour == "stamp-raise":
            flt = BrokenResponse()
        elif behaviour == "inspect":
            flt = ResponseInspector(int(options["limit"]), options.get("types", ""), options.get("how", "now"),
                                    self.seen)
        else:
            flt = Scripted(label, behaviour, self.calls)
        self.built[label] = flt
        return flt


class Chain:
    """A ProxyCore on a memory reactor whose route runs the filters given as (label, behaviour, mode)."""

    def __init__(self, tmp_path: Path, filters: list[tuple[str, str, str]], extra: str = "") -> None:
        sections = "".join(
            f"[filter:{label}]\nuse = scripted\nlabel = {label}\nbehaviour = {behaviour}\nmode = {mode}\n{extra}\n"
            for label, behaviour, mode in filters
        )
        path = tmp_path / "chain.ini"
        path.write_text(
            "[chatproxy]\naccess_log = off\n[listen:main]\nendpoint = tcp:8080:interface=127.0.0.1\n"
            "[upstream:app]\nservers = http://127.0.0.1:9901\n"
            f"[route:all]\npath = /\nupstream = app\nfilters = {', '.join(f[0] for f in filters)}\n" + sections
        )
        self.kind = Kind()
        self.config = load_config([path])
        self.reactor = MemoryReactorClock()
        self.core = ProxyCore(self.reactor, self.config, validate(self.config, {"scripted": self.kind}))
        factory = FrontFactory(self.core, self.config.listeners["main"])
        self.front = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        self.client = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
                                      peerAddress=IPv4Address("TCP", "192.0.2.7", 40000), lenient=True)
        self.front.makeConnection(self.client)

    def send(self, data: bytes) -> None:
        """Bytes from the client."""
        self.front.dataReceived(data)

    def upstream(self) -> tuple[Any, StringTransport]:
        """Complete the pending upstream connection."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        wire = StringTransport(peerAddress=IPv4Address("TCP", host, port), lenient=True)
        protocol.makeConnection(wire)
        return protocol, wire


GET = b"GET /x HTTP/1.1\r\nHost: chat.example\r\n\r\n"


def test_filters_run_in_order_and_the_first_refusal_stops_the_chain(tmp_path):
    """Filters run in the route's order; a refusal answers the client with its status, body and
    headers, the later filters are not called, and no upstream connection is opened."""
    chain = Chain(tmp_path, [("a", "pass", "enforce"), ("b", "refuse", "enforce"), ("c", "pass", "enforce")])
    chain.send(GET)
    assert chain.kind.calls == ["a", "b"]
    reply = chain.client.value()
    assert reply.startswith(b"HTTP/1.1 403 ")
    assert b"X-Refused-By: b\r\n" in reply and reply.endswith(b"refused by b\n")
    assert not chain.reactor.tcpClients
    assert chain.core.filter_counters["a:passed"] == 1 and chain.core.filter_counters["b:refused"] == 1
    assert chain.core.filter_counters["c:passed"] == 0


@pytest.mark.parametrize("behaviour", ["raise", "garbage"])
def test_a_broken_filter_refuses_with_500_and_the_connection_lives_on(tmp_path, behaviour):
    """A filter that raises (or returns something that is not a decision) gets the request a 500;
    the error is counted, and the same keep-alive connection serves the next request."""
    chain = Chain(tmp_path, [("broken", behaviour, "enforce")])
    chain.send(GET)
    assert chain.client.value().startswith(b"HTTP/1.1 500 ")
    assert not chain.client.disconnecting
    assert chain.core.filter_counters["broken:error"] == 1
    chain.client.clear()
    chain.send(GET)
    assert chain.client.value().startswith(b"HTTP/1.1 500 ")
    assert chain.core.filter_counters["broken:error"] == 2


def test_report_mode_logs_and_counts_but_lets_the_request_through(tmp_path):
    """A refusing filter in mode = report does not refuse: the request reaches the upstream and the
    outcome is counted as reported."""
    chain = Chain(tmp_path, [("dry", "refuse", "report"), ("after", "pass", "enforce")])
    chain.send(GET)
    _, wire = chain.upstream()
    assert wire.value().startswith(b"GET /x HTTP/1.1\r\n")
    assert chain.kind.calls == ["dry", "after"]
    assert chain.core.filter_counters["dry:reported"] == 1
    assert chain.core.filter_counters["dry:refused"] == 0


def test_an_answer_is_sent_as_the_response(tmp_path):
    """A filter's Answer is the client's response, with its own headers and a Content-Length."""
    chain = Chain(tmp_path, [("reply", "answer", "enforce")])
    chain.send(GET)
    reply = chain.client.value()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 8\r\n" in reply and reply.endswith(b"\r\n\r\nanswered")
    assert chain.core.filter_counters["reply:answered"] == 1


def test_a_deferred_decision_holds_the_request_until_it_fires(tmp_path):
    """A filter returning a Deferred: nothing is forwarded until it fires with None, then the
    request goes on to the next filter and the upstream."""
    chain = Chain(tmp_path, [("slow", "deferred", "enforce"), ("next", "pass", "enforce")])
    chain.send(GET)
    assert chain.kind.calls == ["slow"] and not chain.reactor.tcpClients
    chain.kind.built["slow"].pending.callback(None)
    assert chain.kind.calls == ["slow", "next"]
    _, wire = chain.upstream()
    assert wire.value().startswith(b"GET /x ")


def test_a_failed_deferred_refuses_with_500(tmp_path):
    """A filter whose Deferred fails gets the request a 500, counted as an error."""
    chain = Chain(tmp_path, [("slow", "deferred", "enforce")])
    chain.send(GET)
    chain.kind.built["slow"].pending.errback(RuntimeError("lookup failed"))
    assert chain.client.value().startswith(b"HTTP/1.1 500 ")
    assert chain.core.filter_counters["slow:error"] == 1


def test_a_rewrite_changes_what_is_forwarded_and_the_client_cannot_undo_it(tmp_path):
    """A Rewrite sets and removes request headers before forwarding; a client naming the set header
    in its Connection header cannot get it dropped as hop-by-hop."""
    chain = Chain(tmp_path, [("tenant", "rewrite", "enforce")])
    chain.send(b"GET /x HTTP/1.1\r\nHost: chat.example\r\nX-Secret: s3cret\r\nX-Tenant: evil\r\n"
               b"Connection: keep-alive, X-Tenant\r\n\r\n")
    _, wire = chain.upstream()
    sent = wire.value()
    assert b"X-Tenant: acme\r\n" in sent
    assert b"evil" not in sent and b"X-Secret" not in sent


def test_response_hook_changes_the_response_head(tmp_path):
    """A filter's response hook sees the upstream's response head and its header list is what the
    client gets (framing kept)."""
    chain = Chain(tmp_path, [("stamp", "stamp", "enforce")])
    chain.send(GET)
    upstream, _ = chain.upstream()
    upstream.dataReceived(OK)
    reply = chain.client.value()
    assert b"X-Stamped: 200\r\n" in reply and b"X-Upstream" not in reply
    assert b"Content-Length: 2\r\n" in reply and reply.endswith(b"\r\n\r\nok")


def _body_chain(tmp_path: Path, limit: int) -> Chain:
    return Chain(tmp_path, [("body", "body", "enforce")], extra=f"limit = {limit}\n")


def test_body_hook_refuses_before_anything_reaches_the_upstream(tmp_path):
    """A body filter sees the first inspect_body_bytes of the body before the request is forwarded;
    its refusal answers the client and no upstream connection is made."""
    chain = _body_chain(tmp_path, 16)
    chain.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 40\r\n\r\n0123456789EVIL")
    assert chain.kind.seen == [] and not chain.reactor.tcpClients  # 14 bytes: still collecting
    chain.send(b"abcdefghij" + b"z" * 16)
    assert chain.kind.seen == [(b"0123456789EVILab", False)]
    assert chain.client.value().startswith(b"HTTP/1.1 403 ")
    assert not chain.reactor.tcpClients


def test_body_hook_passes_and_the_whole_body_is_forwarded_in_order(tmp_path):
    """A body the filter passes is forwarded whole, the inspected bytes first, the rest streamed."""
    chain = _body_chain(tmp_path, 8)
    chain.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 20\r\n\r\nhello, ")
    chain.send(b"world! 123456")
    assert chain.kind.seen == [(b"hello, w", False)]
    _, wire = chain.upstream()
    assert wire.value().endswith(b"\r\n\r\nhello, world! 123456")


def test_body_hook_sees_a_short_body_whole(tmp_path):
    """A body shorter than inspect_body_bytes is inspected once complete, marked complete."""
    chain = _body_chain(tmp_path, 1024)
    chain.send(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chain.kind.seen == [(b"hello", True)]
    _, wire = chain.upstream()
    assert b"Transfer-Encoding: chunked\r\n" in wire.value() and wire.value().endswith(b"5\r\nhello\r\n0\r\n\r\n")


def test_body_hook_answers_expect_continue_before_reading(tmp_path):
    """With Expect: 100-continue the proxy says 100 Continue before collecting the body to inspect,
    and only once."""
    chain = _body_chain(tmp_path, 4)
    chain.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nExpect: 100-continue\r\n\r\n")
    assert chain.client.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    chain.send(b"benign")
    upstream, wire = chain.upstream()
    assert wire.value().endswith(b"\r\n\r\nbenign") and b"Expect" not in wire.value()
    upstream.dataReceived(OK)
    assert chain.client.value().count(b"100 Continue") == 1


def test_response_hooks_see_the_proxys_own_answers_on_the_route(tmp_path):
    """The route's response hooks also run on the answers the proxy makes for a routed request:
    a filter's refusal and a 502 for an upstream that cannot be reached carry the stamp."""
    chain = Chain(tmp_path, [("stamp", "stamp", "enforce"), ("b", "refuse", "enforce")])
    chain.send(GET)
    reply = chain.client.value()
    assert reply.startswith(b"HTTP/1.1 403 ") and b"X-Stamped: 403\r\n" in reply
    other = Chain(tmp_path, [("stamp", "stamp", "enforce")])
    other.send(GET)
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure

    _host, _port, factory, _timeout, _bind = other.reactor.tcpClients.pop(0)
    factory.clientConnectionFailed(other.reactor.connectors.pop(0), Failure(ConnectionRefusedError()))
    reply = other.client.value()
    assert reply.startswith(b"HTTP/1.1 502 ") and b"X-Stamped: 502\r\n" in reply


def test_a_failing_response_hook_answers_500_instead(tmp_path):
    """A response hook that raises fails closed, like the request hooks: the client gets 500
    instead of the upstream's response, the upstream connection is given up, the error is
    counted under the filter's name."""
    chain = Chain(tmp_path, [("broken", "stamp-raise", "enforce")])
    chain.send(GET)
    upstream, wire = chain.upstream()
    upstream.dataReceived(OK)
    reply = chain.client.value()
    assert reply.startswith(b"HTTP/1.1 500 ") and b"X-Upstream" not in reply and b"ok" not in reply.split(b"\r\n\r\n")[1]
    assert chain.core.filter_counters["broken:error"] == 1
    assert wire.disconnecting


def test_report_mode_response_hook_changes_nothing(tmp_path):
    """A response hook in report mode is run, counted as reported, and the response goes out
    as the upstream sent it."""
    chain = Chain(tmp_path, [("stamp", "stamp", "report")])
    chain.send(GET)
    upstream, _ = chain.upstream()
    upstream.dataReceived(OK)
    reply = chain.client.value()
    assert b"X-Upstream: yes\r\n" in reply and b"X-Stamped" not in reply
    assert chain.core.filter_counters["stamp:reported"] == 1


def _head() -> RequestHead:
    return request_head("/ws", host="chat.example", client="192.0.2.7", tls=False, route="all")


class _Messages(Filter):
    """A Filter subclass with only a message hook: refuses messages containing ``bad``."""

    def __init__(self, behaviour: str = "refuse") -> None:
        self.behaviour = behaviour
        self.seen: list[bytes] = []

    def message(self, head: Any, payload: bytes, binary: bool, upward: bool) -> Any:
        self.seen.append(payload)
        if self.behaviour == "raise":
            raise RuntimeError("message hook bug")
        if self.behaviour == "garbage":
            return 7
        return CloseSession(4400, "bad word") if b"bad" in payload else None


@pytest.mark.parametrize("behaviour, report, drop, verdict, counted", [
    ("refuse", False, False, CloseSession(4400, "bad word"), "refused"),
    ("refuse", False, True, DROP, "refused"),
    ("refuse", True, False, None, "reported"),
    ("raise", False, False, CloseSession(1011, "internal filter error"), "error"),
    ("garbage", False, False, CloseSession(1011, "internal filter error"), "error"),
])
def test_message_hook_rules(behaviour, report, drop, verdict, counted):
    """The chain's message hook: a refusal closes the session with the filter's code, or drops
    the message with refused_message = drop; report mode relays it; a failing hook closes with
    1011; each counted under the filter's name.  A message that passes is relayed (None)."""
    from collections import Counter

    counters: Counter[str] = Counter()
    flt = _Messages(behaviour)
    chain = FilterChain([RouteFilter("words", flt, report, drop)], counters)
    assert chain.sees_messages and not chain.sees_responses and chain.inspect_body_bytes == 0
    assert chain.message(_head(), b"this is bad", False, True) == verdict
    assert counters[f"words:{counted}"] == 1
    if behaviour == "refuse":
        assert chain.message(_head(), b"fine", False, True) is None


class _Later(Filter):
    """A message hook whose verdicts come later: each call returns a Deferred kept in ``pending``."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[Any]] = []

    def message(self, head: Any, payload: bytes, binary: bool, upward: bool) -> Any:
        self.pending.append(defer.Deferred())
        return self.pending[-1]


def test_message_hook_may_answer_later():
    """A message hook may return a Deferred: the chain's verdict is then a Deferred too, the
    hooks after it run only once it has fired (and not at all when it refused), and a hook
    whose Deferred fails closes the session with 1011, counted as an error."""
    counters: Counter[str] = Counter()
    later, words = _Later(), _Messages()
    chain = FilterChain([RouteFilter("later", later), RouteFilter("words", words)], counters)
    results: list[Any] = []
    chain.message(_head(), b"this is bad", False, True).addCallback(results.append)
    assert results == [] and words.seen == []
    later.pending[0].callback(None)
    assert results == [CloseSession(4400, "bad word")] and words.seen == [b"this is bad"]
    chain.message(_head(), b"fine", False, True).addCallback(results.append)
    later.pending[1].callback(CloseSession(1008, "later"))
    assert results[1] == CloseSession(1008, "later") and words.seen == [b"this is bad"]
    chain.message(_head(), b"fine", False, True).addCallback(results.append)
    later.pending[2].errback(RuntimeError("engine gone"))
    assert results[2] == CloseSession(1011, "internal filter error") and counters["later:error"] == 1


def test_only_the_hooks_a_filter_overrides_are_called():
    """A Filter subclass's hooks left as the base class defines them are not called by the
    chain: a filter with only a message hook sees no response heads and holds no body."""
    from collections import Counter

    chain = FilterChain([RouteFilter("words", _Messages())], Counter())
    assert chain.sees_messages and not chain.sees_responses
    assert chain.inspect_body_bytes == 0 and chain.max_body_bytes is None
    headers = [(b"X-A", b"1")]
    assert chain.response(_head(), 200, headers) is headers


def test_body_hook_sees_an_empty_chunked_body(tmp_path):
    """A request whose head announced a body (chunked) gets the body hooks even when the
    body is empty, so a filter that leaves such requests to its body hook sees them."""
    chain = _body_chain(tmp_path, 1024)
    chain.send(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert chain.kind.seen == [(b"", True)]


def test_a_refusals_note_is_on_the_head_in_both_modes():
    """A Refuse's note is added to the head's notes under the filter's name, whether the
    refusal ends the request or, in report mode, is only logged."""
    noting = Scripted("noting", "pass", [])
    noting.request = lambda head: Refuse(403, "no", note="score=5 rules=1,2")  # type: ignore[method-assign]
    done: list[tuple[Any, RequestHead]] = []
    for report in (False, True):
        FilterChain([RouteFilter("waf", noting, report=report)], Counter()).request(
            request_head(), lambda decision, head: done.append((decision, head)))
    assert [head.notes for _, head in done] == [(("waf", "score=5 rules=1,2"),)] * 2
    assert done[0][0].status == 403 and done[1][0] is None


# ---------------------------------------------------------------------------
# The response body hook: responses held until the hooks let them go


def _inspect_chain(tmp_path: Path, limit: int, types: str = "", how: str = "now", mode: str = "enforce") -> Chain:
    return Chain(tmp_path, [("leaks", "inspect", mode)], extra=f"limit = {limit}\ntypes = {types}\nhow = {how}\n")


def _page(body: bytes, content_type: bytes = b"text/html", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: %d\r\n\r\n" % size + body


def test_a_response_is_held_until_the_hook_has_seen_its_first_bytes(tmp_path):
    """Nothing of a response reaches the client before the response body hook has seen its
    first inspect_response_bytes; the upstream is not read while the hook decides; once it
    passes, the head, the held bytes and the rest follow in order and the connection stays
    open for the next request."""
    chain = _inspect_chain(tmp_path, 16, how="later")
    chain.send(GET)
    upstream, wire = chain.upstream()
    upstream.dataReceived(_page(b"0123456789", length=40))
    assert chain.client.value() == b"" and chain.kind.seen == []
    upstream.dataReceived(b"abcdefghij")
    assert chain.kind.seen == [(b"0123456789abcdef", False)]
    assert chain.client.value() == b"" and wire.producerState == "paused"
    inspector = chain.kind.built["leaks"]
    inspector.pending.callback(None)
    assert wire.producerState == "producing"
    upstream.dataReceived(b"z" * 20)
    reply = chain.client.value()
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\n0123456789abcdefghij" + b"z" * 20)
    assert not chain.client.disconnecting


def test_a_refused_response_is_replaced_and_the_upstream_connection_closed(tmp_path):
    """A response the hook refuses before it was complete is replaced by the refusal (its
    bytes never reach the client) and the upstream connection is closed, not reused; the
    refusal's note is in the access-log record."""
    chain = _inspect_chain(tmp_path, 8)
    chain.send(GET)
    upstream, wire = chain.upstream()
    upstream.dataReceived(_page(b"LEAK1234", length=100))
    reply = chain.client.value()
    assert reply.startswith(b"HTTP/1.1 403 ") and reply.endswith(b"\r\n\r\nleak\n") and b"LEAK" not in reply
    assert wire.disconnecting
    assert chain.core.filter_counters["leaks:refused"] == 1


def test_a_short_response_is_inspected_whole(tmp_path):
    """A response shorter than the limit is inspected once complete (marked complete); a
    refusal answers the client on the same connection."""
    chain = _inspect_chain(tmp_path, 1024)
    chain.send(GET)
    upstream, wire = chain.upstream()
    upstream.dataReceived(_page(b"a LEAK"))
    assert chain.kind.seen == [(b"a LEAK", True)]
    assert chain.client.value().startswith(b"HTTP/1.1 403 ") and not chain.client.disconnecting
    assert not wire.disconnecting  # the upstream's response was complete: its connection may be reused


def test_only_the_inspected_media_types_are_held(tmp_path):
    """With inspect_response_types, a response of another media type is relayed at once; one
    of an inspected type (parameters and case aside) is held."""
    chain = _inspect_chain(tmp_path, 64, types="text/html text/plain")
    chain.send(GET)
    upstream, _ = chain.upstream()
    upstream.dataReceived(_page(b"LEAK", b"application/octet-stream"))
    assert chain.client.value().endswith(b"\r\n\r\nLEAK") and chain.kind.seen == []
    chain.client.clear()
    chain.send(GET)
    upstream.dataReceived(_page(b"LEAK", b"Text/Plain; charset=utf-8"))
    assert chain.kind.seen == [(b"LEAK", True)] and chain.client.value().startswith(b"HTTP/1.1 403 ")


def test_responses_without_a_body_are_inspected_and_report_mode_lets_leaks_through(tmp_path):
    """A HEAD response goes through the hook with an empty, complete body; in report mode a
    leaking response reaches the client unchanged and is counted as reported."""
    chain = _inspect_chain(tmp_path, 64, mode="report")
    chain.send(b"HEAD /x HTTP/1.1\r\nHost: chat.example\r\n\r\n")
    upstream, _ = chain.upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\n")
    assert chain.kind.seen == [(b"", True)]
    assert chain.client.value().startswith(b"HTTP/1.1 200 ")
    chain.client.clear()
    chain.send(GET)
    upstream, _ = chain.upstream()  # a HEAD response's connection is not reused
    upstream.dataReceived(_page(b"LEAK"))
    assert chain.client.value().endswith(b"\r\n\r\nLEAK")
    assert chain.core.filter_counters["leaks:reported"] == 1


def test_a_failing_response_body_hook_answers_500_and_a_gone_client_abandons_the_upstream(tmp_path):
    """A response body hook that raises fails closed (500 instead of the response, counted as
    an error); a client that goes away while its response is held ends the exchange and the
    upstream connection when the hook later decides."""
    chain = _inspect_chain(tmp_path, 4, how="raise")
    chain.send(GET)
    upstream, wire = chain.upstream()
    upstream.dataReceived(_page(b"hello", length=50))
    assert chain.client.value().startswith(b"HTTP/1.1 500 ") and wire.disconnecting
    assert chain.core.filter_counters["leaks:error"] == 1
    later = _inspect_chain(tmp_path, 4, how="later")
    later.send(GET)
    upstream, wire = later.upstream()
    upstream.dataReceived(_page(b"hello", length=50))
    later.front.connectionLost(Failure(ConnectionDone()))
    assert wire.disconnecting
    later.kind.built["leaks"].pending.callback(None)
    assert later.client.value() == b""
