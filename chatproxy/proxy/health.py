"""Active health checks of upstream servers.

When an ``[upstream:NAME]`` section sets ``health_check_path``, every server
of the upstream gets a :class:`HealthChecker`: every
``health_check_interval`` it opens a new connection to the server (over TLS
for an ``https://`` server, with the same endpoint and TLS settings as the
data path), sends ``GET <path> HTTP/1.1`` with ``Host`` set to the server's
authority and ``Connection: close``, and looks at the response status only.
A status in ``health_check_status`` is a success; another status, a refused
or failed connection, a malformed response, or no response status within
``health_check_timeout`` is a failure.

A server starts healthy.  After ``unhealthy_threshold`` failures in a row it
is marked unhealthy (:attr:`ServerPool.check_healthy` False) and round-robin
skips it; after ``healthy_threshold`` successes in a row it is healthy again.
Each change is logged once.  The checks run on the pool's reactor
(``callLater``/``LoopingCall``), so tests can drive them with a
``MemoryReactorClock``; they run only between :meth:`HealthChecker.start`
and :meth:`HealthChecker.stop`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol as TypingProtocol

import httptools
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from chatproxy.config import Upstream, UpstreamServer

log = Logger()


class Checked(TypingProtocol):
    """What health checks need of a server's pool (a ``ServerPool``)."""

    upstream: Upstream
    server: UpstreamServer
    reactor: Any
    check_healthy: bool

    def _endpoint(self, timeout: float | None = None) -> Any:
        """A client endpoint to the server."""

USER_AGENT = b"chatproxy-health-check"


def status_accepted(status: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    """Whether ``status`` falls in one of the inclusive ``ranges``."""
    return any(low <= status <= high for low, high in ranges)


class _Probe(Protocol):
    """One health check connection: sends the request, reports the status."""

    def __init__(self, request: bytes, report: Callable[[bool, str], None],
                 ranges: tuple[tuple[int, int], ...]) -> None:
        self._request = request
        self._report = report
        self._ranges = ranges
        self._parser = httptools.HttpResponseParser(self)
        self.done = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish(False, "the health check response switched protocols")
        except httptools.HttpParserError as error:
            self._finish(False, f"malformed health check response: {error}")

    def on_headers_complete(self) -> None:
        """httptools: the response head is complete; only its status matters."""
        status = self._parser.get_status_code()
        if status_accepted(status, self._ranges):
            self._finish(True, f"status {status}")
        else:
            self._finish(False, f"health check answered {status}")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._finish(False, f"connection closed before a response status: {reason.getErrorMessage()}")

    def _finish(self, ok: bool, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self._report(ok, reason)
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Give up on this check (timeout, or the checker stopped)."""
        self.done = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _ProbeFactory(Factory):
    noisy = False

    def __init__(self, probe: _Probe) -> None:
        self._probe = probe

    def buildProtocol(self, addr: Any) -> _Probe:
        return self._probe


class HealthChecker:
    """Periodic active checks of one server, marking its :class:`ServerPool` healthy or not."""

    def __init__(self, pool: Checked) -> None:
        self.pool = pool
        upstream = pool.upstream
        assert upstream.health_check_path is not None
        self.path = upstream.health_check_path
        self.interval = upstream.health_check_interval
        self.timeout = upstream.health_check_timeout
        self.ranges = upstream.health_check_status
        self.healthy_threshold = upstream.healthy_threshold
        self.unhealthy_threshold = upstream.unhealthy_threshold
        self.successes = 0  # consecutive, while unhealthy
        self.failures = 0  # consecutive, while healthy
        self.checks = 0  # checks completed (for tests and diagnostics)
        self.last_result = ""  # why the last check passed or failed
        self._request = (
            b"GET " + self.path.encode("ascii") + b" HTTP/1.1\r\n"
            b"Host: " + pool.server.authority.encode("idna") + b"\r\n"
            b"User-Agent: " + USER_AGENT + b"\r\n"
            b"Accept: */*\r\n"
            b"Connection: close\r\n\r\n"
        )
        self._loop = LoopingCall(self.check)
        self._loop.clock = pool.reactor
        self._probe: _Probe | None = None
        self._connecting: defer.Deferred[Any] | None = None
        self._timer: Any = None

    @property
    def running(self) -> bool:
        """Whether checks are scheduled."""
        return bool(self._loop.running)

    def start(self) -> None:
        """Check now and then every interval (idempotent)."""
        if not self._loop.running:
            self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        """Stop checking; a check in progress is abandoned without a result."""
        if self._loop.running:
            self._loop.stop()
        self._cancel()

    def check(self) -> None:
        """Run one check (unless the previous one is still in progress)."""
        if self._probe is not None:
            return
        probe = _Probe(self._request, lambda ok, reason: self._checked(probe, ok, reason), self.ranges)
        self._probe = probe
        self._timer = self.pool.reactor.callLater(self.timeout, self._timed_out, probe)
        try:
            connecting = self.pool._endpoint(timeout=self.timeout).connect(_ProbeFactory(probe))
        except Exception as error:  # an endpoint that cannot even start connecting
            self._checked(probe, False, f"cannot connect: {error}")
            return
        if self._probe is probe:
            self._connecting = connecting

            def connected(result: Any) -> Any:
                if self._connecting is connecting:
                    self._connecting = None
                return result

            def failed(failure: Failure) -> None:
                if self._connecting is connecting:
                    self._connecting = None
                # After a timeout or stop the check is no longer current and this is ignored.
                self._checked(probe, False, f"cannot connect: {failure.getErrorMessage()}")

            connecting.addCallbacks(connected, failed)

    def _timed_out(self, probe: _Probe) -> None:
        self._timer = None
        if self._probe is not probe:
            return
        self._checked(probe, False, f"no response status within {self.timeout:g}s")
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()  # its errback then finds the check already counted
        probe.abort()

    def _cancel(self) -> None:
        probe, self._probe = self._probe, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        if probe is not None:
            probe.abort()

    def _checked(self, probe: _Probe, ok: bool, reason: str) -> None:
        if self._probe is not probe:
            return  # stale: timed out or stopped already
        self._probe = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        probe.done = True
        self.record(ok, reason)

    def record(self, ok: bool, reason: str) -> None:
        """Count one check result and change the server's state when a threshold is reached."""
        pool = self.pool
        self.checks += 1
        self.last_result = reason
        if ok:
            self.failures = 0
            if pool.check_healthy:
                return
            self.successes += 1
            if self.successes >= self.healthy_threshold:
                self.successes = 0
                pool.check_healthy = True
                log.info("upstream {upstream} server {server} is healthy again "
                         "({count} health checks passed in a row)",
                         upstream=pool.upstream.name, server=pool.server.url, count=self.healthy_threshold)
        else:
            self.successes = 0
            if not pool.check_healthy:
                return
            self.failures += 1
            if self.failures >= self.unhealthy_threshold:
                self.failures = 0
                pool.check_healthy = False
                log.warn("upstream {upstream} server {server} is unhealthy, no longer sent requests "
                         "({count} health checks of {path} failed in a row; last: {reason})",
                         upstream=pool.upstream.name, server=pool.server.url, count=self.unhealthy_threshold,
                         path=self.path, reason=reason)
