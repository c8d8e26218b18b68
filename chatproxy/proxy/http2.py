"""HTTP/2 to clients: one :class:`H2Session` per connection, one
:class:`H2Stream` per request.

The front connection hands its transport over to a session when TLS
negotiated ``h2`` (ALPN), as it hands it to a tunnel after an upgrade: the
front connection keeps the socket, its flow control and its one close path;
the session speaks HTTP/2 with the ``h2`` library.  Each request stream
becomes the same request value an HTTP/1.1 head becomes
(:func:`chatproxy.proxy.request.decide`, after :mod:`h2headers`) and drives
the same :class:`~chatproxy.proxy.exchange.Exchange`: a stream is the
exchange's client side.  An extended CONNECT for WebSocket (RFC 8441) is
bridged or tunnelled as an HTTP/1.1 upgrade is, the stream standing in for
the connection.

Flow control maps onto the upstream's backpressure both ways: the request
body's window is reopened (WINDOW_UPDATE) only as the body goes on to the
upstream, and a response waits for the stream's window with its upstream
paused, so a slow reader on one stream holds neither the others nor the
proxy's memory.  What HTTP/2 lets a client ask of a server is bounded (see
:class:`Limits`): concurrent streams, header list size, resets and control
frames per ten seconds (rapid reset, floods), streams that never open their
window, idle connections; past a bound the connection gets GOAWAY
(ENHANCE_YOUR_CALM) and is closed.
"""

from __future__ import annotations

import base64
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from attrs import frozen
from hyperframe.frame import GoAwayFrame
from twisted.logger import Logger

from chatproxy.http.messages import Header
from chatproxy.proxy.exchange import Exchange
from chatproxy.proxy.h2headers import Malformed, StreamRequest, request_from_block, response_block, trailers_from_block
from chatproxy.proxy.request import Rejection, decide
from chatproxy.proxy.tunnel import Tunnel
from chatproxy.proxy.websocket.bridge import WebSocketBridge

if TYPE_CHECKING:
    from chatproxy.config import Listener
    from chatproxy.proxy.core import ProxyCore
    from chatproxy.proxy.forwarding import Connection
    from chatproxy.proxy.request import HostMemo
    from chatproxy.proxy.upstream import UpstreamConnection

log = Logger(namespace=__name__)  # (a compiled module has no frame Twisted could name it from)

PROTOCOL = b"h2"  # the ALPN name


@frozen
class Limits:
    """What one HTTP/2 connection may ask of the proxy."""

    max_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS
    max_header_list: int = 32768  # SETTINGS_MAX_HEADER_LIST_SIZE (the proxy's max_header_bytes)
    stream_window: int = 262144  # SETTINGS_INITIAL_WINDOW_SIZE: request body bytes in flight per stream
    connection_window: int = 4 * 1024 * 1024  # all streams together
    resets_per_10s: int = 200  # RST_STREAM from the client (rapid reset)
    control_frames_per_10s: int = 1000  # SETTINGS, PING, PRIORITY, WINDOW_UPDATE, empty DATA
    idle_timeout: float = 60.0  # no stream open
    header_timeout: float = 15.0  # the first request after the connection opened
    stall_timeout: float = 60.0  # a response waiting for a window the client does not open


