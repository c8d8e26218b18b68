"""One request/response exchange: a request value, the route's filters, an
upstream connection, the response, one access-log line.

An exchange is built from a complete :class:`~chatproxy.proxy.request.Request`
(or a :class:`~chatproxy.proxy.request.Rejection`) and the plan it was routed
with.  It runs the route's filter chain, takes an upstream connection (pooled,
or new), streams the request body to it and the response back, and ends with
one access-log line.  What it needs from the side of the client is the
:class:`ClientSide` interface: an HTTP/1.1 front connection implements it, and
so can anything else that carries one request and its response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from attrs import define, evolve, field
from twisted.internet.error import ConnectingCancelledError, TimeoutError as ConnectTimeout
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproxy.filters import Answer, Refuse
from chatproxy.filters.chain import Decision, FilterChain
from chatproxy.http.messages import HOP_BY_HOP, REASONS, Header, RequestHead, add_fields, replace_headers
from chatproxy.proxy.accesslog import AccessRecord
from chatproxy.proxy.forwarding import Connection, upstream_headers
from chatproxy.proxy.plain import plain_answer
from chatproxy.proxy.request import Rejection, Request
from chatproxy.proxy.routing import TRACE_METHODS, allow_value, method_refused

if TYPE_CHECKING:
    from chatproxy.config import Listener, Route
    from chatproxy.proxy.core import ProxyCore
    from chatproxy.proxy.plan import Plan
    from chatproxy.proxy.upstream import ServerPool, UpstreamConnection

log = Logger(namespace=__name__)  # (a compiled module has no frame Twisted could name it from)

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_BODY_BUFFER_LIMIT = 65536
_CHUNK_END = b"0\r\n\r\n"
_PLAIN_TEXT = (b"Content-Type", b"text/plain; charset=utf-8")
# Request headers chatproxy replaces with its own (Host, framing) or handles
# itself (Expect), besides the hop-by-hop ones.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"expect", b"content-length"}
_HOP_AND_LENGTH = HOP_BY_HOP | {b"content-length"}


class ClientSide(Protocol):
    """What an exchange needs from the side of the client: where its
    response goes and how reading the request is paced.  An HTTP/1.1 front
    connection is one; an HTTP/2 stream can be another."""

    core: ProxyCore
    listener: Listener
    connection: Connection
    client_paused: bool

    @property
    def closing(self) -> bool:
        """The client's side is ending: no keep-alive."""

    @property
    def draining(self) -> bool:
        """The proxy is shutting down: no keep-alive."""

    def send_continue(self) -> None:
        """Tell the client to send its body (an interim ``100 Continue``)."""

    def send_head(self, status: int, reason: bytes, headers: list[Header], framing: str, close: bool) -> None:
        """Start the response: ``headers`` are its end-to-end headers (no
        connection or framing headers but a ``Content-Length`` that came with
        it); ``framing`` says what follows: ``length`` (a body of that
        Content-Length), ``none`` (no body), ``stream`` (a body of unknown
        length, until :meth:`end_response`); ``close``: the connection ends
        after this response (HTTP/1.1's business)."""

    def send_switch(self, reason: bytes, headers: list[Header], protocol: bytes) -> None:
        """Accept the client's upgrade to ``protocol`` (WebSocket): HTTP/1.1's 101."""

    def send_body(self, data: bytes) -> None:
        """Response body bytes."""

    def end_response(self) -> None:
        """The response body is complete."""

    def cork(self) -> None:
        """Gather writes until :meth:`uncork` (to send them as one)."""

    def uncork(self) -> None:
        """Send what was gathered since :meth:`cork`."""

    def pause_reading(self, reason: str) -> None:
        """Stop reading the request (body) for ``reason``."""

    def resume_reading(self, reason: str) -> None:
        """Read again, as far as ``reason`` is concerned."""

    def exchange_done(self, exchange: Exchange, aborted: bool) -> None:
        """The exchange ended (``aborted``: its response must look broken)."""

    def start_bridge(self, exchange: Exchange) -> None:
        """Hand the connection to the WebSocket bridge (a bridge route's upgrade passed its filters)."""

    def start_tunnel(self, exchange: Exchange, connection: UpstreamConnection, leftover: bytes) -> None:
        """Relay bytes both ways from now on (the upstream accepted a tunnel route's upgrade)."""


