"""The ``origin`` filter kind: only pages from trusted origins may call a route.

::

    [filter:trusted-origins]
    use = origin
    allow = https://www.example.com, https://*.example.com
    missing = allow-get

A browser names the page that makes a request in ``Origin`` (always on
WebSocket handshakes, cross-origin requests and POSTs); where it sends no
``Origin``, the origin of its ``Referer`` is used.  The request passes only
when that origin is one of ``allow``.  Scheme, host and port are compared
exactly, after lower-casing scheme and host and filling in the default port
(80 for http/ws, 443 for https/wss).  ``https://*.example.com`` matches any
origin one or more labels below ``example.com`` (``https://a.example.com``,
``https://a.b.example.com``) on the same scheme and port, not
``https://example.com`` itself.  ``Origin: null`` (sandboxed frames, files,
some redirects) is never trusted.  A request with neither header is refused
with ``missing = deny`` (the default), passes with ``missing = allow``, and
with ``missing = allow-get`` passes only when it is a plain ``GET`` or
``HEAD`` (not a WebSocket handshake): a page served with ``Referrer-Policy:
no-referrer`` loads scripts that way.  A header that is present is checked
whatever ``missing`` says.  Refusals are ``403``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import idna
from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.filters import Filter, FilterOptionError, FilterOptions, IFilterFactory, IRequestFilter, Refuse

_OPTIONS = ("allow", "missing")
MISSING = ("deny", "allow-get", "allow")  # the values of ``missing``
_LENIENT_METHODS = frozenset({"GET", "HEAD"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# scheme "://" host [":" port], the serialisation of RFC 6454 section 6.2.
_ORIGIN_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://(\[[0-9A-Fa-f:.]+\]|[^\s:/?#\[\]@]+)(?::([0-9]{1,5}))?")
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?")

# (scheme, host, port): host lower-case, IPv6 in brackets; port None only for
# a scheme without a default port written without one.
OriginKey = tuple[str, str, int | None]


def _port(scheme: str, text: str | None) -> int | None:
    if text is None:
        return DEFAULT_PORTS.get(scheme)
    port = int(text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return port


def _ipv6(host: str) -> str | None:
    """``[canonical]`` for a bracketed IPv6 literal, None for anything else."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    return None


def _header_host(host: str) -> str | None:
    """A host from a request header, lower-cased and checked (IPv6 in brackets,
    canonical), or None when it is not a host name or IP address."""
    host = host.lower()
    try:
        ipv6 = _ipv6(host)
    except ValueError:
        return None
    if ipv6 is not None:
        return ipv6
    if all(_LABEL_RE.fullmatch(label) for label in host.split(".")):
        return host
    return None


def parse_origin(text: str) -> OriginKey | None:
    """The normalised (scheme, host, port) of an ``Origin`` header value, or None
    when it is not a single serialised origin."""
    match = _ORIGIN_RE.fullmatch(text.strip())
    if match is None:
        return None
    scheme, host, port = match.group(1).lower(), _header_host(match.group(2)), match.group(3)
    if host is None:
        return None
    try:
        return scheme, host, _port(scheme, port)
    except ValueError:
        return None


def referer_origin(text: str) -> OriginKey | None:
    """The origin (scheme, host, port) of a ``Referer`` URL, or None when it has none."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, hostname = parts.scheme.lower(), parts.hostname
    if not scheme or not hostname:
        return None
    host = _header_host(f"[{hostname}]" if ":" in hostname else hostname)
    if host is None:
        return None
    return scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme)


def show(key: OriginKey) -> str:
    """An origin as text, default ports left out."""
    scheme, host, port = key
    if port is None or DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _quote(text: str, limit: int = 100) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _config_host(host: str) -> str:
    """A host name from the configuration: lower-case ASCII (IDNA), checked."""
    ipv6 = _ipv6(host)
    if ipv6 is not None:
        return ipv6
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"{host!r} is not a valid host name ({e})") from None
    host = host.lower()
    if not all(_LABEL_RE.fullmatch(label) for label in host.split(".")):
        raise ValueError(f"{host!r} is not a valid host name")
    return host


def parse_allowed(item: str) -> tuple[bool, OriginKey]:
    """One ``allow`` entry: (wildcard?, key).  For a wildcard the host of the
    key is the domain below which any origin matches.  Raises ValueError."""
    text = item[:-1] if item.endswith("/") and item.count("/") == 3 else item
    match = _ORIGIN_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{item!r} is not an origin: expected scheme://host or scheme://host:port "
                         "(such as https://www.example.com), without a path")
    scheme, host, port = match.group(1).lower(), match.group(2), match.group(3)
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if "*" in host:
        raise ValueError(f"{item!r}: '*' may only stand as the first label, as in https://*.example.com")
    host = _config_host(host)
    if wildcard and (host.startswith("[") or host.count(".") < 1):
        raise ValueError(f"{item!r}: a wildcard needs a domain of at least two labels, as in https://*.example.com")
    return wildcard, (scheme, host, _port(scheme, port))


def websocket_handshake(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a request head asks for a WebSocket: an ``Upgrade`` header (any
    of them) lists the protocol ``websocket`` (any case, any version)."""
    for name, value in headers:
        if name.lower() == b"upgrade":
            for token in value.split(b","):
                if token.split(b"/", 1)[0].strip().lower() == b"websocket":
                    return True
    return False