class Carrier(Protocol):
    """What a session needs of the client connection that carries it (a front connection)."""

    core: ProxyCore
    listener: Listener
    connection: Connection
    closing: bool
    draining: bool
    transport: Any

    def write(self, data: bytes) -> None:
        """Send bytes on the connection."""

    def close(self) -> None:
        """End the connection (after what was written is sent)."""

    def abort(self, hard: bool = False) -> None:
        """End the connection at once."""

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client for ``reason``."""

    def resume_reading(self, reason: str) -> None:
        """Read again, as far as ``reason`` is concerned."""


class _Budget:
    """A count of events per ten seconds, refilled continuously (a token bucket)."""

    def __init__(self, per_10s: int, now: Callable[[], float]) -> None:
        self._rate = per_10s / 10.0
        self._capacity = float(per_10s)
        self._tokens = float(per_10s)
        self._now = now
        self._stamp = now()

    def take(self) -> bool:
        """Spend one; False once the budget is exhausted."""
        now = self._now()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class H2Session:
    """The HTTP/2 side of one client connection."""

    def __init__(self, front: Carrier, limits: Limits, memo: HostMemo) -> None:
        self.front = front
        self.core = front.core
        self.limits = limits
        self.memo = memo
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=False, normalize_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
        })
        self.conn.decoder.max_header_list_size = limits.max_header_list  # before our SETTINGS are acknowledged
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(limits.connection_window - 65535)
        self.streams: dict[int, H2Stream] = {}
        self._stalled: set[H2Stream] = set()  # streams whose response waits for the client's window
        self.closing = False
        self.draining = False
        self.last_stream = 0  # the highest stream id taken
        self._goaway_sent = False
        self._corked = 0
        self._transport_paused = False
        now = self.core.sweeper.now
        self._resets = _Budget(limits.resets_per_10s, now)
        self._control = _Budget(limits.control_frames_per_10s, now)
        self.deadline = now() + limits.header_timeout
        self.core.sweeper.add(self)
        self.flush()

    # -- bytes in

    def from_client(self, data: bytes) -> None:
        """Bytes from the client: h2's events, each handled, then what h2 has to say."""
        if self.closing:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            code = getattr(error, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self._fail(code, f"protocol error: {error}")
            return
        self.cork()
        try:
            for event in events:
                self._event(event)
                if self.closing:
                    return
        finally:
            self.uncork()

    def _event(self, event: Any) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)
        elif not self._control.take():
            self._calm("too many control frames")

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        self.last_stream = max(self.last_stream, stream_id)
        if self.draining:
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        key = base64.b64encode(os.urandom(16))
        request = request_from_block(event.headers, True, key)
        if isinstance(request, Malformed):
            log.info("HTTP/2 stream {id} from {peer} refused: {reason}", id=stream_id, peer=self.front.connection.peer,
                     reason=request.reason)
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        stream = H2Stream(self, stream_id, request)
        self.streams[stream_id] = stream
        self._deadline()
        stream.start(bool(event.stream_ended))

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if not event.data and not event.stream_ended and not self._control.take():
            self._calm("too many empty DATA frames")
            return
        if stream is None:
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.body(event.data, event.flow_controlled_length)

    def _ended(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.body_ended()

    def _reset(self, event: h2.events.StreamReset) -> None:
        if event.remote_reset and not self._resets.take():
            self._calm("too many streams reset (rapid reset)")
            return
        stream = self.streams.pop(event.stream_id, None)
        if stream is not None:
            stream.reset_by_client()
        self._deadline()

    def _window(self, event: h2.events.WindowUpdated) -> None:
        if not self._control.take():
            self._calm("too many WINDOW_UPDATE frames")
            return
        streams = self.streams.values() if event.stream_id == 0 else \
            [s for s in (self.streams.get(event.stream_id),) if s is not None]
        for stream in list(streams):
            stream.pump()

    def _settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if not self._control.take():
            self._calm("too many SETTINGS frames")
            return
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for stream in list(self.streams.values()):
                stream.pump()

    def _control_frame(self, event: Any) -> None:
        if not self._control.take():
            self._calm("too many control frames")

    def _terminated(self, event: h2.events.ConnectionTerminated) -> None:
        self._close_streams()
        self.closing = True
        self.flush(now=True)
        self.front.close()

    def _trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.body_ended(trailers_from_block(event.headers))

    # -- bytes out

    def cork(self) -> None:
        """Gather what h2 has to send until :meth:`uncork`."""
        self._corked += 1

    def uncork(self) -> None:
        """Send what was gathered (when no one holds the cork any more)."""
        self._corked -= 1
        if self._corked <= 0:
            self._corked = 0
            self.flush()

    def flush(self, now: bool = False) -> None:
        """Write what h2 has to send (unless corked; ``now``: even so)."""
        if self._corked and not now:
            return
        data = self.conn.data_to_send()
        if data:
            self.front.write(data)

    def client_writable(self, writable: bool) -> None:
        """The connection's send buffer filled (False) or drained: every stream's
        upstream pauses, and the client's frames are not read meanwhile (a
        client that keeps asking, PINGs say, without reading the answers)."""
        self._transport_paused = not writable
        if writable:
            self.front.resume_reading("h2-send")
        else:
            self.front.pause_reading("h2-send")
        for stream in list(self.streams.values()):
            stream.writable_changed()
        self._deadline()

    @property
    def sending_blocked(self) -> bool:
        """Whether the connection's send buffer is full."""
        return self._transport_paused

    # -- endings

    def drain(self) -> None:
        """Shutdown: GOAWAY with the last stream taken; the streams open finish,
        then the connection closes (new streams are refused)."""
        if self.draining or self.closing:
            return
        self.draining = True
        self._send_goaway(h2.errors.ErrorCodes.NO_ERROR)
        self._close_when_idle()

    def stream_done(self, stream: H2Stream) -> None:
        """A stream ended (its response sent, or reset)."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self._deadline()
        if self.draining:
            self._close_when_idle()

    def _close_when_idle(self) -> None:
        if not self.streams and not self.closing:
            self.closing = True
            self.flush(now=True)
            self.front.close()

    def _send_goaway(self, code: int) -> None:
        # h2's close_connection would also end the streams still open; a drain
        # lets them finish, so the GOAWAY is written as a frame of its own.
        if self._goaway_sent:
            return
        self._goaway_sent = True
        frame = GoAwayFrame(0, last_stream_id=self.last_stream, error_code=int(code))
        self.flush(now=True)
        self.front.write(frame.serialize())

    def _calm(self, why: str) -> None:
        log.info("HTTP/2 client {peer}: {why}: GOAWAY (ENHANCE_YOUR_CALM), connection closed",
                 peer=self.front.connection.peer, why=why)
        self.core.counters["http2_enhance_your_calm"] += 1
        self._fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, why)

    def _fail(self, code: int, why: str) -> None:
        """A connection error: GOAWAY with ``code``, every stream ended, the connection closed."""
        if self.closing:
            return
        log.debug("HTTP/2 connection error ({code}): {why}", code=code, why=why)
        self._send_goaway(code)
        self._close_streams()
        self.closing = True
        self.front.close()

    def _close_streams(self) -> None:
        for stream in list(self.streams.values()):
            stream.reset_by_client()
        self.streams.clear()

    def client_lost(self) -> None:
        """The connection is gone: every stream's exchange ends."""
        self.closing = True
        self.core.sweeper.discard(self)
        self._close_streams()

    # -- timeouts

    def stall_changed(self, stream: H2Stream) -> None:
        """A stream started or stopped waiting for its window."""
        if stream.stalled_since:
            self._stalled.add(stream)
        else:
            self._stalled.discard(stream)
        self._deadline()

    def _deadline(self) -> None:
        """The next deadline: idle (no stream), or the earliest stream stall."""
        if self.closing:
            return
        now = self.core.sweeper.now()
        self._stalled = {stream for stream in self._stalled if self.streams.get(stream.stream_id) is stream} \
            if self._stalled else self._stalled
        stalls = [stream.stalled_since for stream in self._stalled]
        if stalls:
            self.deadline = min(stalls) + self.limits.stall_timeout
        elif not self.streams:
            self.deadline = now + (self.limits.idle_timeout if self.last_stream else self.limits.header_timeout)
        else:
            self.deadline = 0.0

    def timed_out(self, now: float) -> None:
        """Idle for ``idle_timeout`` (or no request within ``header_timeout``),
        or a stream stalled on a closed window for ``stall_timeout``."""
        self.deadline = 0.0
        if self.closing:
            return
        if not self.streams:
            self._send_goaway(h2.errors.ErrorCodes.NO_ERROR)
            self.closing = True
            self.front.close()
            return
        for stream in list(self.streams.values()):
            if stream.stalled_since and stream.stalled_since + self.limits.stall_timeout <= now:
                log.info("HTTP/2 stream {id} of {peer}: window closed for {seconds}s: reset", id=stream.stream_id,
                         peer=self.front.connection.peer, seconds=self.limits.stall_timeout)
                stream.reset(h2.errors.ErrorCodes.CANCEL)
        if self._transport_paused and self.streams:
            self._fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "the client reads nothing")
            return
        self._deadline()


