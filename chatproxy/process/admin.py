"""The admin listener: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus) and
``/status`` (an HTML page; ``/status.json`` the same facts as JSON; ``/``
redirects to it).

``/healthz`` answers 200 while the process runs.  ``/readyz`` answers 200 only
when every listener is open and each upstream has at least one server that is
not failing (fewer than :data:`UNHEALTHY_AFTER` connection attempts failed in a
row, and passing its active health checks when it has them), 503 otherwise,
with the reasons (:data:`DRAINING` from SIGTERM until the process exits).
``/metrics`` is the Prometheus text format, produced with ``prometheus_client``
from the proxy's running totals at scrape time (nothing is counted twice on
the data path).  ``/status`` is built by
:mod:`chatproxy.process.status_page` from facts gathered here
(:mod:`chatproxy.process.status_data`).  ``/status``, ``/status.json`` and
``/metrics`` are guarded by ``[admin] allow`` and basic auth
(:mod:`chatproxy.process.admin_access`); ``/healthz`` and ``/readyz`` stay
open for load balancers and probes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.util import Redirect

from chatproxy.config import Admin, Config
from chatproxy.filters import implements_hook
from chatproxy.process.admin_access import AdminAccess, Denial, Verify
from chatproxy.process.status_data import Facts, config_facts, process_facts
from chatproxy.process.status_page import render_status
from chatproxy.process.status_window import SnapshotWindow
from chatproxy.proxy.core import ProxyCore
from chatproxy.proxy.stats import BUCKETS, Stats
from chatproxy.proxy.upstream import EJECT_AFTER

log = Logger()

UNHEALTHY_AFTER = EJECT_AFTER  # the same rule as passive ejection
#: Why /readyz says no once SIGTERM started the drain (one process, or a master).
DRAINING = "draining (SIGTERM): no new connections"


class ProxyView(Protocol):
    """What the admin site reads of the process it reports on (a
    :class:`chatproxy.process.service.ChatproxyService`), at each request."""

    @property
    def config(self) -> Config:
        """The configuration in force."""

    @property
    def ports(self) -> Mapping[str, Any]:
        """The open listening ports by key (``listen:NAME``, ``demo``, ``admin``)."""

    @property
    def draining(self) -> bool:
        """Whether the process is draining (SIGTERM): not ready for new clients."""

    @property
    def core(self) -> ProxyCore | None:
        """The proxy's core, None until the process started."""

    @property
    def config_paths(self) -> list[str]:
        """The configuration files (and directories) given at start."""

    @property
    def window(self) -> SnapshotWindow:
        """Snapshots of the running totals, for the status page's last minutes."""

    def certificates(self) -> list[tuple[str, str, str, float]]:
        """Every certificate served: listener, SNI name (``default``), file, expiry (Unix time)."""


def readiness(service: ProxyView) -> list[str]:
    """Why the proxy is not ready (empty when it is)."""
    if service.draining:
        return [DRAINING]
    problems = []
    for name in service.config.listeners:
        if f"listen:{name}" not in service.ports:
            problems.append(f"listener {name} is not open")
    core = service.core
    if core is None:
        return problems + ["not started"]
    for name, pools in core.pools.items():
        if not any(server.healthy for server in pools.servers):
            problems.append(f"upstream {name}: no healthy server (each failed its last {UNHEALTHY_AFTER} "
                            "connection attempts or its active health checks)")
    return problems