def _end_to_end(headers: list[Header], names: list[bytes], drop: frozenset[bytes]) -> list[Header]:
    """The headers whose lower-cased name is not in ``drop`` nor listed in a
    Connection header.  (Index loops: in the compiled build, ``exchange.pxd``
    makes them C loops over the two lists, on every response.)"""
    count = len(names)
    if b"connection" in names:
        listed: set[bytes] = set()
        for i in range(count):
            if names[i] == b"connection":
                for token in headers[i][1].split(b","):
                    listed.add(token.strip().lower())
        if not listed <= drop:
            drop = drop | listed
    kept: list[Header] = []
    for i in range(count):
        if names[i] not in drop:
            kept.append(headers[i])
    return kept


def _connection_tokens(head: RequestHead, names: tuple[bytes, ...]) -> frozenset[bytes]:
    return frozenset(token.strip().lower() for (_, value), lower in zip(head.headers, names)
                     if lower == b"connection" for token in value.split(b",") if token.strip())


@define
class HeldResponse:
    """A response kept from the client while the route's response body hooks
    look at it: its head as it would be sent, the body bytes read so far,
    whether that is all of it, and whether the hooks are running."""

    status: int
    reason: bytes
    headers: list[Header]
    framing: str
    close: bool
    body: list[bytes] = field(factory=list)
    size: int = 0
    complete: bool = False
    inspecting: bool = False


