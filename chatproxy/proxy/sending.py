"""Shortcuts past Twisted's per-call layers on a connection: sending bytes at
once when a TCP transport has nothing queued, and reading without a client
endpoint's pass-through wrapper.

Twisted's ``transport.write`` always queues and asks the reactor to watch for
writability: every response costs an extra reactor turn and two ``epoll_ctl``
calls even when the socket could take the bytes right away.  :func:`send`
tries the socket first when nothing is queued (so order is kept) and hands
whatever the kernel did not take to ``transport.write`` as usual, so flow
control (producers, ``bufferSize``) is unchanged.  Any transport that is not a
plain TCP connection (TLS, UNIX, in-memory test transports) just gets
``write``.

A protocol connected through a client endpoint gets its reads through the
endpoint's wrapper protocol, one more Python call per read that only passes
it on; :func:`read_directly` has the transport call the protocol itself.
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


def read_directly(protocol: Any) -> None:
    """Have ``protocol``'s transport deliver reads (and the connection's end)
    to it straight, not through the client endpoint's pass-through wrapper
    (``_WrappingProtocol``), when it is connected through one.  Called from
    ``connectionMade``.  A TLS transport (an https or wss upstream) has no
    ``protocol`` attribute and keeps its wrapper."""
    transport = protocol.transport
    if getattr(getattr(transport, "protocol", None), "_wrappedProtocol", None) is protocol:
        transport.protocol = protocol
