"""Cheap running totals of what the proxy did, for the metrics endpoint.

Counting happens on the data path, so it is a few dictionary increments per
request; turning the totals into Prometheus series is left to the scrape
(:mod:`chatproxy.process.admin`).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, deque

from attrs import frozen

from chatproxy.http.messages import RequestHead

# Request duration buckets, seconds (Prometheus' defaults, which suit a proxy).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: How many filter refusals :attr:`Stats.refusals` keeps (the newest).
RECENT_REFUSALS = 20
#: Longer paths and reasons are cut to this many characters in a kept refusal.
REFUSAL_TEXT = 200


@frozen
class Refusal:
    """One request a filter refused, as the status page shows it: the
    normalised path only (never the query string, a header or a body)."""

    time: float  # Unix time
    filter: str
    route: str
    client: str
    method: str
    path: str
    status: int
    reason: str


class Stats:
    """Totals since start: requests, durations, bytes, upstream connects, WebSocket traffic."""

    def __init__(self) -> None:
        # Counted on every request: plain dictionaries (a Counter's subscript
        # is a Python-level method call, several times a dict's).
        self.requests: dict[tuple[str, int, str], int] = {}  # (route, status, protocol)
        self.duration_buckets: dict[str, list[int]] = {}  # route -> counts per bucket (+Inf last)
        self.duration_sum: dict[str, float] = {}
        self.bytes_sent: dict[str, int] = {}  # route -> response body bytes
        self.bytes_received: dict[str, int] = {}  # route -> request body bytes
        self.connect_failures: Counter[str] = Counter()  # upstream server URL
        self.websocket_messages: Counter[tuple[str, str]] = Counter()  # (route, "up"|"down")
        self.websocket_bytes: Counter[tuple[str, str]] = Counter()
        self.websocket_closes: Counter[tuple[str, int]] = Counter()  # (route, close code)
        self.filter_outcomes: Counter[str] = Counter()  # "FILTER:outcome" (see chatproxy.filters.chain)
        self.tls_handshake_failures: Counter[str] = Counter()  # listener name
        self.tls_handshakes: Counter[tuple[str, bool]] = Counter()  # (listener name, session resumed)
        self.reloads: Counter[str] = Counter()  # "success" | "failure"
        self.last_reload_success = 0.0  # Unix time of the start or of the last successful reload
        self.last_reload_ok = True  # whether the last reload attempt succeeded
        self.refusals: deque[Refusal] = deque(maxlen=RECENT_REFUSALS)  # the newest last

    def filter_refused(self, name: str, head: RequestHead, status: int, reason: str) -> None:
        """Keep one refusal by filter ``name`` (see :class:`Refusal`: no query string)."""
        self.refusals.append(Refusal(time.time(), name, head.route, head.client, head.method,
                                     head.path[:REFUSAL_TEXT], status, reason[:REFUSAL_TEXT]))

    def request(self, route: str, status: int, duration: float, sent: int, received: int,
                protocol: str = "http/1.1") -> None:
        """Count one finished request (``protocol``: ``http/1.1`` or ``h2``)."""
        key = (route, status, protocol)
        requests = self.requests
        try:
            requests[key] += 1
        except KeyError:
            requests[key] = 1
        try:
            buckets = self.duration_buckets[route]
        except KeyError:  # the route's first request: its other totals start too
            buckets = self.duration_buckets[route] = [0] * (len(BUCKETS) + 1)
            self.duration_sum[route] = 0.0
            self.bytes_sent[route] = self.bytes_received[route] = 0
        buckets[bisect_left(BUCKETS, duration)] += 1
        self.duration_sum[route] += duration
        self.bytes_sent[route] += sent
        self.bytes_received[route] += received

    def websocket_session(self, route: str, up: tuple[int, int], down: tuple[int, int], close: int | None) -> None:
        """Count one finished WebSocket session: (messages, bytes) each way and its close code."""
        self.websocket_messages[(route, "up")] += up[0]
        self.websocket_messages[(route, "down")] += down[0]
        self.websocket_bytes[(route, "up")] += up[1]
        self.websocket_bytes[(route, "down")] += down[1]
        self.websocket_closes[(route, close if close is not None else 1006)] += 1
