"""The running proxy as a Twisted service: listeners, the demo upstream,
reload (SIGHUP) and drain (SIGTERM)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping, Sequence

from attrs import define
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproxy.config import Config, ConfigError, Listener, load_config
from chatproxy.demo import demo_site
from chatproxy.process.admin import admin_site
from chatproxy.process.dispatch import dispatch_directly
from chatproxy.process.environment import WORKER_DIR_ENV, WORKER_ENV
from chatproxy.process.lifecycle import (StartupError, announce_build, announce_refused_reload, default_reactor,
                                         ensure_certificate, handle_drain_and_reload, state_directory)
from chatproxy.process.notify import notify_reloading, sd_notify
from chatproxy.process.quiet import quiet_twisted_chatter
from chatproxy.process.sharing import shared_endpoint, socket_identity
from chatproxy.process.status_window import SnapshotWindow, status_totals
from chatproxy.process.renewal import Renewer
from chatproxy.process.stapler import Stapler
from chatproxy.proxy.accesslog import AccessLog
from chatproxy.proxy.certificates import TLSMaterial
from chatproxy.proxy.core import ProxyCore
from chatproxy.proxy.front import FrontFactory
from chatproxy.proxy.gate import GateFactory
from chatproxy.proxy.plan import Plan
from chatproxy.proxy.staples import StapleStore
from chatproxy.proxy.tls import HandshakeCountingTLSFactory

log = Logger()


class SwitchFactory(Factory):
    """The factory a listening socket keeps for its whole life: each new
    connection is built by :attr:`current`, which a reload replaces (new
    certificates, a new ``allow`` list) without closing the socket."""

    noisy = False

    def __init__(self, current: IProtocolFactory) -> None:
        self.current = current

    def buildProtocol(self, addr: Any) -> Any:
        """A connection built by the current factory."""
        return self.current.buildProtocol(addr)

    def startFactory(self) -> None:
        """The socket opened: start the current factory."""
        self.current.doStart()

    def stopFactory(self) -> None:
        """The socket closed: stop the current factory."""
        self.current.doStop()

    def switch(self, factory: IProtocolFactory) -> None:
        """New connections are built by ``factory`` from now on."""
        previous, self.current = self.current, factory
        if self.numPorts:
            factory.doStart()
            previous.doStop()


@define
class _Opened:
    """One listening socket: its endpoint text, port, and factories."""

    endpoint: str
    port: Any
    switch: SwitchFactory
    front: FrontFactory | None = None  # None for [demo] and [admin]


@define
class _Prepared:
    """A reload that passed validation: what to open, keep and close."""

    config: Config
    plan: Plan
    access_log: AccessLog
    keep: dict[str, tuple[_Opened, IProtocolFactory, Listener | None]]  # new key -> old socket, new factory
    open: dict[str, tuple[str, SwitchFactory, FrontFactory | None]]  # new key -> endpoint, factories
    opened: dict[str, _Opened]


class ChatproxyService(MultiService):
    """Listens on every configured listener and proxies to the upstreams;
    SIGHUP reloads the configuration, SIGTERM drains."""

    def __init__(self, config: Config, reactor: Any = None, config_paths: Sequence[str] | None = None,
                 filters: Mapping[str, Any] | None = None) -> None:
        """``filters``: the configuration's filters as ``validate(config)`` built
        them (built when the proxy starts if not given)."""
        super().__init__()
        self.reactor = reactor if reactor is not None else default_reactor()
        self.config = config
        self._filters = filters
        self.config_paths = list(config_paths) if config_paths is not None else list(config.sources)
        self.core: ProxyCore | None = None
        # In a worker process (workers = N): its number and the master's directory.
        self.worker = os.environ.get(WORKER_ENV)
        self.worker_dir = os.environ.get(WORKER_DIR_ENV)
        self.opened: dict[str, _Opened] = {}
        self._drained: defer.Deferred[None] | None = None
        self._reloading: defer.Deferred[bool] | None = None
        # The listeners' certificates and OCSP staples; in a single process it
        # also fetches the staples (a master does that for its workers).
        self.tls = TLSMaterial(StapleStore(state_directory(config, "ocsp")))
        self.stapler = Stapler(self.reactor, self.tls.staples, self.tls.refresh) if self.worker is None else None
        self.renewer = Renewer(self.reactor, state_directory(config), self.tls.refresh) if self.worker is None else None
        # The status page's figures over the last minutes: snapshots of the running totals.
        self.window = SnapshotWindow()
        self._snapshots = LoopingCall(self._snapshot)
        self._snapshots.clock = self.reactor

    @property
    def ports(self) -> dict[str, Any]:
        """The open listening ports by key (``listen:NAME``, ``demo``, ``admin``)."""
        return {key: opened.port for key, opened in self.opened.items()}

    # -- building factories

    def _listener_factory(self, core: ProxyCore, front: FrontFactory, listener: Listener) -> IProtocolFactory:
        """The factory for one listener: gate -> TLS -> HTTP front (reads the certificates)."""
        factory: IProtocolFactory = front
        if listener.tls:
            ensure_certificate(listener)
            factory = HandshakeCountingTLSFactory(self.tls.server_tls(listener), factory, core.stats, listener.name)
        if listener.allow is not None:
            factory = GateFactory(factory, listener.allow)
        return factory

    def _wanted(self, core: ProxyCore, config: Config) -> dict[str, tuple[str, IProtocolFactory, Listener | None]]:
        """Every socket ``config`` asks for: key -> (endpoint, factory, listener)."""
        wanted: dict[str, tuple[str, IProtocolFactory, Listener | None]] = {}
        if config.demo is not None and self.worker is None:  # the master runs the demo for all workers
            wanted["demo"] = (config.demo.endpoint, demo_site(), None)
        for listener in config.listeners.values():
            wanted[f"listen:{listener.name}"] = (listener.endpoint, FrontFactory(core, listener), listener)
        if config.admin is not None or self.worker is not None:
            # A worker's private site is read by its master only, which guards [admin] itself.
            wanted["admin"] = (self._admin_endpoint(config), admin_site(self, config.admin if self.worker is None
                                                                        else None), None)
        return wanted

    def _admin_endpoint(self, config: Config) -> str:
        """Where the admin site listens: ``[admin] endpoint``, or in a worker a
        private UNIX socket the master reads (it serves ``[admin]`` for all)."""
        if self.worker is None or self.worker_dir is None:
            assert config.admin is not None
            return config.admin.endpoint
        return f"unix:{self.worker_dir}/worker-{self.worker}.sock:mode=600"

    def _listen(self, key: str, endpoint_text: str, factory: IProtocolFactory) -> defer.Deferred[Any]:
        section = f"[{key}]"
        try:
            if self.worker is not None and self.worker_dir is not None and key.startswith("listen:"):
                endpoint = shared_endpoint(self.reactor, endpoint_text, self.worker_dir, self.worker)
            else:
                endpoint = serverFromString(self.reactor, endpoint_text)
        except Exception as e:
            return defer.fail(StartupError(f"{section}: cannot listen on {endpoint_text}: {e}"))

        def failed(failure: Failure) -> Failure:
            if failure.check(StartupError):
                return failure
            return Failure(StartupError(f"{section}: cannot listen on {endpoint_text}: {failure.getErrorMessage()}"))

        listening: defer.Deferred[Any] = endpoint.listen(factory)
        return listening.addErrback(failed)

    def _open(self, key: str, endpoint: str, factory: IProtocolFactory, listener: Listener | None,
              core: ProxyCore) -> defer.Deferred[_Opened]:
        """Open one socket for ``key``; its switch factory starts at ``factory``."""
        front: FrontFactory | None = None
        if listener is not None:
            assert isinstance(factory, FrontFactory)
            front = factory
            factory = self._listener_factory(core, front, listener)
        switch = SwitchFactory(factory)
        return self._listen(key, endpoint, switch).addCallback(lambda port: _Opened(endpoint, port, switch, front))

    # -- start

    def privilegedStartService(self) -> None:
        """Open the listening sockets (before twistd drops privileges).
        SIGTERM and SIGHUP drain and reload from now on (and SIGUSR1
        refreshes the TLS material)."""
        quiet_twisted_chatter()
        handle_drain_and_reload(self.reactor, self.drain, self.reload, self.tls.refresh)
        try:
            try:
                self.core = core = ProxyCore(self.reactor, self.config, self._filters)
                self._filters = None  # the plan has them
            except OSError as e:
                raise StartupError(f"[chatproxy] access_log: cannot open {self.config.settings.access_log}: "
                                   f"{e.strerror}") from None
            if self.worker is not None and self.worker_dir is not None:
                # A socket left by a worker that died: this worker takes its place.
                stale = f"{self.worker_dir}/worker-{self.worker}.sock"
                if os.path.exists(stale):
                    os.unlink(stale)
            for key, (endpoint, factory, listener) in self._wanted(core, self.config).items():
                outcome: list[Any] = []
                self._open(key, endpoint, factory, listener, core).addBoth(outcome.append)
                if not outcome:
                    # Endpoints that listen asynchronously: wait in the reactor.
                    raise StartupError(f"[{key}]: {endpoint} did not open at once")
                if isinstance(outcome[0], Failure):
                    outcome[0].raiseException()
                self.opened[key] = outcome[0]
                self._log_open(key, endpoint, listener)
        except StartupError as e:
            for opened in self.opened.values():
                opened.port.stopListening()
            self.opened = {}
            sys.stderr.write(f"chatproxy: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        core.stats.last_reload_success = time.time()
        super().privilegedStartService()

    def _log_open(self, key: str, endpoint: str, listener: Listener | None) -> None:
        if self.worker is not None:
            return  # the master says what serves where, once for all workers (its admin socket is private)
        if key == "demo":
            log.info("demo chat upstream listening on {endpoint}", endpoint=endpoint)
        elif key == "admin":
            log.info("[admin] health and metrics on {endpoint}", endpoint=endpoint)
        else:
            log.info("[{key}] listening on {endpoint}{tls}", key=key, endpoint=endpoint,
                     tls=" with TLS" if listener is not None and listener.tls else "")

    def startService(self) -> None:
        """Start the timeout sweeps and any child services; SIGTERM drains, SIGHUP reloads."""
        if self.core is None:
            self.privilegedStartService()
        assert self.core is not None
        dispatch_directly(self.reactor)  # no per-event log context (see chatproxy.process.dispatch)
        if self.worker is None:  # (a master says it once for all its workers)
            announce_build()
        self.core.start()
        if not self._snapshots.running and hasattr(self.reactor, "seconds"):
            self._snapshots.start(self.window.interval, now=True)
        if self.stapler is not None and self.renewer is not None:
            self.stapler.update(self.config)
            self.renewer.update(self.config)
        super().startService()
        if hasattr(self.reactor, "callWhenRunning"):
            # After the reactor installed its own signal handlers, so ours win.
            self.reactor.callWhenRunning(self._handle_signals)
            self.reactor.callWhenRunning(sd_notify, "READY=1\nSTATUS=" + self._status())

    def _snapshot(self) -> None:
        """Keep a snapshot of the running totals (every :attr:`SnapshotWindow.interval` seconds)."""
        if self.core is not None:
            self.window.record(time.time(), status_totals(self.core.stats))

    def _status(self) -> str:
        return "serving " + ", ".join(f"[listen:{name}] {listener.endpoint}"
                                      for name, listener in self.config.listeners.items())

    def _handle_signals(self) -> None:
        """SIGTERM drains (and exits 0), SIGHUP reloads, SIGUSR1 refreshes the TLS material."""
        handle_drain_and_reload(self.reactor, self.drain, self.reload, self.tls.refresh)

    # -- reload

    def reload(self) -> defer.Deferred[bool]:
        """Re-read the configuration files and certificates and apply them
        (SIGHUP).  Fires True when the new configuration is in force, False
        when it was refused; then nothing changed and the old one keeps
        serving.  See :meth:`ProxyCore.install` for what happens to requests
        and WebSocket sessions."""
        if self._drained is not None:
            return defer.succeed(False)
        if self._reloading is not None:
            log.info("SIGHUP: a reload is already in progress")
            return self._reloading
        assert self.core is not None
        core = self.core
        log.info("SIGHUP: reloading {paths}", paths=" ".join(self.config_paths))
        notify_reloading()
        try:
            prepared = self._prepare(core, load_config(self.config_paths))
        except ConfigError as error:
            return defer.succeed(self._reload_failed(f"configuration error: {error}"))
        except StartupError as error:
            return defer.succeed(self._reload_failed(str(error)))
        except Exception as error:  # an unreadable certificate, a filter that cannot start, ...
            log.failure("reload: preparing the new configuration failed")
            return defer.succeed(self._reload_failed(f"{type(error).__name__}: {error}"))

        opening = [
            self._listen(key, endpoint, switch).addCallback(_record, prepared.opened, key, endpoint, switch, front)
            for key, (endpoint, switch, front) in prepared.open.items()
        ]

        def opened(_: Any) -> bool:
            self._commit(prepared)
            return True

        def failed(failure: Failure) -> bool:
            for new in prepared.opened.values():
                new.port.stopListening()
            error = failure.value.subFailure.value if isinstance(failure.value, defer.FirstError) else failure.value
            return self._reload_failed(str(error))

        def finished(result: bool) -> bool:
            self._reloading = None
            return result

        self._reloading = d = defer.gatherResults(opening, consumeErrors=True).addCallbacks(opened, failed)
        d.addBoth(finished)
        if d.called:  # every socket opened at once
            self._reloading = None
        return d

    def _prepare(self, core: ProxyCore, config: Config) -> _Prepared:
        """Build everything a reload needs without changing what runs: the new
        plan and, for each wanted socket, either the old socket it keeps (same
        endpoint) or an endpoint to open.  Raises when certificates or
        upstream TLS files cannot be loaded."""
        plan = Plan(self.reactor, config, core.sweeper, core.stats, previous=core.plan)
        access_log = self._reopened_access_log(core, config)
        if config.settings.workers != self.config.settings.workers and self.worker is None:
            log.warn("[chatproxy] workers changed: a single process applies that at its next start")
        keep: dict[str, tuple[_Opened, IProtocolFactory, Listener | None]] = {}
        to_open: dict[str, tuple[str, SwitchFactory, FrontFactory | None]] = {}
        by_endpoint = {(_kind(key), socket_identity(self.reactor, opened.endpoint)): opened
                       for key, opened in self.opened.items()}
        for key, (endpoint, factory, listener) in self._wanted(core, config).items():
            old = by_endpoint.pop((_kind(key), socket_identity(self.reactor, endpoint)), None)
            if listener is not None:
                front = old.front if old is not None and old.front is not None else factory
                assert isinstance(front, FrontFactory)
                factory = self._listener_factory(core, front, listener)
                if old is None:
                    to_open[key] = (endpoint, SwitchFactory(factory), front)
                    continue
            if old is not None:
                if key == "demo":
                    factory = old.switch.current  # one demo chat room across reloads
                keep[key] = (old, factory, listener)
            else:
                to_open[key] = (endpoint, SwitchFactory(factory), None)
        return _Prepared(config, plan, access_log, keep, to_open, {})

    def _reopened_access_log(self, core: ProxyCore, config: Config) -> AccessLog:
        """The access log for the new configuration, opened again (log
        rotation).  When the same file cannot be opened any more (rotated to a
        file this user cannot write), the current stream is kept, with a
        warning; a new ``access_log`` that cannot be opened refuses the reload."""
        new, old = config.settings, self.config.settings
        try:
            return AccessLog(self.reactor, new.access_log, new.access_log_format)
        except OSError as e:
            if (new.access_log, new.access_log_format) == (old.access_log, old.access_log_format):
                log.warn("reload: cannot reopen the access log {path} ({error}); still writing to the file "
                         "opened before", path=new.access_log, error=e.strerror)
                return core.access_log
            raise StartupError(f"[chatproxy] access_log: cannot open {new.access_log}: {e.strerror}") from None

    def _commit(self, prepared: _Prepared) -> None:
        """Make a prepared reload the running configuration.  Nothing here is
        expected to fail; if something does, it is logged and the rest of the
        commit still happens (sockets, counters, systemd), so that the
        process never stays between two configurations."""
        core = self.core
        assert core is not None
        opened: dict[str, _Opened] = {}
        kept_ports = set()
        for key, (old, factory, listener) in prepared.keep.items():
            try:
                old.switch.switch(factory)
            except Exception:
                log.failure("reload: starting the new factory of [{key}] failed", key=key)
            if old.front is not None and listener is not None:
                old.front.listener = listener
            opened[key] = old
            kept_ports.add(id(old))
        opened.update(prepared.opened)
        closed = [(key, old) for key, old in self.opened.items() if id(old) not in kept_ports]
        self.opened = opened
        self.config = prepared.config
        self.tls.retain({name for name, listener in prepared.config.listeners.items() if listener.tls})
        if self.stapler is not None and self.renewer is not None:
            self.stapler.update(prepared.config)
            self.renewer.update(prepared.config)
        closing = 0
        try:
            closing = core.install(prepared.plan, prepared.access_log)
        except Exception:
            log.failure("reload: installing the new configuration failed part way")
        for key, old in closed:
            defer.maybeDeferred(old.port.stopListening).addErrback(_log_close_failure, key)
            log.info("[{key}] closed {endpoint} (not in the new configuration)", key=key, endpoint=old.endpoint)
            if old.front is not None:
                for connection in list(core.connections):
                    if connection.factory is old.front:
                        connection.drain()
        for key, new in prepared.opened.items():
            self._log_open(key, new.endpoint, prepared.config.listeners.get(key.partition(":")[2]))
        core.stats.reloads["success"] += 1
        core.stats.last_reload_ok = True
        core.stats.last_reload_success = time.time()
        log.info("reload done: {listeners} listener(s), {routes} route(s); {closing} WebSocket session(s) "
                 "on changed routes close with 1012 over {window:g}s",
                 listeners=len(prepared.config.listeners), routes=len(prepared.config.routes), closing=closing,
                 window=prepared.config.settings.reload_close_window)
        sd_notify("READY=1\nSTATUS=" + self._status())

    def _reload_failed(self, reason: str) -> bool:
        assert self.core is not None
        self.core.stats.reloads["failure"] += 1
        self.core.stats.last_reload_ok = False
        announce_refused_reload(reason)
        return False

    # -- drain and stop

    def drain(self) -> defer.Deferred[None]:
        """Stop accepting, let in-flight requests finish (up to ``drain_timeout``),
        close WebSocket sessions with 1001 spread over the first half of that
        window, then stop the reactor: the process exits 0."""
        if self._drained is not None:
            return self._drained
        timeout = self.config.settings.drain_timeout
        log.info("SIGTERM: draining (up to {timeout}s): no new connections, in-flight requests finish",
                 timeout=timeout)
        sd_notify(f"STOPPING=1\nSTATUS=draining (up to {timeout:g}s)")
        self._stop_listening(keep=("admin",))  # /readyz answers 503 "draining" until the end
        self._stop_tls_upkeep()
        assert self.core is not None
        self._drained = self.core.drain(timeout)

        def done(_: Any) -> None:
            log.info("drained; stopping")
            if getattr(self.reactor, "running", False):
                self.reactor.stop()

        self._drained.addBoth(done)
        return self._drained

    def _stop_tls_upkeep(self) -> None:
        """No more OCSP fetches or ACME orders."""
        if self.stapler is not None and self.renewer is not None:
            self.stapler.stop()
            self.renewer.stop()

    def certificates(self) -> list[tuple[str, str, str, float]]:
        """Every certificate served (ACME stand-ins aside): listener, SNI name
        (``default`` for the listener's own), file, expiry (Unix time)."""
        return [(listener, state.source.name or "default", str(state.source.certificate), state.not_after.timestamp())
                for listener, state in self.tls.certificates() if state.not_after is not None]

    def _stop_listening(self, keep: tuple[str, ...] = ()) -> list[defer.Deferred[Any]]:
        stops = [defer.maybeDeferred(opened.port.stopListening) for key, opened in self.opened.items()
                 if key not in keep]
        self.opened = {key: opened for key, opened in self.opened.items() if key in keep}
        return stops

    @property
    def draining(self) -> bool:
        """Whether SIGTERM started the drain."""
        return self._drained is not None

    def stopService(self) -> defer.Deferred[Any]:
        """Stop listening, close connections, flush the access log."""
        stops = self._stop_listening()
        self._stop_tls_upkeep()
        if self._snapshots.running:
            self._snapshots.stop()
        if self.core is not None:
            for connection in list(self.core.connections):
                connection.close()
            self.core.stop()
        stops.append(defer.maybeDeferred(super().stopService))
        return defer.gatherResults(stops, consumeErrors=True)


def _log_close_failure(failure: Failure, key: str) -> None:
    log.failure("reload: closing [{key}] failed", failure, key=key)


def _kind(key: str) -> str:
    """``listen``, ``demo`` or ``admin``: sockets are only reused within a kind."""
    return key.partition(":")[0]


def _record(port: Any, opened: dict[str, _Opened], key: str, endpoint: str, switch: SwitchFactory,
            front: FrontFactory | None) -> None:
    opened[key] = _Opened(endpoint, port, switch, front)
