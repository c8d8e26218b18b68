"""Sending bytes at once when a TCP transport has nothing queued.

Twisted's ``transport.write`` always queues and asks the reactor to watch for
writability: every response costs an extra reactor turn and two ``epoll_ctl``
calls even when the socket could take the bytes right away.  :func:`send`
tries the socket first when nothing is queued (so order is kept) and hands
whatever the kernel did not take to ``transport.write`` as usual, so flow
control (producers, ``bufferSize``) is unchanged.  Any transport that is not a
plain TCP connection (TLS, UNIX, in-memory test transports) just gets
``write``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_DIRECT = (tcp.Server, tcp.Client)


def send(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, sending it immediately when possible."""
    if (
        type(transport) in _DIRECT
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error the reactor will report on its own
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
