"""The WebSocket bridge: Autobahn on both legs, messages relayed between them.

For an upgrade request on a route with ``websocket = yes`` (bridge mode), the
front connection hands its transport to an Autobahn *server* protocol (the
client leg).  When Autobahn has validated the client's handshake it asks
:meth:`ClientLeg.onConnect`, which opens the upstream with an Autobahn
*client* protocol (the upstream leg) and answers only once the upstream has
accepted: the client then gets its 101 with the subprotocol the upstream
chose; a refusal gets the upstream's status, an unreachable upstream 502, a
late one 504.

Messages are relayed whole (Autobahn reassembles fragmented messages and
validates UTF-8), in order, through the route's message filters.  A close
from either side is passed on with its code and reason unchanged, once
:func:`close_frame_problem` found it valid (payload of 0 or 2-125 bytes,
code 1000-1003, 1007-1014 or 3000-4999, UTF-8 reason); an invalid one is
never passed on: its sender gets 1002 and so does the other leg (1002, as
for any protocol error of a peer: the session ended on a protocol error,
and the other peer did nothing wrong but is told why), and the access log
records 1002.  An abrupt loss of the upstream closes the client with 1011,
an abrupt loss of the client closes the upstream with 1001.

Closing relays what is still in flight.  When one leg's peer closes, or the
leg fails (Autobahn: 1002 protocol error, 1007 invalid UTF-8, 1009 too big),
the close goes on to the other leg at once; what that leg's peer sent before
answering it is still relayed to the first, and only then does the first
leg get its close frame: the other peer's answer, passed through (or its
own code echoed if the other leg went away), or its failure's code.  Nothing
is relayed from a leg after its peer's close or its failure, and nothing is
sent on a leg after its close frame.  The wait is bounded by the other
leg's close handshake timeout (``close_timeout``).  chatproxy's own closes (limits,
filters, idle, reload, drain) close both legs at once.  Once a leg's close
handshake is complete its connection ends cleanly (the client leg through
the front connection, which reads on until the client's FIN or TLS
close_notify); only a close handshake that timed out is aborted.

Each leg's slowness pauses reading from the other; bytes sent to a leg that
stays paused are counted and past ``max_buffered_bytes`` the session is
closed with 1013.  A leg whose messages are no longer relayed is read
again whatever the other's backlog, so that its answer to the close frame
gets through.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]
from attrs import evolve
from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproxy.filters import CloseSession
from chatproxy.proxy.sending import send
from chatproxy.http.messages import FORWARDING, HOP_BY_HOP

if TYPE_CHECKING:
    from chatproxy.config import Route
    from chatproxy.proxy.exchange import Exchange
    from chatproxy.proxy.front import FrontConnection

log = Logger()

# Close codes used when one side vanishes without a close frame.
UPSTREAM_LOST = 1011
CLIENT_LOST = 1001
# Request headers the bridge does not copy to the upstream handshake: the
# handshake's own (Autobahn writes fresh ones), hop-by-hop ones, and those
# chatproxy sets itself.
_NOT_COPIED = HOP_BY_HOP | FORWARDING | {
    b"host", b"origin", b"user-agent", b"content-length", b"via",
    b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"sec-websocket-accept", b"pragma", b"cache-control",
}


class _Refused(Exception):
    """The upstream refused the handshake with an HTTP status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


# ---------------------------------------------------------------------------
# The two legs


