"""What a single proxy process and a master share about starting, reloading
and stopping: the startup error, self-signed certificates, the SIGTERM and
SIGHUP handlers, and how a refused reload is reported."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Callable

from twisted.logger import Logger

from chatproxy import __version__
from chatproxy.compiled import describe as describe_build
from chatproxy.config import Config, Listener
from chatproxy.process.notify import sd_notify
from chatproxy.proxy.tls import create_self_signed

log = Logger()


def default_reactor() -> Any:
    """The global reactor, for a service given none."""
    # Imported when asked for, not with this module: importing
    # twisted.internet.reactor installs the default reactor, and twistd (or
    # a program embedding the service) must be free to install another first.
    from twisted.internet import reactor

    return reactor


class StartupError(Exception):
    """The proxy cannot start (a port in use, a certificate that cannot be written)."""


def ensure_certificate(listener: Listener) -> None:
    """Create the self-signed certificate a listener asks for (``create_self_signed``) if its files are missing."""
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


def state_directory(config: Config, *parts: str) -> Path:
    """A directory under ``[chatproxy] state_directory`` (``ocsp``,
    ``acme``...): a path, not made until something is written there."""
    base = config.settings.state_directory or Path("state").resolve()
    return base.joinpath(*parts)


def handle_drain_and_reload(reactor: Any, drain: Callable[[], Any], reload: Callable[[], Any],
                            refresh: Callable[[], Any] | None = None) -> None:
    """SIGTERM calls ``drain`` (rather than stopping the reactor at once),
    SIGHUP ``reload`` and SIGUSR1 ``refresh`` (TLS material written by the
    master: certificates, OCSP responses), in the reactor thread; only from
    the main thread, where signal handlers can be set.

    Call it before the first socket opens, so that a signal arriving while
    the process starts is neither lost nor fatal (the default action of both
    is to terminate): the call waits until the reactor runs.  Call it again
    once the reactor runs, since the reactor installs its own SIGTERM
    handler when it starts."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(reactor, "callFromThread"):
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(drain))
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    if refresh is not None:
        signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(refresh))


def announce_build() -> None:
    """Log the version and which build runs (pure Python or compiled), once per
    start: by the single process, or by a master for all its workers."""
    log.info("chatproxy {version}, {build}", version=__version__, build=describe_build())


def announce_refused_reload(reason: str) -> None:
    """Log a refused reload and tell systemd the previous configuration serves on."""
    log.error("reload refused, the previous configuration keeps serving: {reason}", reason=reason)
    sd_notify("READY=1\nSTATUS=reload refused: " + reason[:200])
