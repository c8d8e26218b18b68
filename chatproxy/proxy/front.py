"""The front connection: one client's HTTP/1.1 connection, parsed by httptools.

Requests are answered in order (pipelining), one exchange at a time; the
parser keeps reading ahead but the connection stops reading from the client
while a later request waits, so read-ahead stays bounded.  Timeouts: a request
head must arrive within ``header_timeout``; a connection with nothing going on
is closed after ``idle_timeout``, as is one whose request body stalls that long.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet.interfaces import IHalfCloseableDescriptor, IPushProducer, ISSLTransport, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproxy.http.messages import REASONS, Header, add_fields, client_ip, in_networks, local_response, replace_headers
from chatproxy.proxy import http2
from chatproxy.proxy.accesslog import AccessRecord
from chatproxy.proxy.exchange import Exchange
from chatproxy.proxy.forwarding import Connection, connection_of
from chatproxy.proxy.request import HostMemo, decide, unknown_method
from chatproxy.proxy.routing import allow_value
from chatproxy.proxy.sending import send
from chatproxy.proxy.tunnel import Tunnel
from chatproxy.proxy.websocket.bridge import WebSocketBridge

if TYPE_CHECKING:
    from chatproxy.config import Listener
    from chatproxy.proxy.upstream import UpstreamConnection
    from chatproxy.proxy.core import ProxyCore

log = Logger(namespace=__name__)  # (a compiled module has no frame Twisted could name it from)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNK_END = b"0\r\n\r\n"

#: Seconds an idle keep-alive connection stays open once the drain began: a
#: request already on its way is answered (with ``Connection: close``).
DRAIN_IDLE_GRACE = 1.0


class _Reject(Exception):
    """Raised inside a parser callback to refuse the request with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FrontConnectionBase:
    """What a client connection does and holds; :class:`FrontConnection` adds
    Twisted's ``Protocol`` to it.  Kept apart from ``Protocol`` (a Python class)
    so that the compiled build can make it a C-typed class (``front.pxd``, the
    same attributes as ``__slots__``: the two must stay in step,
    tests/test_compiled_build.py checks), whose own code then reads its
    attributes as C fields."""

    # Slots: a connection lives as long as its client (an idle chat session
    # for hours), so its state is kept in slots rather than a dictionary.
    __slots__ = ("transport", "connected", "factory", "core", "listener", "settings", "peer", "connection",
                 "deadline", "closing", "draining", "client_paused", "tunnel", "_deadline_kind", "_parser",
                 "_queue", "_parsing", "_read_pauses", "_in_head", "_head_bytes", "_url", "_headers",
                 "_max_headers", "_hosts", "_pending_error", "_upgrade_buffer", "_upgrade_request",
                 "_body_parser", "_starting", "_stop_parsing", "_peer_known", "_corked", "_out", "_chunked",
                 "_close_delimited", "_close_after_response", "_now")

    def __init__(self, factory: FrontFactory) -> None:
        self.transport: ITransport | None = None
        self.connected = 0
        self.factory: Any = factory  # (typed as Twisted's Protocol types it)
        self.core: ProxyCore = factory.core
        self.listener: Listener = factory.listener
        self.settings = self.core.settings
        self.peer = "-"
        self.connection = Connection(self.peer, self.listener.name, self.listener.tls)
        self.deadline = 0.0
        self.closing = False
        self.draining = False  # shutting down: close after the current exchange
        self.client_paused = False
        self.tunnel: Tunnel | WebSocketBridge | http2.H2Session | None = None  # who took the connection over
        self._deadline_kind = "header"
        self._parser: Any = httptools.HttpRequestParser(self)  # None once a session took the connection over
        self._queue: list[Exchange] = []  # in order (a list: an empty deque is ten times the size)
        self._parsing: Exchange | None = None
        self._read_pauses: set[str] = set()
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._headers: list[Header] = []
        self._max_headers = self.settings.max_headers
        self._hosts = HostMemo()
        self._pending_error: tuple[int, str] | None = None
        self._upgrade_buffer: list[bytes] | None = None
        self._upgrade_request: Exchange | None = None  # the request llhttp will stop after (an upgrade)
        self._body_parser: Any = None  # reads the body of an upgrade request chatproxy does not make
        self._starting = False
        self._stop_parsing = False
        self._peer_known = False
        self._corked = False
        self._out: list[bytes] = []
        # The response being written: chunked; delimited by closing; closing after it.
        self._chunked = False
        self._close_delimited = False
        self._close_after_response = False
        self._now = self.core.sweeper.now  # the clock deadlines are on (read several times a request)

    # -- connection lifecycle

    def connectionMade(self) -> None:
        self._identify_peer()
        _no_delay(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.core.sweeper.add(self)
        self.deadline = self._now() + self.settings.header_timeout
        self.core.connections.add(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.closing = True
        self.core.sweeper.discard(self)
        self.core.connections.discard(self)
        if self.tunnel is not None:
            self.tunnel.client_lost()
        for exchange in list(self._queue):
            exchange.client_gone()
        self._queue.clear()

    def _identify_peer(self) -> None:
        """Read the peer and local addresses.  Done again at the first bytes:
        behind a ``haproxy:`` endpoint the PROXY header has set them by then."""
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer = client_ip(peer.host) if hasattr(peer, "host") else "unix"
        port = getattr(self.transport.getHost(), "port", 0)  # type: ignore[union-attr]
        self._connection_facts(port)

    def _connection_facts(self, port: int) -> None:
        listener = self.listener
        self.connection = connection_of(self.peer, listener.name, listener.tls, port, listener.trusted_proxies)

    def dataReceived(self, data: bytes) -> None:
        if not self._peer_known:
            self._peer_known = True
            self._identify_peer()
            if self.listener.http2 and getattr(self.transport, "negotiatedProtocol", None) == http2.PROTOCOL:
                self._start_http2()
        if self.closing:
            return  # read only to see the client's end (see close)
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self._upgrade_buffer is not None:
            self._upgrade_buffer.append(data)
            return
        if self._stop_parsing:
            return
        self._feed(self._body_parser or self._parser, data)

    def _feed(self, parser: Any, data: bytes) -> None:
        """Parse ``data``; answer what breaks the stream (malformed, too large)."""
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            self._parse_stopped(error, data)
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.settings.max_header_bytes:
                self._stream_error(431, "request head too large")

    def _parse_stopped(self, error: Exception, data: bytes) -> None:
        """The parser stopped in ``data``: an upgrade, or a request it refuses."""
        if isinstance(error, httptools.HttpParserUpgrade):
            offset = int(error.args[0]) if error.args else len(data)
            self._upgraded(data[offset:])
        elif isinstance(error, httptools.HttpParserCallbackError):
            context = error.__context__
            if isinstance(context, _Reject):
                self._stream_error(context.status, context.message)
            else:
                log.failure("internal error while parsing a request", Failure(context) if context else None)
                self._stream_error(500, "internal error")
        elif self._stop_parsing:
            return  # what follows an upgrade request's body, on a connection that ends
        elif isinstance(error, httptools.HttpParserInvalidMethodError):
            self._stream_error(*unknown_method(data, str(error)))
        else:
            self._stream_error(400, f"malformed request: {error}")

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after a request asking to switch protocols (``Connection:
        upgrade`` with ``Upgrade``); ``rest`` is what followed its head."""
        if self.tunnel is not None:
            # The bridge took over while the parser was still running.
            if rest:
                self.tunnel.from_client(rest)
            return
        if self._stop_parsing:
            return  # refused (e.g. a WebSocket handshake with a body): nothing more is read
        exchange = self._upgrade_request
        self._upgrade_request = None
        if exchange is not None and not exchange.upgrade:
            # An upgrade chatproxy does not make: an ordinary request, whose body
            # (llhttp left it unparsed) is read with a parser of its own; the
            # connection ends with this exchange.
            if exchange.body_done:
                self.closing_after_queue()
                return
            self._body_parser = httptools.HttpRequestParser(_UpgradeRequestBody(self))
            self._body_parser.feed_data(_body_framing_head(exchange))
            if rest:
                self._feed(self._body_parser, rest)
            return
        # A WebSocket upgrade: what the client sent after it waits for the bridge or tunnel.
        self._upgrade_buffer = [rest] if rest else []
        self.pause_reading("upgrade")

    # -- timeouts

    def timed_out(self, now: float) -> None:
        """The current deadline passed: header, body or idle timeout."""
        self.deadline = 0.0
        if self._deadline_kind == "close":
            log.debug("client {peer} did not close within {seconds}s of being closed: connection reset",
                     peer=self.peer, seconds=self.settings.close_timeout)
            self._reset()
            return
        if self.tunnel is not None or self.closing:
            return
        if self._deadline_kind == "send":
            log.info("client {peer} read nothing for {seconds}s: disconnected", peer=self.peer,
                     seconds=self.settings.idle_timeout)
            if self._queue:
                self._queue[0].client_gone()
            self._reset()
            return
        if self._deadline_kind == "idle" and not self._queue:
            self.close()
            return
        exchange = self._parsing
        if self._deadline_kind == "body" and exchange is not None and not exchange.active:
            # Its body waits behind earlier exchanges, unread because the proxy
            # paused reading (pipelining): not the client's delay.
            self._set_deadline("body", self.settings.idle_timeout)
            return
        if exchange is not None and exchange.active and not exchange.finished:
            exchange.client_body_failed(408, "request body timed out")
            return
        self._stream_error(408, "request timed out")

    def _set_deadline(self, kind: str, seconds: float) -> None:
        if self.closing and kind != "close":
            return  # the close deadline stands until the connection is gone
        self._deadline_kind = kind
        self.deadline = self._now() + seconds

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        listener = self.factory.listener
        if listener is not self.listener:
            # A reload changed this listener: the next request follows it.
            self.listener = listener
            self._connection_facts(self.connection.port)
            if listener.allow is not None and self._peer_known and not in_networks(self.peer, listener.allow):
                raise _Reject(403, "client address no longer allowed on this listener")
        self.settings = settings = self.core.settings
        self._max_headers = settings.max_headers
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        if self._deadline_kind == "idle" or not self.deadline:
            self._set_deadline("header", self.settings.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.settings.max_url_bytes:
            raise _Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self._max_headers:
            raise _Reject(431, "too many request headers")
        # (the head's size is checked as bytes arrive, in dataReceived, and
        # once complete, in _make_exchange)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._stop_parsing:
            return
        exchange = self._make_exchange()
        self._parsing = exchange
        self._queue.append(exchange)
        if exchange.body_done:
            self.deadline = 0.0
        else:
            self._set_deadline("body", self.settings.idle_timeout)
        if len(self._queue) == 1:
            self._start_next()
        else:
            self.pause_reading("pipeline")

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is not None:
            if self._deadline_kind == "body":
                self.deadline = self._now() + self.settings.idle_timeout
            exchange.client_body(body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        if exchange is not None and self._upgrade_request is exchange and not exchange.upgrade \
                and not exchange.body_done:
            return  # llhttp skipped the body of this upgrade request: it is read after (see _upgraded)
        self._parsing = None
        if self._deadline_kind == "body":
            self.deadline = 0.0
        if exchange is not None and not exchange.body_done:
            exchange.client_body_done()

    # -- building the exchange from the parsed head

    def _make_exchange(self) -> Exchange:
        """The exchange of the request whose head was just parsed."""
        parser = self._parser
        upgrade = parser.should_upgrade()
        plan = self.core.plan
        request = decide(parser.get_method().decode("ascii"), parser.get_http_version(), parser.should_keep_alive(),
                         upgrade, self._url, self._headers, self.connection, plan.table,
                         self.settings.max_header_bytes, self._hosts)
        exchange = Exchange(self, request, plan)
        if upgrade:
            # llhttp stops after this request (see _upgraded); one chatproxy does
            # not make is forwarded as an ordinary request, and the connection
            # is not used again.
            self._upgrade_request = exchange
        if exchange.error is not None:
            # A bad request ends the connection: nothing after it is parsed.
            self.closing_after_queue()
        return exchange

    def closing_after_queue(self) -> None:
        """Stop reading: the connection ends once the queued exchanges are done."""
        self._stop_parsing = True
        self.pause_reading("closing")

    # -- running the queue

    def _start_next(self) -> None:
        if self._starting:
            return
        self._starting = True
        try:
            while self._queue and not self._queue[0].active and not self.closing:
                self._queue[0].start()
        finally:
            self._starting = False

    def exchange_done(self, exchange: Exchange, aborted: bool) -> None:
        """An exchange finished: start the next one, keep alive, or close."""
        if self._queue and self._queue[0] is exchange:
            del self._queue[0]
        if self._read_pauses:
            self.resume_reading("upstream")
            self.resume_reading("body")
        close_delimited, self._close_delimited = self._close_delimited, False
        closing, self._close_after_response = self._close_after_response, False
        self._chunked = False
        if aborted:
            self.abort(hard=close_delimited)
            return
        if closing or exchange.close_after or not exchange.client_keep_alive:
            self.close()
            return
        # Draining, after a response whose head went out before the drain began
        # (so it promised keep-alive): the client may send its next request at
        # once; it is answered with Connection: close (see drain()).
        if len(self._queue) <= 1:
            if self._read_pauses:
                self.resume_reading("pipeline")
            if self._parsing is not None and self._deadline_kind == "body":
                # Reading its body resumes: the body timeout starts afresh.
                self._set_deadline("body", self.settings.idle_timeout)
        if self._queue:
            self._start_next()
        elif self._pending_error is not None:
            self._answer_error(*self._pending_error)
        elif not self._in_head:
            self._set_deadline("idle", DRAIN_IDLE_GRACE if self.draining else self.settings.idle_timeout)

    def _stream_error(self, status: int, message: str) -> None:
        """The byte stream broke (malformed, too large, too slow): answer, then close."""
        exchange = self._parsing
        if exchange is not None and not exchange.body_done:
            # The request whose body broke.
            self._parsing = None
            self.closing_after_queue()
            exchange.client_body_failed(status, message)
            if not exchange.active:
                exchange.close_after = True
            return
        self.closing_after_queue()
        if self._queue:
            self._pending_error = (status, message)
            return
        self._answer_error(status, message)

    def _answer_error(self, status: int, message: str) -> None:
        """Answer a broken request stream, then close."""
        self._log_rejected(status)
        extra = ((b"Allow", allow_value(None)),) if status == 405 else ()
        own = self.listener.response_headers
        self.write(local_response(status, message, close=True, extra=replace_headers(extra, own) if own else extra))
        self.close()

    def _log_rejected(self, status: int) -> None:
        if self.core.access_log.enabled:
            now = self._now()
            self.core.access_log.log(AccessRecord(self.peer, "-", self._url.decode("latin-1")[:200] or "-", "1.1",
                                                  status, 0, 0.0, "", "", "", "", "", now))

    # -- the response, as HTTP/1.1 (ClientSide)

    def send_continue(self) -> None:
        """``100 Continue``: the client may send its body."""
        self.write(_CONTINUE)

    def send_head(self, status: int, reason: bytes, headers: list[Header], framing: str, close: bool) -> None:
        """Write a response head: ``headers`` as given, then the framing
        (a body of unknown length is chunked for an HTTP/1.1 client, delimited
        by closing the connection for HTTP/1.0) and ``Connection``."""
        version = self._queue[0].head.version if self._queue else "1.1"
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, "Unknown").encode("ascii"))]
        add_fields(parts, headers)
        if framing == "stream":
            if version == "1.1":
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self._chunked = True
            else:
                close = self._close_delimited = True
        if close:
            parts.append(b"Connection: close\r\n\r\n")
            self._close_after_response = True
        elif version == "1.0":
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        self.write(b"".join(parts))

    def send_switch(self, reason: bytes, headers: list[Header], protocol: bytes) -> None:
        """``101 Switching Protocols`` to ``protocol``."""
        parts = [b"HTTP/1.1 101 %s\r\n" % (reason or b"Switching Protocols")]
        add_fields(parts, headers)
        parts += (b"Connection: Upgrade\r\nUpgrade: ", protocol, b"\r\n\r\n")
        self.write(b"".join(parts))

    def send_body(self, data: bytes) -> None:
        """Response body bytes (a chunk of them when the response is chunked)."""
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._corked and not self.closing:
            self._out.append(data)  # write()'s work, inline: this is every response's path
        else:
            self.write(data)

    def end_response(self) -> None:
        """The end of the response body (the last chunk when chunked)."""
        if self._chunked:
            self.write(_CHUNK_END)

    # -- output, flow control

    def write(self, data: bytes) -> None:
        """Write bytes to the client (gathered while corked)."""
        if self.closing:
            return  # nothing goes out after the close (a late upstream byte, a tunnel's last ones)
        if self._corked:
            self._out.append(data)
        elif self.transport is not None:
            send(self.transport, data)

    def cork(self) -> None:
        """Gather writes until :meth:`uncork`, to send them as one."""
        self._corked = True

    def uncork(self) -> None:
        """Send what was gathered since :meth:`cork`."""
        self._corked = False
        self._flush()

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            if self.transport is not None:
                send(self.transport, out[0] if len(out) == 1 else b"".join(out))

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client for ``reason`` (until resumed for it).
        Not once closing: a closing connection reads on to see the client's end."""
        if self.closing:
            return
        if not self._read_pauses and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._read_pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        """Drop ``reason`` for not reading; read again when none is left."""
        if reason not in self._read_pauses:
            return
        self._read_pauses.discard(reason)
        if not self._read_pauses and self.transport is not None and not self.closing:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        """The client reads slower than the upstream sends: stop the upstream.
        A client that reads nothing for ``idle_timeout`` is disconnected."""
        self.client_paused = True
        if self.tunnel is None:
            self._set_deadline("send", self.settings.idle_timeout)
        if self.tunnel is not None:
            self.tunnel.client_writable(False)
        elif self._queue and self._queue[0].connection is not None:
            self._queue[0].connection.pause_reading()

    def resumeProducing(self) -> None:
        """The client caught up: read from the upstream again."""
        self.client_paused = False
        if self._deadline_kind == "send":
            if self._parsing is not None and not self._parsing.body_done:
                self._set_deadline("body", self.settings.idle_timeout)
            else:
                self._deadline_kind = "none"
                self.deadline = 0.0
        if self.tunnel is not None:
            self.tunnel.client_writable(True)
        elif self._queue and self._queue[0].connection is not None:
            self._queue[0].connection.resume_reading()

    def stopProducing(self) -> None:
        """The transport is going away."""

    def drain(self) -> None:
        """Shutdown: close once the current exchange is answered (with
        ``Connection: close``); an idle keep-alive connection is closed after
        :data:`DRAIN_IDLE_GRACE` unless a request comes first (answered with
        ``Connection: close``: a client that sent it just as the drain began
        gets its answer instead of a closed connection); an HTTP/2 session
        sends GOAWAY.  WebSocket sessions are closed by the proxy core,
        tunnels over the drain window."""
        self.draining = True
        if self.tunnel is not None:
            self.tunnel.drain()
        elif not self._queue and not self._in_head:
            self._set_deadline("idle", DRAIN_IDLE_GRACE)

    def close(self) -> None:
        """End the connection after what has been written is sent.

        The one way a front connection is ended, whatever ends it (an answer
        that closes, a timeout, a drain, a reload, an upgrade not bridged,
        the end of a tunnel).  From here on whatever the client sends is
        read and dropped: so the client's FIN or TLS close_notify is seen
        and the socket released at once (a transport left paused would never
        see it), and bytes the client is still sending (the rest of a refused
        body, pipelined requests) do not make the kernel reset the
        connection before the client has read the answer.  A plain TCP
        connection is half-closed (FIN after the last byte); a TLS one sends
        its close_notify.  A client that neither reads the answer nor closes
        within ``close_timeout`` is cut off (:meth:`timed_out`)."""
        if self.closing:
            return
        self._flush()  # what is corked must go out before the close
        self.closing = True
        transport = self.transport
        if transport is None:
            return
        # A TLS transport does not shut down while a producer is registered.
        transport.unregisterProducer()  # type: ignore[attr-defined]
        self._read_pauses.clear()
        transport.resumeProducing()  # type: ignore[attr-defined]
        self.core.sweeper.add(self)  # a tunnel's connection had left the sweeper
        self._set_deadline("close", self.settings.close_timeout)
        if _half_closeable(transport):
            transport.loseWriteConnection()  # type: ignore[attr-defined]
        else:
            transport.loseConnection()

    def abort(self, hard: bool = False) -> None:
        """Close without completing the response: the client must see a broken
        response, never one that looks complete.  ``hard``: the body was being
        delimited by the close itself (HTTP/1.0), so a clean close would make
        it look complete: reset the connection instead."""
        if hard:
            self._reset()
        else:
            self.close()

    def _reset(self) -> None:
        """Reset the connection now, whatever is still unsent."""
        self.closing = True
        self._out = []
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- the upgrade tunnel

    def _release_http_state(self) -> None:
        """The connection is a WebSocket session from now on: drop what only
        HTTP parsing needed (long-lived idle sessions should be small)."""
        self._headers = []
        self._url = b""
        self._parser = None  # (a parser holds its callbacks: about 1 KiB)
        self._upgrade_request = None
        self.core.sweeper.discard(self)

    def _start_http2(self) -> None:
        """TLS negotiated h2: an HTTP/2 session takes the connection over."""
        settings = self.settings
        limits = http2.Limits(max_streams=settings.http2_max_streams, max_header_list=settings.max_header_bytes,
                              idle_timeout=settings.idle_timeout, header_timeout=settings.header_timeout,
                              stall_timeout=settings.idle_timeout)
        self.deadline = 0.0
        self._release_http_state()
        self.tunnel = http2.H2Session(self, limits, self._hosts)

    def start_bridge(self, exchange: Exchange) -> None:
        """Hand this connection to the WebSocket bridge (a bridge-mode route
        accepted the upgrade request; the bridge now answers it)."""
        if self._queue and self._queue[0] is exchange:
            del self._queue[0]
        head = exchange.head
        assert head is not None and exchange.route is not None
        self.deadline = 0.0
        bridge = WebSocketBridge(self, exchange, exchange.plan.route_sockets(exchange.route))
        self.tunnel = bridge
        self.core.session_started(exchange, lambda: bridge.close_both(1012, "service restart: route changed"))
        self._release_http_state()
        buffered, self._upgrade_buffer = self._upgrade_buffer or [], None
        self._read_pauses.clear()
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        bridge.start(b"".join(buffered))

    def start_tunnel(self, exchange: Exchange, connection: UpstreamConnection, leftover: bytes) -> None:
        """Relay bytes both ways from now on (the upstream accepted the upgrade)."""
        if self._queue and self._queue[0] is exchange:
            del self._queue[0]
        self.deadline = 0.0
        self.tunnel = Tunnel(self, connection, exchange)
        self.core.session_started(exchange, self.close)
        self._release_http_state()
        buffered, self._upgrade_buffer = self._upgrade_buffer or [], None
        for chunk in buffered:
            self.tunnel.from_client(chunk)
        if leftover:
            self.tunnel.write(leftover)
        self._read_pauses.clear()
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]


@implementer(IPushProducer)
class FrontConnection(FrontConnectionBase, Protocol):
    """One client connection to a listener."""

    __slots__ = ()


class _UpgradeRequestBody:
    """Parser callbacks for the body of a request that asked for an upgrade
    chatproxy does not make: llhttp stops after such a request's head, so its
    body is framed by a second parser (fed a head with the same framing) and
    goes to the exchange as any request body does."""

    def __init__(self, front: FrontConnectionBase) -> None:
        self.front = front
        self.started = False

    def on_headers_complete(self) -> None:
        self.started = True

    def on_body(self, body: bytes) -> None:
        self.front.on_body(body)

    def on_message_complete(self) -> None:
        if self.started:
            self.started = False
            self.front.on_message_complete()
            self.front.closing_after_queue()  # the connection ends with this exchange


def _body_framing_head(exchange: Exchange) -> bytes:
    """A request head framing a body as ``exchange``'s is framed (chunked or by length)."""
    if exchange.chunked_in:
        return b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    return b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (exchange.content_length or 0)


def _half_closeable(transport: Any) -> bool:
    """Whether ending ``transport`` is a half-close (shutdown for writing,
    reading on until the client's FIN): a plain TCP or UNIX stream, directly
    or behind a PROXY-protocol wrapper.  Not TLS, which ends with its own
    close_notify (a TCP half-close under it would skip that)."""
    if ISSLTransport.providedBy(transport):
        return False
    return IHalfCloseableDescriptor.providedBy(_innermost(transport))


def _innermost(transport: Any) -> Any:
    """The socket transport under protocol wrappers (``haproxy:`` endpoints)."""
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport


def _no_delay(transport: Any) -> None:
    """Small responses go out at once (no Nagle delay), as nginx's tcp_nodelay."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


class FrontFactory(Factory):
    """Builds front connections for one listener."""

    protocol = FrontConnection
    noisy = False

    def __init__(self, core: ProxyCore, listener: Listener) -> None:
        self.core = core
        self.listener = listener

    def buildProtocol(self, addr: Any) -> FrontConnection:
        """A new client connection."""
        return FrontConnection(self)
