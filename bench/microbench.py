"""In-process micro-benchmark of chatproxy's per-request Python cost.

Drives one front connection and one pooled upstream connection over Twisted's
in-memory ``StringTransport`` (no sockets, no reactor), so the figure is the
cost of parsing, routing, header rewriting and relaying alone: the part of a
request's CPU time that chatproxy's own code controls.  With ``--websocket``,
the same for one bridged WebSocket session (``websocket = yes``): a masked
100-byte text message from the client relayed to the upstream and its echo
relayed back, per relayed message (two per round trip, as ``ws_run.py``
counts them).

    /work/venv/bin/python bench/microbench.py [--requests N] [--websocket]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from chatproxy.config import load_config
from chatproxy.proxy.front import FrontFactory
from chatproxy.proxy.upstream import UpstreamConnection
from chatproxy.proxy.core import ProxyCore

CONFIG = """
[chatproxy]
access_log = off
[listen:main]
endpoint = tcp:18080:interface=127.0.0.1
[upstream:app]
servers = http://127.0.0.1:18000
[route:all]
path = /
upstream = app
"""
REQUEST = (b"GET /prweb/PRChat/app/Chat/messages?since=42 HTTP/1.1\r\nHost: chat.example.com\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: */*\r\nAccept-Language: en\r\n"
           b"Cookie: JSESSIONID=abc123\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 21 Nov 2026 12:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n")


WEBSOCKET_ROUTE = "websocket = yes\nping_interval = 0\n"
HANDSHAKE = (b"GET /prweb/PRChat/app/Chat/ws HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
             b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nCookie: JSESSIONID=abc123\r\n\r\n")
MESSAGE = b'{"type":"message","session":"s-0042","seq":1234,"text":"Hello, I have a question about my order."}'
MESSAGE = MESSAGE + b" " * (100 - len(MESSAGE))


def _connected_front(route_options: str = "") -> tuple[Any, Any, StringTransport, MemoryReactorClock]:
    """A proxy core on a memory reactor (the route's options added to CONFIG's)
    and a client connected to it: (core, front connection, client transport, reactor)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bench.ini"
        path.write_text(CONFIG + route_options)
        config = load_config([path])
    reactor = MemoryReactorClock()
    core = ProxyCore(reactor, config)
    front = FrontFactory(core, config.listeners["main"]).buildProtocol(None)
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                             hostAddress=IPv4Address("TCP", "127.0.0.1", 18080))
    front.makeConnection(client)
    return core, front, client, reactor


def measure(requests: int) -> float:
    """Microseconds of CPU per proxied request (front parse -> upstream -> response relayed)."""
    core, front, client, _reactor = _connected_front()
    server_pool = core.pools["app"].servers[0]
    upstream = UpstreamConnection(server_pool)
    upstream.makeConnection(StringTransport())
    server_pool.release(upstream)
    start = time.process_time()
    for _ in range(requests):
        front.dataReceived(REQUEST)
        upstream.dataReceived(RESPONSE)
        upstream.transport.clear()  # type: ignore[union-attr]
        client.clear()
    elapsed = time.process_time() - start
    assert client.value() == b"" and not core.pools["app"].servers[0].idle_count == 0
    return elapsed / requests * 1e6


def measure_websocket(round_trips: int) -> float:
    """Microseconds of CPU per relayed WebSocket message (client -> upstream, echo -> client)."""
    _core, front, client, reactor = _connected_front(WEBSOCKET_ROUTE)
    front.dataReceived(HANDSHAKE)
    host, port, factory, _timeout, _bind = reactor.tcpClients.pop(0)
    wire: Any = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    wire.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))  # as a TCP connection has it
    wire.protocol.makeConnection(wire)
    upstream = wire.protocol  # the upstream leg, which reads straight from the connection as with TCP
    key = re.search(rb"Sec-WebSocket-Key: (\S+)", wire.value()).group(1)  # type: ignore[union-attr]
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    upstream.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 101 "), client.value()
    client.clear()
    wire.clear()
    mask = b"\x37\xfa\x21\x3d"
    from_client = bytes((0x81, 0x80 | len(MESSAGE))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(MESSAGE))
    echo = bytes((0x81, len(MESSAGE))) + MESSAGE
    start = time.process_time()
    for _ in range(round_trips):
        front.dataReceived(from_client)
        upstream.dataReceived(echo)
        wire.clear()
        client.clear()
    elapsed = time.process_time() - start
    front.dataReceived(from_client)
    upstream.dataReceived(echo)
    assert len(wire.value()) == len(from_client) and client.value() == echo, (wire.value(), client.value())
    return elapsed / (2 * round_trips) * 1e6


def main() -> None:
    """Print the per-request (or per-message) cost, best of five runs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests (or round trips) per run")
    parser.add_argument("--websocket", action="store_true", help="a bridged WebSocket session's messages instead")
    args = parser.parse_args()
    if args.websocket:
        best = min(measure_websocket(args.requests) for _ in range(5))
        print(f"{best:.2f} µs of CPU per relayed WebSocket message (bridge, in-memory transports, best of 5)")
        return
    best = min(measure(args.requests) for _ in range(5))
    print(f"{best:.1f} µs of CPU per proxied request (in-memory transports, best of 5)")


if __name__ == "__main__":
    main()
