"""Fast, deterministic unit tests of FrontConnection / ProxyCore with Twisted's
in-memory tools: a MemoryReactorClock (timeouts advance without sleeping),
StringTransports for the client side and for fake upstream connections."""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import zlib
from pathlib import Path
from typing import Any

import httptools
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from chatproxy.config import load_config
from chatproxy.proxy.front import FrontConnection, FrontFactory
from chatproxy.proxy.core import ProxyCore

OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"


def ok(body: bytes) -> bytes:
    """A complete upstream 200 response with ``body``."""
    return OK % (len(body), body)


class Harness:
    """A ProxyCore on a memory reactor, with helpers to drive clients and fake upstreams."""

    def __init__(self, tmp_path: Path, settings: str = "", upstream_extra: str = "", routes: str | None = None) -> None:
        config_path = tmp_path / "chatproxy.ini"
        config_path.write_text(
            f"[chatproxy]\naccess_log = off\n{settings}\n\n"
            "[listen:main]\nendpoint = tcp:8080:interface=127.0.0.1\n\n"
            f"[upstream:app]\nservers = http://127.0.0.1:9901\n{upstream_extra}\n\n"
            + (routes if routes is not None else "[route:all]\npath = /\nupstream = app\n")
        )
        self.config = load_config([config_path])
        self.reactor = MemoryReactorClock()
        self.core = ProxyCore(self.reactor, self.config)
        self.core.start()
        self.factory = FrontFactory(self.core, self.config.listeners["main"])
        self.accepted: list[tuple[Any, StringTransport]] = []

    def client(self, peer: str = "192.0.2.10") -> tuple[FrontConnection, StringTransport]:
        """A new client connection to the listener."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
                                    peerAddress=IPv4Address("TCP", peer, 40000), lenient=True)
        protocol.makeConnection(transport)
        return protocol, transport

    @property
    def pending_connects(self) -> int:
        """How many upstream connections were asked for and not yet completed."""
        return len(self.reactor.tcpClients)

    def accept_upstream(self) -> tuple[Any, StringTransport]:
        """Complete the oldest pending upstream connection; returns its protocol and transport."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        assert (host, port) == ("127.0.0.1", 9901)
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 50000 + len(self.accepted)),
                                    peerAddress=IPv4Address("TCP", host, port), lenient=True)
        transport.protocol = protocol  # as a TCP connection names the protocol it delivers reads to
        protocol.makeConnection(transport)
        self.accepted.append((protocol, transport))
        return protocol, transport

    def refuse_upstream(self) -> None:
        """Fail the oldest pending upstream connection (connection refused)."""
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients.pop(0)
        connector = self.reactor.connectors.pop(0)
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let ``seconds`` pass on the memory clock, in small steps (sweeps run as they would)."""
        steps = int(round(seconds / step))
        for _ in range(steps):
            self.reactor.advance(step)


@pytest.fixture
def make(tmp_path: Path) -> Any:
    """Build a Harness (settings, upstream options and routes as INI text)."""
    def build(**kwargs: Any) -> Harness:
        return Harness(tmp_path, **kwargs)
    return build


class _Collector:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._current: dict[str, Any] = {}

    def on_message_begin(self) -> None:
        self._current = {"headers": [], "body": b""}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current["headers"].append((name.decode().lower(), value.decode()))

    def on_headers_complete(self) -> None:
        self._current["status"] = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current["body"] += body

    def on_message_complete(self) -> None:
        self.messages.append(self._current)


def responses(data: bytes) -> list[dict[str, Any]]:
    """The complete responses in ``data`` (status, lower-cased headers, body)."""
    collector = _Collector()
    parser = httptools.HttpResponseParser(collector)
    collector._parser = parser  # type: ignore[attr-defined]
    parser.feed_data(data)
    return collector.messages


def header(message: dict[str, Any], name: str) -> str | None:
    """One header of a parsed response."""
    return next((v for k, v in message["headers"] if k == name), None)


def request_heads(data: bytes) -> list[bytes]:
    """The request lines written to a fake upstream, in order."""
    return re.findall(rb"(?:GET|HEAD|POST|PUT|DELETE|OPTIONS) [^ \r\n]+ HTTP/1\.1", data)


# ---------------------------------------------------------------------------
# Pipelining and keep-alive


def test_pipelined_requests_are_processed_one_at_a_time_in_order(make):
    """Three pipelined requests: one upstream exchange at a time, each started only after the
    previous answer, over the same pooled connection; responses come out in request order."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
                       b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                       b"GET /three HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.pending_connects == 1
    upstream, wire = h.accept_upstream()
    assert request_heads(wire.value()) == [b"GET /one HTTP/1.1"]
    assert client.value() == b""
    # Later requests are parsed, but reading from the client pauses.
    assert client.producerState == "paused"
    upstream.dataReceived(ok(b"first"))
    assert [m["body"] for m in responses(client.value())] == [b"first"]
    assert request_heads(wire.value()) == [b"GET /one HTTP/1.1", b"POST /two HTTP/1.1"]
    assert wire.value().endswith(b"\r\n\r\nabc")
    assert h.pending_connects == 0  # the pooled connection was reused
    upstream.dataReceived(ok(b"second"))
    upstream.dataReceived(ok(b"third"))
    assert [m["body"] for m in responses(client.value())] == [b"first", b"second", b"third"]
    assert request_heads(wire.value())[-1] == b"GET /three HTTP/1.1"
    assert not client.disconnecting
    assert client.producerState == "producing"
    assert h.core.pools["app"].servers[0].idle_count == 1


