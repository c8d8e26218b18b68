"""SIGTERM drains: no new connections, in-flight requests finish, WebSocket sessions get
1001, and the process exits 0."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import basic_config, for_sync_websockets, free_port


def test_sigterm_lets_an_in_flight_request_finish_and_exits_0(proxy, upstream):
    """A request in flight when SIGTERM arrives gets its complete response (with Connection:
    close); new connections are refused at once; the process exits with status 0."""
    port = free_port()
    process = proxy.start(basic_config(upstream.url, port, settings="access_log = off\ndrain_timeout = 20"),
                          port=port)
    result: dict[str, object] = {}

    def slow_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/slow?delay=2")
        response = conn.getresponse()
        result["status"] = response.status
        result["body"] = response.read()
        result["connection"] = response.getheader("Connection")

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 10
    while not upstream.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.requests, "the slow request never reached the upstream"
    process.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = False
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        refused = True
    assert refused, "the proxy still accepted connections while draining"
    thread.join(20)
    assert result.get("status") == 200 and b'"path": "/slow?delay=2"' in result["body"]  # type: ignore[operator]
    assert result["connection"] == "close"
    assert process.process.wait(20) == 0
    assert "draining" in process.output()


def test_sigterm_closes_websocket_sessions_with_1001(proxy, tmp_path):
    """An open chat session through the bridge is closed with 1001 (going away) when the proxy
    drains, and the process exits 0."""
    from pathlib import Path

    from websockets.sync.client import connect

    root = Path(__file__).resolve().parent.parent
    text = (root / "etc" / "chatproxy.ini").read_text()
    https_port, demo_port = free_port(), free_port()
    text = text.replace("8443", str(https_port)).replace("8081", str(demo_port))
    text = text.replace("[chatproxy]\n", "[chatproxy]\ndrain_timeout = 4\n")
    process = proxy.start(text, port=https_port)
    import ssl

    context = for_sync_websockets(ssl.create_default_context(cafile=str(tmp_path / "tls" / "localhost.crt")))
    with connect(f"wss://localhost:{https_port}/chat", ssl=context, open_timeout=10) as session:
        session.send("hello")
        assert session.recv(timeout=10) == "hello"
        process.process.send_signal(signal.SIGTERM)
        try:
            while True:
                session.recv(timeout=10)
        except Exception:
            pass
        assert session.close_code == 1001
    assert process.process.wait(20) == 0


#: Starts chatproxy as twistd does (makeService, privilegedStartService, startService, reactor.run)
#: and sends itself SIGTERM once the sockets are open, before the reactor runs.
SIGTERM_WHILE_STARTING = """
import os, signal, sys
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from chatproxy.process.tap import Options, makeService
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
options = Options()
options.parseOptions(sys.argv[1:])
service = makeService(options)
service.privilegedStartService()
os.kill(os.getpid(), signal.SIGTERM)
print("sent SIGTERM while starting", flush=True)
service.startService()
reactor.run()
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_while_starting_drains_and_exits_0(upstream, tmp_path, workers):
    """SIGTERM that arrives once the listening sockets are open but before the reactor runs (a
    stop while the service starts: the port already accepts connections) is not lost and does
    not kill the process outright: once the reactor runs it drains and exits 0, a master with
    its workers, none of which is left running."""
    port = free_port()
    config = tmp_path / "chatproxy.ini"
    config.write_text(basic_config(upstream.url, port, settings=f"access_log = off\nworkers = {workers}"))
    result = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_STARTING, "--config", str(config)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "sent SIGTERM while starting" in output and "SIGTERM: draining" in output, output
    for pid in re.findall(r"worker \d started \(pid (\d+)\)", output):
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_readyz_says_draining_while_the_drain_runs(proxy, upstream, workers):
    """From SIGTERM until the process exits, the admin listener stays open and /readyz answers
    503 "draining" (a load balancer checking it takes the instance out), while the public
    listener refuses new connections and a request in flight still completes; before the
    SIGTERM /readyz was 200 -- with one process and with a master and two workers."""
    port, admin = free_port(), free_port()
    process = proxy.start(basic_config(upstream.url, port, settings="access_log = off\ndrain_timeout = 20",
                                       extra=f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n"),
                          port=port, workers=workers)

    def readyz() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        return response.status, response.read()

    deadline = time.monotonic() + 15
    while readyz()[0] != 200:
        assert time.monotonic() < deadline, readyz()
        time.sleep(0.1)
    result: dict[str, int] = {}

    def slow_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/slow?delay=3")
        result["status"] = conn.getresponse().status

    thread = threading.Thread(target=slow_request)
    thread.start()
    while not upstream.requests:
        assert time.monotonic() < deadline + 10, "the slow request never reached the upstream"
        time.sleep(0.02)
    process.process.send_signal(signal.SIGTERM)
    while True:
        status, body = readyz()
        if status == 503:
            break
        assert time.monotonic() < deadline + 20, (status, body)
        time.sleep(0.05)
    assert b"draining" in body
    thread.join(20)
    assert result.get("status") == 200
    assert process.process.wait(30) == 0
