"""The connection gate: a listener's ``allow`` list, checked at accept.

A client outside the allowed networks is dropped before any byte is read, and
so before TLS: it never gets a handshake, let alone an HTTP answer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IProtocol, IProtocolFactory
from zope.interface import implementer
from twisted.logger import Logger

from chatproxy.http.messages import in_networks

log = Logger(namespace=__name__)  # (a compiled module has no frame Twisted could name it from)


@implementer(IProtocolFactory)
class GateFactory:
    """Wraps a listener's factory; refuses connections from outside ``allow``."""

    def __init__(self, wrapped: IProtocolFactory,
                 allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.wrapped = wrapped
        self.allow = tuple(allow)
        self.refused = 0

    def doStart(self) -> None:
        """Start the wrapped factory."""
        self.wrapped.doStart()

    def doStop(self) -> None:
        """Stop the wrapped factory."""
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> IProtocol | None:
        """The wrapped factory's protocol, or None (close at once) for others."""
        host = getattr(addr, "host", None)
        if host is not None and not in_networks(host, self.allow):
            self.refused += 1
            return None
        return self.wrapped.buildProtocol(addr)