class ProxyCollector:
    """A prometheus_client collector reading the proxy's totals at scrape time."""

    def __init__(self, service: ProxyView) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        """The metric families."""
        core = self.service.core
        if core is None:
            return
        stats = core.stats
        requests = CounterMetricFamily("chatproxy_requests", "Requests answered, by route, status and protocol.",
                                       labels=["route", "status", "protocol"])
        for (route, status, protocol), count in sorted(stats.requests.items()):
            requests.add_metric([route, str(status), protocol], count)
        yield requests
        duration = HistogramMetricFamily("chatproxy_request_duration_seconds",
                                         "Time from the request head to the end of the response, by route.",
                                         labels=["route"])
        for route, counts in sorted(stats.duration_buckets.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, BUCKETS), "+Inf"], counts):
                cumulative += count
                buckets.append((bound, cumulative))
            duration.add_metric([route], buckets, stats.duration_sum.get(route, 0.0))
        yield duration
        for name, help_text, totals in (
            ("chatproxy_response_body_bytes", "Response body bytes sent to clients, by route.", stats.bytes_sent),
            ("chatproxy_request_body_bytes", "Request body bytes received from clients, by route.",
             stats.bytes_received),
        ):
            family = CounterMetricFamily(name, help_text, labels=["route"])
            for route, value in sorted(totals.items()):
                family.add_metric([route], value)
            yield family
        failures = CounterMetricFamily("chatproxy_upstream_connect_failures",
                                       "Failed connection attempts to upstream servers.", labels=["upstream", "server"])
        idle = GaugeMetricFamily("chatproxy_upstream_idle_connections", "Idle keep-alive connections in the pool.",
                                 labels=["upstream", "server"])
        healthy = GaugeMetricFamily("chatproxy_upstream_server_healthy",
                                    "1 unless the server fails its active health checks or its last "
                                    "connection attempts all failed.",
                                    labels=["upstream", "server"])
        for name, pools in sorted(core.pools.items()):
            for server in pools.servers:
                labels = [name, server.server.url]
                failures.add_metric(labels, stats.connect_failures.get(server.server.url, 0))
                idle.add_metric(labels, server.idle_count)
                healthy.add_metric(labels, 1 if server.healthy else 0)
        yield failures
        yield idle
        yield healthy
        yield GaugeMetricFamily("chatproxy_client_connections", "Open client connections (HTTP).",
                                value=len(core.connections))
        yield GaugeMetricFamily("chatproxy_websocket_sessions", "Open bridged WebSocket sessions.",
                                value=len(core.websocket_sessions))
        messages = CounterMetricFamily("chatproxy_websocket_messages",
                                       "WebSocket messages relayed in finished sessions, by route and direction.",
                                       labels=["route", "direction"])
        for (route, direction), count in sorted(stats.websocket_messages.items()):
            messages.add_metric([route, direction], count)
        yield messages
        ws_bytes = CounterMetricFamily("chatproxy_websocket_message_bytes",
                                       "WebSocket message bytes relayed in finished sessions, by route and direction.",
                                       labels=["route", "direction"])
        for (route, direction), count in sorted(stats.websocket_bytes.items()):
            ws_bytes.add_metric([route, direction], count)
        yield ws_bytes
        closes = CounterMetricFamily("chatproxy_websocket_closes", "Finished WebSocket sessions by close code.",
                                     labels=["route", "code"])
        for (route, code), count in sorted(stats.websocket_closes.items()):
            closes.add_metric([route, str(code)], count)
        yield closes
        outcomes = CounterMetricFamily("chatproxy_filter_outcomes",
                                       "Filter decisions by filter and outcome (passed, answered, refused, "
                                       "reported, error).", labels=["filter", "outcome"])
        for key, count in sorted(core.filter_counters.items()):
            name, _, outcome = key.rpartition(":")
            outcomes.add_metric([name, outcome], count)
        yield outcomes
        yield from filter_metrics(core.plan.filters)
        events = CounterMetricFamily("chatproxy_events", "Other counted events (WebSocket limits and drops).",
                                     labels=["event"])
        for event, count in sorted(core.counters.items()):
            events.add_metric([event], count)
        yield events
        yield from self._tls(stats)
        reloads = CounterMetricFamily("chatproxy_config_reloads", "Reloads (SIGHUP) by result.", labels=["result"])
        for result in ("success", "failure"):
            reloads.add_metric([result], stats.reloads.get(result, 0))
        yield reloads
        yield GaugeMetricFamily("chatproxy_config_last_reload_successful",
                                "1 if the last reload succeeded (or none was tried), 0 if it was refused.",
                                value=1 if stats.last_reload_ok else 0)
        yield GaugeMetricFamily("chatproxy_config_last_reload_success_timestamp_seconds",
                                "When the configuration in force was loaded (Unix time).",
                                value=stats.last_reload_success)

    def _tls(self, stats: Stats) -> Iterator[Any]:
        """The TLS families: handshakes (failed, completed and resumed) and certificate expiry."""
        handshakes = CounterMetricFamily("chatproxy_tls_handshake_failures",
                                         "TLS handshakes with clients that failed, by listener.", labels=["listener"])
        for listener, count in sorted(stats.tls_handshake_failures.items()):
            handshakes.add_metric([listener], count)
        yield handshakes
        completed = CounterMetricFamily("chatproxy_tls_handshakes",
                                        "TLS handshakes with clients that completed, by listener and whether "
                                        "they resumed a session.", labels=["listener", "resumed"])
        for (listener, resumed), count in sorted(stats.tls_handshakes.items()):
            completed.add_metric([listener, "true" if resumed else "false"], count)
        yield completed
        expiry = GaugeMetricFamily("chatproxy_certificate_expiry_seconds",
                                   "Seconds until each served certificate expires (negative: expired), by "
                                   "listener, SNI name (default: the listener's own) and file.",
                                   labels=["listener", "name", "file"])
        now = time.time()
        for listener, name, file, not_after in sorted(self.service.certificates()):
            expiry.add_metric([listener, name, file], not_after - now)
        yield expiry


def filter_metrics(filters: Mapping[str, Any]) -> Iterator[CounterMetricFamily]:
    """The counters filters report of their own (``metrics()``, see
    :class:`chatproxy.filters.IRequestFilter`), one family per name, with the
    label ``filter`` (the section) first."""
    families: dict[str, CounterMetricFamily] = {}
    for section, flt in sorted(filters.items()):
        if not implements_hook(flt, "metrics"):
            continue
        for metric in flt.metrics():
            family = families.get(metric.name)
            if family is None:
                family = families[metric.name] = CounterMetricFamily(
                    metric.name, metric.help, labels=["filter", *(name for name, _ in metric.labels)])
            family.add_metric([section, *(value for _, value in metric.labels)], metric.value)
    yield from families.values()


