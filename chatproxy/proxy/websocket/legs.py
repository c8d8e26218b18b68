"""The two legs of a bridged WebSocket session: Autobahn protocols that hand
their messages, close frames, failures and ends to their bridge
(:class:`LegOwner`), and send the close frames it decides on."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Protocol

from autobahn.twisted.websocket import WebSocketClientProtocol, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from chatproxy.proxy.sending import read_directly
from chatproxy.proxy.websocket.closing import close_frame_problem
from chatproxy.proxy.websocket.frames import FastFrames

log = Logger(namespace=__name__)  # (a compiled module has no frame Twisted could name it from)

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSING = WebSocketProtocol.STATE_CLOSING


class LegOwner(Protocol):
    """What a leg tells its bridge (:class:`~chatproxy.proxy.websocket.bridge.WebSocketBridge`)."""

    refused_status: int

    def open_upstream(self, request: Any) -> Any:
        """The client's handshake is valid: connect the upstream; a Deferred of the answer."""

    def client_open(self) -> None:
        """The client leg is open."""

    def upstream_accepted(self, response: Any) -> None:
        """The upstream accepted the handshake."""

    def upstream_open(self) -> None:
        """The upstream leg is open."""

    def upstream_refused(self, status: int, reason: str) -> None:
        """The upstream answered the handshake with another status than 101."""

    def own_headers(self) -> list[tuple[str, str]]:
        """The listener's response headers, for the answers Autobahn writes."""

    def relay(self, source: Any, payload: bytes, binary: bool) -> None:
        """A whole message from ``source``."""

    def side(self, leg: Any) -> str:
        """``client`` or ``upstream``."""

    def close_received(self, source: Any, code: int | None, reason: bytes | None) -> None:
        """A valid close frame from ``source``'s peer."""

    def close_answered(self, leg: Any, code: int | None, reason: bytes | None) -> None:
        """``leg``'s peer answered the close frame sent to it."""

    def leg_failed(self, leg: Any, code: int, reason: str) -> None:
        """Autobahn failed ``leg`` (protocol error, invalid UTF-8, too big)."""

    def leg_closed(self, leg: Any, was_clean: bool, code: int | None, reason: str | None) -> None:
        """``leg``'s connection is gone."""

    def leg_writable(self, upstream: bool, writable: bool) -> None:
        """A leg's send buffer filled or drained."""

    def client_ended(self, clean: bool) -> None:
        """End the client's connection (``clean``: the close handshake completed)."""


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

    bridge: LegOwner
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


class ClientLeg(FastFrames, _BridgeLeg, WebSocketServerProtocol):  # type: ignore[misc]
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
        # Autobahn ending the connection: the bridge decides how (see client_ended).
        self.bridge.client_ended(clean=not abort or self.closed_cleanly)


class UpstreamLeg(FastFrames, _BridgeLeg, WebSocketClientProtocol):  # type: ignore[misc]
    """The Autobahn client protocol speaking to the upstream."""

    _RECEIVE_MASKED = False  # a server does not
    _SEND_MASKED = True

    def connectionMade(self) -> None:
        read_directly(self)  # each message from the upstream: one call less
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

    def __init__(self, bridge: LegOwner, upstream: bool) -> None:
        self.bridge = bridge
        self.upstream = upstream

    def pauseProducing(self) -> None:
        self.bridge.leg_writable(upstream=self.upstream, writable=False)

    def resumeProducing(self) -> None:
        self.bridge.leg_writable(upstream=self.upstream, writable=True)

    def stopProducing(self) -> None:
        pass




def is_open(leg: Any) -> bool:
    """Whether a leg's session is open."""
    return getattr(leg, "state", None) == _OPEN


def is_closed(leg: Any) -> bool:
    """Whether a leg is closed (or was never connected)."""
    # A leg whose connection was never made has no state yet: nothing to close.
    return bool(getattr(leg, "state", leg.STATE_CLOSED) == leg.STATE_CLOSED)


#: What Autobahn keeps of the opening handshake, and the empty value a read
#: finds (on the leg's class) once an open leg has dropped it: the raw
#: request or response, the parsed request line and headers, the offered
#: origin, subprotocols, extensions and key.  Nothing reads them afterwards.
_HANDSHAKE_ONLY: dict[str, Any] = {
    "http_status_line": "", "http_headers": MappingProxyType({}), "http_request_data": b"",
    "http_response_data": b"", "http_request_host": "", "http_request_uri": "", "http_request_path": "",
    "http_request_params": MappingProxyType({}), "websocket_origin": "", "websocket_protocols": (),
    "websocket_extensions": (), "websocket_extensions_in_use": (), "_wskey": "", "websocket_key": b"",
}

#: Autobahn's per-connection state as it stands in an open session nothing
#: has happened to yet (no close or failure, no ping outstanding, no timing
#: kept): an open leg drops each that still has this value, a read finds the
#: same value on the class, and Autobahn's next change puts it back on the leg.
_SETTLED: dict[str, Any] = {
    "triggered": False, "wasMaxFramePayloadSizeExceeded": False, "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False, "failedByMe": False, "droppedByMe": False, "wasClean": False, "wasNotCleanReason": None,
    "wasServerConnectionDropTimeout": False, "wasOpenHandshakeTimeout": False, "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False, "localCloseCode": None, "localCloseReason": None,
    "remoteCloseCode": None, "remoteCloseReason": None, "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None, "autoPingPending": None, "autoPingPendingCall": None,
    "autoPingPendingSent": None, "trackedTimings": None, "websocket_protocol_in_use": None,
}

for _name, _value in {**_HANDSHAKE_ONLY, **_SETTLED}.items():
    setattr(_BridgeLeg, _name, _value)
#: Autobahn's queue of chopped or synchronous writes (which the bridge never
#: asks for: FastFrames.sendData gives a leg its own queue again if it ever
#: does): an open leg drops its empty one, and reads find it empty here.
_BridgeLeg.send_queue = ()  # type: ignore[attr-defined]


def shed_handshake(leg: Any, open_factory: Any = None) -> None:
    """Make an open leg as small as it can be: an idle session can last for
    hours, and Autobahn's protocol keeps about ninety attributes.

    It drops what it kept of its opening handshake (:data:`_HANDSHAKE_ONLY`),
    the state that still has its resting value (:data:`_SETTLED`) and its
    empty write queue, whose values reads then find on the class; an upstream
    leg also gives up its own factory, which held the handshake's URL and
    headers, for ``open_factory``, the route's shared one.  Its dictionary is
    then rebuilt at the size it now needs (a Python dictionary never shrinks
    by itself).  The route's protocol options are not on the leg at all (see
    :class:`~chatproxy.proxy.websocket.sockets.RouteSockets`)."""
    state = vars(leg)
    for name in _HANDSHAKE_ONLY:
        state.pop(name, None)
    for name, value in _SETTLED.items():
        if name in state and type(state[name]) is type(value) and state[name] == value:
            del state[name]
    if "send_queue" in state and not state["send_queue"]:
        del state["send_queue"]
    if open_factory is not None:
        state["factory"] = open_factory
    leg.__dict__ = dict(state)
