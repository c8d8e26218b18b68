"""Per WebSocket route: the Autobahn server factory and the protocol options
of both legs, shared by the route's sessions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketServerFactory
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)

from chatproxy.proxy.websocket.frames import READ_PER_MESSAGE
from chatproxy.proxy.websocket.legs import ClientLeg, UpstreamLeg

if TYPE_CHECKING:
    from chatproxy.config import Route


class RouteSockets:
    """The Autobahn server factory and limits for one WebSocket route, and
    the classes of its two legs.

    The legs' classes carry the route's protocol options as class attributes:
    Autobahn copies each option from the factory into every protocol it
    starts, unless the protocol already has it, so the route's sessions share
    one copy of the thirty or so instead of each holding its own (all but the
    few the relay reads on every message,
    :data:`~chatproxy.proxy.websocket.frames.READ_PER_MESSAGE`)."""

    def __init__(self, route: Route, open_timeout: float, close_timeout: float) -> None:
        options = route.ws
        self.route = route
        self.options = options
        self.close_timeout = close_timeout
        factory = WebSocketServerFactory()
        factory.noisy = False
        factory.protocol = ClientLeg
        factory.server = "chatproxy"
        factory.setProtocolOptions(
            maxFramePayloadSize=options.max_frame_bytes,
            maxMessagePayloadSize=options.max_message_bytes,
            openHandshakeTimeout=open_timeout,
            closeHandshakeTimeout=close_timeout,
            autoPingInterval=options.ping_interval or 0,
            autoPingTimeout=options.ping_timeout or 0,
            autoPingRestartOnAnyTraffic=True,
            perMessageCompressionAccept=_accept_deflate if options.compression else None,
            failByDrop=False,  # a failure sends a close frame (when the bridge says so, see _BridgeLeg)
        )
        factory._batched_timer = TIMER
        self.server_factory = factory
        #: The classes of the route's client and upstream legs.
        self.client_leg: type[ClientLeg] = _with_options(ClientLeg, factory)
        self.upstream_leg: type[UpstreamLeg] = UpstreamLeg  # until the route's own, just below
        #: What an open upstream leg keeps as its factory in place of its
        #: own (which held its handshake): the route's options and timer, shared.
        self.open_client_factory = self.client_factory()
        self.upstream_leg = self.open_client_factory.protocol = _with_options(UpstreamLeg, self.open_client_factory)

    def client_factory(self, **handshake: Any) -> WebSocketClientFactory:
        """An Autobahn client factory for one upstream leg of this route:
        ``handshake`` (url, protocols, headers, ...) and the route's options."""
        factory = WebSocketClientFactory(**handshake)
        factory.noisy = False
        factory.protocol = self.upstream_leg
        factory.setProtocolOptions(**self.client_options())
        factory._batched_timer = TIMER
        return factory

    def client_options(self) -> dict[str, Any]:
        """Protocol options for an upstream leg of this route."""
        options = self.options
        return dict(
            maxFramePayloadSize=options.max_frame_bytes,
            maxMessagePayloadSize=options.max_message_bytes,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=self.close_timeout,
            autoPingInterval=options.ping_interval or 0,
            autoPingTimeout=options.ping_timeout or 0,
            autoPingRestartOnAnyTraffic=True,
            perMessageCompressionOffers=[PerMessageDeflateOffer()] if options.compression else [],
            perMessageCompressionAccept=_accept_deflate_response if options.compression else None,
            failByDrop=False,
        )


def _with_options(leg: type[Any], factory: Any) -> type[Any]:
    """A subclass of ``leg`` whose class attributes are ``factory``'s protocol
    options (Autobahn's ``CONFIG_ATTRS`` for that side, but those read on
    every message), so that Autobahn finds them on the class and does not
    copy them onto each protocol."""
    options = {name: _as_class_attribute(getattr(factory, name))
               for name in leg.CONFIG_ATTRS if name not in READ_PER_MESSAGE}
    return type(leg.__name__, (leg,), {"__module__": leg.__module__, "__qualname__": leg.__qualname__,
                                       "__doc__": leg.__doc__, **options})


def _as_class_attribute(value: Any) -> Any:
    """``value`` as it must sit on a class to read back unchanged from an
    instance: a function (an option such as ``perMessageCompressionAccept``)
    would otherwise come back bound.  Any callable is wrapped, not only
    Python's own function type: compiled, the option is a Cython function,
    which binds as well (and ``staticmethod`` gives any other callable back
    as it is)."""
    return staticmethod(value) if callable(value) else value


class _Timer:
    """Autobahn's timers (pings, ping and handshake timeouts) at the delay asked
    for.  txaio's batched timer, Autobahn's default, rounds the due time down to
    a whole second: a 1 s ping_timeout could fire a millisecond after the ping
    and drop a healthy peer, a 300 ms ping_interval pinged at once."""

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> _Call:
        from twisted.internet import reactor

        return _Call(reactor.callLater(delay, func, *args, **kwargs))  # type: ignore[attr-defined]


class _Call:
    """A timer call whose cancel() may come after it ran (as Autobahn expects)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


#: The timer every Autobahn protocol of the bridge uses (see _Timer).
TIMER = _Timer()


def _accept_deflate(offers: list[Any]) -> Any:
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


def _accept_deflate_response(response: Any) -> Any:
    if isinstance(response, PerMessageDeflateResponse):
        return PerMessageDeflateResponseAccept(response)
    return None
