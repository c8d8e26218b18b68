"""The route table: which route (if any) a request head belongs to.

Matching sees the path the upstream will act on, in the normal form of
:func:`chatproxy.http.paths.normalize_path`, which is also what gets
forwarded.

The most specific matching route wins; see ``docs/configuration.md`` for the
rule, implemented by :meth:`RouteTable.match`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qsl

from attrs import frozen

if TYPE_CHECKING:
    from chatproxy.config import Route

def path_has_prefix(path: str, prefix: str) -> bool:
    """Whether ``path`` lies at or below ``prefix``, segment by segment.

    ``/app/Chat`` covers ``/app/Chat`` and ``/app/Chat/x`` but not ``/app/ChatX``.
    """
    if prefix == "/" or path == prefix:
        return True
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path.startswith(prefix) and path[len(prefix)] == "/"


@frozen
class RequestFacts:
    """What the route table looks at in a request."""

    listener: str
    host: str
    method: str
    path: str
    query: str


class Facts(Protocol):
    """Anything carrying the request facts routing needs (RequestFacts, RequestHead)."""

    @property
    def listener(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def query(self) -> str: ...


def _query_values(query: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        values.setdefault(name, []).append(value)
    return values


def _host_rank(route: Route, host: str) -> int:
    """2 for an exact host match, 1 for a wildcard, 0 for any-host routes, -1 for no match."""
    if route.hosts is None:
        return 0
    best = -1
    for pattern in route.hosts:
        if pattern == host:
            return 2
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            best = 1
    return best


def _static_rank(route: Route) -> tuple[int, int, int, int, int]:
    path_rank = (1, 0) if route.path_regex is not None else (0, len(route.path))
    return (*path_rank, len(route.query), int(route.methods is not None), -route.order)


class RouteTable:
    """The routes of a configuration, ready to match requests against."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = sorted(routes, key=_static_rank, reverse=True)
        self._uses_query = any(route.query for route in routes)

    @property
    def routes(self) -> Sequence[Route]:
        """The routes, most specific first (ignoring host rank)."""
        return self._routes

    def match(self, facts: Facts) -> Route | None:
        """The most specific route matching the request, or None.

        Specificity, highest first: an exact host over a ``*.`` wildcard over
        any host; then ``path_regex`` routes over ``path`` prefixes, longer
        prefixes over shorter; then more required query parameters; then a
        route restricted to methods over one that is not; then the route
        defined first.
        """
        query_values = _query_values(facts.query) if self._uses_query and facts.query else None
        best: Route | None = None
        best_host_rank = -1
        for route in self._routes:
            if route.listeners is not None and facts.listener not in route.listeners:
                continue
            host_rank = _host_rank(route, facts.host)
            if host_rank <= best_host_rank:
                continue
            if route.methods is not None and facts.method not in route.methods:
                if not (facts.method == "HEAD" and "GET" in route.methods):
                    continue
            if route.path_regex is not None:
                if route.path_regex.fullmatch(facts.path) is None:
                    continue
            elif not path_has_prefix(facts.path, route.path):
                continue
            if route.query:
                if query_values is None:
                    continue
                if not all(_query_satisfied(query_values, req.name, req.value) for req in route.query):
                    continue
            best, best_host_rank = route, host_rank
            if host_rank == 2:
                break
        return best


def _query_satisfied(values: dict[str, list[str]], name: str, required: str | None) -> bool:
    found = values.get(name)
    if not found:
        return False
    # Every occurrence must carry the value: a server that reads the first of
    # several must not see another value than the one that was allowed.
    return required is None or all(value == required for value in found)


#: Methods answered 405 unless the route names them in ``methods``: TRACE
#: echoes the request back, cookies and credentials included (cross-site
#: tracing), and TRACK is IIS's name for it.
TRACE_METHODS = frozenset({"TRACE", "TRACK"})


def method_refused(route: Route | None, method: str) -> bool:
    """Whether ``method`` is answered 405 by the proxy: TRACE and TRACK are,
    unless the route matched names them in its ``methods``."""
    return method in TRACE_METHODS and (route is None or route.methods is None or method not in route.methods)


_COMMON_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allow_value(route: Route | None) -> bytes:
    """The ``Allow`` header value of a 405: the route's methods, or the common ones."""
    methods = sorted(route.methods) if route is not None and route.methods is not None else _COMMON_METHODS
    return ", ".join(methods).encode("ascii")


def websocket_upgrade(route: Route | None, method: str, upgrade: str | None) -> bool:
    """Whether an upgrade request (``Connection: upgrade`` with an ``Upgrade``
    header, whose value is ``upgrade``) is a WebSocket handshake chatproxy
    carries: a GET asking for ``websocket`` on a WebSocket route.  Any other
    upgrade request is forwarded as an ordinary request, without its Upgrade."""
    return (route is not None and route.websocket and method == "GET"
            and upgrade is not None and upgrade.strip().lower() == "websocket")

