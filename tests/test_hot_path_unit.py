"""Unit tests pinning down behaviour that the per-request fast paths of the
front connection and the exchange must keep (see bench/README.md: caches of
the last Host value per connection, RequestHead built positionally,
the state of each Exchange its own, the single-server pick)."""

from __future__ import annotations

from typing import Any

from test_front_unit import header, make, ok, responses  # noqa: F401 (make: the fixture)


def test_request_head_fields(make: Any) -> None:
    """Every RequestHead field gets the value of its own name."""
    h = make()
    front, _client = h.client(peer="198.51.100.7")
    front.dataReceived(b"GET /a/./b?x=1 HTTP/1.0\r\nHost: Chat.Example.Test:8080\r\nX-A: 1\r\n\r\n")
    head = front._queue[0].head
    assert head is not None
    assert (head.method, head.target, head.path, head.query, head.version) == (
        "GET", "/a/./b?x=1", "/a/b", "x=1", "1.0")
    assert head.headers == ((b"Host", b"Chat.Example.Test:8080"), (b"X-A", b"1"))
    assert (head.host, head.authority) == ("chat.example.test", "Chat.Example.Test:8080")
    assert (head.client, head.peer, head.tls, head.listener, head.route) == (
        "198.51.100.7", "198.51.100.7", False, "main", "all")


def test_host_is_checked_and_routed_on_every_request_of_a_connection(make: Any) -> None:
    """Keep-alive requests with different Host values on one connection are each routed by
    their own Host, and a malformed Host after a good one still gets 400."""
    h = make(routes="[route:a]\nhosts = a.test\npath = /\nupstream = app\n\n"
                    "[route:b]\nhosts = b.test\npath = /\nupstream = app\n")
    front, client = h.client()
    front.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert front._queue[0].head.route == "a"
    upstream, _wire = h.accept_upstream()
    upstream.dataReceived(ok(b"1"))
    front.dataReceived(b"GET /2 HTTP/1.1\r\nHost: B.test.\r\n\r\n")
    assert front._queue[0].head.route == "b"
    upstream.dataReceived(ok(b"2"))
    front.dataReceived(b"GET /3 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert front._queue[0].head.route == "a"
    upstream.dataReceived(ok(b"3"))
    front.dataReceived(b"GET /4 HTTP/1.1\r\nHost: a test\r\n\r\n")
    assert [m["status"] for m in responses(client.value())] == [200, 200, 200, 400]
    assert client.disconnecting


def test_empty_host_header_is_refused(make: Any) -> None:
    """An empty Host value is malformed (also as the first request of a connection)."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET / HTTP/1.1\r\nHost: \r\n\r\n")
    assert [m["status"] for m in responses(client.value())] == [400]
    assert h.pending_connects == 0


def test_exchange_state_is_not_shared_between_requests(make: Any) -> None:
    """Per-exchange state (status, bytes, flags) starts afresh for each request of a connection."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    first = front._queue[0]
    upstream, _wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 201 Made\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    front.dataReceived(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    second = front._queue[0]
    assert second is not first and not second.response_started and second.status == 0
    assert not front._chunked and second.bytes_sent == 0  # the chunked framing of the first response is over
    upstream.dataReceived(ok(b"hi"))
    messages = responses(client.value())
    assert [(m["status"], m["body"]) for m in messages] == [(201, b"abc"), (200, b"hi")]
    assert header(messages[0], "transfer-encoding") == "chunked"
    assert header(messages[1], "content-length") == "2"
    assert (first.status, first.bytes_sent, second.status, second.bytes_sent) == (201, 3, 200, 2)
    assert b"HTTP/1.1 201 Made\r\n" in client.value()


def test_response_connection_listed_headers_are_dropped(make: Any) -> None:
    """Headers the upstream lists in Connection are not relayed; others are, in order."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _wire = h.accept_upstream()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nX-One: 1\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
                          b"Keep-Alive: timeout=5\r\nX-Two: 2\r\nContent-Length: 2\r\n\r\nok")
    head = client.value().split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head == [b"HTTP/1.1 200 OK", b"X-One: 1", b"X-Two: 2", b"Content-Length: 2"]
