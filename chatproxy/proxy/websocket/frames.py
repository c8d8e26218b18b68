"""The bridge's fast path for the common frame.

A whole unfragmented, uncompressed text or binary frame of up to 64 KiB in an
open session is unmasked, UTF-8-checked, relayed, masked (towards the
upstream) and written by :class:`FastFrames` itself; every other frame goes
through Autobahn exactly as without it, and Autobahn alone decides what is a
protocol error.  The fast path reads Autobahn protocol attributes; with an
Autobahn whose attributes differ it turns itself off (logged once).
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.logger import Logger

from chatproxy.proxy.sending import send
from chatproxy.proxy.websocket.masking import unmask

log = Logger(namespace=__name__)  # (a compiled module has no frame Twisted could name it from)


class FastFrames:
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
    send_queue: Any  # Autobahn's queue of chopped or synchronous writes
    _RECEIVE_MASKED: bool  # frames from the peer are masked (it is a client)
    _SEND_MASKED: bool  # frames to the peer are masked (we are its client)
    #: The largest payload the fast path takes from the peer, and sends to
    #: it: what the leg's options allow, fixed once it is open (:func:`settle`);
    #: -1 (the fast path off) until then, and for good on a leg whose options
    #: need Autobahn's general path (logging, compression, auto-fragmenting).
    fast_in = -1
    fast_out = -1

    def dataReceived(self, data: bytes) -> None:
        # In an open session whose leg is settled for the fast path (see
        # settle: not when logging or compression needs Autobahn's general
        # path), bytes go straight to Autobahn's frame loop (that of its
        # consumeData): its own dataReceived formats three debug-log arguments
        # (a qualified function name among them) for every read before it
        # gets there, and counts the bytes in its traffic statistics, which
        # nothing reads (sendMessage's fast path does not count either).
        try:
            direct = _FAST_PATH and self.fast_in > 0 and self.state == _OPEN  # type: ignore[attr-defined]
        except AttributeError:  # an Autobahn whose internals differ
            _disable_fast_path()
            direct = False
        if not direct:
            super().dataReceived(data)  # type: ignore[misc]
            return
        self.data += data
        while self.processData() and self.state != _CLOSED:  # type: ignore[attr-defined]  # as consumeData does
            pass

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
        limit = self.fast_in
        if not (limit > 0 and self.current_frame is None and self.state == _OPEN  # type: ignore[attr-defined]
                and not self.inside_message):  # type: ignore[attr-defined]
            return None
        data = self.data
        span = frame_span(data, self._RECEIVE_MASKED)
        if span is None:
            return None
        start, end, key = span
        length = end - start
        if length > limit:
            return None  # over a limit: Autobahn fails the session
        payload = unmask(data[start:end], key) if key and length else data[start:end]
        text = data[0] == 0x81
        if text and self.utf8validateIncoming and not is_utf8(payload):  # type: ignore[attr-defined]
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
            general = (not _FAST_PATH or fragmentSize is not None or sync or length > self.fast_out
                       or self.state != _OPEN or self.send_queue)  # type: ignore[attr-defined]
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
            frame += unmask(payload, key) if length else b""
        elif length < 126:
            frame = head + bytes((length,)) + payload
        else:
            frame = head + b"\x7e" + length.to_bytes(2, "big") + payload
        send(self.transport, frame)  # type: ignore[attr-defined]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Close frames, pings and pongs, and what the fast path leaves to Autobahn.
        if sync or chopsize or self.send_queue or self.logOctets:  # type: ignore[attr-defined]
            if "send_queue" not in vars(self):  # an open leg dropped its empty queue (legs.shed_handshake)
                self.send_queue = deque()
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
        else:
            send(self.transport, data)  # type: ignore[attr-defined]


#: The Autobahn protocol options the fast path reads on every message (the
#: others it reads once, in :func:`settle`): a leg keeps its own copy of
#: these (reading an instance's attribute is faster than reading its
#: class's), the others are on the route's leg classes (see
#: :class:`~chatproxy.proxy.websocket.sockets.RouteSockets`).
READ_PER_MESSAGE = frozenset({"utf8validateIncoming", "autoPingRestartOnAnyTraffic"})
#: The longest payload the fast path handles (a 7-bit or 16-bit length).
FAST_MAX = 0xFFFF

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSED = WebSocketProtocol.STATE_CLOSED
#: Whether the fast path is used: it reads Autobahn's protocol attributes, so
#: an Autobahn whose internals differ turns it off (and is used for everything).
_FAST_PATH = True


def _disable_fast_path() -> None:
    global _FAST_PATH
    if _FAST_PATH:
        _FAST_PATH = False
        log.warn("this Autobahn version's internals differ from what the WebSocket fast path reads: "
                 "every frame goes through Autobahn (slower, same behaviour)")


def settle(leg: Any) -> None:
    """Fix an open leg's fast-path limits (``fast_in``, ``fast_out``) from
    its options, once: they do not change after the opening handshake, which
    has also settled compression.  The fast path then reads two integers per
    message instead of six of Autobahn's attributes (each a generic lookup
    through its deep class hierarchy).  Logging frames or octets or
    compression turn the fast path off for the leg, automatic fragmentation
    for what it sends."""
    try:
        off = bool(leg.logOctets or leg.logFrames or leg._perMessageCompress is not None)
        frame_limit, message_limit = leg.maxFramePayloadSize, leg.maxMessagePayloadSize
        fragments = leg.autoFragmentSize
    except AttributeError:  # an Autobahn whose internals differ
        _disable_fast_path()
        return
    message_max = message_limit if 0 < message_limit < FAST_MAX else FAST_MAX
    leg.fast_in = -1 if off else min(message_max, frame_limit if frame_limit > 0 else FAST_MAX)
    leg.fast_out = -1 if off or fragments else message_max


def frame_span(data: bytes, masked: bool) -> tuple[int, int, bytes] | None:
    """(start, end, masking key) of the payload of the whole frame at the start
    of ``data`` when the fast path takes it: FIN, no RSV bits, text or binary,
    masked as ``masked`` says, a 7-bit or minimal 16-bit length; None for
    anything else (an incomplete frame included), which Autobahn handles."""
    if len(data) < 2 or (data[0] != 0x81 and data[0] != 0x82):
        return None
    b1 = data[1]
    if (b1 >= 0x80) != masked:
        return None
    length = b1 & 0x7F
    start = 2
    if length == 126:
        length = int.from_bytes(data[2:4], "big") if len(data) >= 4 else 0
        if length < 126:
            return None  # incomplete, or not the minimal encoding: Autobahn's to refuse
        start = 4
    elif length > 125:
        return None  # 64-bit lengths: left to Autobahn
    key = data[start:start + 4] if masked else b""
    start += len(key)
    end = start + length
    return (start, end, key) if len(data) >= end else None


def is_utf8(payload: bytes) -> bool:
    """Valid UTF-8 as WebSocket requires it (no surrogates, no overlong forms)."""
    if payload.isascii():
        return True
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