class _FastFrames:
    """The common case of the relay, done without Autobahn's general machinery:
    a whole unfragmented, uncompressed text or binary frame of up to 64 KiB in
    an open session.  Parsing it, masking and framing the message sent on, and
    writing it (at once when nothing is queued, see
    :func:`chatproxy.proxy.sending.send`) otherwise goes through half a dozen
    Autobahn methods per message, each formatting debug-log arguments and
    keeping statistics nobody reads; that was most of the bridge's CPU.

    Anything else -- a frame not yet complete, a fragment, a control frame,
    compression, a limit exceeded, invalid UTF-8, a protocol violation, a
    session not open -- is left to Autobahn untouched, which handles (and
    fails) it as before: the checks here only decide whether the fast path
    applies, never what is an error.
    """

    data: bytes  # Autobahn's receive buffer
    _RECEIVE_MASKED: bool  # frames from the peer are masked (it is a client)
    _SEND_MASKED: bool  # frames to the peer are masked (we are its client)

    def processData(self) -> bool:
        if _FAST_PATH:
            try:
                message = self._whole_small_frame()
            except AttributeError:  # an Autobahn whose internals differ: its own path from now on
                _disable_fast_path()
                message = None
            if message is not None:
                payload, binary = message
                self.onMessage(payload, binary)  # type: ignore[attr-defined]
                return len(self.data) > 0
        return super().processData()  # type: ignore[misc,no-any-return]

    def _whole_small_frame(self) -> tuple[bytes, bool] | None:
        """Take a whole small text/binary frame off the receive buffer when the
        fast path applies (see the class docstring), else None (nothing taken)."""
        data = self.data
        if not (self.current_frame is None and self.state == _OPEN  # type: ignore[attr-defined]
                and not self.inside_message and self._perMessageCompress is None  # type: ignore[attr-defined]
                and len(data) >= 2 and (data[0] == 0x81 or data[0] == 0x82)):  # FIN, no RSV, text/binary
            return None
        b1 = data[1]
        masked = b1 >= 0x80
        if masked != self._RECEIVE_MASKED:
            return None
        length = b1 & 0x7F
        start = 2
        if length == 126 and len(data) >= 4:
            length = int.from_bytes(data[2:4], "big")
            start = 4 if length >= 126 else 0  # not the minimal encoding: Autobahn's to refuse
        elif length > 125:
            start = 0  # 64-bit lengths: left to Autobahn
        if not start:
            return None
        key = data[start:start + 4] if masked else b""
        start += len(key)
        end = start + length
        frame_limit = self.maxFramePayloadSize  # type: ignore[attr-defined]
        message_limit = self.maxMessagePayloadSize  # type: ignore[attr-defined]
        if len(data) < end or 0 < frame_limit < length or 0 < message_limit < length or self.logFrames:  # type: ignore[attr-defined]
            return None
        payload = _unmask(data[start:end], key) if key and length else data[start:end]
        text = data[0] == 0x81
        if text and self.utf8validateIncoming and not _is_utf8(payload):  # type: ignore[attr-defined]
            return None  # Autobahn fails the session with 1007
        restart_ping = self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic  # type: ignore[attr-defined]
        self.data = data[end:]
        if restart_ping:
            self._cancelAutoPingTimeoutCall()  # type: ignore[attr-defined]
        return payload, not text

    def sendMessage(self, payload: bytes, isBinary: bool = False, fragmentSize: int | None = None,
                    sync: bool = False, doNotCompress: bool = False) -> None:
        length = len(payload)
        try:
            general = (not _FAST_PATH or fragmentSize is not None or sync or length > 0xFFFF
                       or self.state != _OPEN  # type: ignore[attr-defined]
                       or self._perMessageCompress is not None or self.autoFragmentSize  # type: ignore[attr-defined]
                       or self.send_queue or self.logFrames  # type: ignore[attr-defined]
                       or 0 < self.maxMessagePayloadSize < length)  # type: ignore[attr-defined]
        except AttributeError:  # an Autobahn whose internals differ
            _disable_fast_path()
            general = True
        if general:
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)  # type: ignore[misc]
            return
        head = b"\x82" if isBinary else b"\x81"
        if self._SEND_MASKED:
            key = random.getrandbits(32).to_bytes(4, "big")  # as Autobahn does
            if length < 126:
                frame = head + bytes((0x80 | length,)) + key
            else:
                frame = head + b"\xfe" + length.to_bytes(2, "big") + key
            frame += _unmask(payload, key) if length else b""
        elif length < 126:
            frame = head + bytes((length,)) + payload
        else:
            frame = head + b"\x7e" + length.to_bytes(2, "big") + payload
        send(self.transport, frame)  # type: ignore[attr-defined]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Close frames, pings and pongs, and what the fast path leaves to Autobahn.
        if sync or chopsize or self.send_queue or self.logOctets:  # type: ignore[attr-defined]
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
        else:
            send(self.transport, data)  # type: ignore[attr-defined]


_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSING = WebSocketProtocol.STATE_CLOSING
#: Whether the fast path is used: it reads Autobahn's protocol attributes, so
#: an Autobahn whose internals differ turns it off (and is used for everything).
_FAST_PATH = True


def _disable_fast_path() -> None:
    global _FAST_PATH
    if _FAST_PATH:
        _FAST_PATH = False
        log.warn("this Autobahn version's internals differ from what the WebSocket fast path reads: "
                 "every frame goes through Autobahn (slower, same behaviour)")


