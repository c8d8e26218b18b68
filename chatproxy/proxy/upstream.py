"""Connections to upstream servers: an HTTP/1.1 client protocol over
httptools, and a keep-alive pool per server with round-robin between servers.

A connection goes back to the pool only after a complete, well-formed
exchange: request fully sent, response fully read, both sides willing to keep
it alive.  Anything else closes it.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol as TypingProtocol

import httptools
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproxy.proxy.health import HealthChecker
from chatproxy.http.messages import Header
from chatproxy.proxy.sending import read_directly, send
from chatproxy.proxy.stats import Stats
from chatproxy.proxy.tls import build_client_tls

if TYPE_CHECKING:
    from chatproxy.config import Upstream, UpstreamServer
    from chatproxy.proxy.timeouts import TimeoutSweeper


# Passive health: after this many failed connection attempts in a row a
# server is skipped by round-robin for EJECTION_SECONDS.
EJECT_AFTER = 3
EJECTION_SECONDS = 10.0


class Corked(TypingProtocol):
    """Where a response goes (the exchange's client side), gathering writes while corked."""

    def cork(self) -> None: ...
    def uncork(self) -> None: ...


class ResponseSink(TypingProtocol):
    """What an upstream connection reports to (an exchange)."""

    @property
    def client(self) -> Corked: ...
    def response_head(self, status: int, reason: bytes, headers: list[Header], names: list[bytes],
                      body_framing: str) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self) -> None: ...
    def response_upgraded(self, leftover: bytes) -> None: ...
    def upstream_failed(self, reason: str, timeout: bool) -> None: ...
    def upstream_writable(self, writable: bool) -> None: ...