_HANDLERS: dict[type, Callable[[H2Session, Any], None]] = {
    h2.events.RequestReceived: H2Session._request,
    h2.events.DataReceived: H2Session._data,
    h2.events.StreamEnded: H2Session._ended,
    h2.events.StreamReset: H2Session._reset,
    h2.events.WindowUpdated: H2Session._window,
    h2.events.RemoteSettingsChanged: H2Session._settings,
    h2.events.PingReceived: H2Session._control_frame,
    h2.events.PriorityUpdated: H2Session._control_frame,
    h2.events.SettingsAcknowledged: lambda session, event: None,
    h2.events.PingAckReceived: H2Session._control_frame,
    h2.events.ConnectionTerminated: H2Session._terminated,
    h2.events.TrailersReceived: H2Session._trailers,
}


class H2Stream:
    """One request stream: the client side of its exchange (and, after a
    WebSocket handshake, of its tunnel or bridge)."""

    def __init__(self, session: H2Session, stream_id: int, request: StreamRequest) -> None:
        self.session = session
        self.stream_id = stream_id
        self.request = request
        self.core = session.core
        front = session.front
        self.listener = front.listener
        self.connection = front.connection
        self.exchange: Exchange | None = None
        self.client_paused = False
        self.stalled_since = 0.0
        self.transport: StreamTransport | None = None  # a bridged WebSocket's client leg speaks on it
        self.tunnel: Tunnel | WebSocketBridge | None = None
        self._pending: deque[bytes] = deque()
        self._end_pending = False
        self._ended = False  # our side of the stream is closed
        self._unacked = 0  # request body bytes consumed, not yet acknowledged
        self._read_pauses: set[str] = set()
        self._received = 0  # request body bytes, checked against content-length
        self._body_done = False
        self._early: list[bytes] = []  # a WebSocket client's first frames, until its session starts

    @property
    def closing(self) -> bool:
        """Whether the stream (or its connection) is ending."""
        return self._ended or self.session.closing

    @property
    def draining(self) -> bool:
        """Whether the proxy is shutting down."""
        return self.session.draining

    # -- the request

    def start(self, ended: bool) -> None:
        """Decide about the request and start its exchange."""
        session = self.session
        request = self.request
        plan = self.core.plan
        self._body_done = ended
        has_body = not ended and not request.websocket
        decision = decide(request.method, "2", True, request.websocket, request.target, list(request.headers),
                          self.connection, plan.table, self.core.settings.max_header_bytes, session.memo,
                          unframed_body=has_body)
        if len(request.target) > self.core.settings.max_url_bytes:
            decision = Rejection(414, "request target too long", decision.head)
        elif len(request.headers) > self.core.settings.max_headers:
            decision = Rejection(431, "too many request headers", decision.head)
        self.exchange = exchange = Exchange(self, decision, plan)
        if ended and not exchange.body_done:
            exchange.client_body_done()
        exchange.start()

    def body(self, data: bytes, flow_controlled: int) -> None:
        """DATA of the request body: on to the exchange; the window reopens as it goes on."""
        self._received += len(data)
        limit = self.request.content_length
        if limit is not None and self._received > limit:
            self.reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        self._unacked += flow_controlled
        exchange = self.exchange
        if self.tunnel is not None:
            self.tunnel.from_client(data)
        elif self.request.websocket:
            self._early.append(data)  # WebSocket frames before the bridge or tunnel is up
        elif exchange is not None and not exchange.finished:
            exchange.client_body(data)
        self._acknowledge()

    def body_ended(self, trailers: tuple[Header, ...] = ()) -> None:
        """END_STREAM from the client (with the trailers that ended it, if any)."""
        if self._body_done:
            return
        self._body_done = True
        limit = self.request.content_length
        if limit is not None and self._received != limit:
            self.reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        if self.tunnel is not None:
            self.tunnel.client_lost()
        elif self.exchange is not None and not self.exchange.body_done:
            self.exchange.client_body_done(trailers)

    def _acknowledge(self) -> None:
        if self._unacked and not self._read_pauses and not self._ended:
            try:
                self.session.conn.acknowledge_received_data(self._unacked, self.stream_id)
            except h2.exceptions.StreamClosedError:
                pass
            self._unacked = 0
            self.session.flush()

    def pause_reading(self, reason: str) -> None:
        """Stop reopening the request body's window (the upstream is slow)."""
        self._read_pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        """Reopen it as the body goes on."""
        self._read_pauses.discard(reason)
        self._acknowledge()

    # -- the response (ClientSide)

    def send_continue(self) -> None:
        """Interim 100: the client may send its body."""
        self._headers([(b":status", b"100")], end=False)

    def send_head(self, status: int, reason: bytes, headers: list[Header], framing: str, close: bool) -> None:
        """HEADERS of the response (END_STREAM when there is no body)."""
        self._headers(response_block(status, headers), end=framing == "none")

    def send_switch(self, reason: bytes, headers: list[Header], protocol: bytes) -> None:
        """An extended CONNECT accepted: 200 (RFC 8441), the stream carries the protocol from now on."""
        accepted = [h for h in headers if h[0].lower() != b"sec-websocket-accept"]
        self._headers(response_block(200, accepted), end=False)

    def _headers(self, block: list[Header], end: bool) -> None:
        if self._ended:
            return
        try:
            self.session.conn.send_headers(self.stream_id, block, end_stream=end)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self._ended = True
            return
        if end:
            self._ended = True
        self.session.flush()

    def send_body(self, data: bytes) -> None:
        """DATA of the response, as the stream's window allows."""
        self.write(data)

    def write(self, data: bytes) -> None:
        """Bytes on the stream (a response body, a tunnel's bytes, WebSocket frames)."""
        if self._ended or not data:
            return
        self._pending.append(data)
        self.pump()

    def end_response(self) -> None:
        """END_STREAM once what is pending is sent."""
        self._end_pending = True
        self.pump()

    def pump(self) -> None:
        """Send what is pending as far as the windows allow; pause the upstream
        while they are closed."""
        conn = self.session.conn
        while self._pending and not self._ended:
            try:
                window = min(conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                self._ended = True
                break
            if window <= 0:
                break
            chunk = self._pending.popleft()
            if len(chunk) > window:
                self._pending.appendleft(chunk[window:])
                chunk = chunk[:window]
            conn.send_data(self.stream_id, chunk)
        if not self._pending and self._end_pending and not self._ended:
            self._ended = True
            try:
                conn.end_stream(self.stream_id)
            except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
                pass
        self.session.flush()
        self.writable_changed()
        if self._ended and (self.tunnel is not None or self.exchange is None or self.exchange.finished):
            self.session.stream_done(self)

    def writable_changed(self) -> None:
        """Pause or resume what feeds this stream (the upstream, the other leg)."""
        blocked = bool(self._pending) or self.session.sending_blocked
        if blocked == self.client_paused:
            return
        self.client_paused = blocked
        self.stalled_since = self.core.sweeper.now() if self._pending else 0.0
        self.session.stall_changed(self)
        if self.tunnel is not None:
            self.tunnel.client_writable(not blocked)
        elif self.exchange is not None and self.exchange.connection is not None:
            if blocked:
                self.exchange.connection.pause_reading()
            else:
                self.exchange.connection.resume_reading()

    def cork(self) -> None:
        """Gather frames until :meth:`uncork`."""
        self.session.cork()

    def uncork(self) -> None:
        """Send what was gathered."""
        self.session.uncork()

    # -- endings

    def exchange_done(self, exchange: Exchange, aborted: bool) -> None:
        """The exchange ended: an aborted one resets the stream (a response that
        cannot be completed must look broken); a request body the response did
        not wait for is stopped with RST_STREAM (NO_ERROR)."""
        if aborted:
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        if not self._body_done and not self._ended:
            self._end_pending = True
            self.pump()
            if self._ended:
                self.reset(h2.errors.ErrorCodes.NO_ERROR)
            return
        self.pump()

    def reset(self, code: int) -> None:
        """RST_STREAM with ``code``; the exchange ends."""
        self._pending.clear()
        if not self._ended:
            self._ended = True
            try:
                self.session.conn.reset_stream(self.stream_id, code)
            except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
                pass
            self.session.flush()
        self.reset_by_client()

    def reset_by_client(self) -> None:
        """The stream is gone: its exchange (or tunnel, or bridge) ends."""
        self._ended = True
        self._pending.clear()
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.client_lost()  # it logs the session
        elif self.exchange is not None and not self.exchange.finished:
            self.exchange.client_gone()
        self.session.stream_done(self)

    def close(self) -> None:
        """End the stream after what is pending (a tunnel's or bridge's end)."""
        self._end_pending = True
        self.pump()

    def abort(self, hard: bool = False) -> None:
        """End the stream at once."""
        self.reset(h2.errors.ErrorCodes.CANCEL)

    # -- WebSocket over HTTP/2 (RFC 8441)

    def start_tunnel(self, exchange: Exchange, connection: UpstreamConnection, leftover: bytes) -> None:
        """Relay the stream's DATA and the upstream's bytes both ways (a tunnel route)."""
        self.tunnel = Tunnel(self, connection, exchange)
        self.core.session_started(exchange, self.close)
        early, self._early = self._early, []
        for data in early:
            self.tunnel.from_client(data)
        if leftover:
            self.tunnel.write(leftover)

    def start_bridge(self, exchange: Exchange) -> None:
        """Hand the stream to the WebSocket bridge: its client leg speaks on the
        stream (:class:`StreamTransport`) as on a connection."""
        self.transport = StreamTransport(self)
        route = exchange.route
        assert route is not None
        bridge = WebSocketBridge(self, exchange, exchange.plan.route_sockets(route))
        self.tunnel = bridge
        self.core.session_started(exchange, lambda: bridge.close_both(1012, "service restart: route changed"))
        early, self._early = self._early, []
        bridge.start(b"".join(early))


class StreamTransport:
    """A stream as the transport of a bridged WebSocket's client leg.

    Autobahn answers the handshake (written out for it as HTTP/1.1) with an
    HTTP/1.1 response: its head becomes the stream's response HEADERS (101
    as RFC 8441's 200, a refusal with its status), what follows is DATA."""

    disconnecting = False

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        self._head = b""  # the HTTP/1.1 response head, until it is complete
        self._head_done = False
        self._producer: Any = None

    def write(self, data: bytes) -> None:
        """Bytes from the client leg."""
        if self._head_done:
            self.stream.write(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return
        head, rest = self._head[:end], self._head[end + 4:]
        self._head_done = True
        self._head = b""
        status, headers = _parse_head(head)
        if status == 101:
            self.stream.send_switch(b"", headers, b"websocket")
        else:
            self.stream.send_head(status, b"", headers, "stream", True)
            self.stream.end_response()
        if rest:
            self.stream.write(rest)

    def writeSequence(self, data: list[bytes]) -> None:
        """Several writes at once."""
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """The leg is done: the stream ends after what is pending."""
        self.disconnecting = True
        self.stream.close()

    def abortConnection(self) -> None:
        """The leg gives up: the stream is reset."""
        self.disconnecting = True
        self.stream.abort()

    def getPeer(self) -> Any:
        """The client connection's peer."""
        return self.stream.session.front.transport.getPeer()

    def getHost(self) -> Any:
        """The client connection's local address."""
        return self.stream.session.front.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Kept; the stream's window says when it may send."""
        self._producer = producer

    def unregisterProducer(self) -> None:
        """Forgotten."""
        self._producer = None

    def pauseProducing(self) -> None:
        """Reading from the client leg pauses: the stream's window stays closed."""
        self.stream.pause_reading("websocket")

    def resumeProducing(self) -> None:
        """The window reopens."""
        self.stream.resume_reading("websocket")

    def stopProducing(self) -> None:
        """Nothing to stop."""


def _parse_head(head: bytes) -> tuple[int, list[Header]]:
    """(status, headers) of an HTTP/1.1 response head Autobahn wrote."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
    headers: list[Header] = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name:
            headers.append((name.strip(), value.strip()))
    return status, headers
