"""HTTP/2 header blocks to and from the proxy's HTTP/1.1 terms.  No I/O.

A request's header block (RFC 9113 8.3) becomes what an HTTP/1.1 request
head would have given the proxy: a method, a target, and header fields with
``Host`` from ``:authority`` and the cookie crumbs joined (8.2.3).  What an
HTTP/2 server must refuse as malformed is refused here, as a stream error:
pseudo-header fields out of place, unknown, repeated or missing, upper-case
names, connection-specific fields (``Connection``, ``Keep-Alive``,
``Proxy-Connection``, ``Transfer-Encoding``, ``Upgrade``), a ``TE`` other
than ``trailers``, characters a field cannot carry, a ``Host`` that names
another authority.

An extended CONNECT (RFC 8441) with ``:protocol: websocket`` is a WebSocket
handshake: it becomes the ``GET`` with ``Upgrade: websocket`` an HTTP/1.1
client would have sent (with a ``Sec-WebSocket-Key`` of the caller's, since
HTTP/2 has none), so that routing, filters and the bridge treat both alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attrs import frozen

from chatproxy.http.messages import Header

#: Fields that describe an HTTP/1.1 connection: never in an HTTP/2 message (RFC 9113 8.2.2).
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority", b":protocol"})
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")  # a token, lower-case
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]\Z")


@frozen
class StreamRequest:
    """A request's header block in HTTP/1.1 terms: ``headers`` are the fields
    an HTTP/1.1 head would carry (``Host`` first); ``websocket``: an extended
    CONNECT for WebSocket; ``content_length``: its declared body length."""

    method: str
    target: bytes
    headers: tuple[Header, ...]
    websocket: bool = False
    content_length: int | None = None


@frozen
class Malformed:
    """A header block the stream is refused for (a stream error, PROTOCOL_ERROR)."""

    reason: str


def request_from_block(block: Sequence[Header], connect_protocol: bool, websocket_key: bytes) -> StreamRequest | Malformed:
    """The request a HEADERS block opens, or why it is malformed.

    ``connect_protocol``: extended CONNECT is enabled on the connection;
    ``websocket_key``: the ``Sec-WebSocket-Key`` to give an extended CONNECT."""
    pseudo: dict[bytes, bytes] = {}
    fields: list[Header] = []
    cookies: list[bytes] = []
    for name, value in block:
        problem = _field_problem(name, value, pseudo, fields)
        if problem is not None:
            return Malformed(problem)
        if name[:1] == b":":
            pseudo[name] = value
        elif name == b"cookie":
            cookies.append(value)
        else:
            fields.append((name, value))
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    return _request(pseudo, fields, connect_protocol, websocket_key)


def _field_problem(name: bytes, value: bytes, pseudo: dict[bytes, bytes], fields: list[Header]) -> str | None:
    """Why one field makes the block malformed, or None."""
    if name[:1] == b":":
        if fields:
            return f"pseudo-header field {name.decode('latin-1')} after a regular field"
        if name not in _REQUEST_PSEUDO:
            return f"pseudo-header field {name.decode('latin-1')} is not a request's"
        if name in pseudo:
            return f"repeated pseudo-header field {name.decode('latin-1')}"
    elif not _NAME.match(name):
        return f"field name {name[:40]!r} is not a lower-case token"
    elif name in CONNECTION_SPECIFIC:
        return f"connection-specific field {name.decode('latin-1')}"
    elif name == b"te" and value.strip().lower() != b"trailers":
        return "TE other than trailers"
    if _BAD_VALUE.search(value):
        return f"value of {name.decode('latin-1', 'replace')} has characters a field cannot carry"
    return None


def _request(pseudo: dict[bytes, bytes], fields: list[Header], connect_protocol: bool,
             websocket_key: bytes) -> StreamRequest | Malformed:
    """The request the pseudo-header and regular fields of a block make."""
    method = pseudo.get(b":method")
    if not method:
        return Malformed(":method missing")
    headers = _with_host(pseudo.get(b":authority"), fields)
    if isinstance(headers, Malformed):
        return headers
    protocol = pseudo.get(b":protocol")
    if protocol is not None:
        return _extended_connect(method, pseudo, headers, protocol, connect_protocol, websocket_key)
    if method == b"CONNECT":
        return StreamRequest("CONNECT", pseudo.get(b":authority") or b"", tuple(headers))  # refused as HTTP/1.1's is
    return _plain_request(method, pseudo, headers)


def _with_host(authority: bytes | None, fields: list[Header]) -> list[Header] | Malformed:
    """The fields with ``Host`` first, from ``:authority`` or the block's own
    ``Host``; malformed when both are there and differ."""
    host = next((value for name, value in fields if name == b"host"), None)
    if authority is not None and host is not None and host != authority:
        return Malformed("Host names another authority than :authority")
    rest = [(name, value) for name, value in fields if name != b"host"]
    head_host = authority if authority is not None else host
    return ([(b"host", head_host)] if head_host is not None else []) + rest


def _plain_request(method: bytes, pseudo: dict[bytes, bytes], headers: list[Header]) -> StreamRequest | Malformed:
    """A request other than CONNECT: it needs ``:scheme`` and ``:path``, and
    at most one well-formed content-length."""
    path = pseudo.get(b":path")
    if not path or not pseudo.get(b":scheme"):
        return Malformed(":scheme and :path are required")
    lengths = {value for name, value in headers if name == b"content-length"}
    if len(lengths) > 1 or not all(value.isdigit() for value in lengths):
        return Malformed("malformed content-length")
    return StreamRequest(method.decode("latin-1"), path, tuple(headers), False,
                         int(lengths.pop()) if lengths else None)


def _extended_connect(method: bytes, pseudo: dict[bytes, bytes], headers: list[Header], protocol: bytes,
                      connect_protocol: bool, websocket_key: bytes) -> StreamRequest | Malformed:
    """An extended CONNECT (RFC 8441): a WebSocket handshake, as HTTP/1.1 says it."""
    if method != b"CONNECT" or not connect_protocol:
        return Malformed(":protocol without extended CONNECT")
    path = pseudo.get(b":path")
    if not path or not pseudo.get(b":scheme") or b":authority" not in pseudo:
        return Malformed("extended CONNECT needs :scheme, :path and :authority")
    if protocol.lower() != b"websocket":
        return StreamRequest("CONNECT", path, tuple(headers))  # another protocol: refused, as CONNECT
    handshake = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-key", websocket_key)]
    return StreamRequest("GET", path, tuple(headers + handshake), True)


def response_block(status: int, headers: Sequence[Header]) -> list[Header]:
    """A response head as an HTTP/2 header block: ``:status`` first, names
    lower-cased, connection-specific fields left out."""
    block = [(b":status", b"%d" % status)]
    for name, value in headers:
        lower = name.lower()
        if lower not in CONNECTION_SPECIFIC and lower != b"te":
            block.append((lower, value))
    return block


def trailers_from_block(block: Sequence[Header]) -> tuple[Header, ...]:
    """The fields of a trailer block that may be passed on: no pseudo-header
    fields, nothing connection-specific or framing."""
    return tuple((name, value) for name, value in block
                 if name[:1] != b":" and name not in CONNECTION_SPECIFIC
                 and name not in (b"content-length", b"te", b"host") and _NAME.match(name)
                 and not _BAD_VALUE.search(value))
