"""The forwarding-header policy: what the upstream is told about the client.

Security policy, written once and used by the plain exchange and the
WebSocket bridge alike.  The client's own ``X-Forwarded-For``,
``X-Forwarded-Proto``, ``-Host``, ``-Port``, ``Forwarded`` and ``X-Real-IP``
are believed (and passed on) only when the TCP peer is one of the listener's
``trusted_proxies``; from anyone else they are removed and chatproxy's own
are written: ``X-Forwarded-For`` (the peer, after any trusted values),
``X-Forwarded-Proto``, ``X-Forwarded-Host`` (the client's authority),
``X-Forwarded-Port`` (the listener's port) and ``Via``.  Headers the client
names in ``Connection`` and the hop-by-hop ones are never forwarded.  No I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

from attrs import field, frozen

from chatproxy.http.messages import FORWARDING, Header, client_ip, in_networks

if TYPE_CHECKING:
    from chatproxy.config import Network

VIA = b"1.1 chatproxy"
_VIA_HEADER = (b"Via", VIA)
# The header names upstream_headers does more with than pass them on, per ``drop`` set.
_SPECIAL: dict[frozenset[bytes], frozenset[bytes]] = {}
_X_FORWARDED_FOR = b"x-forwarded-for"


@frozen
class Connection:
    """The client connection a request came on, as forwarding sees it: the
    TCP peer (and whether it is a trusted proxy), the listener, TLS or not,
    and the listener's port."""

    peer: str
    listener: str
    tls: bool
    port: int = 0
    trusted_proxies: tuple[Network, ...] = ()
    peer_trusted: bool = False
    #: chatproxy's X-Forwarded-For, -Proto and -Port for this connection (the same on every request).
    forwarded: tuple[Header, ...] = field(init=False, eq=False)

    @forwarded.default
    def _forwarded(self) -> tuple[Header, ...]:
        return ((b"X-Forwarded-For", self.peer.encode("ascii")),
                (b"X-Forwarded-Proto", b"https" if self.tls else b"http"),
                (b"X-Forwarded-Port", b"%d" % self.port))


def connection_of(peer: str, listener: str, tls: bool, port: int,
                  trusted_proxies: tuple[Network, ...]) -> Connection:
    """The :class:`Connection` of a peer on a listener (whether it is trusted decided here)."""
    trusted = bool(trusted_proxies) and in_networks(peer, trusted_proxies)
    return Connection(peer, listener, tls, port, trusted_proxies, trusted)


def resolve_client(peer: str, forwarded_for: Sequence[str],
                   trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """The client address: walk ``X-Forwarded-For`` right to left through trusted proxies.

    Only when the TCP peer is a trusted proxy is the header believed; the
    first address (from the right) that is not a trusted proxy is the client.
    """
    if not trusted or not in_networks(peer, trusted):
        return peer
    candidate = peer
    for hop in reversed(forwarded_for):
        hop = hop.strip()
        if hop.startswith("[") and "]" in hop:
            hop = hop[1: hop.index("]")]
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return candidate
        candidate = client_ip(hop)
        if not in_networks(candidate, trusted):
            return candidate
    return candidate


def upstream_headers(headers: Sequence[Header], names: Sequence[bytes], connection_named: frozenset[bytes],
                     conn: Connection, authority: str, drop: frozenset[bytes]) -> list[Header]:
    """The headers of a request as the upstream gets them, Host and framing
    aside: the client's end-to-end headers (without those in ``drop``, the
    hop-by-hop ones the caller lists there, and those named in
    ``Connection``), forwarding headers believed from a trusted peer, then
    chatproxy's own forwarding headers and ``Via``.  ``names`` are the
    lower-cased names of ``headers``; ``authority`` is the client's Host."""
    special = _SPECIAL.get(drop)
    if special is None:
        special = _SPECIAL[drop] = drop | FORWARDING | {b"via"}
    trusted = conn.peer_trusted
    out: list[Header] = []
    prior_for: list[bytes] = []
    kept: set[bytes] = set()
    vias: list[bytes] = []
    for i in range(len(headers)):  # (indexes: a C loop in the compiled build, forwarding.pxd)
        header = headers[i]
        lower = names[i]
        if lower not in special and lower not in connection_named:
            out.append(header)  # the common case: passed on as it is
        elif lower in drop or lower in connection_named:
            continue
        elif lower == b"via":
            vias.append(header[1])
        elif trusted:
            if lower == _X_FORWARDED_FOR:
                prior_for.append(header[1])
            else:
                kept.add(lower)
                out.append(header)
    if trusted:
        out += _own_forwarding(conn, prior_for, kept, authority.encode("latin-1"))
    else:
        out += conn.forwarded
        if authority:
            out.append((b"X-Forwarded-Host", authority.encode("latin-1")))
    out.append((b"Via", b", ".join([*vias, VIA])) if vias else _VIA_HEADER)
    return out


def _own_forwarding(conn: Connection, prior_for: list[bytes], kept: set[bytes], authority: bytes) -> list[Header]:
    """chatproxy's forwarding headers, except where a trusted peer sent its own."""
    forwarded_for, proto, port = conn.forwarded
    if prior_for:
        forwarded_for = (b"X-Forwarded-For", b", ".join([*prior_for, forwarded_for[1]]))
    out = [forwarded_for]
    if b"x-forwarded-proto" not in kept:
        out.append(proto)
    if b"x-forwarded-host" not in kept and authority:
        out.append((b"X-Forwarded-Host", authority))
    if b"x-forwarded-port" not in kept:
        out.append(port)
    return out
