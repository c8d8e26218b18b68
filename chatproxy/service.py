"""The running proxy as a Twisted service: listeners, the demo upstream, shutdown."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from chatproxy.config import Config, Listener
from chatproxy.gate import GateFactory
from chatproxy.http.front import FrontFactory
from chatproxy.proxy import ProxyCore
from chatproxy.tls import build_server_tls, create_self_signed

log = Logger()


def sd_notify(state: str) -> None:
    """Tell systemd (``Type=notify``) about our state through ``$NOTIFY_SOCKET``;
    nothing happens when not started by systemd."""
    import os
    import socket

    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.connect(address)
            notify.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warn("cannot notify systemd at {address}: {error}", address=address, error=e)


class StartupError(Exception):
    """The proxy cannot start (a port in use, a certificate that cannot be written)."""


class ChatproxyService(MultiService):
    """Listens on every configured listener and proxies to the upstreams."""

    def __init__(self, config: Config, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.core: ProxyCore | None = None
        self.ports: dict[str, Any] = {}
        self._drained: defer.Deferred[None] | None = None

    def listener_factory(self, core: ProxyCore, listener: Listener) -> IProtocolFactory:
        """The factory for one listener: gate -> TLS -> HTTP front."""
        factory: IProtocolFactory = FrontFactory(core, listener)
        if listener.tls:
            self._ensure_certificate(listener)
            factory = TLSMemoryBIOFactory(build_server_tls(listener), False, factory)
        if listener.allow is not None:
            factory = GateFactory(factory, listener.allow)
        return factory

    def _ensure_certificate(self, listener: Listener) -> None:
        assert listener.certificate is not None and listener.key is not None
        if listener.create_self_signed and not (listener.certificate.exists() and listener.key.exists()):
            try:
                create_self_signed(listener.certificate, listener.key)
            except OSError as e:
                raise StartupError(f"[listen:{listener.name}]: cannot create a self-signed certificate: {e}") from None
            log.info(
                "[listen:{name}] created a self-signed certificate for localhost: {certificate} (key: {key})",
                name=listener.name, certificate=str(listener.certificate), key=str(listener.key),
            )

    def _listen(self, name: str, endpoint_text: str, factory: IProtocolFactory) -> Any:
        endpoint = serverFromString(self.reactor, endpoint_text)
        result: list[Any] = []
        d = endpoint.listen(factory)
        d.addBoth(result.append)
        if not result:
            # Endpoints that listen asynchronously: wait in the reactor.
            d.addErrback(lambda f: log.failure("cannot listen on {endpoint}", f, endpoint=endpoint_text))
            return d
        outcome = result[0]
        if isinstance(outcome, Failure):
            raise StartupError(f"{name}: cannot listen on {endpoint_text}: {outcome.getErrorMessage()}")
        return outcome

    def privilegedStartService(self) -> None:
        """Open the listening sockets (before twistd drops privileges)."""
        try:
            try:
                self.core = core = ProxyCore(self.reactor, self.config)
            except OSError as e:
                raise StartupError(f"[chatproxy] access_log: cannot open {self.config.settings.access_log}: "
                                   f"{e.strerror}") from None
            if self.config.demo is not None:
                from chatproxy.demo import demo_site

                self.ports["demo"] = self._listen("[demo]", self.config.demo.endpoint, demo_site())
                log.info("demo chat upstream listening on {endpoint}", endpoint=self.config.demo.endpoint)
            for listener in self.config.listeners.values():
                factory = self.listener_factory(core, listener)
                self.ports[f"listen:{listener.name}"] = self._listen(f"[listen:{listener.name}]", listener.endpoint, factory)
                log.info("[listen:{name}] listening on {endpoint}{tls}", name=listener.name,
                         endpoint=listener.endpoint, tls=" with TLS" if listener.tls else "")
            if self.config.admin is not None:
                from chatproxy.admin import admin_site

                self.ports["admin"] = self._listen("[admin]", self.config.admin.endpoint, admin_site(self))
                log.info("[admin] health and metrics on {endpoint}", endpoint=self.config.admin.endpoint)
        except StartupError as e:
            for port in self.ports.values():
                if hasattr(port, "stopListening"):
                    port.stopListening()
            sys.stderr.write(f"chatproxy: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        super().privilegedStartService()

    def startService(self) -> None:
        """Start the timeout sweeps and any child services; SIGTERM drains."""
        if self.core is None:
            self.privilegedStartService()
        assert self.core is not None
        self.core.start()
        super().startService()
        if hasattr(self.reactor, "callWhenRunning"):
            # After the reactor installed its own signal handlers, so ours wins.
            self.reactor.callWhenRunning(self._handle_sigterm)
            self.reactor.callWhenRunning(sd_notify, "READY=1\nSTATUS=serving " + ", ".join(
                f"[listen:{name}] {listener.endpoint}" for name, listener in self.config.listeners.items()))

    def _handle_sigterm(self) -> None:
        """Make SIGTERM drain (and exit 0) rather than stop the reactor at once
        (only in the main thread, where signal handlers can be set)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread() or not hasattr(self.reactor, "callFromThread"):
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.drain)

        signal.signal(signal.SIGTERM, on_sigterm)

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
        self._stop_listening()
        assert self.core is not None
        self._drained = self.core.drain(timeout)

        def done(_: Any) -> None:
            log.info("drained; stopping")
            if getattr(self.reactor, "running", False):
                self.reactor.stop()

        self._drained.addBoth(done)
        return self._drained

    def _stop_listening(self) -> list[defer.Deferred[Any]]:
        stops = [defer.maybeDeferred(port.stopListening) for port in self.ports.values() if hasattr(port, "stopListening")]
        self.ports = {}
        return stops

    def stopService(self) -> defer.Deferred[Any]:
        """Stop listening, close connections, flush the access log."""
        stops = self._stop_listening()
        if self.core is not None:
            for connection in list(self.core.connections):
                connection.close()
            self.core.stop()
        stops.append(defer.maybeDeferred(super().stopService))
        return defer.gatherResults(stops, consumeErrors=True)
