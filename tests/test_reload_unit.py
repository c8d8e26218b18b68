"""Fast unit tests of what a reload does inside the proxy core (ProxyCore.install and
Plan.keeps_session) on a memory reactor: which WebSocket sessions stay, how the others are
closed, which upstream pools are kept, and which plan a request follows."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from chatproxy.config import load_config
from chatproxy.proxy.plan import Plan
from chatproxy.proxy.core import SERVICE_RESTART
from test_front_unit import Harness, ok, request_heads, responses

ROUTES = (
    "[upstream:ws]\nservers = http://127.0.0.1:9902\n\n"
    "[route:chat]\npath = /chat\nupstream = ws\nwebsocket = yes\n\n"
    "[route:lobby]\npath = /lobby\nupstream = ws\nwebsocket = yes\n\n"
    "[route:all]\npath = /\nupstream = app\n"
)
CHAT_ROUTE = "[route:chat]\npath = /chat\nupstream = ws\nwebsocket = yes\n\n"


def _harness(tmp_path: Path) -> Harness:
    """A core with chat and lobby routes (ws upstream, port 9902) and a catch-all (app upstream, port 9901)."""
    return Harness(tmp_path, settings="reload_close_window = 4", routes=ROUTES)


def _base(tmp_path: Path) -> str:
    """The configuration text the harness started with."""
    return (tmp_path / "chatproxy.ini").read_text()


def _plan(h: Harness, tmp_path: Path, text: str, name: str = "next.ini") -> Plan:
    path = tmp_path / name
    path.write_text(text)
    return Plan(h.reactor, load_config([path]), h.core.sweeper, h.core.stats, previous=h.core.plan)


class _Session:
    """Stands in for a bridged WebSocket session: what install() reads, and its closes."""

    def __init__(self, h: Harness, route: str, listener: str = "main") -> None:
        plan = h.core.plan
        matched = plan.routes[route]
        self.exchange = SimpleNamespace(route=matched, server=SimpleNamespace(upstream=plan.upstream_of(matched)),
                                        head=SimpleNamespace(listener=listener, peer="192.0.2.10"), plan=plan)
        self.closes: list[tuple[int, float]] = []
        self._reactor = h.reactor

    def close_both(self, code: int, reason: str) -> None:
        self.closes.append((code, self._reactor.seconds()))


@pytest.mark.parametrize("change, kept", [
    (lambda t: t + "\n[route:extra]\npath = /extra\nupstream = app\n", True),
    (lambda t: t.replace("[upstream:ws]\nservers = http://127.0.0.1:9902\n",
                         "[upstream:ws]\nservers = http://127.0.0.1:9902\nresponse_timeout = 5\n"), True),
    (lambda t: t.replace("path = /chat\n", "path = /talk\n"), True),
    (lambda t: t.replace("[route:chat]\npath = /chat\nupstream = ws\nwebsocket = yes\n\n", ""), False),
    (lambda t: t.replace("servers = http://127.0.0.1:9902", "servers = http://127.0.0.1:9903"), False),
    (lambda t: t.replace("upstream = ws\n", "upstream = app\n"), False),
    (lambda t: t.replace("websocket = yes\n", "websocket = tunnel\n"), False),
    (lambda t: t.replace("websocket = yes\n", "websocket = no\n"), False),
    (lambda t: t.replace("[listen:main]", "[listen:other]"), False),
    (lambda t: t.replace("[listen:main]\n", "[listen:main]\nallow = 192.0.2.0/24\n"), True),
    (lambda t: t.replace("[listen:main]\n", "[listen:main]\nallow = 198.51.100.0/24\n"), False),
], ids=["route-added-elsewhere", "upstream-timeout-changed", "route-path-changed", "route-removed",
        "upstream-servers-changed", "route-now-to-another-upstream", "mode-changed", "websocket-turned-off",
        "listener-renamed", "allow-still-admits-peer", "allow-no-longer-admits-peer"])
def test_keeps_session_only_while_route_upstream_and_listener_stay(tmp_path, change, kept):
    """A session is kept when its route (by name) still carries WebSockets the same way to an
    upstream with the same servers on the same listener, whose allow list still admits the
    client; any of those changing ends it, other changes do not."""
    h = _harness(tmp_path)
    session = _Session(h, "chat")
    plan = _plan(h, tmp_path, change(_base(tmp_path)))
    exchange = session.exchange
    assert plan.keeps_session(exchange.route, exchange.server.upstream, "main", "192.0.2.10") is kept


def test_install_closes_orphaned_sessions_with_1012_spread_over_the_window(tmp_path):
    """Sessions whose route was removed are each closed once with 1012, at moments spread over
    reload_close_window (not all at once); sessions on an unchanged route are never touched."""
    random.seed(7)
    h = _harness(tmp_path)
    doomed = [_Session(h, "chat") for _ in range(20)]
    kept = [_Session(h, "lobby") for _ in range(5)]
    h.core.websocket_sessions.update(doomed + kept)  # type: ignore[arg-type]
    plan = _plan(h, tmp_path, _base(tmp_path).replace(CHAT_ROUTE, ""))
    start = h.reactor.seconds()
    assert h.core.install(plan) == 20
    assert all(not s.closes for s in doomed)  # nothing closes in the reload's own turn
    h.advance(4.1)
    assert all([code for code, _ in s.closes] == [SERVICE_RESTART] for s in doomed)
    moments = sorted(s.closes[0][1] - start for s in doomed)
    assert 0 <= moments[0] and moments[-1] <= 4.1
    assert len({round(m, 2) for m in moments}) > 10, moments  # spread, not one burst
    assert all(not s.closes for s in kept)


def test_unchanged_upstream_pools_are_kept_and_removed_ones_retired(tmp_path):
    """A reload keeps the pool (and its idle keep-alive connection) of an unchanged upstream;
    a changed upstream gets a new pool and the old one's idle connections are closed."""
    h = _harness(tmp_path)
    front, client = h.client()
    front.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = h.accept_upstream()
    upstream.dataReceived(ok(b"one"))
    old_app = h.core.pools["app"]
    assert old_app.servers[0].idle_count == 1
    old_ws = h.core.pools["ws"]
    h.core.install(_plan(h, tmp_path, _base(tmp_path).replace("servers = http://127.0.0.1:9902",
                                                              "servers = http://127.0.0.1:9903")))
    assert h.core.pools["app"] is old_app and old_app.servers[0].idle_count == 1
    assert h.core.pools["ws"] is not old_ws and old_ws.servers[0].retired
    h.core.install(_plan(h, tmp_path, _base(tmp_path).replace("[upstream:app]\n", "[upstream:app]\nconnect_timeout = 3\n"),
                         "third.ini"))
    assert old_app.servers[0].retired and old_app.servers[0].idle_count == 0
    assert wire.disconnecting  # the idle connection of the retired pool was closed


