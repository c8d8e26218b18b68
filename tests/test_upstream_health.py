"""Upstream health, sticky sessions and the retry rules.

Fast unit tests drive :class:`chatproxy.proxy.health.HealthChecker`,
:class:`chatproxy.proxy.upstream.UpstreamPools` and exchanges on a
``MemoryReactorClock`` (the ``Harness`` of ``test_front_unit``); the
configuration tests load INI files; the end-to-end tests run a real
``twistd chatproxy`` in front of two real upstream servers on loopback.
"""

from __future__ import annotations

import hashlib
import http.client
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from chatproxy.process.admin import ProxyCollector, readiness
from chatproxy.config import ConfigError, Upstream, UpstreamServer, load_config
from chatproxy.proxy.upstream import UpstreamPools
from chatproxy.proxy.core import ProxyCore
from chatproxy.proxy.stats import Stats
from chatproxy.proxy.timeouts import TimeoutSweeper
from conftest import free_port, wait_for_port
from test_front_unit import Harness, header, make, ok, request_heads, responses  # noqa: F401 (make: fixture)

A, B = 9901, 9902
URL_A, URL_B = f"http://127.0.0.1:{A}", f"http://127.0.0.1:{B}"


def sticky_id(url: str) -> str:
    """The documented cookie value for a server: 16 hex digits of SHA-256 of its URL."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Helpers: memory-reactor connections


def _pop(reactor: MemoryReactorClock, port: int | None) -> tuple[Any, Any]:
    """Take the oldest pending connection attempt (to ``port`` when given)."""
    index = 0 if port is None else next(i for i, c in enumerate(reactor.tcpClients) if c[1] == port)
    attempt = reactor.tcpClients.pop(index)
    connector = reactor.connectors.pop(index)
    return attempt, connector


def accept(reactor: MemoryReactorClock, port: int | None = None) -> tuple[Any, StringTransport, int]:
    """Complete a pending connection; returns its protocol, transport and port."""
    (host, dest_port, factory, _timeout, _bind), _connector = _pop(reactor, port)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, dest_port))
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                                peerAddress=IPv4Address("TCP", host, dest_port), lenient=True)
    protocol.makeConnection(transport)
    return protocol, transport, dest_port


def refuse(reactor: MemoryReactorClock, port: int | None = None) -> None:
    """Fail a pending connection attempt with 'connection refused'."""
    (_host, _port, factory, _timeout, _bind), connector = _pop(reactor, port)
    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))


def pending_ports(reactor: MemoryReactorClock) -> list[int]:
    """The ports of the pending connection attempts, oldest first."""
    return [attempt[1] for attempt in reactor.tcpClients]


def status_response(status: int) -> bytes:
    """A complete, empty response with ``status``."""
    return b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % status


def make_pools(servers: tuple[str, ...] = (URL_A, URL_B), **options: Any) -> tuple[MemoryReactorClock, UpstreamPools]:
    """UpstreamPools on a memory reactor (health checks on /healthz unless options say otherwise)."""
    options.setdefault("health_check_path", "/healthz")
    parsed = tuple(UpstreamServer(url, url.split(":")[0], "127.0.0.1", int(url.rsplit(":", 1)[1])) for url in servers)
    reactor = MemoryReactorClock()
    return reactor, UpstreamPools(reactor, Upstream("app", parsed, **options), TimeoutSweeper(reactor, 0.1))


@contextmanager
def captured_log() -> Iterator[list[str]]:
    """The formatted texts of log events emitted by chatproxy.proxy.health meanwhile."""
    texts: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "chatproxy.proxy.health":
            texts.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield texts
    finally:
        globalLogPublisher.removeObserver(observe)


def run_checks(reactor: MemoryReactorClock, pools: UpstreamPools, results: dict[int, int | None],
               interval: float = 5.0) -> None:
    """Answer the pending check of each server (status, or None: refused), then let one interval pass."""
    for port, status in results.items():
        if status is None:
            refuse(reactor, port)
        else:
            protocol, _transport, _ = accept(reactor, port)
            protocol.dataReceived(status_response(status))
    assert pending_ports(reactor) == []
    reactor.advance(interval)


# ---------------------------------------------------------------------------
# Active health checks (memory reactor)


def test_health_check_request_and_schedule():
    """start_health_checks checks each server at once and then every interval: a new connection,
    'GET <path> HTTP/1.1' with Host = the server's authority and Connection: close."""
    reactor, pools = make_pools(health_check_interval=3.0)
    pools.start_health_checks()
    assert sorted(pending_ports(reactor)) == [A, B]
    _protocol, transport, _ = accept(reactor, A)
    head = transport.value().split(b"\r\n")
    assert head[0] == b"GET /healthz HTTP/1.1"
    assert b"Host: 127.0.0.1:9901" in head
    assert b"Connection: close" in head
    refuse(reactor, B)
    reactor.advance(2.9)
    assert pending_ports(reactor) == []
    reactor.advance(0.1)
    assert sorted(pending_ports(reactor)) == [A, B]
    pools.stop_health_checks()


