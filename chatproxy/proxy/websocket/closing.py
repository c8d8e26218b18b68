"""Which WebSocket close frames may be passed on: a rule without I/O."""

from __future__ import annotations

from autobahn.websocket.protocol import WebSocketProtocol

from chatproxy.proxy.websocket.frames import is_utf8

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
    if reason and not is_utf8(reason):
        return "close reason is not UTF-8"
    return None
