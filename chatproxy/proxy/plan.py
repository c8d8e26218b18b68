"""What one configuration means for the data path: the route table, each
route's filters and limits, and the upstream pools.

A :class:`Plan` is built from a validated :class:`~chatproxy.config.Config`
and never changes.  The proxy core holds the current plan; a reload builds a
new one and swaps it in, so a request sees one configuration from its first
byte to its last (each exchange keeps the plan it was routed with) while the
next request already sees the new one.  Upstream pools whose section did not
change are carried over to the new plan with their idle keep-alive
connections.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chatproxy.config import Config, Route, Upstream
from chatproxy.filters.chain import FilterChain, RouteFilter
from chatproxy.http.messages import in_networks
from chatproxy.proxy.plain import ChallengeFiles
from chatproxy.proxy.upstream import UpstreamPools
from chatproxy.proxy.websocket.sockets import RouteSockets
from chatproxy.proxy.routing import RouteTable
from chatproxy.proxy.stats import Stats
from chatproxy.proxy.timeouts import TimeoutSweeper
from chatproxy.proxy.tls import build_client_tls
from chatproxy.proxy.validate import validate



def _body_limit(route: Route, default: int, chain: FilterChain) -> int:
    """A route's request body limit: its own (or ``default``), or its filters' when smaller."""
    own = route.max_body_bytes if route.max_body_bytes is not None else default
    return own if chain.max_body_bytes is None else min(own, chain.max_body_bytes)


class Plan:
    """The route table, per-route filters and limits, and upstream pools of one configuration.

    ``filters`` are the configuration's filters as :func:`~chatproxy.proxy.validate.validate`
    built them; without them the plan validates ``config`` itself (raising
    :class:`~chatproxy.config.ConfigError`), so each filter is built once per plan.
    """

    def __init__(self, reactor: Any, config: Config, sweeper: TimeoutSweeper, stats: Stats,
                 previous: Plan | None = None, filters: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.filters = dict(filters) if filters is not None else validate(config)
        self.settings = config.settings
        self.table = RouteTable(config.routes)
        # ACME HTTP-01 answers for the plain listeners (the ACME client writes them there).
        state = config.settings.state_directory
        self.challenges = ChallengeFiles(state / "acme" / "challenges") if config.acme and state is not None \
            else None
        self.routes = {route.name: route for route in config.routes}
        self.pools: dict[str, UpstreamPools] = {}
        self.new_pools: list[UpstreamPools] = []  # made for this plan (not carried over)
        # Carried-over pools with their client TLS loaded again (files may have changed).
        self._fresh_tls: list[tuple[UpstreamPools, list[Any]]] = []
        for name, upstream in config.upstreams.items():
            kept = previous.pools.get(name) if previous is not None else None
            if kept is not None and kept.upstream == upstream:
                self.pools[name] = kept
                if any(server.tls for server in upstream.servers):
                    self._fresh_tls.append((kept, [build_client_tls(upstream, server) if server.tls else None
                                                   for server in upstream.servers]))
            else:
                self.pools[name] = pools = UpstreamPools(reactor, upstream, sweeper, stats)
                self.new_pools.append(pools)
        #: The filter chain of each route, by route name.
        self.chains = {
            route.name: FilterChain([RouteFilter(name, self.filters[name], config.filters[name].mode == "report",
                                                 config.filters[name].refused_message == "drop")
                                     for name in route.filters], stats.filter_outcomes, stats.filter_refused)
            for route in config.routes
        }
        self._body_limits = {route.name: _body_limit(route, config.settings.max_body_bytes, self.chains[route.name])
                             for route in config.routes}
        self._sockets: dict[str, RouteSockets] = {}

    def refresh_tls(self) -> None:
        """Give carried-over pools the client TLS credentials loaded for this
        plan: new upstream connections use them; open ones keep theirs."""
        for pools, creators in self._fresh_tls:
            pools.replace_tls(creators)
        self._fresh_tls = []

    def retired_pools(self, successor: Plan) -> list[UpstreamPools]:
        """The pools of this plan that ``successor`` no longer uses."""
        kept = {id(pools) for pools in successor.pools.values()}
        return [pools for pools in self.pools.values() if id(pools) not in kept]

    def upstream_of(self, route: Route) -> Upstream:
        """The upstream section a route of this plan forwards to."""
        return self.config.upstreams[route.upstream]

    def chain(self, route: Route) -> FilterChain:
        """The filter chain of a route of this plan."""
        return self.chains[route.name]

    def body_limit(self, route: Route) -> int:
        """The request body limit of a route: its own or the global one, or a
        filter's (``request_limits``) when smaller."""
        return self._body_limits[route.name]

    def route_sockets(self, route: Route) -> RouteSockets:
        """The WebSocket server factory and limits of a bridge route (made once)."""
        sockets = self._sockets.get(route.name)
        if sockets is None:
            upstream = self.config.upstreams[route.upstream]
            sockets = RouteSockets(route, upstream.connect_timeout + upstream.response_timeout + 5,
                                   self.settings.close_timeout)
            self._sockets[route.name] = sockets
        return sockets

    def keeps_session(self, route: Route, upstream: Upstream, listener: str, peer: str) -> bool:
        """Whether an established WebSocket session (routed by ``route`` of an
        earlier plan to ``upstream``, on ``listener``, from ``peer``) may stay
        open under this plan: its route still exists, carries WebSockets the
        same way, forwards to an upstream with the same servers, still serves
        its listener, and the listener's ``allow`` still admits the peer."""
        current = self.routes.get(route.name)
        if current is None or not current.websocket or current.ws.mode != route.ws.mode:
            return False
        now_listener = self.config.listeners.get(listener)
        if now_listener is None:
            return False
        if now_listener.allow is not None and not in_networks(peer, now_listener.allow):
            return False
        if current.listeners is not None and listener not in current.listeners:
            return False
        now = self.config.upstreams.get(current.upstream)
        return now is not None and current.upstream == route.upstream and now.servers == upstream.servers