def test_no_checks_without_start_or_without_a_path(tmp_path):
    """Health checks never run unless started: a ProxyCore that is not started makes no check
    connections, and a started one makes none for an upstream without health_check_path."""
    reactor, pools = make_pools()
    reactor.advance(60)
    assert pending_ports(reactor) == []
    path = tmp_path / "c.ini"
    path.write_text("[listen:main]\nendpoint = tcp:8080\n[upstream:app]\nservers = http://127.0.0.1:9901\n"
                    "health_check_path = /healthz\n[upstream:plain]\nservers = http://127.0.0.1:9902\n"
                    "[route:all]\nupstream = app\n")
    config = load_config([path])
    reactor = MemoryReactorClock()
    core = ProxyCore(reactor, config)
    reactor.advance(30)
    assert pending_ports(reactor) == []
    core.start()
    assert pending_ports(reactor) == [A]  # only the upstream with a health_check_path
    core.stop()


def test_start_is_idempotent_and_stop_abandons_a_check():
    """Calling start_health_checks twice does not double the checks; stop_health_checks stops them
    and abandons a check in progress without counting it."""
    reactor, pools = make_pools(servers=(URL_A,))
    pools.start_health_checks()
    pools.start_health_checks()
    assert pending_ports(reactor) == [A]
    _protocol, transport, _ = accept(reactor, A)
    pools.stop_health_checks()
    assert transport.disconnecting
    checker = pools.servers[0].checker
    assert checker is not None and checker.checks == 0 and not checker.running
    reactor.advance(60)
    assert pending_ports(reactor) == []
    pools.start_health_checks()
    assert pending_ports(reactor) == [A]
    pools.stop_health_checks()


def test_thresholds_and_transitions_are_logged_once():
    """A server turns unhealthy only after unhealthy_threshold failures in a row (a success in
    between starts over), healthy again only after healthy_threshold successes in a row; each
    change is logged once; failures are bad statuses and refused connections alike."""
    reactor, pools = make_pools(servers=(URL_A,), unhealthy_threshold=3, healthy_threshold=2)
    server = pools.servers[0]
    with captured_log() as log:
        pools.start_health_checks()
        run_checks(reactor, pools, {A: 503})
        run_checks(reactor, pools, {A: None})
        run_checks(reactor, pools, {A: 200})  # resets the failure count
        run_checks(reactor, pools, {A: 500})
        run_checks(reactor, pools, {A: 404})
        assert server.check_healthy and server.available()
        run_checks(reactor, pools, {A: None})
        assert not server.check_healthy and not server.available() and not server.healthy
        run_checks(reactor, pools, {A: 503})
        run_checks(reactor, pools, {A: 200})
        run_checks(reactor, pools, {A: 503})  # resets the success count
        run_checks(reactor, pools, {A: 204})
        assert not server.check_healthy
        run_checks(reactor, pools, {A: 302})
        assert server.check_healthy and server.available()
        run_checks(reactor, pools, {A: 200})
        pools.stop_health_checks()
    unhealthy = [text for text in log if "is unhealthy" in text]
    recovered = [text for text in log if "healthy again" in text]
    assert len(unhealthy) == 1 and URL_A in unhealthy[0] and "[upstream:app]" not in unhealthy[0]
    assert len(recovered) == 1 and URL_A in recovered[0]


def test_status_ranges_decide_success():
    """health_check_status lists the accepted statuses: here only 204, so a 200 is a failure."""
    reactor, pools = make_pools(servers=(URL_A,), health_check_status=((204, 204),), unhealthy_threshold=1)
    pools.start_health_checks()
    run_checks(reactor, pools, {A: 204})
    assert pools.servers[0].check_healthy
    run_checks(reactor, pools, {A: 200})
    assert not pools.servers[0].check_healthy
    pools.stop_health_checks()


