"""The proxy core for one configuration: route table, upstream pools, filters,
access log and timeouts, shared by every front connection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatproxy.accesslog import AccessLog
from chatproxy.config import Config, Route
from chatproxy.http.upstream import UpstreamPools
from chatproxy.routing import RouteTable
from chatproxy.timeouts import TimeoutSweeper

if TYPE_CHECKING:
    from chatproxy.http.front import FrontConnection


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
        self.pools = {name: UpstreamPools(reactor, upstream, self.sweeper) for name, upstream in config.upstreams.items()}
        self.access_log = AccessLog(reactor, config.settings.access_log, config.settings.access_log_format)
        self.connections: set[FrontConnection] = set()
        self._route_filters = {
            route.name: [(name, config.filters[name].filter) for name in route.filters] for route in config.routes
        }

    def route_filters(self, route: Route) -> list[tuple[str, Any]]:
        """The (name, filter) pairs of a route, in order."""
        return self._route_filters[route.name]

    def start(self) -> None:
        """Start the timeout sweeps."""
        self.sweeper.start()

    def stop(self) -> None:
        """Stop timers, close pooled connections and the access log."""
        self.sweeper.stop()
        for pools in self.pools.values():
            pools.close_all()
        self.access_log.close()
