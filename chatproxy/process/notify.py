"""systemd notifications (``Type=notify``, sd_notify(3)): both ends.

:func:`sd_notify` sends a state (``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
``STATUS=...``) to ``$NOTIFY_SOCKET``: systemd's socket for a single process
or a master, the master's own socket for a worker (whose messages then carry
``CHATPROXY_WORKER=k``).  :class:`NotifyReceiver` is the master's end of that
socket: it hands each worker message on as a mapping of fields.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from chatproxy.process.environment import WORKER_ENV

log = Logger()


def sd_notify(state: str) -> None:
    """Tell systemd (or a worker's master) about our state through ``$NOTIFY_SOCKET``;
    nothing happens when not started by either."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    worker = os.environ.get(WORKER_ENV)
    if worker:
        state += f"\n{WORKER_ENV}={worker}"  # the master tells its workers apart
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.setblocking(False)  # never wait for the receiver (systemd, or a worker's master)
            notify.connect(address)
            notify.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warn("cannot notify systemd at {address}: {error}", address=address, error=e)


def notify_reloading() -> None:
    """Tell systemd a reload began (``RELOADING=1`` with the monotonic time it asks for)."""
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}\nSTATUS=reloading")


def parse_state(data: bytes) -> dict[str, str]:
    """The ``NAME=value`` fields of one notification datagram (lines without ``=`` are ignored)."""
    return dict(line.split("=", 1) for line in data.decode("utf-8", "replace").splitlines() if "=" in line)


class NotifyReceiver(DatagramProtocol):
    """The master's end of its workers' ``NOTIFY_SOCKET``: each datagram's
    fields (:func:`parse_state`) go to ``received``."""

    def __init__(self, received: Callable[[dict[str, str]], None]) -> None:
        self.received = received

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        """One worker's notification."""
        self.received(parse_state(data))
