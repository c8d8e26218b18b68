"""In-process micro-benchmark of chatproxy's per-request Python cost.

Drives one front connection and one pooled upstream connection over Twisted's
in-memory ``StringTransport`` (no sockets, no reactor), so the figure is the
cost of parsing, routing, header rewriting and relaying alone: the part of a
request's CPU time that chatproxy's own code controls.

    /work/venv/bin/python bench/microbench.py [--requests N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

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


def measure(requests: int) -> float:
    """Microseconds of CPU per proxied request (front parse -> upstream -> response relayed)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bench.ini"
        path.write_text(CONFIG)
        config = load_config([path])
    reactor = MemoryReactorClock()
    core = ProxyCore(reactor, config)
    front = FrontFactory(core, config.listeners["main"]).buildProtocol(None)
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                             hostAddress=IPv4Address("TCP", "127.0.0.1", 18080))
    front.makeConnection(client)
    server_pool = core.pools["app"].servers[0]
    upstream = UpstreamConnection(server_pool)
    upstream.makeConnection(StringTransport())
    server_pool.release(upstream)
    start = time.process_time()
    for _ in range(requests):
        front.dataReceived(REQUEST)
        upstream.dataReceived(RESPONSE)
        upstream.transport.clear()  # type: ignore[attr-defined]
        client.clear()
    elapsed = time.process_time() - start
    assert client.value() == b"" and not core.pools["app"].servers[0].idle_count == 0
    return elapsed / requests * 1e6


def main() -> None:
    """Print the per-request cost, best of five runs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    best = min(measure(args.requests) for _ in range(5))
    print(f"{best:.1f} µs of CPU per proxied request (in-memory transports, best of 5)")


if __name__ == "__main__":
    main()
