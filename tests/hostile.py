"""A raw client for the hostile-client tests: connects over TCP, TLS, a UNIX
socket or with a PROXY-protocol header, sends exactly the bytes a test gives,
and reads until the response is complete or the proxy ends the connection,
telling a clean end (FIN, TLS close_notify) from a reset.  Plus the process
accounting those tests use (open file descriptors of a pid)."""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass

from ws_peers import wait_until as wait_for  # noqa: F401 (the bounded poll these tests use)

WAIT = 15.0  # the bound on every read and wait here


@dataclass(frozen=True)
class Target:
    """Where a listener is and how to reach it."""

    port: int = 0
    unix: str | None = None
    tls: ssl.SSLContext | None = None
    proxy_header: bool = False  # a `haproxy:` listener: send a PROXY v1 line first

    def connect(self) -> socket.socket:
        """A connected socket (TLS handshake done, PROXY line sent)."""
        sock: socket.socket
        if self.unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(WAIT)
            sock.connect(self.unix)
        else:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        if self.proxy_header:
            sock.sendall(f"PROXY TCP4 198.51.100.7 127.0.0.1 40000 {self.port}\r\n".encode())
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname="localhost")
        return sock


@dataclass
class Outcome:
    """What a client got: the bytes, and how the connection ended."""

    data: bytes
    end: str  # "eof" (the proxy closed cleanly), "reset", "open" (complete response, still open)

    @property
    def status(self) -> int:
        """The status code of the first response (0 when there is none)."""
        if not self.data.startswith(b"HTTP/1.1 "):
            return 0
        return int(self.data[9:12])

    def header(self, name: str) -> str | None:
        """A header of the first response, or None."""
        head = self.data.partition(b"\r\n\r\n")[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def _complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole response framed by Content-Length."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def read_until_end(sock: socket.socket, stop_when_complete: bool) -> Outcome:
    """Read until the proxy ends the connection (or, with ``stop_when_complete``,
    until one whole response arrived)."""
    data = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if stop_when_complete and _complete(data):
            return Outcome(data, "open")
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return Outcome(data, "reset")
        except ssl.SSLError as error:
            return Outcome(data, f"reset ({error.reason})")
        if not chunk:
            return Outcome(data, "eof")
        data += chunk
    raise AssertionError(f"the connection neither ended nor completed a response within {WAIT}s: {data[:200]!r}")


def send_and_read(target: Target, request: bytes, *, more: bytes = b"", stop_when_complete: bool = False) -> Outcome:
    """Connect, send ``request`` then ``more`` (e.g. the rest of a body the
    proxy will refuse; ignoring a reset while sending it), read the answer,
    close."""
    sock = target.connect()
    try:
        if request:
            sock.sendall(request)
        if more:
            try:
                sock.sendall(more)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                pass
        return read_until_end(sock, stop_when_complete)
    finally:
        sock.close()


def fd_count(pid: int) -> int:
    """How many file descriptors process ``pid`` holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))
