"""From a parsed request head to a request the proxy acts on, or a rejection.

No I/O: the front connection (or, later, an HTTP/2 stream) parses the bytes
and hands the pieces to :func:`decide`, which checks them (framing, Host,
target form, path, query, size), resolves the client address, normalises the
path, routes the request and returns a complete :class:`Request`, or a
:class:`Rejection` saying which status to answer with.  The exchange is built
from that value and nothing is added to it afterwards.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import httptools
from attrs import define, frozen

from chatproxy.http.messages import Header, RequestHead
from chatproxy.http.paths import PathError, normalize_path
from chatproxy.proxy.forwarding import Connection, resolve_client
from chatproxy.proxy.routing import TRACE_METHODS, RouteTable, websocket_upgrade

if TYPE_CHECKING:
    from chatproxy.config import Route

_HOST_RE = re.compile(rb"^(?:[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?$")
_QUERY_FORBIDDEN = re.compile(r"[^\x21-\x7e]|#")
# The request headers the checks look at (the others are only collected).
_NOTHING: frozenset[bytes] = frozenset()
_VERSIONS = frozenset({"1.0", "1.1", "2"})
_SPECIAL = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect", b"x-forwarded-for", b"connection"})


@define(eq=False)
class Request:
    """A request that passed the checks: its head (what filters see), how its
    body is framed, and what the proxy does with it.  Built on every request,
    so a plain slotted class (a frozen one costs a microsecond more to build);
    nothing changes it after :func:`decide`.

    ``names`` are the header names lower-cased, in order;
    ``connection_named`` the tokens of its Connection headers; ``upgrade``
    says the client asked to switch protocols (the parser stops after it);
    ``websocket`` that it is a WebSocket handshake the proxy carries;
    ``route`` the route it matched (None: 404)."""

    head: RequestHead
    names: tuple[bytes, ...]
    connection_named: frozenset[bytes]
    content_length: int | None
    chunked: bool
    expect_continue: bool
    keep_alive: bool
    upgrade: bool
    websocket: bool
    route: Route | None

    @property
    def has_body(self) -> bool:
        """Whether a body follows the head."""
        return self.chunked or (self.content_length or 0) > 0


@frozen
class Rejection:
    """A request the proxy answers with ``status`` and closes the connection
    after; ``head`` is as much of it as could be read (for the access log)."""

    status: int
    message: str
    head: RequestHead
    content_length: int | None = None
    chunked: bool = False
    upgrade: bool = False

    @property
    def has_body(self) -> bool:
        """Whether a body follows the head (it is not read)."""
        return self.chunked or (self.content_length or 0) > 0


class HostMemo:
    """Per connection: the last Host value found well-formed and the last one
    turned into a routing name (keep-alive requests repeat them)."""

    __slots__ = ("valid", "routed")

    def __init__(self) -> None:
        self.valid: bytes | None = None
        self.routed: tuple[bytes, str] = (b"", "")


class _Scan:
    """What one pass over the header list found (a C-typed class in the
    compiled build, request.pxd)."""

    __slots__ = ("names", "hosts", "content_length", "chunked", "expect_continue", "forwarded_for", "named", "size",
                 "error")

    names: list[bytes]
    size: int
    expect_continue: bool

    def __init__(self) -> None:
        self.hosts: list[bytes] = []
        self.content_length: int | None = None
        self.chunked = False
        self.forwarded_for: list[str] | None = None
        self.named: frozenset[bytes] = _NOTHING
        self.error: tuple[int, str] | None = None

    def expect(self, value: bytes) -> None:
        """An ``Expect`` header: 100-continue is the only one the proxy meets."""
        if value.strip().lower() == b"100-continue":
            self.expect_continue = True
        else:
            self.error = (417, "unsupported expectation")


def _scan(headers: list[Header], trusted: bool) -> _Scan:
    """Lower-case the names and pick out what the checks need, in one pass."""
    scan = _Scan()
    scan.expect_continue = False
    names: list[bytes] = []
    special = _SPECIAL
    size = 4 * len(headers)
    for name, value in headers:
        lower = name.lower()
        names.append(lower)
        size += len(name) + len(value)
        if lower not in special:
            continue
        if lower == b"host":
            scan.hosts.append(value)
        elif lower == b"content-length":
            scan.content_length = int(value)  # llhttp has checked it
        elif lower == b"transfer-encoding":
            scan.chunked = True
            if value.strip().lower() != b"chunked":
                scan.error = (501, "only the chunked transfer coding is supported")
        elif lower == b"expect":
            scan.expect(value)
        elif lower == b"connection":
            scan.named = scan.named | {t.strip().lower() for t in value.split(b",") if t.strip()}
        elif trusted:  # x-forwarded-for
            scan.forwarded_for = (scan.forwarded_for or []) + value.decode("latin-1").split(",")
    scan.names = names
    scan.size = size
    return scan


def _where(scan: _Scan, version: str, target: str, memo: HostMemo) -> tuple[bytes, str, str, tuple[int, str] | None]:
    """(authority, path, query, refusal): the Host header's value, or the
    authority of an absolute-form target, which replaces it (RFC 9112
    3.2.2); the path and query of the target; why it is refused, if it is
    (Host missing, repeated or malformed, another target form, a malformed
    query)."""
    hosts = scan.hosts
    host = hosts[0] if hosts else b""
    error: tuple[int, str] | None = None
    if len(hosts) > 1:
        error = (400, "more than one Host header")
    elif not hosts:
        error = (400, "missing Host header") if version != "1.0" else None
    elif host != memo.valid:
        if _HOST_RE.match(host):
            memo.valid = host  # keep-alive requests repeat it: checked once
        else:
            error = (400, "malformed Host header")
    if target[:1] == "/":
        path, _, query = target.partition("?")
    elif target.startswith(("http://", "https://")):
        host, path, query, absolute_error = _absolute_form(target)
        error = error or absolute_error
    else:
        return host, target, "", error or (400, "unsupported request target form")
    if query and _QUERY_FORBIDDEN.search(query):
        error = error or (400, "malformed query string")
    return host, path, query, error


def _absolute_form(target: str) -> tuple[bytes, str, str, tuple[int, str] | None]:
    """(authority, path, query, refusal) of an absolute-form target."""
    scheme_end = target.index("//") + 2
    slash = target.find("/", scheme_end)
    authority = target[scheme_end: slash if slash >= 0 else len(target)]
    path, _, query = (target[slash:] if slash >= 0 else "/").partition("?")
    host = authority.encode("latin-1")
    if not authority or not _HOST_RE.match(host):
        return host, path, query, (400, "malformed request target")
    return host, path, query, None


def _routing_host(value: bytes) -> str:
    """The host name routes match: lower-case, without port or trailing dot, IPv6 without brackets."""
    host = value.decode("latin-1").lower()
    if host.startswith("["):
        return host[1: host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


class _Facts:
    """What the route table looks at (slots: built on every request)."""

    __slots__ = ("listener", "host", "method", "path", "query")

    def __init__(self, listener: str, host: str, method: str, path: str, query: str) -> None:
        self.listener = listener
        self.host = host
        self.method = method
        self.path = path
        self.query = query


def decide(method: str, version: str, keep_alive: bool, upgrade: bool, url: bytes, headers: list[Header],
           connection: Connection, table: RouteTable, max_header_bytes: int, memo: HostMemo,
           unframed_body: bool = False) -> Request | Rejection:
    """Check and route one parsed request head.

    ``version`` is ``1.0``, ``1.1`` or (an HTTP/2 stream) ``2``; ``upgrade``:
    the client asked to switch protocols; ``memo`` is the connection's
    :class:`HostMemo`; ``unframed_body``: a body follows whose length the
    head does not say (an HTTP/2 request without content-length), which goes
    to the upstream chunked.  Returns a :class:`Request`, or a
    :class:`Rejection` (400, 417, 431, 501, 505)."""
    scan = _scan(headers, connection.peer_trusted)
    if unframed_body and scan.content_length is None:
        scan.chunked = True
    error = scan.error
    if scan.size + len(url) > max_header_bytes:
        error = (431, "request head too large")
    if version not in _VERSIONS:
        error = (505, "only HTTP/1.0 and HTTP/1.1 are supported")
    target = url.decode("latin-1")
    authority, path, query, where_error = _where(scan, version, target, memo)
    error = error or where_error
    try:
        normal = normalize_path(path)
    except PathError as e:
        error = error or (400, f"rejected path: {e.reason}")
        normal = "/"
    if authority != memo.routed[0]:
        memo.routed = (authority, _routing_host(authority))
    host = memo.routed[1]
    client = connection.peer
    if scan.forwarded_for:
        client = resolve_client(connection.peer, scan.forwarded_for, connection.trusted_proxies)
    route = table.match(_Facts(connection.listener, host, method, normal, query)) if error is None else None
    # Positional, in the order of RequestHead's fields (method, target, path,
    # query, version, headers, host, authority, client, peer, tls, listener,
    # route): keywords cost about 0.4 µs more per request.
    head = RequestHead(method, target, normal, query, version, tuple(headers), host, authority.decode("latin-1"),
                       client, connection.peer, connection.tls, connection.listener,
                       route.name if route is not None else "")
    websocket = upgrade and error is None and websocket_upgrade(route, method, head.header("upgrade"))
    if websocket and (scan.chunked or scan.content_length):
        error = (400, "a WebSocket handshake has no body")
    if error is not None:
        return Rejection(error[0], error[1], head, scan.content_length, scan.chunked, upgrade)
    return Request(head, tuple(scan.names), scan.named, scan.content_length, scan.chunked, scan.expect_continue,
                   keep_alive, upgrade, websocket, route)


_REQUEST_LINE_START = re.compile(rb"(?:^|\n)([!#$%&'*+.^_`|~0-9A-Za-z-]+) ")


def unknown_method(data: bytes, error: str) -> tuple[int, str]:
    """The answer to a request whose method llhttp does not know: 405 for
    TRACK (TRACE's twin, refused like it), 501 for another method name, 400
    when it is not a method name at all.  The method is the last line-start
    token of ``data`` llhttp does not parse (it stopped in that request)."""
    method = next((m.group(1).decode("ascii") for m in _REQUEST_LINE_START.finditer(data)
                   if not _llhttp_knows(m.group(1))), "")
    if method in TRACE_METHODS:
        return 405, f"{method} is not allowed"
    if method:
        return 501, f"method {method[:40]} is not implemented"
    return 400, f"malformed request: {error}"


def _llhttp_knows(method: bytes) -> bool:
    """Whether llhttp parses ``method`` (it refuses methods it has no name for)."""
    try:
        httptools.HttpRequestParser(_NoCallbacks()).feed_data(method + b" / HTTP/1.1\r\n\r\n")
    except httptools.HttpParserInvalidMethodError:
        return False
    except httptools.HttpParserError:
        return True
    return True


class _NoCallbacks:
    """A parser target that wants no callbacks."""