def test_the_next_request_on_a_kept_connection_follows_the_new_plan(tmp_path):
    """A request in flight during a reload finishes under the plan it was routed with (its
    upstream's pool is retired only after); the next request on the same keep-alive connection
    is routed by the new plan."""
    h = _harness(tmp_path)
    front, client = h.client()
    front.dataReceived(b"GET /chat/history HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = _accept(h, 9902)
    h.core.install(_plan(h, tmp_path, _base(tmp_path).replace(CHAT_ROUTE, "")
                         .replace("[route:lobby]\npath = /lobby\nupstream = ws\nwebsocket = yes\n\n", "")
                         .replace("[upstream:ws]\nservers = http://127.0.0.1:9902\n\n", "")))
    upstream.dataReceived(ok(b"from ws"))
    assert [m["body"] for m in responses(client.value())] == [b"from ws"]
    assert wire.disconnecting  # not pooled: its upstream is gone from the configuration
    front.dataReceived(b"GET /chat/history HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream2, wire2 = _accept(h, 9901)
    assert request_heads(wire2.value()) == [b"GET /chat/history HTTP/1.1"]


def _accept(h: Harness, port: int) -> tuple[Any, Any]:
    """Complete the oldest pending upstream connection, which must go to ``port``."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    host, got, factory, _timeout, _bind = h.reactor.tcpClients.pop(0)
    h.reactor.connectors.pop(0)
    assert (host, got) == ("127.0.0.1", port)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                                peerAddress=IPv4Address("TCP", host, port), lenient=True)
    protocol.makeConnection(transport)
    return protocol, transport


class _FakeTunnel:
    """Stands in for a tunnel-mode session (bytes spliced after a 101): its exchange, and when
    the core closed it."""

    def __init__(self, session: _Session) -> None:
        self.exchange = session.exchange
        self.closed_at: list[float] = []
        self._reactor = session._reactor

    def close(self) -> None:
        self.closed_at.append(self._reactor.seconds())


def test_tunnel_sessions_of_a_removed_route_are_closed_over_the_window(tmp_path):
    """Tunnel-mode sessions (bytes spliced, no frames to send 1012 in) whose route a reload
    removed are closed at moments spread over reload_close_window; those on kept routes stay."""
    random.seed(3)
    h = _harness(tmp_path)
    doomed = [_FakeTunnel(_Session(h, "chat")) for _ in range(10)]
    kept = [_FakeTunnel(_Session(h, "lobby")) for _ in range(3)]
    h.core.tunnels.update(doomed + kept)  # type: ignore[arg-type]
    start = h.reactor.seconds()
    assert h.core.install(_plan(h, tmp_path, _base(tmp_path).replace(CHAT_ROUTE, ""))) == 10
    h.advance(4.1)
    assert all(len(c.closed_at) == 1 for c in doomed)
    assert len({round(c.closed_at[0] - start, 2) for c in doomed}) > 5
    assert all(not c.closed_at for c in kept)
    h.core.tunnels.difference_update(doomed + kept)  # type: ignore[arg-type]


def test_drain_closes_tunnel_sessions_over_the_first_half_of_the_window(tmp_path):
    """On drain, tunnel-mode sessions are closed at moments within the first half of
    drain_timeout (as bridged sessions get 1001), not all at the deadline."""
    random.seed(5)
    h = _harness(tmp_path)
    tunnels = [_FakeTunnel(_Session(h, "chat")) for _ in range(10)]
    h.core.tunnels.update(tunnels)  # type: ignore[arg-type]
    start = h.reactor.seconds()
    h.core.drain(10)
    h.advance(5.05)
    assert all(len(c.closed_at) == 1 and c.closed_at[0] - start <= 5.05 for c in tunnels)
    assert len({round(c.closed_at[0] - start, 2) for c in tunnels}) > 5
    h.core.tunnels.difference_update(tunnels)  # type: ignore[arg-type]


def test_a_session_routed_before_a_reload_that_removed_its_route_is_closed_once_established(tmp_path):
    """A WebSocket upgrade routed under the old plan that completes after a reload removed its
    route is closed over the reload window, as the sessions open at the reload were."""
    random.seed(11)
    h = _harness(tmp_path)
    session = _Session(h, "chat")
    h.core.install(_plan(h, tmp_path, _base(tmp_path).replace(CHAT_ROUTE, "")))
    closed: list[float] = []
    h.core.session_started(session.exchange, lambda: closed.append(h.reactor.seconds()))
    h.advance(4.1)
    assert len(closed) == 1
    kept = _Session(h, "lobby")
    # Routed under an earlier plan (not the one in force); its route is unchanged.
    kept.exchange.plan = SimpleNamespace(upstream_of=h.core.plan.upstream_of)
    h.core.session_started(kept.exchange, lambda: closed.append(-1.0))
    h.advance(4.1)
    assert closed[1:] == []


def test_a_keep_alive_client_no_longer_allowed_is_refused_at_its_next_request(tmp_path):
    """When a reload narrows a listener's allow list, a client already connected from an address
    it no longer admits gets 403 at its next request and the connection closes."""
    import ipaddress

    from attrs import evolve

    h = _harness(tmp_path)
    front, client = h.client(peer="192.0.2.10")
    front.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, wire = _accept(h, 9901)
    upstream.dataReceived(ok(b"first"))
    h.factory.listener = evolve(h.factory.listener, allow=(ipaddress.ip_network("198.51.100.0/24"),))
    front.dataReceived(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    answers = responses(client.value())
    assert [a["status"] for a in answers] == [200, 403]
    assert client.disconnecting
    assert request_heads(wire.value()) == [b"GET /a HTTP/1.1"]