def _unmask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (masking and unmasking alike)."""
    n = len(payload)
    if n > 1024:
        return create_xor_masker(key, n).process(payload)  # type: ignore[no-any-return]
    whole = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(whole, "little")).to_bytes(n, "little")


def _is_utf8(payload: bytes) -> bool:
    """Valid UTF-8 as WebSocket requires it (no surrogates, no overlong forms)."""
    if payload.isascii():
        return True
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: Close codes a peer may send (RFC 6455 7.4): Autobahn's list of the
#: allowed ones (1000-1003, 1007-1013), 1014 (registered with IANA since), and
#: 3000-4999 (see close_frame_problem).  0-999, 1004-1006, 1015-2999 and 5000
#: up are not: 1005, 1006 and 1015 only stand for "no code", "connection
#: lost" and "TLS failed" locally, never on the wire.
_WIRE_CLOSE_CODES = frozenset(WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED) | {1014}


def close_frame_problem(length: int, code: int | None, reason: bytes | None) -> str | None:
    """What is wrong with a close frame received from a peer, or None if it
    is valid.  ``length`` is its payload length, ``code`` and ``reason`` the
    status code and reason bytes in it (None when absent).

    Valid (RFC 6455 5.5, 5.5.1, 7.4): an empty payload (no code), or 2 to 125
    bytes: a code of 1000-1003, 1007-1014 or 3000-4999, then a UTF-8 reason.
    No I/O: the bridge calls it for every close frame before anything is
    relayed."""
    if length == 1:
        return "close frame with a 1-byte payload"
    if length > 125:
        return f"close frame with a {length}-byte payload (control frames carry at most 125)"
    if code is None:
        return None if not reason else "close frame with a reason but no code"
    if code not in _WIRE_CLOSE_CODES and not 3000 <= code <= 4999:
        return f"invalid close code {code}"
    if reason and not _is_utf8(reason):
        return "close reason is not UTF-8"
    return None


def _close_payload_length(leg: Any, code: int | None, reason: bytes | None) -> int:
    """The payload length of the close frame ``leg`` is processing: from
    Autobahn's frame header when it has one (a 1-byte payload reaches
    onCloseFrame as no code at all), else what the code and reason add up to."""
    length = getattr(getattr(leg, "current_frame", None), "length", None)
    if isinstance(length, int):
        return length
    return (0 if code is None else 2) + len(reason or b"")


class _BridgeLeg:
    """What both legs share: they hand messages, close frames, failures and
    their end to the bridge, and send the close frames it decides on.

    A leg's close frame may have to wait: when its peer closed first, or when
    it failed, the close goes on to the other leg at once, but this leg's own
    close frame (the answer, or the failure's close) is sent only once the
    other leg has answered (or is gone), so that the messages the other peer
    sent before its answer still reach this peer first (RFC 6455 allows an
    endpoint to finish sending before it answers a close; nothing is sent on
    a leg after its close frame).  Autobahn would answer a close and send a
    failure's close at once; the leg does both itself, with Autobahn's
    ``sendCloseFrame``, and then tells Autobahn's ``onCloseFrame`` that the
    close handshake is complete, which ends the connection Autobahn's way
    (a server drops it at once, a client waits for the server to, bounded by
    ``serverConnectionDropTimeout``).  A close frame this leg sends first is
    answered within ``closeHandshakeTimeout`` or the connection is dropped.
    """

    bridge: WebSocketBridge
    state: int
    #: Its peer sent a close frame: nothing it sends is relayed any more.
    peer_closed = False
    #: It failed (Autobahn's code and reason): nothing it sends is relayed any more.
    failed: tuple[int, str] | None = None
    #: The close frame (code, reason) its peer is owed, sent once the other leg has answered.
    owed: tuple[int | None, bytes | None] | None = None
    #: A close frame was sent first on it and its peer has not answered yet.
    awaiting_answer = False
    #: Both close frames went: its connection may end without an abort.
    closed_cleanly = False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.bridge.relay(self, payload, isBinary)

    def onPing(self, payload: bytes) -> None:
        # Nothing is sent to a peer that broke the protocol or closed, its close aside.
        if self.failed is None and not self.peer_closed:
            super().onPing(payload)  # type: ignore[misc]

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> Any:
        # Checked here, before anything is relayed, whatever Autobahn checked or
        # will check (it fails a 1-byte payload before calling this, a bad code
        # only in its own onCloseFrame, which is never given the frame).
        problem = close_frame_problem(_close_payload_length(self, code, reasonRaw), code, reasonRaw)
        if self.state == _OPEN:  # the peer closes (or closes while its close is owed)
            self.peer_closed = True
            if problem is not None:
                self._fail_connection(1002, problem)
            else:
                self.bridge.close_received(self, code, reasonRaw)
        elif self.state == _CLOSING and self.awaiting_answer:  # the answer to our close
            self.awaiting_answer = False
            if problem is not None:
                log.info("WebSocket {side} answered its close with an invalid close frame: {problem}",
                         side=self.bridge.side(self), problem=problem)
                code, reasonRaw = 1002, problem.encode()
            self.bridge.close_answered(self, code, reasonRaw)
            self._complete_close()
        return None

    def send_close(self, code: int | None, reason: bytes | None) -> None:
        """Send this leg's close frame: the answer its peer is owed (the close
        handshake is then complete), or the first one."""
        if self.state != _OPEN:
            return
        self.owed = None
        if self.peer_closed:
            self.sendCloseFrame(code=code, reasonUtf8=reason, isReply=True)  # type: ignore[attr-defined]
            self._complete_close()
        else:
            self.awaiting_answer = True
            self.sendCloseFrame(code=code, reasonUtf8=reason)  # type: ignore[attr-defined]

    def _complete_close(self) -> None:
        # Autobahn, in its closing state, takes this as the answer to its close
        # frame; it is not given the code (checked above, and Autobahn's list of
        # codes lacks 1014).
        self.closed_cleanly = True
        super().onCloseFrame(None, None)  # type: ignore[misc]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.bridge.leg_closed(self, wasClean, code, reason)

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        # Autobahn failing this leg (1002 protocol error, 1007 invalid UTF-8,
        # 1009 too big).  Open: the bridge sends the close when its time comes.
        # Closing: Autobahn drops the connection.
        if self.state != _OPEN:
            super()._fail_connection(code, reason)  # type: ignore[misc]
            return
        if self.failed is None:
            self.failed = (code, reason)
            self.failedByMe = True  # Autobahn: assemble nothing more from this peer
            self.bridge.leg_failed(self, code, reason)


class ClientLeg(_FastFrames, _BridgeLeg, WebSocketServerProtocol):  # type: ignore[misc]
    """The Autobahn server protocol speaking to the client."""

    _RECEIVE_MASKED = True  # a client masks its frames
    _SEND_MASKED = False

    def onConnect(self, request: Any) -> Any:
        return self.bridge.open_upstream(request)

    def onOpen(self) -> None:
        self.bridge.client_open()

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        # Autobahn refusing the client's handshake itself (malformed), or our
        # denial: an answer with the listener's response headers, framed (no
        # body) and saying the connection ends.
        if not self.bridge.refused_status:
            self.bridge.refused_status = code
        headers = list(responseHeaders or []) + self.bridge.own_headers() + [("Content-Length", "0"),
                                                                             ("Connection", "close")]
        super().failHandshake(reason, code, headers)

    def _closeConnection(self, abort: bool = False) -> None:
        # Autobahn ending the connection: through the front connection, which
        # reads on until the peer's FIN or TLS close_notify (bounded).  Autobahn
        # asks for an abort also once the close handshake is complete (a server
        # drops the TCP connection when the peer's close arrives): a reset the
        # peer may see before it has read the close frame, and on TLS the close
        # frame never leaves.  Only a close handshake that did not complete
        # (timed out, dead peer) is aborted.
        if abort and not self.closed_cleanly:
            self.bridge.front.abort(hard=True)
        else:
            self.bridge.front.close()


class UpstreamLeg(_FastFrames, _BridgeLeg, WebSocketClientProtocol):  # type: ignore[misc]
    """The Autobahn client protocol speaking to the upstream."""

    _RECEIVE_MASKED = False  # a server does not
    _SEND_MASKED = True

    def connectionMade(self) -> None:
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        super().connectionMade()
        self.transport.registerProducer(_PauseOther(self.bridge, upstream=True), True)  # type: ignore[union-attr]

    def onConnect(self, response: Any) -> None:
        self.bridge.upstream_accepted(response)

    def onOpen(self) -> None:
        self.bridge.upstream_open()

    def failHandshake(self, reason: str) -> None:
        status_line = getattr(self, "http_status_line", "") or ""
        parts = status_line.split()
        if len(parts) >= 2 and parts[1].isdigit() and parts[1] != "101":
            self.bridge.upstream_refused(int(parts[1]), " ".join(parts[2:]))
        else:
            self.bridge.upstream_refused(502, f"bad upstream handshake: {reason}")
        super().failHandshake(reason)


@implementer(IPushProducer)
class _PauseOther:
    """Registered on one leg's transport: when that leg cannot take more, stop
    reading from the other leg."""

    def __init__(self, bridge: WebSocketBridge, upstream: bool) -> None:
        self.bridge = bridge
        self.upstream = upstream

    def pauseProducing(self) -> None:
        self.bridge.leg_writable(upstream=self.upstream, writable=False)

    def resumeProducing(self) -> None:
        self.bridge.leg_writable(upstream=self.upstream, writable=True)

    def stopProducing(self) -> None:
        pass


# ---------------------------------------------------------------------------
# Per-route settings, shared by the sessions of a route


class RouteSockets:
    """The Autobahn server factory and limits for one WebSocket route."""

    def __init__(self, route: Route, open_timeout: float, close_timeout: float) -> None:
        options = route.ws
        self.route = route
        self.options = options
        self.close_timeout = close_timeout
        factory = WebSocketServerFactory()
        factory.noisy = False
        factory.protocol = ClientLeg
        factory.server = "chatproxy"
        factory.setProtocolOptions(
            maxFramePayloadSize=options.max_frame_bytes,
            maxMessagePayloadSize=options.max_message_bytes,
            openHandshakeTimeout=open_timeout,
            closeHandshakeTimeout=close_timeout,
            autoPingInterval=options.ping_interval or 0,
            autoPingTimeout=options.ping_timeout or 0,
            autoPingRestartOnAnyTraffic=True,
            perMessageCompressionAccept=_accept_deflate if options.compression else None,
            failByDrop=False,  # a failure sends a close frame (when the bridge says so, see _BridgeLeg)
        )
        factory._batched_timer = _TIMER
        self.server_factory = factory

    def client_options(self) -> dict[str, Any]:
        """Protocol options for an upstream leg of this route."""
        options = self.options
        return dict(
            maxFramePayloadSize=options.max_frame_bytes,
            maxMessagePayloadSize=options.max_message_bytes,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=self.close_timeout,
            autoPingInterval=options.ping_interval or 0,
            autoPingTimeout=options.ping_timeout or 0,
            autoPingRestartOnAnyTraffic=True,
            perMessageCompressionOffers=[PerMessageDeflateOffer()] if options.compression else [],
            perMessageCompressionAccept=_accept_deflate_response if options.compression else None,
            failByDrop=False,
        )


class _Timer:
    """Autobahn's timers (pings, ping and handshake timeouts) at the delay asked
    for.  txaio's batched timer, Autobahn's default, rounds the due time down to
    a whole second: a 1 s ping_timeout could fire a millisecond after the ping
    and drop a healthy peer, a 300 ms ping_interval pinged at once."""

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> _Call:
        from twisted.internet import reactor

        return _Call(reactor.callLater(delay, func, *args, **kwargs))  # type: ignore[attr-defined]


class _Call:
    """A timer call whose cancel() may come after it ran (as Autobahn expects)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