def test_a_check_without_a_response_times_out():
    """A server that accepts the check connection but sends nothing fails the check after
    health_check_timeout; the connection is aborted and the next check runs normally."""
    reactor, pools = make_pools(servers=(URL_A,), health_check_interval=5.0, health_check_timeout=1.0,
                                unhealthy_threshold=1)
    pools.start_health_checks()
    _protocol, transport, _ = accept(reactor, A)
    reactor.advance(0.9)
    assert pools.servers[0].check_healthy
    reactor.advance(0.2)
    assert not pools.servers[0].check_healthy
    assert transport.disconnecting
    checker = pools.servers[0].checker
    assert checker is not None and "no response" in checker.last_result
    reactor.advance(4)
    assert pending_ports(reactor) == [A]
    pools.stop_health_checks()


def test_a_connect_attempt_that_hangs_times_out():
    """A check whose connection attempt never completes fails after health_check_timeout."""
    reactor, pools = make_pools(servers=(URL_A,), health_check_timeout=2.0, unhealthy_threshold=1)
    pools.start_health_checks()
    reactor.advance(2.1)
    assert not pools.servers[0].check_healthy
    pools.stop_health_checks()


def test_https_server_is_checked_over_tls(tmp_path):
    """An https:// server's health check goes through the upstream's client TLS (the same
    endpoint as the data path), not plain TCP."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    reactor = MemoryReactorClock()
    upstream = Upstream("app", (UpstreamServer("https://127.0.0.1:9443", "https", "127.0.0.1", 9443),),
                        health_check_path="/healthz", verify=False)
    pools = UpstreamPools(reactor, upstream, TimeoutSweeper(reactor, 0.1))
    pools.start_health_checks()
    [(_host, port, factory, _timeout, _bind)] = reactor.tcpClients
    assert port == 9443 and isinstance(factory._wrappedFactory, TLSMemoryBIOFactory)
    pools.stop_health_checks()


def test_pick_skips_unhealthy_servers_and_falls_back_when_all_are_down():
    """Round-robin skips a server that fails its active checks; when every server is unhealthy
    they are all tried in turn, as before."""
    _reactor, pools = make_pools()
    first, second = pools.servers
    first.check_healthy = False
    assert {id(pools.pick()) for _ in range(6)} == {id(second)}
    second.check_healthy = False
    assert {id(pools.pick()) for _ in range(4)} == {id(first), id(second)}


def test_readiness_and_metrics_include_the_active_state():
    """/readyz reports an upstream whose servers all fail their active checks, and the
    chatproxy_upstream_server_healthy gauge is 0 for an actively unhealthy server."""
    _reactor, pools = make_pools()
    first, second = pools.servers
    service: Any = SimpleNamespace(config=SimpleNamespace(listeners={}), ports={}, draining=False,
                                   core=SimpleNamespace(pools={"app": pools}))
    first.check_healthy = False
    assert readiness(service) == []
    second.check_healthy = False
    [problem] = readiness(service)
    assert "upstream app" in problem
    service.core.stats = Stats()
    second.check_healthy = True
    gauge = next(family for family in ProxyCollector(service).collect()
                 if family.name == "chatproxy_upstream_server_healthy")
    assert {sample.labels["server"]: sample.value for sample in gauge.samples} == {URL_A: 0, URL_B: 1}


# ---------------------------------------------------------------------------
# Sticky sessions (memory reactor)

TWO = ("[upstream:two]\nservers = http://127.0.0.1:9901, http://127.0.0.1:9902\n{extra}\n"
       "[route:all]\npath = /\nupstream = two\n")


def two(make: Any, extra: str = "") -> Harness:
    """A Harness whose route forwards to two servers (9901, 9902)."""
    return make(routes=TWO.format(extra=extra))


def exchange(h: Harness, front: Any, request: bytes, expect_port: int | None = None) -> int:
    """Send one request, answer it on whichever server it went to (a new connection or a pooled
    one); returns that server's port."""
    before = {id(t): len(t.value()) for t in h.accepted_transports}  # type: ignore[attr-defined]
    front.dataReceived(request)
    if h.reactor.tcpClients:
        protocol, transport, port = accept(h.reactor)
        h.accepted_transports.append(transport)  # type: ignore[attr-defined]
        h.upstreams[id(transport)] = (protocol, port)  # type: ignore[attr-defined]
    else:
        transport = next(t for t in h.accepted_transports  # type: ignore[attr-defined]
                         if len(t.value()) > before.get(id(t), 0))
        protocol, port = h.upstreams[id(transport)]  # type: ignore[attr-defined]
    protocol.dataReceived(ok(b"%d" % port))
    if expect_port is not None:
        assert port == expect_port
    return port