class UpstreamConnectionBase:
    """What a connection to an upstream server does and holds;
    :class:`UpstreamConnection` adds Twisted's ``Protocol`` to it.  Kept apart
    from ``Protocol`` (a Python class) so that the compiled build can make it
    a C-typed class (``upstream.pxd``, the same attributes as ``__slots__``:
    the two must stay in step, tests/test_compiled_build.py checks).

    ``body_framing`` told to the sink: ``length`` (Content-Length), ``chunked``,
    ``eof`` (read until close), ``none`` (HEAD, 204, 304) or ``upgrade`` (101).
    """

    __slots__ = ("transport", "connected", "factory", "pool", "sink", "deadline", "exchanges", "tunnel",
                 "_parser", "_headers", "_reason", "_head_done", "_framing", "_method_head", "_request_sent",
                 "_response_done", "_got_bytes", "_reusable", "_connected", "_closed", "_now", "_reading_paused")

    def __init__(self, pool: ServerPool) -> None:
        self.transport: ITransport | None = None
        self.connected = 0
        self.factory: Any = None  # (typed as Twisted's Protocol types it)
        self.pool = pool
        self._now = pool.sweeper.now  # the clock deadlines are on (read on every request)
        self.sink: ResponseSink | None = None
        self.deadline = 0.0
        self.exchanges = 0
        self.tunnel: Any = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[Header] = []
        self._reason = b""
        self._head_done = False
        self._framing = "none"
        self._method_head = False
        self._request_sent = False
        self._response_done = False
        self._got_bytes = False
        self._reusable = True
        self._connected = False
        self._closed = False
        self._reading_paused = False  # pause_reading paused the transport (resume_reading has not since)

    # -- Twisted protocol

    def connectionMade(self) -> None:
        self._connected = True
        read_directly(self)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection: the server broke the exchange rules.
            self._reusable = False
            self.close()
            return
        self._got_bytes = True
        if self._head_done:
            self.deadline = self._now() + self.pool.upstream.response_timeout
        client = sink.client
        client.cork()  # what this read produces for the client goes out in one send
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = int(upgrade.args[0]) if upgrade.args else len(data)
            self.deadline = 0.0
            self.sink = None
            client.uncork()
            sink.response_upgraded(data[offset:])
        except httptools.HttpParserError as error:
            self._fail(f"malformed response from upstream: {error}", timeout=False)
        finally:
            client.uncork()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._closed = True
        self.pool.forget(self)  # type: ignore[arg-type]  # (self is an UpstreamConnection)
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.peer_lost()
            return
        if self.sink is None:
            return
        if self._head_done and self._framing == "eof":
            self._complete()
            return
        if self._got_bytes:
            what = "upstream closed the connection mid-response"
        else:
            what = f"upstream connection failed: {reason.getErrorMessage()}"
        self._fail(what, timeout=False)

    # -- IPushProducer: the upstream's send buffer filled or drained

    def pauseProducing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_writable(False)
        elif self.tunnel is not None:
            self.tunnel.peer_writable(False)

    def resumeProducing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_writable(True)
        elif self.tunnel is not None:
            self.tunnel.peer_writable(True)

    def stopProducing(self) -> None:
        pass

    # -- sending a request

    def begin(self, sink: ResponseSink, head: bytes, method_head: bool) -> None:
        """Start an exchange: write the request head and report to ``sink``."""
        self.sink = sink
        self.exchanges += 1
        self._headers = []
        self._head_done = False
        self._method_head = method_head
        self._request_sent = False
        self._response_done = False
        self._got_bytes = False
        self.deadline = 0.0  # response_timeout runs once the whole request is sent
        send(self.transport, head)

    def send_body(self, data: bytes) -> None:
        """Write request body bytes (already framed by the caller)."""
        send(self.transport, data)

    def request_sent(self) -> None:
        """The whole request has been written: the response is now awaited."""
        self._request_sent = True
        if self.sink is not None and not self._head_done:
            self.deadline = self._now() + self.pool.upstream.response_timeout
        if self._response_done:
            self._release()

    def abandon(self) -> None:
        """The client went away or the exchange failed: close, never reuse."""
        self.sink = None
        self._reusable = False
        self.deadline = 0.0
        if self.transport is not None and not self._closed:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close after pending writes (TLS waits for no producer, so unregister first)."""
        if self.transport is not None and not self._closed:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def pause_reading(self) -> None:
        """Stop reading from the upstream (the client is slow): the upstream is
        not to blame for the wait, so its response timeout is suspended."""
        self.deadline = 0.0
        if self.transport is not None and not self._closed:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        """Read from the upstream again."""
        if self.sink is not None and self._request_sent:
            self.deadline = self._now() + self.pool.upstream.response_timeout
        if self._reading_paused and self.transport is not None and not self._closed:
            # (only then: every pooled connection is resumed as it goes back
            # to the pool, and Twisted's resumeProducing is four Python calls)
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- timeouts

    def timed_out(self, now: float) -> None:
        """Past the deadline: the response is late, or an idle connection aged out."""
        self.deadline = 0.0
        if self.sink is None:
            self.pool.forget(self)  # type: ignore[arg-type]
            self.close()
            return
        self._fail("upstream did not answer in time" if not self._head_done else "upstream stalled mid-response",
                   timeout=True)

    # -- httptools callbacks

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._headers = []
            self._reason = b""
            return  # interim response: dropped; the final one follows
        self._head_done = True
        headers = self._headers
        names = [name.lower() for name, _ in headers]
        framing = "eof"
        if status == 101:
            framing = "upgrade"  # the parser raises HttpParserUpgrade next
            self._reusable = False
        elif self._method_head or status in (204, 304):
            framing = "none"
        else:
            for lower in names:
                if lower == b"transfer-encoding":
                    framing = "chunked"
                    break
                if lower == b"content-length":
                    framing = "length"
        self._framing = framing
        if not self._parser.should_keep_alive() or framing == "eof":
            self._reusable = False
        sink, reason = self.sink, self._reason
        self._reason = b""
        assert sink is not None
        sink.response_head(status, reason, headers, names, framing)
        if self._method_head and self.sink is sink:
            # httptools cannot be told that a HEAD response has no body: the
            # exchange ends here and this connection is not reused.
            self._reusable = False
            self._complete()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        if not self._head_done or self._method_head or self._framing == "upgrade":
            return
        self._complete()

    # -- endings

    def _complete(self) -> None:
        sink = self.sink
        if sink is None:
            return
        self._response_done = True
        self.deadline = 0.0
        if not self._request_sent:
            # The upstream answered before reading the whole request: never reuse.
            self._reusable = False
        self.sink = None
        # Back to the pool first: a pipelined request that the sink starts next
        # can then take this connection instead of opening another one.
        if self._request_sent or not self._reusable:
            self._release()
        sink.response_complete()

    def _release(self) -> None:
        if self._reusable and not self._closed and self.sink is None and self.tunnel is None:
            self.pool.release(self)  # type: ignore[arg-type]
        else:
            self.close()

    def _fail(self, reason: str, timeout: bool) -> None:
        sink = self.sink
        self.abandon()
        if sink is not None:
            sink.upstream_failed(reason, timeout)

    @property
    def reused(self) -> bool:
        """Whether this connection carried an exchange before the current one."""
        return self.exchanges > 1

    @property
    def got_response_bytes(self) -> bool:
        """Whether any response byte arrived for the current exchange."""
        return self._got_bytes


@implementer(IPushProducer)
class UpstreamConnection(UpstreamConnectionBase, Protocol):
    """One connection to one upstream server, carrying one exchange at a time."""

    __slots__ = ()


class _OneConnection(Factory):
    """Hands out one prepared protocol instance (quietly, unlike connectProtocol)."""

    noisy = False

    def __init__(self, connection: UpstreamConnection) -> None:
        self._connection = connection

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return self._connection


class ServerPool:
    """Idle keep-alive connections to one upstream server, and new ones on demand."""

    def __init__(self, reactor: Any, upstream: Upstream, server: UpstreamServer, sweeper: TimeoutSweeper,
                 tls_creator: Any, stats: Stats | None = None) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.server = server
        self.sweeper = sweeper
        self._tls_creator = tls_creator  # replaced by UpstreamPools.replace_tls on reload
        self._idle: deque[UpstreamConnection] = deque()
        self._all: set[UpstreamConnection] = set()
        self.consecutive_failures = 0  # connects that failed in a row (passive health)
        self.retired = False  # a reload no longer uses this server's pool
        self.ejected_until = 0.0  # skipped by round-robin until then
        self.check_healthy = True  # active health checks' verdict (always True without them)
        self.checker: HealthChecker | None = None  # made by UpstreamPools.start_health_checks
        self.stats = stats if stats is not None else Stats()
        # Sticky sessions: an opaque, stable id of this server for the cookie
        # (not the URL itself), and the Set-Cookie values naming it.
        self.sticky_id = hashlib.sha256(server.url.encode("utf-8")).hexdigest()[:16]
        if upstream.sticky_cookie is not None:
            cookie = f"{upstream.sticky_cookie}={self.sticky_id}; Path=/; HttpOnly; SameSite=Lax".encode("ascii")
            self.set_cookie: tuple[bytes, bytes] = (cookie, cookie + b"; Secure")  # (plain, TLS client)

    def _endpoint(self, timeout: float | None = None) -> Any:
        """A client endpoint to this server (TLS-wrapped for https://); ``timeout``
        overrides the upstream's ``connect_timeout``."""
        host, port = self.server.host, self.server.port
        timeout = self.upstream.connect_timeout if timeout is None else timeout
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            endpoint: Any = HostnameEndpoint(self.reactor, host.encode("idna"), port, timeout=timeout)
        else:
            cls = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
            endpoint = cls(self.reactor, host, port, timeout=timeout)
        if self.server.tls:
            endpoint = wrapClientTLS(self._tls_creator, endpoint)
        return endpoint

    def available(self) -> bool:
        """Whether round-robin should send this server requests now: it passes
        its active health checks (if any) and is not passively ejected."""
        if not self.check_healthy:
            return False
        return not self.ejected_until or self.sweeper.now() >= self.ejected_until

    @property
    def healthy(self) -> bool:
        """Health as reported by the admin listener: passing its active checks
        (if any) and fewer than :data:`EJECT_AFTER` failed connects in a row."""
        return self.check_healthy and self.consecutive_failures < EJECT_AFTER

    def take_idle(self) -> UpstreamConnection | None:
        """An idle pooled connection, most recently used first, or None."""
        while self._idle:
            connection = self._idle.pop()
            if not connection._closed:
                connection.deadline = 0.0
                return connection
        return None

    def connect(self) -> defer.Deferred[UpstreamConnection]:
        """A new connection (not pooled until its first exchange ends)."""
        connection = UpstreamConnection(self)
        self._all.add(connection)
        self.sweeper.add(connection)
        d: defer.Deferred[UpstreamConnection] = self._endpoint().connect(_OneConnection(connection))

        def failed(failure: Failure) -> Failure:
            self.forget(connection)
            self.consecutive_failures += 1
            self.stats.connect_failures[self.server.url] += 1
            if self.consecutive_failures >= EJECT_AFTER:
                self.ejected_until = self.sweeper.now() + EJECTION_SECONDS
            return failure

        def connected(protocol: UpstreamConnection) -> UpstreamConnection:
            self.consecutive_failures = 0
            self.ejected_until = 0.0
            return protocol

        d.addCallbacks(connected, failed)
        return d

    def release(self, connection: UpstreamConnection) -> None:
        """Return a connection after a clean exchange, or close it if the pool
        is full or retired (a reload no longer uses this upstream)."""
        if self.retired or len(self._idle) >= self.upstream.max_idle_connections:
            connection.close()
            return
        connection.deadline = self.sweeper.now() + self.upstream.idle_connection_timeout
        connection.resume_reading()  # an idle connection must notice the server closing it
        self._idle.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        """Drop every reference to a closed connection."""
        self._all.discard(connection)
        self.sweeper.discard(connection)
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    @property
    def idle_count(self) -> int:
        """How many connections wait in the pool."""
        return len(self._idle)

    def close_all(self) -> None:
        """Close every connection of this server (shutdown)."""
        for connection in list(self._all):
            connection.close()

    def retire(self) -> None:
        """A reload dropped or changed this upstream: close the idle
        connections now and each busy one when its exchange ends."""
        self.retired = True
        while self._idle:
            self._idle.pop().close()


class UpstreamPools:
    """The servers of one upstream, chosen round-robin."""

    def __init__(self, reactor: Any, upstream: Upstream, sweeper: TimeoutSweeper, stats: Stats | None = None) -> None:
        self.upstream = upstream
        self.servers = [
            ServerPool(reactor, upstream, server, sweeper, build_client_tls(upstream, server) if server.tls else None,
                       stats)
            for server in upstream.servers
        ]
        self._next = 0
        # The sticky cookie's name, only when it can matter (several servers):
        # the data path checks this one attribute before any cookie work.
        self.sticky: bytes | None = (upstream.sticky_cookie.encode("ascii")
                                     if upstream.sticky_cookie is not None and len(self.servers) > 1 else None)
        self._by_sticky_id = {server.sticky_id.encode("ascii"): server for server in self.servers}

    def pick(self, avoid: ServerPool | None = None) -> ServerPool:
        """The next healthy server in turn, other than ``avoid`` when there is one.

        A server failing its active health checks is skipped while it fails
        them.  A server whose last :data:`EJECT_AFTER` connection attempts failed is
        skipped for :data:`EJECTION_SECONDS` (passive ejection); then it gets
        traffic again, and one success makes it healthy.  When every server
        is unhealthy or ejected, they are tried in turn all the same.
        """
        count = len(self.servers)
        if count == 1:
            return self.servers[0]  # the only choice, available or not
        for _ in range(count):
            server = self.servers[self._next % count]
            self._next += 1
            if server is avoid and count > 1:
                continue
            if server.available():
                return server
        server = self.servers[self._next % count]
        self._next += 1
        if server is avoid and count > 1:
            server = self.servers[self._next % count]
            self._next += 1
        return server

    def pick_sticky(self, headers: Sequence[Header], tls: bool,
                    avoid: ServerPool | None = None) -> tuple[ServerPool, bytes | None]:
        """The server a request goes to when the upstream has a sticky cookie
        (:attr:`sticky` is set), and the ``Set-Cookie`` value for the response
        (None when the request's cookie already names that server).

        The server named by the request's cookie is chosen when it is
        available (not unhealthy, not ejected) and not ``avoid``; otherwise
        the next server in turn, and the cookie is set to name it.
        """
        name = self.sticky
        wanted = None
        if name is not None:
            for key, value in headers:
                if len(key) == 6 and key.lower() == b"cookie":
                    for part in value.split(b";"):
                        key_part, equals, cookie = part.strip().partition(b"=")
                        if equals and key_part == name:
                            wanted = cookie.strip().strip(b'"')
                            break
                    if wanted is not None:
                        break
        if wanted is not None:
            server = self._by_sticky_id.get(wanted)
            if server is not None and server is not avoid and server.available():
                return server, None
        server = self.pick(avoid)
        if name is None or (wanted is not None and self._by_sticky_id.get(wanted) is server):
            return server, None
        return server, server.set_cookie[1 if tls else 0]

    def replace_tls(self, creators: Sequence[Any]) -> None:
        """New client TLS credentials, one per server (a reload read the files
        again): connections made from now on use them."""
        for server, creator in zip(self.servers, creators):
            server._tls_creator = creator

    def start_health_checks(self) -> None:
        """Start the active health checks, if the upstream has ``health_check_path`` (idempotent)."""
        if self.upstream.health_check_path is None:
            return
        for server in self.servers:
            if server.checker is None:
                server.checker = HealthChecker(server)
            server.checker.start()

    def stop_health_checks(self) -> None:
        """Stop the active health checks (a check in progress is abandoned)."""
        for server in self.servers:
            if server.checker is not None:
                server.checker.stop()

    def close_all(self) -> None:
        """Close every connection to every server."""
        for server in self.servers:
            server.close_all()

    def retire(self) -> None:
        """A reload no longer uses this upstream (as configured here): stop
        its health checks; connections close once their exchanges end."""
        self.stop_health_checks()
        for server in self.servers:
            server.retire()