_TIMER = _Timer()


def _accept_deflate(offers: list[Any]) -> Any:
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


def _accept_deflate_response(response: Any) -> Any:
    if isinstance(response, PerMessageDeflateResponse):
        return PerMessageDeflateResponseAccept(response)
    return None


# ---------------------------------------------------------------------------
# One session


class WebSocketBridge:
    """One proxied WebSocket session: a client leg, an upstream leg, the relay."""

    def __init__(self, front: FrontConnection, exchange: Exchange, sockets: RouteSockets) -> None:
        self.front = front
        self.exchange = exchange
        self.sockets = sockets
        self.options = sockets.options
        self.reactor = front.core.reactor
        self.started = time.monotonic()
        self.client = ClientLeg()
        self.client.bridge = self
        self.client.factory = sockets.server_factory
        self.upstream: UpstreamLeg | None = None
        self._handshake: defer.Deferred[Any] | None = None
        self._handshake_timer: Any = None
        self._connecting: defer.Deferred[Any] | None = None
        self._client_open = False
        self._upstream_open = False
        self._pending_to_client: list[tuple[bytes, bool]] = []
        self._paused = {"client": False, "upstream": False}
        self._excess = {"client": 0, "upstream": 0}
        self._ended = False
        self.messages_up = self.messages_down = 0
        self.bytes_up = self.bytes_down = 0
        self.close_code: int | None = None
        self.refused_status = 0
        self._rate_tokens = float(self.options.max_messages_per_second or 0) * 2
        self._rate_stamp = time.monotonic()
        self._last_message = time.monotonic()
        self._idle_call: Any = None

    # -- start: hand the client's transport to Autobahn

    def start(self, request: bytes) -> None:
        """Attach the client leg to the front's transport and feed it the handshake."""
        self.client.makeConnection(self.front.transport)
        self.client.dataReceived(request)

    def from_client(self, data: bytes) -> None:
        """Raw bytes from the client connection."""
        self.client.dataReceived(data)

    def client_lost(self) -> None:
        """The front connection closed."""
        self.client.connectionLost(Failure(ConnectionDone()))

    def client_writable(self, writable: bool) -> None:
        """The client's send buffer filled or drained."""
        self.leg_writable(upstream=False, writable=writable)

    # -- the upstream handshake

    def open_upstream(self, request: Any) -> defer.Deferred[Any]:
        """Called by the client leg with the client's validated handshake."""
        exchange = self.exchange
        head = exchange.head
        route = exchange.route
        assert head is not None and route is not None
        pools = exchange.plan.pools[route.upstream]
        # A sticky cookie chooses the server; the client's 101 sets it when it did not name that one.
        if pools.sticky is None:
            server = pools.pick()
        else:
            server, exchange.set_cookie = pools.pick_sticky(head.headers, self.front.tls)
        exchange.server = server
        upstream_config = server.upstream
        path = route.rewrite_path or head.path
        resource = f"{path}?{head.query}" if head.query else path
        scheme = "wss" if server.server.tls else "ws"
        factory = WebSocketClientFactory(
            url=f"{scheme}://{_url_host(server.server.host)}:{server.server.port}{resource}",
            protocols=list(request.protocols or []),
            headers=self._upstream_headers(),
            useragent=head.header("user-agent") or None,
            origin=head.header("origin") or None,
        )
        factory.noisy = False
        factory.protocol = UpstreamLeg
        factory.setProtocolOptions(**self.sockets.client_options())
        factory._batched_timer = _TIMER
        if upstream_config.host_header == "client" and head.authority:
            # Host as the client sent it (Autobahn writes "Host: host:port"), not
            # the client's host name with the upstream's port.
            factory.host, factory.port = _split_authority(head.authority, 443 if self.front.tls else 80)
        self._handshake = defer.Deferred()
        leg = UpstreamLeg()
        leg.bridge = self
        leg.factory = factory
        self.upstream = leg
        endpoint = server._endpoint()
        connecting = self._connecting = endpoint.connect(_Prepared(leg))
        connecting.addErrback(self._connect_failed)
        self._handshake_timer = self.reactor.callLater(
            upstream_config.connect_timeout + upstream_config.response_timeout, self._handshake_timed_out)
        return self._handshake

    def _upstream_headers(self) -> dict[str, str]:
        exchange = self.exchange
        head = exchange.head
        assert head is not None
        named = exchange.connection_named
        headers: dict[str, str] = {}
        for (name, value), lower in zip(head.headers, exchange.names):
            if lower in _NOT_COPIED or lower in named:
                continue
            text = name.decode("latin-1")
            if text in headers:
                # e.g. two Cookie lines: cookies are separated by "; ", other lists by ", "
                headers[text] += ("; " if lower == b"cookie" else ", ") + value.decode("latin-1")
            else:
                headers[text] = value.decode("latin-1")
        front = self.front
        prior = [v.decode("latin-1") for (n, v), lower in zip(head.headers, exchange.names)
                 if lower == b"x-forwarded-for"] if front.peer_trusted else []
        headers["X-Forwarded-For"] = ", ".join(prior + [front.peer])
        kept = {lower for lower in exchange.names if lower in FORWARDING} if front.peer_trusted else set()
        if front.peer_trusted:
            for (name, value), lower in zip(head.headers, exchange.names):
                if lower in FORWARDING and lower != b"x-forwarded-for":
                    headers[name.decode("latin-1")] = value.decode("latin-1")
        if b"x-forwarded-proto" not in kept:
            headers["X-Forwarded-Proto"] = "https" if front.tls else "http"
        if b"x-forwarded-host" not in kept and head.authority:
            headers["X-Forwarded-Host"] = head.authority
        if b"x-forwarded-port" not in kept:
            headers["X-Forwarded-Port"] = str(front.local_port)
        via = head.header("via")
        headers["Via"] = f"{via}, 1.1 chatproxy" if via else "1.1 chatproxy"
        return headers

    def _settle(self) -> defer.Deferred[Any] | None:
        handshake, self._handshake = self._handshake, None
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        return handshake

    def _connect_failed(self, failure: Failure) -> None:
        if self._handshake is None:
            return  # nobody waits for it any more (the client left, or it timed out)
        timeout = failure.check(ConnectTimeout, ConnectingCancelledError) is not None
        server = self.exchange.server
        log.warn("WebSocket upstream {server} unreachable: {reason}",
                 server=server.server.url if server else "-", reason=failure.getErrorMessage())
        self._deny(504 if timeout else 502, "upstream timed out" if timeout else "upstream unreachable")

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self._handshake is not None:
            log.warn("WebSocket upstream handshake timed out")
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.abortConnection()  # type: ignore[attr-defined]
            self._deny(504, "upstream timed out")

    def _deny(self, status: int, reason: str) -> None:
        handshake = self._settle()
        if handshake is not None:
            self.refused_status = status
            handshake.errback(ConnectionDeny(status, reason))

    def upstream_refused(self, status: int, reason: str) -> None:
        """The upstream answered the handshake with another status than 101."""
        self._deny(status, reason or "refused by upstream")

    def upstream_accepted(self, response: Any) -> None:
        """The upstream accepted: the client gets its 101 with the same subprotocol."""
        handshake = self._settle()
        if handshake is None:
            return
        headers: dict[str, Any] = {}
        # One line each: Autobahn's parsed headers join repeated ones with ", ",
        # which breaks Set-Cookie (its Expires dates hold commas).
        raw = getattr(self.upstream, "http_response_data", b"") or b""
        cookies = [line.split(b":", 1)[1].strip().decode("latin-1") for line in raw.split(b"\r\n")[1:]
                   if line[:11].lower() == b"set-cookie:"]
        if self.exchange.set_cookie is not None:
            cookies.append(self.exchange.set_cookie.decode("latin-1"))  # sticky sessions
        if cookies:
            headers["Set-Cookie"] = cookies
        headers.update(self.own_headers())
        handshake.callback((response.protocol, headers))

    def own_headers(self) -> list[tuple[str, str]]:
        """The listener's ``response_headers``, for the answers Autobahn writes (the 101, a refusal)."""
        return [(name.decode("ascii"), value.decode("latin-1")) for name, value in self.front.listener.response_headers]

    # -- open

    def upstream_open(self) -> None:
        """The upstream leg is open (before or as the client leg opens)."""
        self._upstream_open = True

    def client_open(self) -> None:
        """The client leg is open: deliver what the upstream already sent."""
        self._client_open = True
        self._last_message = time.monotonic()
        self.front.core.websocket_sessions.add(self)
        pending, self._pending_to_client = self._pending_to_client, []
        for payload, binary in pending:
            self._send(self.client, payload, binary)
        if self.options.idle_timeout:
            self._idle_call = self.reactor.callLater(self.options.idle_timeout, self._check_idle)

    # -- messages

    def relay(self, source: Any, payload: bytes, binary: bool) -> None:
        """A whole message from one leg: filter it and send it to the other.
        Also while the session closes: what a leg sends before its own close
        (or its failure) is relayed as long as the other leg had no close
        frame sent to it; nothing is relayed from a leg after that."""
        upward = source is self.client
        target = self.upstream if upward else self.client
        if source.peer_closed or source.failed is not None or target is None or (
                not _is_open(target) and (upward or self._client_open)):
            return
        self._last_message = time.monotonic()
        if upward:
            if self.options.max_messages_per_second and not self._take_token():
                log.info("WebSocket session over {rate} messages/s: closed with 1008",
                         rate=self.options.max_messages_per_second)
                self.front.core.counters["websocket_rate_limited"] += 1
                self.close_both(1008, "message rate limit exceeded")
                return
            self.messages_up += 1
            self.bytes_up += len(payload)
        else:
            self.messages_down += 1
            self.bytes_down += len(payload)
        exchange = self.exchange
        chain = exchange.plan.chain(exchange.route) if exchange.route is not None else None  # (a reload may change it)
        if chain is not None and chain.sees_messages:
            assert exchange.head is not None
            verdict = chain.message(exchange.head, payload, binary, upward)
            if verdict is not None:
                if isinstance(verdict, CloseSession):
                    self.close_both(verdict.code, verdict.reason)
                else:
                    self.front.core.counters["websocket_dropped"] += 1
                return
        if upward:
            assert self.upstream is not None
            self._send(self.upstream, payload, binary)
        elif self._client_open:
            self._send(self.client, payload, binary)
        else:
            self._pending_to_client.append((payload, binary))

    def _send(self, leg: Any, payload: bytes, binary: bool) -> None:
        side = "upstream" if leg is self.upstream else "client"
        leg.sendMessage(payload, binary)
        if self._paused[side]:
            self._excess[side] += len(payload)
            if self._excess[side] > self.options.max_buffered_bytes:
                log.info("WebSocket {side} reads too slowly ({n} bytes waiting): session closed with 1013",
                         side=side, n=self._excess[side])
                self.front.core.counters["websocket_slow_reader"] += 1
                self.close_both(1013, "peer reads too slowly")

    def _take_token(self) -> bool:
        rate = float(self.options.max_messages_per_second)
        now = time.monotonic()
        self._rate_tokens = min(rate * 2, self._rate_tokens + (now - self._rate_stamp) * rate)
        self._rate_stamp = now
        if self._rate_tokens < 1:
            return False
        self._rate_tokens -= 1
        return True

    def _check_idle(self) -> None:
        idle = time.monotonic() - self._last_message
        if idle >= self.options.idle_timeout:
            log.info("WebSocket session idle for {seconds:.0f}s: closed with 1001", seconds=idle)
            self.close_both(1001, "idle timeout")
            self._idle_call = None
        else:
            self._idle_call = self.reactor.callLater(self.options.idle_timeout - idle, self._check_idle)

    # -- flow control

    def leg_writable(self, upstream: bool, writable: bool) -> None:
        """One leg's send buffer filled (stop reading the other) or drained."""
        side = "upstream" if upstream else "client"
        self._paused[side] = not writable
        if writable:
            self._excess[side] = 0
        # A leg whose messages are no longer relayed is read on (see _reread),
        # whatever this one's buffer holds.
        self._read_other(upstream, writable or not self._relays_from(self.client if upstream else self.upstream))

    def _read_other(self, upstream: bool, read: bool) -> None:
        """Read from the leg opposite ``upstream`` (the upstream when False) or stop."""
        other = self.client if upstream else self.upstream
        transport = getattr(other, "transport", None) if other is not None else None
        if transport is None:
            return
        if other is self.client:
            if read:
                self.front.resume_reading("websocket")
            else:
                self.front.pause_reading("websocket")
        elif read:
            transport.resumeProducing()
        else:
            transport.pauseProducing()

    def _relays_from(self, leg: Any) -> bool:
        """Whether what ``leg`` sends may still be relayed: it neither closed
        nor failed, and the other leg had no close frame sent to it."""
        other = self.upstream if leg is self.client else self.client
        return (leg is not None and not leg.peer_closed and leg.failed is None and other is not None
                and getattr(other, "state", None) in (_OPEN, WebSocketProtocol.STATE_CONNECTING))

    def _reread(self) -> None:
        """Read again a leg held back by the other's full send buffer once its
        messages are no longer relayed (it closed or failed, or the other leg
        had a close frame sent): what it still sends is discarded, and its
        close frame, queued behind, must get through (the 1013 case: else its
        close handshake ends only at closeHandshakeTimeout, with the
        connection dropped)."""
        for upstream in (False, True):
            if self._paused["upstream" if upstream else "client"] and \
                    not self._relays_from(self.client if upstream else self.upstream):
                self._read_other(upstream, True)

    # -- closing
    #
    # A close (or failure) of one leg is passed on to the other at once; the
    # first leg's own close frame waits until the other leg has answered or
    # is gone (see _BridgeLeg), bounded by the other leg's close handshake
    # timeout.  close_both (limits, filters, idle, reload, drain) closes both
    # at once.

    def side(self, leg: Any) -> str:
        """``client`` or ``upstream``: which leg ``leg`` is (for log lines)."""
        return "client" if leg is self.client else "upstream"

    def _record_close(self, code: int) -> None:
        if self.close_code is None:
            self.close_code = code

    def close_received(self, source: Any, code: int | None, reason: bytes | None) -> None:
        """A valid close frame from ``source``'s peer, the first on that leg:
        pass it on, code and reason unchanged; ``source`` answers it once the
        other leg has answered (that answer passed back) or is gone (then its
        own code and reason are echoed)."""
        self._record_close(code if code is not None else 1005)
        if source.owed is None:  # (a failed leg already owes its failure's close)
            source.owed = (code, reason)
        other = self.upstream if source is self.client else self.client
        if other is not None and _is_open(other) and other.owed is None:
            other.send_close(code, reason)
        self._send_owed()

    def close_answered(self, leg: Any, code: int | None, reason: bytes | None) -> None:
        """``leg``'s peer answered the close frame sent to it: the other leg,
        if it owes its peer an answer, passes this one back (a failed leg
        sends its failure's close)."""
        other = self.upstream if leg is self.client else self.client
        if other is not None and other.owed is not None and other.failed is None:
            other.owed = (code, reason)
        self._send_owed()

    def leg_failed(self, leg: Any, code: int, reason: str) -> None:
        """Autobahn fails one leg (1007 invalid UTF-8, 1009 too big, 1002
        protocol error, an invalid close frame): the other leg is closed with
        that code at once, the failed one once the other has answered (what
        that one sent until then still reaches it); the access log says so
        (not 1001/1011)."""
        log.info("WebSocket {side} failed with {code}: {reason}", side=self.side(leg), code=code, reason=reason)
        self._record_close(code)
        leg.owed = (code, reason.encode("utf-8")[:120])
        other = self.upstream if leg is self.client else self.client
        if other is not None and _is_open(other) and other.owed is None:
            other.send_close(code, reason.encode("utf-8")[:120])
        self._send_owed()

    def close_both(self, code: int, reason: str) -> None:
        """chatproxy itself ends the session (limits, filters, idle, reload,
        drain): each leg still open gets its close frame now (the answer it
        owes, if any, else this code)."""
        self._record_close(code)
        for leg in (self.client, self.upstream):
            if leg is not None and _is_open(leg):
                owed = leg.owed or (code, reason.encode("utf-8")[:120])
                leg.send_close(*owed)
        self._reread()

    def _send_owed(self) -> None:
        """Send each owed close frame whose leg waits for nothing any more: the
        other leg is not awaiting its peer's answer (answered, gone, or never
        sent a close); and read on the legs no longer relayed from."""
        for leg in (self.client, self.upstream):
            other = self.upstream if leg is self.client else self.client
            if leg is not None and leg.owed is not None and _is_open(leg) and \
                    (other is None or not other.awaiting_answer or _is_closed(other)):
                leg.send_close(*leg.owed)
        self._reread()

    def leg_closed(self, leg: Any, was_clean: bool, code: int | None, reason: str | None) -> None:
        """A leg's connection is gone; make sure the other one goes too."""
        leg.awaiting_answer = False
        # Gone, it no longer holds the other leg back: read that one again, or
        # its answer to the close below waits unread for closeHandshakeTimeout.
        self.leg_writable(upstream=leg is self.upstream, writable=True)
        if leg is self.upstream and self._handshake is not None:
            self._deny(502, "upstream closed during the handshake")
        other = self.upstream if leg is self.client else self.client
        if leg is self.client and other is not None and other.transport is None and self._connecting is not None:
            # The client left while the upstream was still being connected: give
            # up on it, or the upstream would get a session nobody ever closes.
            self._settle()
            self._connecting.cancel()
        if other is not None and _is_open(other):
            if other.owed is None:
                lost_code = UPSTREAM_LOST if leg is self.upstream else CLIENT_LOST
                self._record_close(lost_code)
                other.owed = (lost_code, b"upstream connection lost" if leg is self.upstream else b"client went away")
            self._send_owed()
        elif (other is not None and other.transport is not None and not _is_closed(other)
              and getattr(other, "state", None) != other.STATE_CLOSING):
            # Still handshaking: drop it.  A leg already closing finishes its
            # close handshake by itself (bounded by closeHandshakeTimeout).
            other.dropConnection(abort=not was_clean)
        if leg is self.client or (other is None or _is_closed(other)):
            self._end()

    def _end(self) -> None:
        if self._ended:
            return
        if self.upstream is not None and not _is_closed(self.upstream):
            return  # logged when the upstream leg closes too
        self._ended = True
        self.front.core.websocket_sessions.discard(self)
        route = self.exchange.route
        self.front.core.stats.websocket_session(route.name if route else "", (self.messages_up, self.bytes_up),
                                                (self.messages_down, self.bytes_down),
                                                self.close_code if self._client_open else None)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._settle()
        core = self.front.core
        if core.access_log.enabled:
            record = self.exchange.record()
            core.access_log.log(evolve(
                record,
                status=101 if self._client_open else (self.refused_status or 499),
                bytes_sent=self.bytes_down,
                websocket=(f"messages_up={self.messages_up} messages_down={self.messages_down} "
                           f"bytes_up={self.bytes_up} bytes_down={self.bytes_down} "
                           f"close={self.close_code if self.close_code is not None else '-'}"),
            ))


class _Prepared(Factory):
    """Hands out one prepared protocol instance, quietly."""

    noisy = False

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


def _is_open(leg: Any) -> bool:
    return bool(getattr(leg, "state", None) == leg.STATE_OPEN)


def _is_closed(leg: Any) -> bool:
    # A leg whose connection was never made has no state yet: nothing to close.
    return bool(getattr(leg, "state", leg.STATE_CLOSED) == leg.STATE_CLOSED)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` (host possibly ``[v6]``) -> (host, port or ``default_port``)."""
    end = authority.find("]") + 1 if authority.startswith("[") else 0
    host, _, port = authority[end:].partition(":")
    return authority[:end] + host, int(port) if port.isdigit() else default_port