#: What an admin endpoint answers: status, content type, body.
Answer = tuple[int, bytes, bytes]
PLAIN = b"text/plain; charset=utf-8"
HTML = b"text/html; charset=utf-8"
JSON = b"application/json"
HEALTHY: Answer = (200, PLAIN, b"ok\n")
#: The status page has no script, loads nothing and is not framed.
STATUS_POLICY = b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"


def status_facts(service: ProxyView) -> Facts:
    """The facts of one process (single or worker) for ``/status`` and ``/status.json``."""
    facts = config_facts(service.config, service.config_paths)
    core = service.core
    if core is not None:
        listeners = [key.partition(":")[2] for key in service.ports if key.startswith("listen:")]
        facts.update(process_facts(core, service.window, time.time(), listeners, service.certificates()))
    facts["workers"] = None
    return facts


def status_answer(facts: Facts) -> Answer:
    """The ``/status`` page."""
    return 200, HTML, render_status(facts).encode("utf-8")


def json_answer(facts: Facts) -> Answer:
    """The ``/status.json`` answer."""
    return 200, JSON, json.dumps(facts, sort_keys=True).encode("utf-8")


def readiness_answer(problems: list[str]) -> Answer:
    """The ``/readyz`` answer: 200 ``ready``, or 503 with the reasons."""
    if problems:
        return 503, PLAIN, ("not ready: " + "; ".join(problems) + "\n").encode()
    return 200, PLAIN, b"ready\n"


def prepare(request: Any, answer: Answer) -> bytes:
    """Set an admin answer's status and headers on ``request``; returns its body."""
    status, content_type, body = answer
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    if content_type == HTML:
        request.setHeader(b"content-security-policy", STATUS_POLICY)
    return bytes(body)


class Guarded(Resource):
    """An admin endpoint only clients :class:`AdminAccess` lets through may
    read.  A password is checked in a thread (an scrypt costs tens of
    milliseconds: the reactor, which also proxies in a single process, never
    waits for it), one check at a time (a flood of wrong passwords queues
    here instead of taking memory and cores)."""

    isLeaf = True

    def __init__(self, wrapped: Resource, access: AdminAccess) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.access = access
        self._one_at_a_time = defer.DeferredSemaphore(1)

    def render(self, request: Any) -> Any:
        """The wrapped endpoint's answer, or the refusal (403, or 401 asking for basic auth)."""
        decision = self.access.check(getattr(request.getClientAddress(), "host", None),
                                     request.getHeader(b"authorization"))
        if not isinstance(decision, Verify):
            return self._answer(request, decision)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        checked = self._one_at_a_time.run(deferToThread, self.access.verify, decision)

        def answer(denial: Denial | None) -> None:
            if gone:
                return
            body = self._answer(request, denial)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()

        checked.addCallback(answer)
        checked.addErrback(lambda failure: log.failure("admin: checking a password failed", failure))
        return NOT_DONE_YET

    def _answer(self, request: Any, denial: Denial | None) -> Any:
        if denial is None:
            return self.wrapped.render(request)
        request.setResponseCode(denial.status)
        for name, value in denial.headers:
            request.setHeader(name, value)
        request.setHeader(b"content-type", PLAIN)
        request.setHeader(b"cache-control", b"no-store")
        return denial.body


class TextResource(Resource):
    """An admin endpoint computed at once by ``answer()``."""

    isLeaf = True

    def __init__(self, answer: Callable[[], Answer]) -> None:
        super().__init__()
        self.answer = answer

    def render_GET(self, request: Any) -> bytes:
        """The answer."""
        return prepare(request, self.answer())


def admin_site(service: ProxyView, admin: Admin | None = None) -> Site:
    """The admin endpoints as a twisted.web Site, guarded by ``admin``'s
    ``allow``, ``user`` and ``password_hash`` (None: a worker's private site,
    which only its master reads)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(service))  # type: ignore[arg-type]

    def metrics() -> Answer:
        return 200, CONTENT_TYPE_LATEST.encode("ascii"), generate_latest(registry)

    access = AdminAccess(admin)
    root = Resource()
    root.putChild(b"healthz", TextResource(lambda: HEALTHY))
    root.putChild(b"readyz", TextResource(lambda: readiness_answer(readiness(service))))
    root.putChild(b"metrics", Guarded(TextResource(metrics), access))
    root.putChild(b"status", Guarded(TextResource(lambda: status_answer(status_facts(service))), access))
    root.putChild(b"status.json", Guarded(TextResource(lambda: json_answer(status_facts(service))), access))
    root.putChild(b"", Redirect(b"/status"))
    return quiet_site(root)


def quiet_site(root: Resource) -> Site:
    """A Site for ``root`` that keeps no access log of scrapes and probes and shows no tracebacks."""
    site = _QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


class _QuietSite(Site):
    """No access log for scrapes and probes."""

    def log(self, request: Any) -> None:
        pass