def test_keep_alive_connection_reads_the_next_request(make):
    """After a complete exchange the client connection stays open and the next request is
    served over the pooled upstream connection."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(ok(b"A"))
    front.dataReceived(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.pending_connects == 0
    upstream.dataReceived(ok(b"B"))
    assert [m["body"] for m in responses(client.value())] == [b"A", b"B"]
    assert not client.disconnecting


def test_connection_close_request_closes_after_the_response(make):
    """A request with Connection: close gets its response with Connection: close, then the
    connection is closed."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    upstream, wire = h.accept_upstream()
    head_lines = wire.value().split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    assert not [line for line in head_lines if line.lower().startswith(b"connection:")]
    upstream.dataReceived(ok(b"bye"))
    [message] = responses(client.value())
    assert message["body"] == b"bye" and header(message, "connection") == "close"
    assert client.disconnecting


# ---------------------------------------------------------------------------
# Timeouts on the memory clock


def test_header_timeout_fires_on_a_partial_head(make):
    """A partial request head: nothing happens before header_timeout, then 408 and close;
    no upstream connection is ever made."""
    h = make(settings="header_timeout = 2\nidle_timeout = 30")
    front, client = h.client()
    front.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a\r\n")
    h.advance(1.5)
    assert client.value() == b"" and not client.disconnecting
    front.dataReceived(b"X-More: 1\r\n")  # more bytes do not restart the clock
    h.advance(1.0)
    [message] = responses(client.value())
    assert message["status"] == 408
    assert client.disconnecting
    assert h.pending_connects == 0


def test_header_timeout_for_a_silent_connection(make):
    """A client that connects and sends nothing is answered 408 and closed at header_timeout."""
    h = make(settings="header_timeout = 1\nidle_timeout = 30")
    _front, client = h.client()
    h.advance(0.8)
    assert not client.disconnecting
    h.advance(0.5)
    assert responses(client.value())[0]["status"] == 408
    assert client.disconnecting


def test_close_reads_on_and_aborts_a_close_the_peer_never_completes(make):
    """close() makes a transport paused for any reason read again (a TLS
    transport sends close_notify and waits for the peer's: unread, it would
    never come), and nothing pauses it again; a connection still there
    close_timeout after close() is aborted, one that ends before is not."""
    h = make(settings="header_timeout = 30\nclose_timeout = 3")
    front, client = h.client()
    front.pause_reading("upstream")
    assert client.producerState == "paused"
    front.close()
    assert client.disconnecting and client.producerState == "producing"
    front.pause_reading("websocket")
    assert client.producerState == "producing"
    h.advance(2.5)
    assert not client.disconnected
    h.advance(1)
    assert client.disconnected  # aborted
    front2, client2 = h.client()
    front2.close()
    front2.connectionLost(Failure(ConnectionDone()))
    h.advance(4)
    assert not client2.disconnected


def test_idle_timeout_closes_a_quiet_keep_alive_connection(make):
    """After an exchange, a keep-alive connection with no new request is closed at
    idle_timeout (silently: no response is written)."""
    h = make(settings="header_timeout = 1\nidle_timeout = 5")
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _wire = h.accept_upstream()
    h.advance(3)  # waiting for the upstream is not idleness
    upstream.dataReceived(ok(b"A"))
    written = client.value()
    h.advance(4)
    assert not client.disconnecting
    h.advance(1.5)
    assert client.disconnecting
    assert client.value() == written


def test_a_new_request_head_on_a_kept_alive_connection_gets_the_header_timeout(make):
    """A request head that starts on an idle connection must complete within header_timeout."""
    h = make(settings="header_timeout = 1\nidle_timeout = 30")
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _wire = h.accept_upstream()
    upstream.dataReceived(ok(b"A"))
    front.dataReceived(b"GET /b HTTP/1.1\r\n")
    h.advance(1.5)
    assert [m["status"] for m in responses(client.value())] == [200, 408]
    assert client.disconnecting


