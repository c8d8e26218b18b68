"""The proxy core: what lives as long as the process (connections, sessions,
timeouts, statistics, the access log) and the current :class:`Plan`, which a
reload replaces."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from chatproxy.proxy.accesslog import AccessLog
from chatproxy.config import Config, Settings
from chatproxy.proxy.upstream import UpstreamPools
from chatproxy.proxy.plan import Plan
from chatproxy.proxy.routing import RouteTable
from chatproxy.proxy.stats import Stats
from chatproxy.proxy.timeouts import TimeoutSweeper


log = Logger(namespace=__name__)  # (a compiled module has no frame Twisted could name it from)


class Session(Protocol):
    """What the core needs of a bridged WebSocket session."""

    exchange: Any  # the exchange whose upgrade started it

    def close_both(self, code: int, reason: str) -> None:
        """End the session with ``code`` on both legs."""


class Tunnel(Protocol):
    """What the core needs of a tunnel-mode session."""

    exchange: Any  # the exchange whose upgrade started it

    def close(self) -> None:
        """End it from the proxy's side."""


class ClientConnection(Protocol):
    """What the core needs of a client connection (a front connection)."""

    factory: Any

    def drain(self) -> None:
        """Close once the current exchange is done (shutdown)."""

    def close(self) -> None:
        """Close after what was written is sent."""

    def abort(self, hard: bool = False) -> None:
        """Close without completing the response."""

#: The WebSocket close code for sessions a reload ends (RFC 6455 registry: "Service Restart").
SERVICE_RESTART = 1012


def _sweep_interval(config: Config) -> float:
    shortest = min(
        [config.settings.header_timeout, config.settings.idle_timeout, config.settings.close_timeout]
        + [u.response_timeout for u in config.upstreams.values()]
    )
    return max(0.05, min(1.0, shortest / 4))


class ProxyCore:
    """Everything the data path needs; :attr:`plan` is the current configuration's part
    (its filters given as :func:`~chatproxy.proxy.validate.validate` built them, or built here)."""

    def __init__(self, reactor: Any, config: Config, filters: Mapping[str, Any] | None = None) -> None:
        self.reactor = reactor
        self.sweeper = TimeoutSweeper(reactor, _sweep_interval(config))
        self.stats = Stats()
        self.plan = Plan(reactor, config, self.sweeper, self.stats, filters=filters)
        self.access_log = AccessLog(reactor, config.settings.access_log, config.settings.access_log_format)
        self.connections: set[ClientConnection] = set()
        self.websocket_sessions: set[Session] = set()
        self.tunnels: set[Tunnel] = set()  # tunnel-mode sessions (bytes relayed after a 101)
        self.counters: Counter[str] = Counter()
        self._started = False

    @property
    def filter_counters(self) -> Counter[str]:
        """Filter outcomes by ``FILTER:outcome`` (kept in :attr:`stats`)."""
        return self.stats.filter_outcomes

    # The current plan's parts, for code that only needs "what is configured now".

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.plan.config

    @property
    def settings(self) -> Settings:
        """The ``[chatproxy]`` settings in force."""
        return self.plan.settings

    @property
    def table(self) -> RouteTable:
        """The route table in force."""
        return self.plan.table

    @property
    def pools(self) -> dict[str, UpstreamPools]:
        """The upstream pools in force, by upstream name."""
        return self.plan.pools

    # -- reload

    def install(self, plan: Plan, access_log: AccessLog | None = None) -> int:
        """Make ``plan`` the one in force (a reload): new requests use it at
        once; requests already routed finish under the plan they started
        with.  Pools it no longer uses close once their connections are
        done; kept pools take freshly loaded client TLS credentials;
        WebSocket sessions it does not keep (see :meth:`Plan.keeps_session`)
        are closed with 1012 at random moments over ``reload_close_window``,
        the others follow its message filters from now on.  ``access_log``
        (opened beforehand, so that failing to open it refuses the reload)
        replaces the current one.  Returns how many sessions will be closed."""
        old, self.plan = self.plan, plan
        for pools in old.retired_pools(plan):
            pools.retire()
        plan.refresh_tls()
        if self._started:
            for pools in plan.new_pools:
                pools.start_health_checks()
        interval = _sweep_interval(plan.config)
        if interval != self.sweeper.interval:
            self.sweeper.stop()
            self.sweeper.interval = interval
            if self._started:
                self.sweeper.start()
        if access_log is not None and access_log is not self.access_log:
            previous, self.access_log = self.access_log, access_log
            previous.close()
        return self._close_orphaned_sessions(plan)

    def _doomed(self, exchange: Any, plan: Plan) -> bool:
        """Whether ``plan`` ends the session ``exchange`` started (and if not, it adopts ``plan``)."""
        route, head = exchange.route, exchange.head
        if route is None or head is None or exchange.plan is plan:
            return False
        if not plan.keeps_session(route, exchange.plan.upstream_of(route), head.listener, head.peer):
            return True
        exchange.plan = plan  # kept: the new configuration's message filters apply from now on
        return False

    def _close_orphaned_sessions(self, plan: Plan) -> int:
        window = plan.settings.reload_close_window
        closing = 0
        for session in list(self.websocket_sessions):
            if self._doomed(session.exchange, plan):
                closing += 1
                self.reactor.callLater(random.uniform(0, window), session.close_both, SERVICE_RESTART,
                                       "service restart: route changed")
        for tunnel in list(self.tunnels):
            if self._doomed(tunnel.exchange, plan):
                closing += 1
                self.reactor.callLater(random.uniform(0, window), tunnel.close)
        return closing

    def session_started(self, exchange: Any, close: Any) -> None:
        """A WebSocket session (or tunnel) whose upgrade was routed before a
        reload is now established: if the plan in force does not keep it,
        ``close`` it over the reload window as the reload would have."""
        if exchange.plan is not self.plan and self._doomed(exchange, self.plan):
            self.reactor.callLater(random.uniform(0, self.plan.settings.reload_close_window), close)

    # -- shutdown

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """Let connections finish: idle ones close now, busy ones after their
        current exchange, WebSocket sessions are closed with 1001 and tunnels
        closed, spread over the first half of ``timeout``; whatever is left
        at ``timeout`` is closed.  Fires when nothing is left."""
        done: defer.Deferred[None] = defer.Deferred()
        window = timeout / 2
        for connection in list(self.connections):
            connection.drain()
        for tunnel in list(self.tunnels):
            self.reactor.callLater(random.uniform(0, window), tunnel.close)
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
                for session in list(self.websocket_sessions):  # a close frame first, then the abort
                    session.close_both(1001, "server shutting down")
                for connection in list(self.connections):
                    connection.abort()
                self.reactor.callLater(0.5, finish)
                return
            self.reactor.callLater(0.05, check)

        check()
        return done

    def start(self) -> None:
        """Start the timeout sweeps and the upstreams' health checks."""
        self._started = True
        self.sweeper.start()
        for pools in self.plan.pools.values():
            pools.start_health_checks()

    def stop(self) -> None:
        """Stop timers, close pooled connections and the access log."""
        self._started = False
        self.sweeper.stop()
        for pools in self.plan.pools.values():
            pools.stop_health_checks()
            pools.close_all()
        self.access_log.close()
