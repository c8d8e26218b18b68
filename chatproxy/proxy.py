"""The proxy core for one configuration: route table, upstream pools, filters,
access log and timeouts, shared by every front connection."""

from __future__ import annotations

from collections import Counter

from twisted.internet import defer
from typing import TYPE_CHECKING, Any

from chatproxy.accesslog import AccessLog
from chatproxy.config import Config, Route
from chatproxy.filters.chain import RouteFilter
from chatproxy.http.upstream import UpstreamPools
from chatproxy.routing import RouteTable
from chatproxy.stats import Stats
from chatproxy.timeouts import TimeoutSweeper

if TYPE_CHECKING:
    from chatproxy.http.front import FrontConnection
    from chatproxy.websocket import RouteSockets, WebSocketBridge


def _sweep_interval(config: Config) -> float:
    shortest = min(
        [config.settings.header_timeout, config.settings.idle_timeout]
        + [u.response_timeout for u in config.upstreams.values()]
    )
    return max(0.05, min(1.0, shortest / 4))


class ProxyCore:
    """Everything the data path needs, built from one :class:`Config`."""

    def __init__(self, reactor: Any, config: Config) -> None:
        self.reactor = reactor
        self.config = config
        self.settings = config.settings
        self.table = RouteTable(config.routes)
        self.sweeper = TimeoutSweeper(reactor, _sweep_interval(config))
        self.stats = Stats()
        self.pools = {name: UpstreamPools(reactor, upstream, self.sweeper, self.stats)
                      for name, upstream in config.upstreams.items()}
        self.access_log = AccessLog(reactor, config.settings.access_log, config.settings.access_log_format)
        self.connections: set[FrontConnection] = set()
        self.websocket_sessions: set[WebSocketBridge] = set()
        self.counters: Counter[str] = Counter()
        self.filter_counters: Counter[str] = Counter()  # "FILTER:outcome" -> count
        self._route_filters = {
            route.name: [RouteFilter(name, config.filters[name].filter, config.filters[name].mode == "report")
                         for name in route.filters]
            for route in config.routes
        }
        self._message_filters = {
            name: [f for f in filters if callable(getattr(f.filter, "message", None))]
            for name, filters in self._route_filters.items()
        }
        self._response_filters = {
            name: [(f.name, f.filter) for f in filters if callable(getattr(f.filter, "response", None))]
            for name, filters in self._route_filters.items()
        }
        self._body_filters = {
            name: [f for f in filters if callable(getattr(f.filter, "request_body", None))
                   and isinstance(getattr(f.filter, "inspect_body_bytes", None), int) and f.filter.inspect_body_bytes > 0]
            for name, filters in self._route_filters.items()
        }
        self._body_limits = {
            route.name: min([route.max_body_bytes if route.max_body_bytes is not None else config.settings.max_body_bytes]
                            + [int(f.filter.max_body_bytes) for f in self._route_filters[route.name]
                               if isinstance(getattr(f.filter, "max_body_bytes", None), int) and not f.report])
            for route in config.routes
        }
        self._sockets: dict[str, RouteSockets] = {}

    def route_filters(self, route: Route) -> list[RouteFilter]:
        """The filters of a route, in order."""
        return self._route_filters[route.name]

    def response_filters(self, route: Route) -> list[tuple[str, Any]]:
        """The (name, filter) pairs of a route whose filters see response heads."""
        return self._response_filters[route.name]

    def body_filters(self, route: Route) -> list[RouteFilter]:
        """The filters of a route that read the start of request bodies."""
        return self._body_filters[route.name]

    def body_inspection_limit(self, route: Route) -> int:
        """How many body bytes the route's body filters want before forwarding (0: none)."""
        filters = self._body_filters[route.name]
        return max((int(f.filter.inspect_body_bytes) for f in filters), default=0)

    def body_limit(self, route: Route) -> int:
        """The request body limit of a route: its own or the global one, or a
        filter's (``request_limits``) when smaller."""
        return self._body_limits[route.name]

    def message_filters(self, route: Route | None) -> list[RouteFilter]:
        """The filters of a route that look at WebSocket messages."""
        return self._message_filters[route.name] if route is not None else []

    def route_sockets(self, route: Route) -> RouteSockets:
        """The WebSocket server factory and limits of a bridge route (made once)."""
        sockets = self._sockets.get(route.name)
        if sockets is None:
            from chatproxy.websocket import RouteSockets

            upstream = self.config.upstreams[route.upstream]
            sockets = RouteSockets(route, upstream.connect_timeout + upstream.response_timeout + 5)
            self._sockets[route.name] = sockets
        return sockets

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """Let connections finish: idle ones close now, busy ones after their
        current exchange, WebSocket sessions are closed with 1001 spread over
        the first half of ``timeout``; whatever is left at ``timeout`` is
        closed.  Fires when nothing is left."""
        import random

        done: defer.Deferred[None] = defer.Deferred()
        for connection in list(self.connections):
            connection.drain()
        window = timeout / 2
        for session in list(self.websocket_sessions):
            self.reactor.callLater(random.uniform(0, window), session.close_both, 1001, "server shutting down")
        deadline = self.reactor.seconds() + timeout

        def finish() -> None:
            if not done.called:
                done.callback(None)

        def check() -> None:
            if not self.connections and not self.websocket_sessions:
                finish()
                return
            if self.reactor.seconds() >= deadline:
                for connection in list(self.connections):
                    connection.abort()
                for session in list(self.websocket_sessions):
                    session.close_both(1001, "server shutting down")
                self.reactor.callLater(0.5, finish)
                return
            self.reactor.callLater(0.05, check)

        check()
        return done

    def start(self) -> None:
        """Start the timeout sweeps."""
        self.sweeper.start()

    def stop(self) -> None:
        """Stop timers, close pooled connections and the access log."""
        self.sweeper.stop()
        for pools in self.pools.values():
            pools.close_all()
        self.access_log.close()