def test_stalled_request_body_gets_408(make):
    """A request body that stops arriving for idle_timeout: 408, the upstream connection is
    dropped and the client connection closed."""
    h = make(settings="idle_timeout = 5")
    front, client = h.client()
    front.dataReceived(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    upstream, wire = h.accept_upstream()
    h.advance(4)
    front.dataReceived(b"de")  # progress restarts the body clock
    h.advance(4)
    assert client.value() == b""
    h.advance(1.5)
    assert [m["status"] for m in responses(client.value())] == [408]
    assert client.disconnecting and wire.disconnected


def test_pipelined_body_waiting_behind_a_slow_exchange_does_not_time_out(make):
    """A pipelined POST whose body the proxy stops reading while an earlier slow exchange runs
    is not blamed for the wait: once its turn comes, the body is read and forwarded."""
    h = make(settings="idle_timeout = 5", upstream_extra="response_timeout = 60")
    front, client = h.client()
    front.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
                       b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    upstream, wire = h.accept_upstream()
    h.advance(12)
    assert client.value() == b"" and not client.disconnecting
    upstream.dataReceived(ok(b"slow"))
    assert client.producerState == "producing"
    front.dataReceived(b"defghij")
    assert request_heads(wire.value()) == [b"GET /slow HTTP/1.1", b"POST /two HTTP/1.1"]
    assert wire.value().endswith(b"\r\n\r\nabcdefghij")
    upstream.dataReceived(ok(b"two"))
    assert [m["body"] for m in responses(client.value())] == [b"slow", b"two"]
    assert not client.disconnecting


def test_response_timeout_gives_504_and_does_not_resend(make):
    """An upstream that does not answer within response_timeout: 504, the upstream
    connection is aborted, and the request is not sent again (even on a pooled connection)."""
    h = make(upstream_extra="response_timeout = 2")
    front, client = h.client()
    front.dataReceived(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(ok(b"warm"))
    front.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.pending_connects == 0
    h.advance(1.5)
    assert len(responses(client.value())) == 1
    h.advance(1.0)
    assert [m["status"] for m in responses(client.value())] == [200, 504]
    assert wire.disconnected
    assert h.pending_connects == 0


def test_upstream_stalling_mid_body_breaks_the_client_connection(make):
    """An upstream that stops sending mid-body for response_timeout: the client connection is
    closed without completing the body."""
    h = make(upstream_extra="response_timeout = 2")
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    h.advance(2.5)
    assert client.disconnecting
    assert responses(client.value()) == []
    assert wire.disconnected


# ---------------------------------------------------------------------------
# Malformed input and limits


@pytest.mark.parametrize(
    "payload",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost : a\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /a HTTP/1.1\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /a/%2f/b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a/..;/b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a?x=1#y HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
    ids=["request-line", "space-before-colon", "cl-and-te", "chunk-size", "no-host", "two-hosts",
         "encoded-slash", "dotdot-semicolon", "fragment", "asterisk"],
)
def test_malformed_request_gets_400_and_close(make, payload):
    """Malformed input is answered 400 with Connection: close, the connection is closed and
    a request pipelined after it is never forwarded."""
    h = make()
    front, client = h.client()
    front.dataReceived(payload + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    for _protocol, wire in [h.accept_upstream() for _ in range(h.pending_connects)]:
        assert b"smuggled" not in wire.value()
    messages = responses(client.value())
    assert [m["status"] for m in messages] == [400]
    assert header(messages[0], "connection") == "close"
    assert client.disconnecting


@pytest.mark.parametrize(
    ("settings", "payload", "status"),
    [
        ("max_headers = 5", b"GET /a HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(10)) + b"\r\n",
         431),
        ("max_header_bytes = 1k", b"GET /a HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n", 431),
        ("max_url_bytes = 64", b"GET /" + b"u" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        ("max_body_bytes = 10", b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", 413),
    ],
    ids=["too-many-headers", "head-too-large", "url-too-long", "content-length-too-large"],
)
def test_limits(make, settings, payload, status):
    """Over-limit requests get 431 / 414 / 413 and the connection is closed, without any
    upstream connection."""
    h = make(settings=settings)
    front, client = h.client()
    front.dataReceived(payload)
    messages = responses(client.value())
    assert [m["status"] for m in messages] == [status]
    assert client.disconnecting
    assert h.pending_connects == 0


def test_head_too_large_when_it_arrives_in_pieces(make):
    """A head growing past max_header_bytes in small pieces (one header never completing)
    is cut off with 431."""
    h = make(settings="max_header_bytes = 1k")
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\nX-Big: ")
    for _ in range(30):
        if client.disconnecting:
            break
        front.dataReceived(b"b" * 100)
    assert [m["status"] for m in responses(client.value())] == [431]
    assert client.disconnecting


def test_chunked_body_over_the_limit_gets_413(make):
    """A chunked body growing past max_body_bytes: 413, the upstream connection is dropped
    and the client connection closed."""
    h = make(settings="max_body_bytes = 100")
    front, client = h.client()
    front.dataReceived(b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    upstream, wire = h.accept_upstream()
    front.dataReceived(b"50\r\n" + b"x" * 80 + b"\r\n")
    assert client.value() == b""
    front.dataReceived(b"50\r\n" + b"x" * 80 + b"\r\n")
    assert [m["status"] for m in responses(client.value())] == [413]
    assert client.disconnecting
    assert wire.disconnected
    assert h.core.pools["app"].servers[0].idle_count == 0


# ---------------------------------------------------------------------------
# Upstream behaviour seen from the front


def test_expect_100_continue_is_sent_once_the_upstream_is_connected(make):
    """Expect: 100-continue: the client gets 100 Continue when the upstream connection is
    ready, the body is relayed, and the final response follows."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert client.value() == b""
    upstream, wire = h.accept_upstream()
    assert client.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"expect" not in wire.value().lower()
    front.dataReceived(b"data")
    assert wire.value().endswith(b"\r\n\r\ndata")
    upstream.dataReceived(ok(b"done"))
    assert [m["status"] for m in responses(client.value())] == [100, 200]


def test_truncated_chunked_response_is_not_completed(make):
    """An upstream that dies inside a chunked body: the client never gets the final
    zero-size chunk and its connection is closed."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    upstream.connectionLost(Failure(ConnectionLost()))
    data = client.value()
    assert b"hello" in data
    assert not data.endswith(b"0\r\n\r\n")
    assert responses(data) == []
    assert client.disconnecting


def test_truncated_body_for_an_http10_client_resets_the_connection(make):
    """For an HTTP/1.0 client a chunked upstream body is relayed delimited by the close, so
    when the upstream dies mid-body the client connection is reset (aborted), not closed
    cleanly, which would make the truncated body look complete."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.0\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert client.value().endswith(b"\r\n\r\nhello")
    upstream.connectionLost(Failure(ConnectionLost()))
    assert client.disconnected


def test_truncated_length_delimited_body_is_closed_after_what_was_sent(make):
    """With a Content-Length the client can tell a short body: the connection is closed after
    the bytes already relayed (so they reach the client), not reset."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    upstream.connectionLost(Failure(ConnectionLost()))
    assert client.disconnecting and not client.disconnected
    assert client.value().endswith(b"\r\n\r\n" + b"x" * 10)


def test_read_until_close_response_is_rechunked_and_completed(make):
    """An upstream body delimited by connection close is re-framed as chunked for an HTTP/1.1
    client and completed when the upstream closes; the client connection stays usable."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome ")
    upstream.dataReceived(b"bytes")
    upstream.connectionLost(Failure(ConnectionDone()))
    [message] = responses(client.value())
    assert message["body"] == b"some bytes"
    assert header(message, "transfer-encoding") == "chunked"
    assert not client.disconnecting
    assert h.core.pools["app"].servers[0].idle_count == 0


def test_client_gone_mid_response_aborts_the_upstream_connection(make):
    """A client that disconnects mid-response: its upstream connection is aborted and never
    pooled; the next client gets a new upstream connection."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    front.connectionLost(Failure(ConnectionLost()))
    assert wire.disconnected
    upstream.dataReceived(b"y" * 1000)  # late bytes change nothing
    upstream.connectionLost(Failure(ConnectionLost()))
    server = h.core.pools["app"].servers[0]
    assert server.idle_count == 0
    front2, client2 = h.client()
    front2.dataReceived(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.pending_connects == 1
    upstream2, wire2 = h.accept_upstream()
    upstream2.dataReceived(ok(b"fresh"))
    assert [m["body"] for m in responses(client2.value())] == [b"fresh"]


def test_slow_client_pauses_the_upstream(make):
    """When the client's transport asks the proxy to pause, reading from the upstream pauses,
    and resumes with it."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    front.pauseProducing()
    assert wire.producerState == "paused"
    front.resumeProducing()
    assert wire.producerState == "producing"
    upstream.dataReceived(b"67890")
    assert responses(client.value())[0]["body"] == b"1234567890"


def test_an_upstream_connection_is_resumed_only_where_it_was_paused(make):
    """Reading from an upstream connection is resumed only after a pause: a
    connection going back to the pool after an exchange nobody paused is left
    as it is (Twisted's resumeProducing is four Python calls), one paused
    while the client was slow is resumed once, and then not again as it is
    pooled."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    calls: list[str] = []
    wire.pauseProducing = lambda: calls.append("pause")  # type: ignore[method-assign]
    wire.resumeProducing = lambda: calls.append("resume")  # type: ignore[method-assign]
    upstream.dataReceived(ok(b"one"))
    assert h.core.pools["app"].servers[0].idle_count == 1 and calls == []
    front.dataReceived(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    front.pauseProducing()
    front.resumeProducing()
    assert calls == ["pause", "resume"]
    upstream.dataReceived(b"67890")
    assert calls == ["pause", "resume"] and h.core.pools["app"].servers[0].idle_count == 1
    assert [m["body"] for m in responses(client.value())] == [b"one", b"1234567890"]


def test_stale_pooled_connection_is_retried_for_idempotent_requests(make):
    """A pooled connection the server closed before answering: a GET is sent again on a new
    connection and succeeds; a POST with a body is not resent and gets 502."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _wire = h.accept_upstream()
    upstream.dataReceived(ok(b"warm"))
    front.dataReceived(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream.connectionLost(Failure(ConnectionDone()))
    assert h.pending_connects == 1
    upstream2, wire2 = h.accept_upstream()
    assert request_heads(wire2.value()) == [b"GET /again HTTP/1.1"]
    upstream2.dataReceived(ok(b"again"))
    front.dataReceived(b"POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    upstream2.connectionLost(Failure(ConnectionDone()))
    assert h.pending_connects == 0
    assert [m["status"] for m in responses(client.value())] == [200, 200, 502]


def test_unreachable_upstream_gives_502(make):
    """A refused upstream connection gives 502 and the client connection stays usable."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    h.refuse_upstream()
    [message] = responses(client.value())
    assert message["status"] == 502
    assert not client.disconnecting


def test_no_route_gives_404_without_an_upstream_connection(make):
    """A request matching no route gets 404 and no upstream connection is attempted."""
    h = make(routes="[route:app]\npath = /app/\nupstream = app\n")
    front, client = h.client()
    front.dataReceived(b"GET /app/../etc/passwd HTTP/1.1\r\nHost: a\r\n\r\nGET /apple HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [m["status"] for m in responses(client.value())] == [404, 404]
    assert h.pending_connects == 0
    assert not client.disconnecting


def test_forwarded_request_head(make):
    """The request head sent upstream: normalised path, raw query, hop-by-hop headers gone,
    X-Forwarded-* from the TCP peer (untrusted), Via, and the framing header."""
    h = make()
    front, client = h.client(peer="198.51.100.20")
    front.dataReceived(b"POST /x//y/./z?q=%2e%2E&r=a+b HTTP/1.1\r\nHost: Chat.Example.Test\r\n"
                       b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nTE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\n"
                       b"X-Keep: yes\r\nContent-Length: 2\r\n\r\nok")
    _upstream, wire = h.accept_upstream()
    head, _, body = wire.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /x/y/z?q=%2e%2E&r=a+b HTTP/1.1"
    names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    assert b"connection" not in names and b"x-drop" not in names and b"te" not in names
    assert b"X-Keep: yes" in lines
    assert b"Host: Chat.Example.Test" in lines
    assert b"X-Forwarded-For: 198.51.100.20" in lines
    assert b"X-Forwarded-Proto: http" in lines
    assert b"X-Forwarded-Host: Chat.Example.Test" in lines
    assert b"X-Forwarded-Port: 8080" in lines
    assert b"Via: 1.1 chatproxy" in lines
    assert b"Content-Length: 2" in lines
    assert body == b"ok"


def test_round_robin_skips_a_server_whose_connects_keep_failing(make):
    """Passive ejection: after three failed connection attempts in a row a server is skipped by
    round-robin for ten seconds, then tried again; the healthy one takes the traffic meanwhile."""
    h = make(routes="[upstream:two]\nservers = http://127.0.0.1:9901, http://127.0.0.1:9902\n"
                    "[route:all]\npath = /\nupstream = two\n")
    pools = h.core.pools["two"]
    bad, good = pools.servers
    for _ in range(3):
        bad.connect()
        _host, port, factory, _timeout, _bind = h.reactor.tcpClients.pop()
        factory.clientConnectionFailed(h.reactor.connectors.pop(), Failure(ConnectionRefusedError()))
    assert bad.consecutive_failures == 3 and not bad.available()
    assert {id(pools.pick()) for _ in range(6)} == {id(good)}
    h.advance(10.1, step=0.5)
    assert bad.available()
    assert id(bad) in {id(pools.pick()) for _ in range(2)}


# ---------------------------------------------------------------------------
# The close path


@pytest.mark.parametrize("payload", [
    b"GET /%2F HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",  # no WebSocket route
    b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n",
], ids=["400", "upgrade-not-bridged", "413"])
def test_a_connection_the_proxy_closes_reads_on_until_the_client_ends(make, payload):
    """Whatever made the proxy close (here a 400, an upgrade it does not make, a 413): reading
    from the client is resumed (a paused transport would never see the client's FIN or TLS
    close_notify), the transport is told to close, and the connection stays counted until the
    transport reports it gone; bytes arriving meanwhile are dropped."""
    h = make(settings="max_body_bytes = 1k")
    front, client = h.client()
    front.dataReceived(payload)
    if h.pending_connects:
        upstream, wire = h.accept_upstream()
        upstream.dataReceived(ok(b"done"))
    assert client.disconnecting
    assert client.producerState == "producing"
    assert front in h.core.connections
    written = client.value()
    front.dataReceived(b"GET /more HTTP/1.1\r\nHost: a\r\n\r\n" + b"x" * 1000)
    assert client.value() == written and h.pending_connects == 0
    front.connectionLost(Failure(ConnectionDone()))
    assert front not in h.core.connections


def test_a_client_that_does_not_close_is_cut_off_after_close_timeout(make):
    """A closed connection whose client neither reads the answer nor closes its end is
    aborted once ``close_timeout`` has passed, not kept for ever."""
    h = make(settings="close_timeout = 2s")
    front, client = h.client()
    front.dataReceived(b"GET /%2F HTTP/1.1\r\nHost: a\r\n\r\n")
    assert client.disconnecting and not client.disconnected
    h.advance(1.5)
    assert not client.disconnected
    h.advance(1.0)
    assert client.disconnected  # abortConnection


def test_a_silent_tls_client_before_its_handshake_is_cut_off_too(make):
    """The close deadline also ends a connection whose close cannot complete on its own
    (a 408 written before a TLS handshake that never finishes waits in TLS's buffer)."""
    h = make(settings="header_timeout = 1s\nclose_timeout = 1s")
    front, client = h.client()
    h.advance(1.3)
    assert responses(client.value())[0]["status"] == 408
    assert client.disconnecting and not client.disconnected
    h.advance(1.3)
    assert client.disconnected


def test_unknown_method_answers():
    """What a method llhttp refuses is answered with: 405 for TRACK, 501 for another
    method name, 400 for bytes that are no method name; the refused request is found
    behind earlier pipelined ones."""
    from chatproxy.proxy.request import unknown_method

    assert unknown_method(b"TRACK / HTTP/1.1\r\n\r\n", "e")[0] == 405
    assert unknown_method(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nTRACK / HTTP/1.1\r\n", "e")[0] == 405
    assert unknown_method(b"BREW /pot HTTP/1.1\r\n", "e") == (501, "method BREW is not implemented")
    assert unknown_method(b"\x00\x01garbage", "e")[0] == 400


def test_drain_answers_a_request_that_arrives_just_after_it_on_an_idle_connection(make):
    """When the drain begins, an idle keep-alive connection is not cut at once: a request
    that arrives within DRAIN_IDLE_GRACE is forwarded and answered with Connection: close
    (then the connection closes); one that stays idle is closed silently after the grace."""
    from chatproxy.proxy.front import DRAIN_IDLE_GRACE

    h = make(settings="idle_timeout = 30")
    busy, busy_client = h.client()
    quiet, quiet_client = h.client("192.0.2.11")
    for front in (busy, quiet):
        front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(2):
        upstream, _wire = h.accept_upstream()
        upstream.dataReceived(ok(b"A"))
    busy_client.clear()
    quiet_client.clear()
    h.core.drain(10)
    assert not busy_client.disconnecting and not quiet_client.disconnecting
    busy.dataReceived(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _wire = h.accept_upstream() if h.pending_connects else h.accepted[-1]
    upstream.dataReceived(ok(b"B"))
    (answer,) = responses(busy_client.value())
    assert answer["status"] == 200 and header(answer, "connection") == "close" and answer["body"] == b"B"
    assert busy_client.disconnecting
    h.advance(DRAIN_IDLE_GRACE + 0.2)
    assert quiet_client.disconnecting and quiet_client.value() == b""


def test_drain_after_a_keep_alive_head_went_out_answers_the_next_request_with_close(make):
    """When the drain begins after a response's head already promised keep-alive, the
    connection is not closed at the end of that response (the client would send its next
    request into a closed connection): the next request is answered with Connection:
    close, and only then is the connection closed."""
    h = make(settings="idle_timeout = 30")
    front, client = h.client()
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n")  # the head, not yet the body
    h.core.drain(10)
    upstream.dataReceived(b"A")
    (first,) = responses(client.value())
    assert header(first, "connection") is None and first["body"] == b"A"
    assert not client.disconnecting
    client.clear()
    front.dataReceived(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream.dataReceived(ok(b"B"))
    (second,) = responses(client.value())
    assert header(second, "connection") == "close" and second["body"] == b"B"
    assert client.disconnecting


def _accept_key(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept answering ``key`` (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


def _open_bridge(make: Any, options: str = "", client_headers: bytes = b"",
                 upstream_headers: bytes = b"") -> tuple[Any, Any, Any, Any]:
    """A bridged WebSocket session opened through a front connection (its
    route with ``options`` lines added, the client's handshake and the
    upstream's 101 with the given header lines added): (front, client
    transport, upstream leg's connection, upstream transport), both
    transports cleared."""
    h = make(routes="[route:ws]\npath = /\nupstream = app\nwebsocket = yes\nping_interval = 0\n" + options)
    front, client = h.client()
    front.dataReceived(b"GET /chat HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       b"Sec-WebSocket-Version: 13\r\nCookie: a=1\r\nUser-Agent: test\r\n"
                       + client_headers + b"\r\n")
    upstream, up_transport = h.accept_upstream()
    handshake = up_transport.value()
    assert handshake.startswith(b"GET /chat HTTP/1.1\r\n") and b"Cookie: a=1" in handshake
    key = re.search(rb"Sec-WebSocket-Key: (\S+)", handshake).group(1)  # type: ignore[union-attr]
    up_transport.clear()
    upstream.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: " + _accept_key(key) + b"\r\n" + upstream_headers + b"\r\n")
    upstream.handshake_sent = handshake  # for tests that check what the upstream was offered
    assert client.value().startswith(b"HTTP/1.1 101 "), client.value()
    client.opened = client.value()  # for tests that check the client's 101
    client.clear()
    return front, client, upstream, up_transport


def _masked(opcode: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """One whole client frame (FIN set, payload under 126 bytes), masked."""
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _unmasked_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole masked frame (payloads under 126 bytes) the bridge sent upstream."""
    frames = []
    while data:
        length = data[1] & 0x7F
        mask = data[2:6]
        frames.append((data[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data[6:6 + length]))))
        data = data[6 + length:]
    return frames


def test_an_open_bridge_session_follows_the_message_filters_a_reload_gives_it(make, tmp_path):
    """A bridged session that a reload keeps is filtered from then on by the
    new configuration's message filters for its route: a route that had
    none gets a message rate limit, and the client's second message after the
    reload closes the session with 1008 (the bridge must take the route's
    chain from the session's plan as it is at each message)."""
    from chatproxy.proxy.plan import Plan

    front, client, upstream, up_transport = _open_bridge(make)
    for n in range(3):
        front.dataReceived(_masked(1, b"m%d" % n))
    assert _unmasked_frames(up_transport.value()) == [(1, b"m0"), (1, b"m1"), (1, b"m2")]
    up_transport.clear()
    core = front.core
    text = (tmp_path / "chatproxy.ini").read_text().replace("websocket = yes\n", "websocket = yes\nfilters = limit\n")
    (tmp_path / "next.ini").write_text(text + "\n[filter:limit]\nuse = rate_limit\nrate = 1000\n"
                                       "message_rate = 1/min\nmessage_burst = 1\n")
    assert core.install(Plan(core.reactor, load_config([tmp_path / "next.ini"]), core.sweeper, core.stats,
                             previous=core.plan)) == 0  # the session is kept
    front.dataReceived(_masked(1, b"m3"))
    front.dataReceived(_masked(1, b"m4"))
    frames = _unmasked_frames(up_transport.value())
    assert frames[0] == (1, b"m3") and frames[1][0] == 8 and frames[1][1][:2] == (1008).to_bytes(2, "big")
    assert len(frames) == 2


def test_both_kinds_of_upstream_connection_read_without_the_endpoints_wrapper(make):
    """A TCP connection delivers an upstream's reads straight to chatproxy's
    protocol, not through the client endpoint's pass-through wrapper: that of
    a proxied request (an upstream connection) and that of a bridged
    WebSocket session (its upstream leg); what the upstream sends still
    arrives."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    wrapper, transport = h.accept_upstream()
    assert transport.protocol is not wrapper and transport.protocol is wrapper._wrappedProtocol
    transport.protocol.dataReceived(ok(b"hi"))
    assert [m["body"] for m in responses(client.value())] == [b"hi"]
    front, client, upstream, up_transport = _open_bridge(make)
    assert up_transport.protocol is front.tunnel.upstream is upstream._wrappedProtocol
    up_transport.protocol.dataReceived(b"\x81\x02hi")
    assert client.value() == b"\x81\x02hi"


def test_an_open_bridge_session_keeps_nothing_of_its_handshake(make):
    """Once a bridged WebSocket session is open, the front connection no
    longer holds an HTTP parser, neither leg holds the raw handshake or its
    parsed headers, and the upstream leg no longer holds a factory of its own
    with the forwarded headers (an idle session lasts for hours); messages still pass
    both ways afterwards."""
    front, client, upstream, up_transport = _open_bridge(make)
    bridge = front.tunnel
    assert bridge is not None and front._parser is None
    for leg in (bridge.client, bridge.upstream):
        assert leg.http_headers == {} and leg.http_request_data == b"" and leg.http_response_data == b""
    # The upstream leg's own factory (the handshake's URL and headers) gave way to the route's shared one.
    assert bridge.upstream.factory is bridge.sockets.open_client_factory
    assert bridge.upstream.factory.headers == {} and bridge.upstream.factory.url is None
    mask = b"\x01\x02\x03\x04"
    front.dataReceived(b"\x81\x82" + mask + bytes(a ^ b for a, b in zip(b"hi", mask)))
    sent = up_transport.value()
    assert sent[:1] == b"\x81" and sent[1] == 0x82
    assert bytes(a ^ b for a, b in zip(sent[6:8], sent[2:6])) == b"hi"
    upstream.dataReceived(b"\x81\x02ho")
    assert client.value() == b"\x81\x02ho"


@pytest.mark.parametrize("compression", [False, True])
def test_a_client_offering_compression_gets_the_routes_answer_on_each_leg(make, compression):
    """A client offering permessage-deflate opens its session on a route with
    or without compression (the route's accept function is called as the
    plain function it is, not as a method of the leg): with compression both
    legs negotiate it and a compressed message passes; without, neither
    the upstream nor the client hears of the extension."""
    front, client, upstream, up_transport = _open_bridge(
        make, options="compression = yes\n" if compression else "",
        client_headers=b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        upstream_headers=b"Sec-WebSocket-Extensions: permessage-deflate\r\n" if compression else b"")
    assert (b"permessage-deflate" in upstream.handshake_sent) is compression
    assert (b"permessage-deflate" in client.opened) is compression
    deflater = zlib.compressobj(wbits=-15)
    payload = b"\x81\x02hi" if not compression else bytes(
        (0xC1, len(body := deflater.compress(b"hello") + deflater.flush(zlib.Z_SYNC_FLUSH)[:-4]))) + body
    upstream.dataReceived(payload)
    received = client.value()
    if compression:
        inflater = zlib.decompressobj(wbits=-15)
        assert received[0] == 0xC1 and inflater.decompress(received[2:] + b"\x00\x00\xff\xff") == b"hello"
    else:
        assert received == b"\x81\x02hi"


def test_an_open_bridge_leg_keeps_in_itself_only_what_the_relay_changes_or_reads_per_message(make):
    """An open leg's own dictionary is small (Autobahn's protocol keeps about
    ninety attributes: 3.3 KB for the client leg's dictionary alone): no
    handshake leftovers, no empty write queue, none of the route's protocol
    options but those the relay reads on every message, no state that still
    has its resting value.  Reads still give what Autobahn set: the route's
    options (each route its own), empty handshake values, the resting state."""
    from autobahn.websocket.protocol import WebSocketProtocol

    from chatproxy.proxy.websocket.frames import READ_PER_MESSAGE
    from chatproxy.proxy.websocket.legs import _HANDSHAKE_ONLY, _SETTLED

    front, client, upstream, up_transport = _open_bridge(make, "ping_timeout = 7s\nmax_message_bytes = 4096\n")
    bridge = front.tunnel
    for leg in (bridge.client, bridge.upstream):
        own = vars(leg)
        assert not set(own) & set(_HANDSHAKE_ONLY)
        assert not set(own) & (set(leg.CONFIG_ATTRS) - READ_PER_MESSAGE)
        assert "send_queue" not in own and len(leg.send_queue) == 0
        assert not any(name in own and own[name] == value for name, value in _SETTLED.items())
        assert sys.getsizeof(own) < 1200
        # What reads find: the route's options, Autobahn's resting state, empty handshake values.
        assert leg.autoPingTimeout == 7 and leg.autoPingInterval == 0
        assert leg.maxMessagePayloadSize == 4096 and "maxMessagePayloadSize" not in own
        assert leg.fast_in == leg.fast_out == 4096  # the fast path's limits, fixed as it opened
        assert leg.closedByMe is False and leg.localCloseCode is None and leg.http_headers == {}
        assert leg.state == WebSocketProtocol.STATE_OPEN
    assert bridge.client.requireMaskedClientFrames is True and bridge.upstream.maskClientFrames is True
    # Another route's legs have that route's options, not these.
    other, *_ = _open_bridge(make, "ping_timeout = 9s\nmax_message_bytes = 2048\n")
    assert other.tunnel.client.autoPingTimeout == 9 and other.tunnel.upstream.autoPingTimeout == 9
    assert bridge.client.autoPingTimeout == 7 and type(other.tunnel.client) is not type(bridge.client)
    # A message over the route's limit is not relayed: the session fails with 1009 (too big).
    mask = b"\x01\x02\x03\x04"
    front.dataReceived(b"\x82\xfe" + (5000).to_bytes(2, "big") + mask + bytes(5000))
    assert [opcode for opcode, _ in _unmasked_frames(up_transport.value())] == [8]  # a close, no message


def test_an_open_leg_asked_for_a_synchronous_write_gets_its_own_queue_again(make):
    """An open leg dropped its empty write queue; a chopped or synchronous
    write (which the bridge never asks for, but Autobahn allows) gives it its
    own queue again instead of using the class's empty one, and the bytes go
    out."""
    front, client, upstream, up_transport = _open_bridge(make)
    leg = front.tunnel.client
    assert "send_queue" not in vars(leg)
    leg.sendData(b"\x81\x02hi", sync=True)
    assert client.value() == b"\x81\x02hi"
    assert "send_queue" in vars(leg) and leg.send_queue is not type(leg).send_queue
    assert type(leg).send_queue == ()


def test_bridge_reads_relay_every_frame_in_order_and_nothing_after_a_close(make):
    """Bytes read from an open bridged session are cut into frames however
    they arrive: several whole frames in one read, a frame split over reads
    (its header too), a ping among messages (answered, not relayed); a close
    frame goes on upstream and a message the client sends after its close in
    the same read is not relayed."""
    front, client, upstream, up_transport = _open_bridge(make)
    stream = (_masked(1, b"one") + _masked(2, b"\x00two") + _masked(9, b"p") + _masked(1, b"three")
              + _masked(1, "vier \u00e9".encode()))
    front.dataReceived(stream[:20])
    front.dataReceived(stream[20:21])
    front.dataReceived(stream[21:])
    assert _unmasked_frames(up_transport.value()) == [(1, b"one"), (2, b"\x00two"), (1, b"three"),
                                                      (1, "vier \u00e9".encode())]
    assert client.value() == b"\x8a\x01p"  # the pong, from the proxy
    up_transport.clear()
    front.dataReceived(_masked(1, b"last") + _masked(8, b"\x03\xe8bye") + _masked(1, b"after"))
    assert _unmasked_frames(up_transport.value()) == [(1, b"last"), (8, b"\x03\xe8bye")]