class Exchange:
    """One request on a client side and the response it gets.

    Slotted: built on every request, and read and written all along it.  In
    the compiled build ``exchange.pxd`` beside this module makes it a C-typed
    class with the same attributes (reading one is then a field access, not a
    lookup by name); the two lists must name the same attributes
    (tests/test_compiled_build.py checks).
    """

    __slots__ = ("client", "plan", "request", "head", "content_length", "chunked_in", "body_done", "body_limit",
                 "started", "close_after", "_buffer", "error", "client_keep_alive", "upgrade", "expect_continue",
                 "names", "connection_named", "body_received", "active", "finished", "discarding", "route",
                 "chain", "server", "connection", "retried", "connect_retried", "set_cookie", "response_started",
                 "held", "status", "bytes_sent", "_buffered", "_inspect_limit", "_sent_continue", "_trailers")

    def __init__(self, client: ClientSide, request: Request | Rejection, plan: Plan) -> None:
        self.body_received = 0
        self.active = False
        self.finished = False
        self.discarding = False
        self.route: Route | None = None
        self.chain: FilterChain | None = None  # the route's filters, once started
        self.server: ServerPool | None = None
        self.connection: UpstreamConnection | None = None
        self.retried = False  # resent once after a pooled connection turned out stale
        self.connect_retried = False  # another server tried once after a failed connect
        self.set_cookie: bytes | None = None  # the sticky cookie for the response, when one is due
        self.response_started = False
        self.held: HeldResponse | None = None  # a response the response body hooks have not yet let go
        self.status = 0
        self.bytes_sent = 0
        self._buffered = 0
        # Body inspection: filters that read the first bytes of the body
        # before the request is forwarded (0: none is waiting for it).
        self._inspect_limit = 0
        self._sent_continue = False
        self._trailers: tuple[Header, ...] = ()  # fields after a request body
        self.client = client
        self.plan = plan  # the configuration this request was routed with, to its end
        self.request = request
        self.head: RequestHead = request.head
        self.content_length = request.content_length
        self.chunked_in = request.chunked
        self.body_done = not (request.chunked or (request.content_length or 0) > 0)
        self.body_limit = plan.settings.max_body_bytes
        self.started = client.core.sweeper.now()
        # After an upgrade request the parser is done with this connection:
        # unless the upgrade succeeds, the connection ends with this exchange.
        self.close_after = request.upgrade
        self._buffer: list[bytes] = []
        if isinstance(request, Rejection):
            self.error: tuple[int, str] | None = (request.status, request.message)
            self.client_keep_alive = self.upgrade = self.expect_continue = False
            self.names: tuple[bytes, ...] = tuple(name.lower() for name, _ in request.head.headers)
            self.connection_named: frozenset[bytes] = frozenset()
        else:
            self.error = None
            self.client_keep_alive = request.keep_alive
            self.upgrade = request.websocket  # an upgrade the proxy carries
            self.expect_continue = request.expect_continue
            self.names = request.names
            self.connection_named = request.connection_named

    # -- starting: route, filters, upstream

    def start(self) -> None:
        """Begin processing: this exchange is now first in the connection's queue."""
        self.active = True
        if self.error is not None:
            self.respond_local(self.error[0], self.error[1], close=True)
            return
        assert isinstance(self.request, Request)
        route, head = self.request.route, self.head
        listener = self.client.listener
        if listener.redirect_to_https or (self.plan.challenges is not None and not listener.tls):
            answer = plain_answer(listener, head, self.plan.challenges)  # ACME challenges, redirects to https
            if answer is not None:
                self.respond_answer(answer)
                return
        if head.method in TRACE_METHODS and method_refused(route, head.method):
            self.respond_local(405, f"{head.method} is not allowed", extra=((b"Allow", allow_value(route)),))
            return
        if route is None:
            self.respond_local(404, "no route for this request")
            return
        self.route = route
        self.body_limit = self.plan.body_limit(route)
        if self.content_length is not None and self.content_length > self.body_limit:
            self.respond_local(413, f"request body larger than {self.body_limit} bytes", close=True)
            return
        chain = self.chain = self.plan.chains[route.name]
        if chain.filters:
            chain.request(head, self._filtered)
        else:
            self._dispatch()

    def _filtered(self, decision: Decision, head: RequestHead) -> None:
        if self.finished:
            return
        if head is not self.head:
            # A filter rewrote the headers: what is forwarded follows.
            self.head = head
            self.names = tuple(name.lower() for name, _ in head.headers)
            self.connection_named = _connection_tokens(head, self.names)
        if decision is None:
            self._inspect_or_dispatch()
        else:
            self._decided(decision)

    def _decided(self, decision: Refuse | Answer) -> None:
        """A filter refused or answered the request."""
        if isinstance(decision, Refuse):
            self.respond_local(decision.status, decision.reason or None, extra=decision.headers)
        else:
            self.respond_answer(decision)

    def _inspect_or_dispatch(self) -> None:
        """Dispatch, or first collect the body for the route's body filters."""
        limit = self.chain.inspect_body_bytes if self.chain is not None and not self.upgrade else 0
        # Every request whose head announced a body gets the body hooks, even
        # when that body turned out empty (a chunked body of no chunks).
        if limit and (self.chunked_in or (self.content_length or 0) > 0):
            self._inspect_limit = limit
            if not self.body_done and self.expect_continue:
                self._send_continue()
            self._maybe_inspect()
            return
        self._dispatch()

    def _send_continue(self) -> None:
        if not self._sent_continue:
            self._sent_continue = True
            self.client.send_continue()

    def _maybe_inspect(self) -> None:
        """Run the body filters once enough of the body (or all of it) is here."""
        if not self._inspect_limit or self.finished:
            return
        if not self.body_done and self._buffered < self._inspect_limit:
            self.client.resume_reading("body")  # keep reading up to the inspection limit
            return
        limit, self._inspect_limit = self._inspect_limit, 0
        body = b"".join(self._buffer)
        assert self.chain is not None
        self.chain.body(self.head, body[:limit], self.body_done and len(body) <= limit, self._body_filtered)

    def _body_filtered(self, decision: Decision, head: RequestHead) -> None:
        if self.finished:
            return
        if head.notes != self.head.notes:
            self.head = evolve(self.head, notes=head.notes)  # for the access log; a body hook rewrites nothing
        if decision is None:
            self._dispatch()
        else:
            self._decided(decision)

    def _dispatch(self) -> None:
        assert self.route is not None
        if self.upgrade and self.route.ws.mode == "bridge":
            self.client.start_bridge(self)
            return
        pools = self.plan.pools[self.route.upstream]
        if pools.sticky is None:
            server = pools.pick(avoid=self.server)
        else:
            server, self.set_cookie = pools.pick_sticky(self.head.headers, self.client.connection.tls,
                                                        avoid=self.server)
        self.server = server
        connection = None if self.upgrade else server.take_idle()
        if connection is not None:
            self._attach(connection)
        else:
            server.connect().addCallbacks(self._attach, self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        if self.finished:
            return
        assert self.server is not None and self.route is not None
        log.warn("upstream {server} unreachable: {reason}", server=self.server.server.url,
                 reason=failure.getErrorMessage())
        if not self.connect_retried and len(self.plan.pools[self.route.upstream].servers) > 1:
            # Nothing was sent: trying another server is always safe.
            self.connect_retried = True
            self._dispatch()
            return
        timeout = failure.check(ConnectTimeout, ConnectingCancelledError) is not None
        self.respond_local(504 if timeout else 502,
                           "upstream timed out" if timeout else "upstream unreachable")

    def _attach(self, connection: UpstreamConnection) -> None:
        if self.finished:
            if connection.exchanges == 0 and connection.sink is None:
                connection.pool.release(connection)
            return
        self.connection = connection
        connection.begin(self, self._upstream_head(), self.head.method == "HEAD")
        if self.client.client_paused:
            connection.pause_reading()
        if self.expect_continue and not self.body_done and self._buffered == 0:
            self._send_continue()
        if self._buffer:
            for chunk in self._buffer:
                connection.send_body(self._frame(chunk))
            self._buffer = []
            self._buffered = 0
            self.client.resume_reading("body")
        if self.body_done:
            self._end_request_body(connection)

    def _frame(self, chunk: bytes) -> bytes:
        if self.chunked_in:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return chunk

    def _end_request_body(self, connection: UpstreamConnection) -> None:
        if self.chunked_in:
            trailers = self._trailers
            if trailers:
                lines = [b"0\r\n"]
                add_fields(lines, trailers)
                lines.append(b"\r\n")
                connection.send_body(b"".join(lines))
            else:
                connection.send_body(_CHUNK_END)
        connection.request_sent()

    def _upstream_head(self) -> bytes:
        """The request head as the upstream gets it (see :mod:`chatproxy.proxy.forwarding`)."""
        head, route, server = self.head, self.route, self.server
        assert route is not None and server is not None
        path = route.rewrite_path or head.path
        line = f"{head.method} {path}?{head.query} HTTP/1.1\r\n" if head.query else f"{head.method} {path} HTTP/1.1\r\n"
        lines = [line.encode("latin-1")]
        client_host = head.authority
        if self.plan.upstream_of(route).host_header == "client" and client_host:
            lines += (b"Host: ", client_host.encode("latin-1"), b"\r\n")
        else:
            lines += (b"Host: ", server.server.authority.encode("idna"), b"\r\n")
        add_fields(lines, upstream_headers(head.headers, self.names, self.connection_named, self.client.connection,
                                           client_host, _NOT_FORWARDED))
        if self.chunked_in:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif self.content_length is not None:
            lines.append(b"Content-Length: %d\r\n" % self.content_length)
        if self.upgrade:
            upgrade = head.header("upgrade") or "websocket"
            lines.append(b"Connection: Upgrade\r\nUpgrade: " + upgrade.encode("latin-1") + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # -- the request body from the client

    def client_body(self, data: bytes) -> None:
        """Bytes of the request body, as the client sends them."""
        self.body_received += len(data)
        if self.body_received > self.body_limit and not self.discarding:
            self._body_too_large()
            return
        if self.discarding:
            return
        if self.connection is not None:
            self.connection.send_body(self._frame(data))
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._inspect_limit:
            self._maybe_inspect()
        if self._buffered > max(_BODY_BUFFER_LIMIT, self._inspect_limit) and self.connection is None:
            self.client.pause_reading("body")

    def client_body_done(self, trailers: tuple[Header, ...] = ()) -> None:
        """The request body is complete (``trailers``: fields after it, passed on
        when the body goes to the upstream chunked)."""
        self.body_done = True
        self._trailers = trailers
        if self.discarding:
            return
        if self.connection is not None:
            self._end_request_body(self.connection)
        elif self._inspect_limit:
            self._maybe_inspect()

    def _body_too_large(self) -> None:
        message = f"request body larger than {self.body_limit} bytes"
        if not self.active:
            self.error = (413, message)
            self.discarding = True
            return
        self._give_up_upstream()
        if self.response_started:
            self._abort("request body over the limit after the response began")
        else:
            self.respond_local(413, message, close=True)

    def client_body_failed(self, status: int, message: str) -> None:
        """The request body was malformed (bad chunk framing)."""
        self._give_up_upstream()
        if not self.active:
            self.error = (status, message)
            return
        if self.response_started:
            self._abort(message)
        elif not self.finished:
            self.respond_local(status, message, close=True)

    def _give_up_upstream(self) -> None:
        if self.connection is not None:
            self.connection.abandon()
            self.connection = None

    # -- the response from the upstream (ResponseSink)

    def response_head(self, status: int, reason: bytes, headers: list[Header], names: list[bytes],
                      body_framing: str) -> None:
        """The upstream's response head: relay it to the client.  ``names`` are
        the header names lower-cased, in the same order."""
        if self.finished:
            return
        if status == 101:
            self._switching(reason, headers, names)
            return
        if self.upgrade:
            # The upstream refused the upgrade: relay its answer, then close.
            self.close_after = True
        out = _end_to_end(headers, names, HOP_BY_HOP if body_framing in ("length", "none") else _HOP_AND_LENGTH)
        if not self.body_done:
            # The upstream answered before the whole body arrived: the rest of
            # the body is read and dropped, and the connection ends afterwards.
            self.close_after = True
        if self.set_cookie is not None:
            out.append((b"Set-Cookie", self.set_cookie))  # sticky sessions: pins the client to this server
        client = self.client
        close = not self.client_keep_alive or self.close_after or client.closing or client.draining
        framing = "stream" if body_framing in ("chunked", "eof") else body_framing
        chain = self.chain
        if chain is not None and chain.inspect_response_bytes and chain.inspects_response(out):
            self.held = HeldResponse(status, reason, out, framing, close)
            return
        if (chain is None or not chain.sees_responses) and not client.listener.response_headers:
            self.status = status  # nothing to change: the common case, without a call more
            self.response_started = True
            client.send_head(status, reason, out, framing, close)
            return
        final = self._upstream_answer_headers(status, out)
        if final is None:
            return
        self._send_head(status, reason, final, framing, close)

    def _switching(self, reason: bytes, headers: list[Header], names: list[bytes]) -> None:
        """The upstream answered 101: relayed if an upgrade was asked for, else 502."""
        if not self.upgrade:
            self._give_up_upstream()
            self.respond_local(502, "upstream switched protocols without being asked")
            return
        out = _end_to_end(headers, names, HOP_BY_HOP)
        upgrade_to = next((v for (_, v), k in zip(headers, names) if k == b"upgrade"), b"websocket")
        if self.set_cookie is not None:
            out.append((b"Set-Cookie", self.set_cookie))
        final = self._upstream_answer_headers(101, out)
        if final is None:
            return
        self.status = 101
        self.response_started = True
        self.client.send_switch(reason, final, upgrade_to)

    def _answer_headers(self, status: int, headers: list[Header]) -> list[Header] | None:
        """The headers of an answer about to be sent on this exchange (the
        upstream's, the proxy's own, a filter's): as the route's response
        hooks change them (connection and framing headers are the proxy's and
        stay), then with the listener's ``response_headers``.  None when a
        response hook failed."""
        chain = self.chain
        if chain is not None and chain.sees_responses:
            changed = chain.response(self.head, status, headers)
            if isinstance(changed, Refuse):
                return None
            if changed is not headers:
                headers = [h for h in changed if h[0].lower() not in _HOP_AND_LENGTH] + \
                    [h for h in headers if h[0].lower() in _HOP_AND_LENGTH]
        own = self.client.listener.response_headers
        return replace_headers(headers, own) if own else headers

    def _upstream_answer_headers(self, status: int, headers: list[Header]) -> list[Header] | None:
        """:meth:`_answer_headers` for the upstream's answer; when a response hook
        failed, the upstream is given up and the client answered 500 instead (None)."""
        final = self._answer_headers(status, headers)
        if final is None:
            self._give_up_upstream()
            self.respond_local(500, "internal filter error", hooks=False)
        return final

    def _send_head(self, status: int, reason: bytes, headers: list[Header], framing: str, close: bool) -> None:
        self.status = status
        self.response_started = True
        self.client.send_head(status, reason, headers, framing, close)

    def response_body(self, data: bytes) -> None:
        """Response body bytes from the upstream."""
        if self.finished or not data:
            return
        held = self.held
        if held is not None:
            held.body.append(data)
            held.size += len(data)
            assert self.chain is not None
            if held.size >= self.chain.inspect_response_bytes:
                if self.connection is not None:
                    self.connection.pause_reading()  # until the hooks have let the response go
                self._inspect_response(held)
            return
        self.bytes_sent += len(data)
        self.client.send_body(data)

    def response_complete(self) -> None:
        """The upstream's response ended cleanly."""
        self.connection = None
        if self.finished:
            return
        held = self.held
        if held is not None:
            held.complete = True
            self._inspect_response(held)
            return
        self._response_ended()

    def _response_ended(self) -> None:
        self.client.end_response()
        if not self.body_done:
            self.discarding = True
            self.close_after = True
        self._finish()

    def _inspect_response(self, held: HeldResponse) -> None:
        """Give the held response to the response body hooks (once)."""
        if held.inspecting:
            return
        held.inspecting = True
        chain = self.chain
        assert chain is not None
        limit = chain.inspect_response_bytes
        body = b"".join(held.body)
        chain.response_body(self.head, held.status, held.headers, body[:limit], held.complete and len(body) <= limit,
                            self._response_inspected)

    def _response_inspected(self, decision: Decision, head: RequestHead) -> None:
        """The response body hooks decided: send the held response, or replace it."""
        held, self.held = self.held, None
        if self.finished or held is None:
            return
        if head.notes != self.head.notes:
            self.head = evolve(self.head, notes=head.notes)  # for the access log
        if decision is not None:
            if not held.complete:
                self._give_up_upstream()
                self.close_after = True
            self._decided(decision)
            return
        final = self._upstream_answer_headers(held.status, held.headers)
        if final is None:
            return
        client = self.client
        client.cork()
        self._send_head(held.status, held.reason, final, held.framing, held.close)
        for data in held.body:
            self.bytes_sent += len(data)
            client.send_body(data)
        client.uncork()
        if held.complete:
            self._response_ended()
        elif self.connection is not None and not client.client_paused:
            self.connection.resume_reading()

    def response_upgraded(self, leftover: bytes) -> None:
        """The upstream switched protocols: from now on bytes are relayed as they are."""
        connection, self.connection = self.connection, None
        assert connection is not None
        if self.finished:
            connection.abandon()
            return
        self.client.start_tunnel(self, connection, leftover)

    def upstream_failed(self, reason: str, timeout: bool) -> None:
        """The upstream connection failed or timed out during the exchange."""
        connection, self.connection = self.connection, None
        if self.finished:
            return
        if self._may_resend(connection, timeout):
            # A pooled connection the server had already closed: send again.
            self.retried = True
            self.server = None
            self._dispatch()
            return
        log.warn("{method} {target}: {reason}", method=self.head.method, target=self.head.target, reason=reason)
        if self.response_started:
            self._abort(reason)
        else:
            self.respond_local(504 if timeout else 502, "upstream timed out" if timeout else "bad gateway")

    def _may_resend(self, connection: UpstreamConnection | None, timeout: bool) -> bool:
        """Whether a request whose upstream connection failed may be sent again.

        The request head (at least) was already written to that connection,
        so the server may have acted on it: only an idempotent method (GET,
        HEAD, OPTIONS, TRACE, PUT, DELETE) is ever resent, and only without a
        body (a body already sent is not kept to send again).  And only once,
        when a reused pooled connection failed (not timed out) before any
        response byte: the server had closed it while it was idle."""
        if timeout or self.retried or self.response_started or connection is None:
            return False
        return (connection.reused and not connection.got_response_bytes and self.head.method in _IDEMPOTENT
                and not self.request.has_body and self.body_received == 0)

    def upstream_writable(self, writable: bool) -> None:
        """The upstream's send buffer filled (False) or drained (True)."""
        if writable:
            self.client.resume_reading("upstream")
        else:
            self.client.pause_reading("upstream")

    # -- endings

    def respond_local(self, status: int, message: str | None = None, *, close: bool = False,
                      extra: tuple[Header, ...] = (), hooks: bool = True) -> None:
        """Answer from the proxy itself (errors, refusals), through the route's
        response hooks unless ``hooks`` is False (the answer to a failed one)."""
        if self.finished:
            return
        if self.response_started:
            self._abort(message or REASONS.get(status, ""))
            return
        if not self.body_done:
            self.discarding = True
            close = True
        client = self.client
        close = close or self.close_after or not self.client_keep_alive or client.closing or client.draining
        self.close_after = close
        body = ((message or REASONS.get(status, "Unknown")) + "\n").encode("utf-8")
        headers = [_PLAIN_TEXT, (b"Content-Length", b"%d" % len(body)), *extra]
        final = self._answer_headers(status, headers) if hooks else \
            replace_headers(headers, client.listener.response_headers)
        if final is None:
            self.respond_local(500, "internal filter error", close=close, hooks=False)
            return
        self._send_whole(status, final, body, close)

    def _send_whole(self, status: int, headers: list[Header], body: bytes, close: bool) -> None:
        """A complete answer of the proxy's own (a body with its Content-Length in ``headers``), sent as one."""
        client = self.client
        client.cork()
        self._send_head(status, b"", headers, "length", close)
        if self.head.method != "HEAD":
            client.send_body(body)
            self.bytes_sent = len(body)
        client.end_response()
        client.uncork()
        self._finish()

    def respond_answer(self, answer: Answer) -> None:
        """Send a filter's complete answer."""
        if not self.body_done:
            self.discarding = True
            self.close_after = True
        headers = [(n, v) for n, v in answer.headers if n.lower() not in _HOP_AND_LENGTH]
        headers.append((b"Content-Length", b"%d" % len(answer.body)))
        final = self._answer_headers(answer.status, headers)
        if final is None:
            self.respond_local(500, "internal filter error", hooks=False)
            return
        self._send_whole(answer.status, final, answer.body, self.close_after or not self.client_keep_alive)

    def _abort(self, reason: str) -> None:
        """The response cannot be completed: close the client connection
        without anything that would make a truncated body look complete."""
        self.close_after = True
        self._give_up_upstream()
        self._finish(aborted=True)

    def client_gone(self) -> None:
        """The client connection closed before this exchange ended."""
        if self.finished:
            return
        self._give_up_upstream()
        if not self.response_started:
            self.status = 499
        self._finish(aborted=True)

    def _finish(self, aborted: bool = False) -> None:
        self.finished = True
        core = self.client.core
        core.stats.request(self.route.name if self.route else "", self.status, core.sweeper.now() - self.started,
                           self.bytes_sent, self.body_received, "h2" if self.head.version == "2" else "http/1.1")
        if core.access_log.enabled:
            core.access_log.log(self.record())
        self.client.exchange_done(self, aborted)

    def record(self) -> AccessRecord:
        """The access-log record of this exchange."""
        head = self.head
        return AccessRecord(
            client=head.client,
            method=head.method,
            target=head.target,
            version=head.version,
            status=self.status,
            bytes_sent=self.bytes_sent,
            duration=self.client.core.sweeper.now() - self.started,
            route=self.route.name if self.route else "",
            upstream=self.server.server.url if self.server else "",
            referer=head.header("referer") or "",
            user_agent=head.header("user-agent") or "",
            host=head.host,
            started=self.started,
            notes=head.notes,
        )