@pytest.fixture
def sticky(make: Any) -> Harness:
    """A two-server Harness with sticky_cookie = sid and bookkeeping of upstream connections."""
    h = two(make, "sticky_cookie = sid")
    h.accepted_transports = []  # type: ignore[attr-defined]
    h.upstreams = {}  # type: ignore[attr-defined]
    return h


def test_sticky_cookie_is_set_and_pins_the_client(sticky):
    """Without a cookie the request goes round-robin and the response sets
    'sid=<id>; Path=/; HttpOnly; SameSite=Lax' naming that server (an opaque id, not its URL);
    with that cookie every later request goes to the same server and no cookie is set again."""
    h = sticky
    front, client = h.client()
    port = exchange(h, front, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    [message] = responses(client.value())
    url = f"http://127.0.0.1:{port}"
    assert header(message, "set-cookie") == f"sid={sticky_id(url)}; Path=/; HttpOnly; SameSite=Lax"
    assert url not in client.value().decode() and "127.0.0.1" not in header(message, "set-cookie")
    cookie = b"Cookie: theme=dark; sid=%s; x=1\r\n" % sticky_id(url).encode()
    for _ in range(4):
        exchange(h, front, b"GET /b HTTP/1.1\r\nHost: a\r\n" + cookie + b"\r\n", expect_port=port)
    later = responses(client.value())[1:]
    assert len(later) == 4 and all(header(m, "set-cookie") is None for m in later)


def test_sticky_cookie_naming_the_other_server_overrides_round_robin(sticky):
    """A cookie naming server B sends requests to B even when round-robin would pick A."""
    h = sticky
    front, _client = h.client()
    cookie = b"Cookie: sid=%s\r\n" % sticky_id(URL_B).encode()
    ports = [exchange(h, front, b"GET / HTTP/1.1\r\nHost: a\r\n" + cookie + b"\r\n") for _ in range(3)]
    assert ports == [B, B, B]


def test_unknown_or_unavailable_sticky_server_gets_a_new_cookie(sticky):
    """An unknown cookie value, or one naming a server that is unhealthy (active checks) or
    ejected (passive), gives normal round-robin and a Set-Cookie naming the new server."""
    h = sticky
    front, client = h.client()
    exchange(h, front, b"GET / HTTP/1.1\r\nHost: a\r\nCookie: sid=0123456789abcdef\r\n\r\n")
    first = responses(client.value())[-1]
    assert header(first, "set-cookie") is not None
    pools = h.core.pools["two"]
    server_a, server_b = pools.servers
    server_a.check_healthy = False
    cookie_a = b"Cookie: sid=%s\r\n" % sticky_id(URL_A).encode()
    exchange(h, front, b"GET / HTTP/1.1\r\nHost: a\r\n" + cookie_a + b"\r\n", expect_port=B)
    assert header(responses(client.value())[-1], "set-cookie").startswith(f"sid={sticky_id(URL_B)};")
    server_a.check_healthy = True
    server_a.ejected_until = h.reactor.seconds() + 100
    exchange(h, front, b"GET / HTTP/1.1\r\nHost: a\r\n" + cookie_a + b"\r\n", expect_port=B)
    assert header(responses(client.value())[-1], "set-cookie").startswith(f"sid={sticky_id(URL_B)};")


def test_sticky_cookie_is_secure_for_a_tls_client(sticky):
    """A client on a TLS connection gets the cookie with the Secure attribute."""
    h = sticky
    h.factory.listener = __import__("attrs").evolve(h.factory.listener, tls=True)  # as a TLS listener's
    front, client = h.client()
    exchange(h, front, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert header(responses(client.value())[0], "set-cookie").endswith("; HttpOnly; SameSite=Lax; Secure")


def test_no_sticky_work_without_the_option_or_with_one_server(make, tmp_path):
    """Without sticky_cookie (or with a single server) the pools' sticky attribute is None, so
    the data path does no cookie work and no Set-Cookie is added."""
    h = two(make)
    assert h.core.pools["two"].sticky is None
    front, client = h.client()
    front.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    protocol, _transport, _ = accept(h.reactor)
    protocol.dataReceived(ok(b"x"))
    assert header(responses(client.value())[0], "set-cookie") is None
    _reactor, single = make_pools(servers=(URL_A,), sticky_cookie="sid")
    assert single.sticky is None


def test_pick_sticky_directly():
    """pick_sticky: the named server when available (no cookie to set), else round-robin with the
    plain or Secure Set-Cookie value; a retry's avoided server is not chosen even if named."""
    _reactor, pools = make_pools(sticky_cookie="route")
    server_a, server_b = pools.servers
    headers = [(b"COOKIE", b"route=" + sticky_id(URL_B).encode())]
    assert pools.pick_sticky(headers, tls=False) == (server_b, None)
    server, cookie = pools.pick_sticky(headers, tls=True, avoid=server_b)
    assert server is server_a and cookie == f"route={sticky_id(URL_A)}; Path=/; HttpOnly; SameSite=Lax; Secure".encode()
    server, cookie = pools.pick_sticky([], tls=False)
    assert cookie is not None and cookie.startswith(b"route=" + server.sticky_id.encode() + b";")


# ---------------------------------------------------------------------------
# Retry rules (memory reactor)


def _warm(h: Harness, front: Any, client: Any) -> dict[int, tuple[Any, StringTransport]]:
    """One GET to each of the two servers, so each has a pooled keep-alive connection."""
    conns = {}
    for _ in range(2):
        front.dataReceived(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        protocol, transport, port = accept(h.reactor)
        protocol.dataReceived(ok(b"warm"))
        conns[port] = (protocol, transport)
    assert sorted(conns) == [A, B]
    assert [m["status"] for m in responses(client.value())] == [200, 200]
    return conns


def test_post_whose_body_was_sent_is_not_retried_on_a_new_connection(make):
    """A POST whose body reached a server that then dropped the connection (no response) is not
    sent again, to any server: the client gets 502."""
    h = two(make)
    front, client = h.client()
    front.dataReceived(b"POST /pay HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    protocol, transport, _ = accept(h.reactor)
    assert transport.value().endswith(b"\r\n\r\nhello")
    protocol.connectionLost(Failure(ConnectionLost()))
    assert pending_ports(h.reactor) == []
    assert [m["status"] for m in responses(client.value())] == [502]


def test_post_on_a_stale_pooled_connection_is_not_retried(make):
    """A POST with a body sent on a pooled connection that turns out closed is not resent (not
    idempotent, body already sent): 502, and no other server is tried."""
    h = two(make)
    front, client = h.client()
    conns = _warm(h, front, client)
    front.dataReceived(b"POST /pay HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    protocol, transport = conns[A]
    assert transport.value().endswith(b"\r\n\r\nhi")
    protocol.connectionLost(Failure(ConnectionDone()))
    assert pending_ports(h.reactor) == []
    assert b"POST" not in conns[B][1].value()
    assert [m["status"] for m in responses(client.value())] == [200, 200, 502]


def test_get_on_a_stale_pooled_connection_is_retried(make):
    """A GET sent on a pooled connection the server had closed is sent again (to the next
    server in turn) and the client gets that server's answer."""
    h = two(make)
    front, client = h.client()
    conns = _warm(h, front, client)
    front.dataReceived(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
    conns[A][0].connectionLost(Failure(ConnectionDone()))
    assert request_heads(conns[B][1].value())[-1] == b"GET /again HTTP/1.1"
    conns[B][0].dataReceived(ok(b"from b"))
    [*_, last] = responses(client.value())
    assert (last["status"], last["body"]) == (200, b"from b")


@pytest.mark.parametrize("method, body, resent", [
    ("GET", b"", True), ("HEAD", b"", True), ("OPTIONS", b"", True), ("DELETE", b"", True), ("PUT", b"", True),
    ("POST", b"", False), ("PATCH", b"", False), ("PUT", b"data", False), ("DELETE", b"data", False),
])
def test_stale_connection_retry_follows_the_method_and_body(make, method, body, resent):
    """On a stale pooled connection only idempotent methods without a body are resent; a
    non-idempotent one, or one whose body was already sent, gets 502."""
    h = make()
    front, client = h.client()
    front.dataReceived(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _wire = h.accept_upstream()
    upstream.dataReceived(ok(b"warm"))
    length = b"Content-Length: %d\r\n" % len(body) if body or method in ("POST", "PATCH") else b""
    front.dataReceived(method.encode() + b" /x HTTP/1.1\r\nHost: a\r\n" + length + b"\r\n" + body)
    upstream.connectionLost(Failure(ConnectionDone()))
    assert h.pending_connects == (1 if resent else 0)
    if resent:
        again, wire = h.accept_upstream()
        assert request_heads(wire.value()) == [method.encode() + b" /x HTTP/1.1"]
        again.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    else:
        assert [m["status"] for m in responses(client.value())] == [200, 502]


def test_connect_failure_is_retried_once_on_another_server(make):
    """A refused connection (nothing sent) is retried once on the other server, even for a
    POST with a body, which then reaches that server whole; a second refusal gives 502."""
    h = two(make)
    front, client = h.client()
    front.dataReceived(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    refuse(h.reactor, A)
    assert pending_ports(h.reactor) == [B]
    protocol, transport, _ = accept(h.reactor, B)
    assert transport.value().endswith(b"\r\n\r\nhello")
    protocol.dataReceived(ok(b"done"))
    front.dataReceived(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    # B's connection is pooled but round-robin is at A: refused, then B's pooled connection.
    refuse(h.reactor, A)
    assert transport.value().count(b"POST /p") == 2
    protocol.dataReceived(ok(b"done"))
    assert pending_ports(h.reactor) == []
    assert [m["status"] for m in responses(client.value())] == [200, 200]


def test_connect_retry_and_stale_connection_retry_are_counted_apart(make):
    """A refused connect (retried on the other server) does not use up the stale-connection
    retry: when the other server's pooled connection then turns out closed, the GET is still
    resent once, and succeeds."""
    h = two(make)
    front, client = h.client()
    conns = _warm(h, front, client)
    conns[A][0].connectionLost(Failure(ConnectionDone()))  # A closes its idle connection
    front.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    refuse(h.reactor, A)
    assert request_heads(conns[B][1].value())[-1] == b"GET /x HTTP/1.1"
    conns[B][0].connectionLost(Failure(ConnectionDone()))
    protocol, transport, _ = accept(h.reactor)
    assert request_heads(transport.value()) == [b"GET /x HTTP/1.1"]
    protocol.dataReceived(ok(b"third time"))
    assert responses(client.value())[-1]["body"] == b"third time"


def test_two_refused_connects_give_502_after_exactly_two_attempts(make):
    """When both servers refuse, the request is tried on each once and the client gets 502."""
    h = two(make)
    front, client = h.client()
    front.dataReceived(b"GET /q HTTP/1.1\r\nHost: a\r\n\r\n")
    refuse(h.reactor)
    assert len(pending_ports(h.reactor)) == 1
    refuse(h.reactor)
    assert pending_ports(h.reactor) == []
    assert [m["status"] for m in responses(client.value())] == [502]


# ---------------------------------------------------------------------------
# Configuration

BASE = "[listen:main]\nendpoint = tcp:8080\n[route:all]\nupstream = app\n[upstream:app]\nservers = http://h:1\n"


def _load(tmp_path: Path, extra: str) -> Any:
    path = tmp_path / "chatproxy.ini"
    path.write_text(BASE + textwrap.dedent(extra))
    return path, load_config([path])


def test_health_and_sticky_defaults(tmp_path):
    """Without the new options: no active checks, no sticky cookie, and the documented defaults."""
    _path, config = _load(tmp_path, "")
    upstream = config.upstreams["app"]
    assert upstream.health_check_path is None and upstream.sticky_cookie is None
    assert (upstream.health_check_interval, upstream.health_check_timeout) == (5.0, 2.0)
    assert (upstream.healthy_threshold, upstream.unhealthy_threshold) == (2, 3)
    assert upstream.health_check_status == ((200, 399),)


def test_health_and_sticky_options_parse(tmp_path):
    """Every new option with a valid value ends up in the Upstream model."""
    _path, config = _load(tmp_path, """\
        health_check_path = /healthz?deep=1
        health_check_interval = 1500ms
        health_check_timeout = 1
        health_check_status = 200, 204-206
        healthy_threshold = 1
        unhealthy_threshold = 5
        sticky_cookie = chatproxy_srv
        """)
    upstream = config.upstreams["app"]
    assert upstream.health_check_path == "/healthz?deep=1"
    assert (upstream.health_check_interval, upstream.health_check_timeout) == (1.5, 1.0)
    assert upstream.health_check_status == ((200, 200), (204, 206))
    assert (upstream.healthy_threshold, upstream.unhealthy_threshold) == (1, 5)
    assert upstream.sticky_cookie == "chatproxy_srv"


@pytest.mark.parametrize("extra, option, fragment", [
    ("health_check_path = healthz", "health_check_path", "must start with '/'"),
    ("health_check_path = /health z", "health_check_path", "without spaces"),
    ("health_check_path =", "health_check_path", "must start with '/'"),
    ("health_check_path = /h\nhealth_check_interval = often", "health_check_interval", "expected a duration"),
    ("health_check_path = /h\nhealth_check_interval = 0", "health_check_interval", "greater than zero"),
    ("health_check_path = /h\nhealth_check_timeout = -1", "health_check_timeout", "expected a duration"),
    ("health_check_path = /h\nhealth_check_timeout = 10", "health_check_timeout", "must not be longer"),
    ("health_check_path = /h\nhealth_check_interval = 1", "health_check_interval", "must not be longer"),
    ("health_check_path = /h\nhealthy_threshold = 0", "healthy_threshold", "at least 1"),
    ("health_check_path = /h\nunhealthy_threshold = many", "unhealthy_threshold", "whole number"),
    ("health_check_path = /h\nhealth_check_status = 600", "health_check_status", "between 100 and 599"),
    ("health_check_path = /h\nhealth_check_status = 399-200", "health_check_status", "ends before it starts"),
    ("health_check_path = /h\nhealth_check_status = ok", "health_check_status", "not a status"),
    ("health_check_path = /h\nhealth_check_status = ,", "health_check_status", "at least one status"),
    ("health_check_interval = 5", "health_check_interval", "needs health_check_path"),
    ("unhealthy_threshold = 2", "unhealthy_threshold", "needs health_check_path"),
    ("sticky_cookie = a b", "sticky_cookie", "not a valid cookie name"),
    ("sticky_cookie = a;b", "sticky_cookie", "not a valid cookie name"),
    ("sticky_cookie =", "sticky_cookie", "not a valid cookie name"),
])
def test_invalid_health_and_sticky_options(tmp_path, extra, option, fragment):
    """Each invalid value is a ConfigError naming the file, [upstream:app] and the option."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, extra + "\n")
    error = info.value
    text = str(error)
    assert (error.section, error.option) == ("upstream:app", option), text
    assert str(tmp_path / "chatproxy.ini") in text and "[upstream:app]" in text and option in text
    assert fragment in text


# ---------------------------------------------------------------------------
# End to end: twistd in front of two real upstream servers


class _NamedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: NamedUpstream

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.server.health_checks += 1
            status, body = self.server.health, b""
        else:
            status, body = 200, self.server.name.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class NamedUpstream(ThreadingHTTPServer):
    """An upstream answering its name; ``/healthz`` answers ``health`` (a status)."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _NamedHandler)
        self.name = name
        self.health = 200
        self.health_checks = 0
        self.port = self.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop serving."""
        self.shutdown()
        self.server_close()


@pytest.fixture
def pair() -> Iterator[tuple[NamedUpstream, NamedUpstream]]:
    """Two running upstream servers, 'one' and 'two'."""
    servers = NamedUpstream("one"), NamedUpstream("two")
    yield servers
    for server in servers:
        server.stop()


def _get(port: int, path: str = "/", cookie: str | None = None) -> tuple[int, str, str | None]:
    """One request on a new connection: status, body, Set-Cookie."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    response = conn.getresponse()
    result = response.status, response.read().decode(), response.getheader("Set-Cookie")
    conn.close()
    return result


def _until(condition: Any, limit: float = 20.0) -> bool:
    """Poll ``condition`` (bounded); whether it became true."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _config(pair: tuple[NamedUpstream, NamedUpstream], port: int, admin: int) -> str:
    one, two_ = pair
    return (
        "[chatproxy]\naccess_log = off\n\n"
        f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n\n"
        f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n\n"
        f"[upstream:app]\nservers = {one.url}, {two_.url}\n"
        "health_check_path = /healthz\nhealth_check_interval = 250ms\nhealth_check_timeout = 250ms\n"
        "unhealthy_threshold = 2\nhealthy_threshold = 2\nsticky_cookie = srv\n\n"
        "[route:all]\npath = /\nupstream = app\n"
    )


def test_traffic_leaves_a_server_failing_its_health_checks(proxy, pair):
    """With active checks on two real servers, both get traffic; once one answers its health path
    with 503, traffic moves to the other and /readyz still says ready; when it recovers it gets
    traffic again; when both fail, /readyz turns 503."""
    one, two_ = pair
    port, admin = free_port(), free_port()
    process = proxy.start(_config(pair, port, admin), port=port)
    wait_for_port(admin)
    assert _until(lambda: one.health_checks > 0 and two_.health_checks > 0)
    assert _until(lambda: {_get(port)[1] for _ in range(4)} == {"one", "two"})
    one.health = 503
    assert _until(lambda: all(_get(port)[1] == "two" for _ in range(6)))
    assert _get(admin, "/readyz")[0] == 200
    assert _until(lambda: f"{one.url} is unhealthy" in process.output())
    assert process.output().count(f"{one.url} is unhealthy") == 1  # logged once, not per check
    one.health = 200
    assert _until(lambda: "one" in {_get(port)[1] for _ in range(4)})
    one.health = two_.health = 503
    assert _until(lambda: _get(admin, "/readyz")[0] == 503)
    status, body, _ = _get(admin, "/readyz")
    assert "upstream app" in body
    # Every server down: requests are still tried in turn.
    assert _get(port)[0] == 200
    assert "Traceback" not in process.output() and "Unhandled" not in process.output()


def test_sticky_cookie_pins_a_client_end_to_end(proxy, pair):
    """A client that keeps the Set-Cookie it got is served by the same server every time; when that
    server starts failing its health checks, the client moves to the other server with a new cookie."""
    one, two_ = pair
    port, admin = free_port(), free_port()
    proxy.start(_config(pair, port, admin), port=port)
    status, first, set_cookie = _get(port)
    assert status == 200 and set_cookie is not None
    cookie = set_cookie.split(";", 1)[0]
    name, _, value = cookie.partition("=")
    assert name == "srv" and len(value) == 16 and "127.0.0.1" not in set_cookie
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie and "Path=/" in set_cookie
    for _ in range(8):
        status, body, again = _get(port, cookie=cookie)
        assert (status, body, again) == (200, first, None)
    pinned = one if first == "one" else two_
    pinned.health = 503
    other = "two" if first == "one" else "one"
    assert _until(lambda: _get(port, cookie=cookie)[1] == other)
    _status, _body, moved = _get(port, cookie=cookie)
    assert moved is not None and moved.split(";", 1)[0] != cookie


def test_sticky_cookie_on_websocket_sessions(proxy):
    """A WebSocket session through the bridge gets the sticky cookie on its 101 (beside the
    upstream's own cookies), and a session that sends it back reaches the same server."""
    from websockets.sync.client import connect

    from ws_peers import WsUpstream

    first, second = WsUpstream(), WsUpstream()
    try:
        port = free_port()
        proxy.start(
            "[chatproxy]\naccess_log = off\n\n"
            f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n\n"
            f"[upstream:chat]\nservers = http://127.0.0.1:{first.port}, http://127.0.0.1:{second.port}\n"
            "sticky_cookie = srv\n\n"
            "[route:chat]\npath = /\nupstream = chat\nwebsocket = yes\n", port=port)
        with connect(f"ws://127.0.0.1:{port}/chat?sid=a", open_timeout=10) as session:
            cookies = session.response.headers.get_all("Set-Cookie")
            sticky = [c for c in cookies if c.startswith("srv=")]
            assert len(sticky) == 1 and any(c.startswith("upstream_session=") for c in cookies)
            session.send("hi")
            assert session.recv(timeout=10) == "hi"
        pinned = first if "a" in first.sessions else second
        cookie = sticky[0].split(";", 1)[0]
        for n in range(4):
            with connect(f"ws://127.0.0.1:{port}/chat?sid=b{n}", open_timeout=10,
                         additional_headers={"Cookie": cookie}) as session:
                assert not [c for c in session.response.headers.get_all("Set-Cookie") if c.startswith("srv=")]
                session.send("again")
                assert session.recv(timeout=10) == "again"
            assert f"b{n}" in pinned.sessions
    finally:
        first.stop()
        second.stop()