def missing_refusal(missing: str, method: str, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """What happens to a request with neither ``Origin`` nor ``Referer`` under
    ``missing``: None when it passes, otherwise the reason it is refused.

    ``allow-get`` lets a plain ``GET`` or ``HEAD`` pass (what a page with
    ``Referrer-Policy: no-referrer`` sends for its scripts and images) and
    refuses a WebSocket handshake and every other method (``OPTIONS``
    included: a browser's CORS preflight always carries ``Origin``).
    """
    if missing == "allow":
        return None
    if missing == "allow-get":
        if websocket_handshake(headers):
            return "no Origin or Referer header (WebSocket handshakes need one)"
        if method not in _LENIENT_METHODS:
            return f"no Origin or Referer header ({method[:20]} requests need one)"
        return None
    return "no Origin or Referer header"


@implementer(IRequestFilter)
class OriginFilter(Filter):
    """Passes requests from a trusted origin; refuses the others with 403."""

    def __init__(self, exact: frozenset[OriginKey], wildcards: tuple[OriginKey, ...], missing: str = "deny") -> None:
        if missing not in MISSING:
            raise ValueError(f"missing must be one of {', '.join(MISSING)}, got {missing!r}")
        self.exact = exact
        self.wildcards = wildcards
        self.missing = missing

    def trusted(self, key: OriginKey) -> bool:
        """Whether an origin is in the allow list."""
        if key in self.exact:
            return True
        scheme, host, port = key
        for w_scheme, domain, w_port in self.wildcards:
            if scheme == w_scheme and port == w_port and host.endswith("." + domain):
                below = host[: -len(domain) - 1]
                if below and all(below.split(".")):
                    return True
        return False

    def request(self, head: Any) -> Refuse | None:
        """403 unless the Origin (or, without one, the Referer's origin) is trusted."""
        origins = [value.decode("latin-1") for name, value in head.headers if name.lower() == b"origin"]
        if len(origins) > 1:
            return Refuse(403, "several Origin headers")
        if origins:
            value = origins[0].strip()
            if value == "null":
                return Refuse(403, "Origin null is not trusted")
            key = parse_origin(value)
            if key is None:
                return Refuse(403, f"Origin {_quote(value)} is not an origin")
            if not self.trusted(key):
                return Refuse(403, f"origin {show(key)} is not trusted")
            return None
        referer = head.header("referer")
        if referer is None or not referer.strip():
            reason = missing_refusal(self.missing, head.method, head.headers)
            return None if reason is None else Refuse(403, reason)
        key = referer_origin(referer)
        if key is None:
            return Refuse(403, f"Referer {_quote(referer)} has no origin")
        if not self.trusted(key):
            return Refuse(403, f"origin {show(key)} (from Referer) is not trusted")
        return None


@implementer(IPlugin, IFilterFactory)
class OriginKind:
    """The filter kind ``use = origin`` (options ``allow``, ``missing``)."""

    name = "origin"

    def build(self, options: Mapping[str, str]) -> OriginFilter:
        """Parse ``allow`` (required list of origins) and ``missing`` (deny, allow-get or allow)."""
        opts = FilterOptions(self.name, options, _OPTIONS)
        exact: set[OriginKey] = set()
        wildcards: list[OriginKey] = []
        for item in opts.items("allow", what="origin"):
            wildcard, key = _allowed("allow", item)
            if wildcard:
                wildcards.append(key)
            else:
                exact.add(key)
        return OriginFilter(frozenset(exact), tuple(wildcards), opts.choice("missing", MISSING, "deny"))


def _allowed(option: str, item: str) -> tuple[bool, OriginKey]:
    """One entry of ``allow`` (see :func:`parse_allowed`), never ``*`` or ``null``."""
    if item == "*":
        raise FilterOptionError(option, "'*' would trust every origin; list the origins instead")
    if item == "null":
        raise FilterOptionError(option, "the origin null cannot be trusted (any sandboxed page sends it)")
    try:
        return parse_allowed(item)
    except ValueError as e:
        raise FilterOptionError(option, str(e)) from None


origin = OriginKind()
