"""Listening sockets several worker processes share.

With ``workers = N`` every worker accepts on every listener.  For a
``tcp:``/``tcp6:`` endpoint (also inside ``haproxy:``) the master binds one
``SO_REUSEPORT`` socket per worker (the kernel spreads new connections evenly
over them; a port something else serves is an error, as with one process)
and keeps it: a worker fetches its own over a UNIX socket in the master's
private directory, at start and when a reload adds a listener, and a worker
that dies leaves its socket, with the connections queued on it, to the
worker that replaces it.  A
``systemd:`` endpoint adopts the socket systemd passed to the master, which
every worker inherits.  Other endpoint types (``unix:``, …) cannot be shared
and need ``workers = 1``.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.python.systemd import ListenFDs

#: Endpoint types a worker can share (``haproxy:`` only around ``tcp:``/``tcp6:``).
SHAREABLE = ("tcp", "tcp6", "systemd", "haproxy")


def endpoint_kind(text: str) -> str:
    """The endpoint type of an endpoint string: ``tcp``, ``systemd``, ... (``tcp`` for a bare port)."""
    head = text.split(":", 1)[0].strip().lower()
    return "tcp" if head.isdigit() else head


def socket_identity(reactor: Any, text: str) -> str:
    """What makes two endpoint strings the same listening socket: for TCP the
    kind, interface and port (``tcp:8080`` and ``tcp:port=8080`` are one
    socket; a ``haproxy:`` prefix makes another), else the text itself."""
    prefix, plain = ("haproxy:", text.split(":", 1)[1]) if endpoint_kind(text) == "haproxy" else ("", text)
    if endpoint_kind(plain) not in ("tcp", "tcp6"):
        return text
    try:
        endpoint = serverFromString(reactor, plain)
    except Exception:  # not valid here: compared as written
        return text
    if not endpoint._port:  # port 0: a new port each time, never the same socket
        return text
    return f"{prefix}{endpoint_kind(plain)}:{endpoint._interface}:{endpoint._port}"


def can_share(text: str) -> bool:
    """Whether worker processes can share a listener with this endpoint."""
    kind = endpoint_kind(text)
    if kind == "haproxy":
        return endpoint_kind(text.split(":", 1)[1]) in ("tcp", "tcp6")
    return kind in SHAREABLE


def bind_listening(reactor: Any, text: str, probe: bool = True) -> socket.socket:
    """A listening TCP socket with ``SO_REUSEPORT`` for a ``tcp:``/``tcp6:`` (or
    ``haproxy:tcp:``) endpoint string, bound as Twisted would bind it, for
    the master to hand to one worker.  Each worker gets its own socket on the
    port, so the kernel spreads new connections evenly over the workers.
    ``probe``: first make sure nothing accepts connections there already (a
    second chatproxy of the same user could otherwise share the port).
    Raises OSError (a port in use) or ValueError."""
    endpoint = serverFromString(reactor, text)
    plain = text
    if endpoint_kind(text) == "haproxy":
        endpoint = endpoint._wrappedEndpoint
        plain = text.split(":", 1)[1]
    interface = endpoint._interface or ("::" if endpoint_kind(plain) == "tcp6" else "0.0.0.0")
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    if probe and endpoint._port:
        _refuse_if_served(interface, endpoint._port, family)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, endpoint._port))
        sock.listen(endpoint._backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _refuse_if_served(interface: str, port: int, family: socket.AddressFamily) -> None:
    """Raise OSError when something already accepts connections on the port."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(interface, interface)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            pass
    except OSError:
        return
    raise OSError(errno.EADDRINUSE, f"Address already in use (something accepts connections on port {port})")


def fetch_socket(directory: str, worker: str, text: str, timeout: float = 10.0) -> tuple[int, socket.AddressFamily]:
    """Ask the master (over ``DIRECTORY/sockets``) for worker ``worker``'s
    listening socket for the endpoint string ``text``: a new file descriptor
    and its family.  Raises OSError with the master's reason when it cannot
    listen there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as broker:
        broker.settimeout(timeout)
        broker.connect(f"{directory}/{BROKER_SOCKET}")
        broker.sendall(f"{worker} {text}\n".encode("utf-8"))
        answer, received = b"", []
        while not answer.endswith(b"\n"):
            data, fds, _flags, _address = socket.recv_fds(broker, 4096, 4)
            if not data:
                break
            answer += data
            received.extend(fds)
    if not answer.startswith(b"OK") or not received:
        for fd in received:
            os.close(fd)
        raise OSError(answer.decode("utf-8", "replace").removeprefix("ERR ").strip() or "no answer from the master")
    for extra in received[1:]:
        os.close(extra)
    family = socket.AddressFamily(int(answer.split()[1])) if len(answer.split()) > 1 else socket.AF_INET
    return received[0], family


#: The master's UNIX socket that hands listening sockets to workers.
BROKER_SOCKET = "sockets"


class BrokeredEndpoint:
    """A worker's listener on the socket the master keeps for it (so a worker
    that dies leaves its socket, and the connections queued on it, to the
    worker that replaces it)."""

    def __init__(self, reactor: Any, directory: str, worker: str, text: str) -> None:
        self.reactor = reactor
        self.directory = directory
        self.worker = worker
        self.text = text

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        """Fetch the socket from the master and accept on it."""
        try:
            fileno, family = fetch_socket(self.directory, self.worker, self.text)
        except OSError as e:
            return defer.fail(e)
        # Made non-blocking, adopted, and this copy of the descriptor closed.
        listening: defer.Deferred[Any] = AdoptedStreamServerEndpoint(self.reactor, fileno, family).listen(factory)
        return listening


def _inherited(reactor: Any, text: str) -> AdoptedStreamServerEndpoint:
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
    # A duplicate: adopting closes it, and the passed socket stays open for a later reload.
    return AdoptedStreamServerEndpoint(reactor, os.dup(fileno), family)


def shared_endpoint(reactor: Any, text: str, directory: str, worker: str) -> Any:
    """The server endpoint worker ``worker`` listens on for the endpoint
    string ``text`` (``directory``: the master's private directory)."""
    kind = endpoint_kind(text)
    if kind == "systemd":
        return _inherited(reactor, text)
    if kind in ("tcp", "tcp6") or (kind == "haproxy" and can_share(text)):
        brokered = BrokeredEndpoint(reactor, directory, worker, text)
        if kind == "haproxy":
            endpoint = serverFromString(reactor, text)
            endpoint._wrappedEndpoint = brokered
            return endpoint
        return brokered
    raise ValueError(f"{kind}: endpoints cannot be shared by several workers (set workers = 1)")
