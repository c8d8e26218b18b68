"""Listening sockets several worker processes share.

With ``workers = N`` every worker listens on every listener itself: a
``tcp:``/``tcp6:`` endpoint (also inside ``haproxy:``) is opened with
``SO_REUSEPORT``, so the kernel spreads new connections over the workers'
sockets and a reload in one worker opens or closes its own sockets without
asking anyone; a ``systemd:`` endpoint adopts the socket systemd passed to the
master, which every worker inherits.  Other endpoint types (``unix:``, …)
cannot be shared and need ``workers = 1``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, fdesc
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.python.systemd import ListenFDs

#: Endpoint types a worker can share (``haproxy:`` only around ``tcp:``/``tcp6:``).
SHAREABLE = ("tcp", "tcp6", "systemd", "haproxy")


def endpoint_kind(text: str) -> str:
    """The endpoint type of an endpoint string: ``tcp``, ``systemd``, ... (``tcp`` for a bare port)."""
    head = text.split(":", 1)[0].strip().lower()
    return "tcp" if head.isdigit() else head


def can_share(text: str) -> bool:
    """Whether worker processes can share a listener with this endpoint."""
    kind = endpoint_kind(text)
    if kind == "haproxy":
        return endpoint_kind(text.split(":", 1)[1]) in ("tcp", "tcp6")
    return kind in SHAREABLE


class ReusePortEndpoint:
    """A TCP server endpoint whose socket has ``SO_REUSEPORT`` (one per worker, same port)."""

    def __init__(self, reactor: Any, port: int, interface: str, backlog: int, family: socket.AddressFamily) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.family = family

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        """Bind with SO_REUSEPORT and hand the socket to the reactor."""
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if self.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((self.interface, self.port))
                sock.listen(self.backlog)
                sock.setblocking(False)
                port = self.reactor.adoptStreamPort(sock.fileno(), self.family, factory)
            finally:
                sock.close()  # the reactor holds its own duplicate
        except OSError as e:
            return defer.fail(e)
        return defer.succeed(port)


class InheritedEndpoint:
    """A socket systemd passed to the master (``LISTEN_FDS``), adopted by a worker."""

    def __init__(self, reactor: Any, fileno: int, family: socket.AddressFamily) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self.family = family

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        """Accept on the inherited socket (non-blocking: the workers race for each connection)."""
        try:
            fdesc.setNonBlocking(self.fileno)
            return defer.succeed(self.reactor.adoptStreamPort(self.fileno, self.family, factory))
        except OSError as e:
            return defer.fail(e)


def _inherited(reactor: Any, text: str) -> InheritedEndpoint:
    """``systemd:domain=INET6:name=https`` (or ``index=N``) in a worker: the
    master's ``LISTEN_PID`` is not ours, so the descriptors are looked up as if it were."""
    options = dict(part.split("=", 1) for part in text.split(":")[1:] if "=" in part)
    # The master passed LISTEN_FDS and LISTEN_FDNAMES on with its own LISTEN_PID.
    environ = dict(os.environ, LISTEN_PID=str(os.getpid()))
    fds = ListenFDs.fromEnvironment(environ=environ)
    if "name" in options:
        named = fds.inheritedNamedDescriptors()
        if options["name"] not in named:
            raise ValueError(f"systemd passed no socket named {options['name']!r}")
        fileno = named[options["name"]]
    else:
        descriptors = fds.inheritedDescriptors()
        index = int(options.get("index", "-1"))
        if not 0 <= index < len(descriptors):
            raise ValueError(f"systemd passed no socket with index {index}")
        fileno = descriptors[index]
    family = socket.AF_INET6 if options.get("domain", "INET").upper() == "INET6" else socket.AF_INET
    return InheritedEndpoint(reactor, fileno, family)


def shared_endpoint(reactor: Any, text: str) -> Any:
    """The server endpoint a worker listens on for the endpoint string ``text``."""
    kind = endpoint_kind(text)
    if kind == "systemd":
        return _inherited(reactor, text)
    endpoint = serverFromString(reactor, text)
    if kind == "haproxy":
        wrapped = endpoint._wrappedEndpoint
        endpoint._wrappedEndpoint = _reuse_port(reactor, wrapped, text)
        return endpoint
    if kind in ("tcp", "tcp6"):
        return _reuse_port(reactor, endpoint, text)
    raise ValueError(f"{kind}: endpoints cannot be shared by several workers (set workers = 1)")


def _reuse_port(reactor: Any, endpoint: Any, text: str) -> ReusePortEndpoint:
    """The SO_REUSEPORT twin of a parsed ``tcp:``/``tcp6:`` endpoint."""
    family = socket.AF_INET6 if "tcp6" in text.split(":", 2)[:2] else socket.AF_INET
    interface = endpoint._interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    if ":" in interface:
        family = socket.AF_INET6
    return ReusePortEndpoint(reactor, endpoint._port, interface, endpoint._backlog, family)
