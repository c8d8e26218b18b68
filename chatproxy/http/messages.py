"""Request heads, locally generated responses, and the header rules of a proxy
(hop-by-hop removal and the forwarding headers)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from attrs import frozen

Header = tuple[bytes, bytes]

# RFC 9110 7.6.1 hop-by-hop fields, plus the historical ones clients still send.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Headers that describe the client's connection: believed (and passed on) only
# from a trusted proxy, otherwise removed and replaced by chatproxy's own.
FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"forwarded", b"x-real-ip"}
)

# Headers that describe the connection or the message framing: chatproxy
# writes these itself, configuration cannot set or remove them.
CONNECTION_HEADERS = HOP_BY_HOP | {b"content-length", b"host"}

FIELD_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a token (RFC 9110 5.6.2)
_FIELD_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # visible characters, spaces and tabs (RFC 9110 5.5)


def parse_header_lines(text: str) -> tuple[Header, ...]:
    """``Name: value`` lines (blank lines skipped) as header pairs, for
    configuration options.  Raises ValueError naming the first bad line."""
    headers: list[Header] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"expected 'Name: value', got {line!r}")
        name, value = name.strip(), value.strip()
        if not FIELD_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name")
        if not _FIELD_VALUE_RE.fullmatch(value):
            raise ValueError(f"the value of {name} has characters a header value cannot have")
        headers.append((name.encode("ascii"), value.encode("latin-1")))
    if not headers:
        raise ValueError("expected at least one 'Name: value' line")
    return tuple(headers)


def replace_headers(headers: Sequence[Header], replacements: Sequence[Header]) -> list[Header]:
    """``headers`` without any header named in ``replacements``, then ``replacements``."""
    if not replacements:
        return list(headers)
    replaced = {name.lower() for name, _ in replacements}
    return [h for h in headers if h[0].lower() not in replaced] + list(replacements)


REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@frozen(slots=False)
class RequestHead:
    """One client request head as the router and filters see it (immutable;
    built on every request, so without slots: a frozen slotted class costs
    twice as much to build).

    ``path`` is the normalised path (what matching used and what is
    forwarded, unless the route rewrites it); ``query`` is the raw query
    string without ``?``; ``authority`` is the Host header, or the authority
    of an absolute-form target (which replaces Host, RFC 9112 3.2.2), and
    ``host`` its lower-cased name without port, used for routing; ``client``
    is the client address after ``trusted_proxies`` resolution and ``peer``
    the TCP peer; ``route`` names the route the request matched.
    """

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: tuple[Header, ...]
    host: str
    authority: str
    client: str
    peer: str
    tls: bool
    listener: str
    route: str = ""  # the matched route's name, once routed (what filters see)
    # What filters noted for the access log: (filter section, note) pairs.
    notes: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None


def add_fields(lines: list[bytes], headers: list[Header] | tuple[Header, ...]) -> None:
    """Append the wire form of ``headers`` (``name: value`` and CRLF, each
    field as four pieces) to ``lines``, the parts of a message head that
    the caller joins: the header fields of every head the proxy relays or
    answers with (those it adds itself, Host, framing and Upgrade, are written
    where they are decided).  In the compiled build a C loop (messages.pxd)."""
    for name, value in headers:
        lines.append(name)
        lines.append(b": ")
        lines.append(value)
        lines.append(b"\r\n")


def local_response(status: int, message: str | None = None, *, close: bool = False,
                   extra: Sequence[Header] = (), head_only: bool = False,
                   headers: Sequence[Header] | None = None) -> bytes:
    """A complete small plain-text response generated by the proxy itself:
    ``Content-Type: text/plain`` and ``extra``, or ``headers`` instead of
    both; the body is ``message`` (or the reason phrase) and a newline."""
    reason = REASONS.get(status, "Unknown")
    body = ((message or reason) + "\n").encode("utf-8")
    if headers is None:
        headers = [(b"Content-Type", b"text/plain; charset=utf-8"), *extra]
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("ascii"))]
    add_fields(lines, [header for header in headers if header[0].lower() == b"content-type"])
    lines.append(b"Content-Length: %d\r\n" % len(body))
    add_fields(lines, [header for header in headers if header[0].lower() != b"content-type"])
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def client_ip(host: str) -> str:
    """An IP address in canonical text form, IPv4-mapped IPv6 unmapped."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def in_networks(host: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether the address ``host`` lies in any of ``networks``."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
