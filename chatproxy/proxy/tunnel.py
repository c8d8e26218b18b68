"""Byte relay between a client and an upstream after a protocol upgrade.

Used for WebSocket routes once the upstream answered 101: bytes pass
unchanged both ways, each side's slowness pauses reading from the other, and
either side closing closes the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from attrs import evolve

from chatproxy.proxy.sending import send

if TYPE_CHECKING:
    from chatproxy.proxy.core import ProxyCore
    from chatproxy.proxy.exchange import Exchange
    from chatproxy.proxy.upstream import UpstreamConnection


class TunnelClient(Protocol):
    """What a tunnel needs of the client's connection (a front connection)."""

    core: ProxyCore
    client_paused: bool

    def write(self, data: bytes) -> None:
        """Send bytes to the client."""

    def close(self) -> None:
        """Close after what was written is sent."""

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client for ``reason``."""

    def resume_reading(self, reason: str) -> None:
        """Read again, as far as ``reason`` is concerned."""


class Tunnel:
    """Relays bytes between ``front`` and ``upstream`` after an upgrade."""

    def __init__(self, front: TunnelClient, upstream: UpstreamConnection, exchange: Exchange) -> None:
        self.front = front
        self.upstream = upstream
        self.exchange = exchange
        self.bytes_up = 0
        self.bytes_down = 0
        self._ended = False
        upstream.tunnel = self
        upstream.deadline = 0.0
        if front.client_paused:
            upstream.pause_reading()
        front.core.tunnels.add(self)

    def from_client(self, data: bytes) -> None:
        """Client bytes: to the upstream."""
        self.bytes_up += len(data)
        if self.upstream.transport is not None:
            send(self.upstream.transport, data)

    def write(self, data: bytes) -> None:
        """Upstream bytes: to the client."""
        self.bytes_down += len(data)
        self.front.write(data)

    def client_writable(self, writable: bool) -> None:
        """The client's send buffer filled or drained."""
        if writable:
            self.upstream.resume_reading()
        else:
            self.upstream.pause_reading()

    def peer_writable(self, writable: bool) -> None:
        """The upstream's send buffer filled or drained."""
        if writable:
            self.front.resume_reading("tunnel")
        else:
            self.front.pause_reading("tunnel")

    def close(self) -> None:
        """End the tunnel from the proxy's side (a reload that drops its route, a
        drain): the client's side is closed, which closes the upstream."""
        self.front.close()

    def drain(self) -> None:
        """Shutdown: the proxy core closes tunnels over the drain window (see ``ProxyCore.drain``)."""

    def peer_lost(self) -> None:
        """The upstream closed: close the client."""
        self._end()
        self.front.close()

    def client_lost(self) -> None:
        """The client closed: close the upstream."""
        self._end()
        self.upstream.close()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.front.core.tunnels.discard(self)
        exchange = self.exchange
        log = self.front.core.access_log
        if log.enabled:
            log.log(evolve(exchange.record(), bytes_sent=self.bytes_down))
