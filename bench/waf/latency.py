"""Whether the event loop stays responsive while the ``waf`` filter inspects large bodies.

    .venv/bin/python bench/waf/latency.py
    .venv/bin/python bench/waf/latency.py --seconds 10 --senders 2

Part 1, end to end: one ``twistd -n chatproxy`` process (``workers = 1``) with two
routes to the same upstream: ``/waf/`` has the waf (paranoia 1, 64 KiB of bodies
inspected), ``/plain/`` no filter; ``/chat`` is a WebSocket route with the waf. A prober sends ``GET /plain/`` every 10 ms on
a keep-alive connection and records each answer's latency, first with nothing else
going on, then while ``--senders`` clients post 64 KiB JSON bodies to ``/waf/`` as
fast as they are answered (the bodies are inspected in the waf's thread pool), then
while they send 8 KiB WebSocket messages on ``/chat`` (inspected in the thread pool
too, one message of a session after the other).

Part 2, in one process: a Twisted reactor ticks every 5 ms and records how late each
tick is, while the same 64 KiB bodies go through the filter's body hook (the thread
pool) or are inspected inline in the reactor thread, for comparison.

Everything listens on 127.0.0.1; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from processes import Supervisor, free_ports  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from chatproxy.filters.waf import waf  # noqa: E402
from chatproxy.filters.waf_results import request_transaction  # noqa: E402
from chatproxy.testing import request_head  # noqa: E402

TWISTD = str(Path(sys.executable).parent / "twistd")
UPSTREAM = """
import sys
from twisted.internet import reactor
from twisted.web import resource, server
class Ok(resource.Resource):
    isLeaf = True
    def render(self, request):
        request.content.read()
        return b"ok"
reactor.listenTCP(int(sys.argv[1]), server.Site(Ok()), interface="127.0.0.1")
reactor.run()
"""
WS_UPSTREAM = """
import sys
from websockets.sync.server import serve
def drain(connection):
    for _ in connection:
        pass
with serve(drain, "127.0.0.1", int(sys.argv[1])) as server:
    server.serve_forever()
"""
CHAT = "Hi, I ordered a blue jacket last week (order #4711) and it has not arrived yet, can you help me? "


def body_64k() -> bytes:
    """A 64 KiB JSON body of 64 chat-text fields (about 60 ms of engine CPU at paranoia 1)."""
    return json.dumps({f"field{i}": (CHAT * 11)[:1000] for i in range(64)}).encode()[:65536]


def message_8k() -> str:
    """An 8 KiB JSON chat message (the vendor profile's inspect_message_bytes)."""
    return json.dumps({"type": "message", "text": (CHAT * 90)[:8100]})


def config(port: int, upstream: int, ws_upstream: int) -> str:
    """The proxy's configuration."""
    return (f"[chatproxy]\naccess_log = off\nworkers = 1\n\n[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n\n"
            f"[upstream:app]\nservers = http://127.0.0.1:{upstream}\n\n"
            f"[upstream:ws]\nservers = http://127.0.0.1:{ws_upstream}\n\n"
            "[route:waf]\npath = /waf\nupstream = app\nfilters = waf\n\n"
            "[route:chat]\npath = /chat\nupstream = ws\nwebsocket = yes\nfilters = waf\n\n"
            "[route:plain]\npath = /plain\nupstream = app\n\n"
            "[filter:waf]\nuse = waf\ninspect_body_bytes = 64k\n")


def percentiles(samples: list[float]) -> str:
    """p50 / p99 / max in milliseconds."""
    if not samples:
        return "no samples"
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{len(ordered):5} probes  p50 {statistics.median(ordered) * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms  "
            f"max {ordered[-1] * 1000:7.2f} ms")


def probe(port: int, seconds: float) -> list[float]:
    """GET /plain/ every 10 ms for ``seconds``: the latencies."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    found = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        connection.request("GET", "/plain/")
        connection.getresponse().read()
        found.append(time.perf_counter() - started)
        time.sleep(0.01)
    connection.close()
    return found


def post_bodies(port: int, stop: threading.Event, counts: list[int]) -> None:
    """POST 64 KiB JSON bodies to /waf/ until ``stop``."""
    body = body_64k()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        connection.request("POST", "/waf/send", body, {"Content-Type": "application/json"})
        connection.getresponse().read()
        counts.append(1)
    connection.close()


def send_messages(port: int, stop: threading.Event, counts: list[int]) -> None:
    """Send 8 KiB WebSocket messages to /waf/ until ``stop`` (the upstream echoes nothing:
    the proxy inspects each message and relays it)."""
    message = message_8k()
    with connect(f"ws://127.0.0.1:{port}/chat", open_timeout=10) as ws:
        while not stop.is_set():
            ws.send(message)
            counts.append(1)
            time.sleep(0.001)


def loaded(port: int, seconds: float, senders: int, sender: Any) -> tuple[list[float], int]:
    """Probe while ``senders`` threads run ``sender``: the latencies and how many items they sent."""
    stop = threading.Event()
    counts: list[int] = []
    threads = [threading.Thread(target=sender, args=(port, stop, counts), daemon=True) for _ in range(senders)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    found = probe(port, seconds)
    stop.set()
    for thread in threads:
        thread.join(30)
    return found, len(counts)


def end_to_end(seconds: float, senders: int) -> None:
    """Part 1."""
    port, upstream, ws_upstream = free_ports(3)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "chatproxy.ini"
        path.write_text(config(port, upstream, ws_upstream))
        supervisor = Supervisor(Path(directory))
        try:
            supervisor.start("upstream", [sys.executable, "-c", UPSTREAM, str(upstream)])
            supervisor.start("ws-upstream", [sys.executable, "-c", WS_UPSTREAM, str(ws_upstream)])
            supervisor.start("chatproxy", [TWISTD, "-n", "--pidfile=", "chatproxy", "--config", str(path)],
                             cwd=Path(directory))
            wait_for(port)
            print(f"idle                          {percentiles(probe(port, seconds))}")
            found, sent = loaded(port, seconds, senders, post_bodies)
            print(f"{senders} x 64 KiB JSON bodies       {percentiles(found)}  ({sent / seconds:.1f} bodies/s)")
            found, sent = loaded(port, seconds, senders, send_messages)
            print(f"{senders} x 8 KiB messages          {percentiles(found)}  ({sent / seconds:.1f} messages/s)")
        finally:
            supervisor.stop_all()


def wait_for(port: int, timeout: float = 30.0) -> None:
    """Until GET /plain/ answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/plain/")
            connection.getresponse().read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def in_process(seconds: float) -> None:
    """Part 2: tick lateness with bodies through the body hook (thread pool) or inline."""
    # Imported here: twisted.internet.reactor installs the default reactor.
    from twisted.internet import reactor, task

    flt = waf.build({"inspect_body_bytes": "64k"})
    body = body_64k()
    head = request_head("/waf/send", method="POST",
                        headers=[("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                 ("User-Agent", "bench"), ("Accept", "*/*")])
    results: dict[str, list[float]] = {}

    def run(name: str, feed: Any) -> None:
        lateness: list[float] = []
        last = [time.perf_counter()]

        def tick() -> None:
            now = time.perf_counter()
            lateness.append(max(0.0, now - last[0] - 0.005))
            last[0] = now

        ticker = task.LoopingCall(tick)
        ticker.start(0.005)
        deadline = time.monotonic() + seconds
        feed(deadline)
        reactor.callLater(seconds + 0.5, lambda: (ticker.stop(), results.__setitem__(name, lateness), step()))

    def threaded(deadline: float) -> None:
        def again(_: Any = None) -> None:
            if time.monotonic() < deadline:
                flt.request_body(head, body, True).addBoth(again)
        again()
        again()

    def inline(deadline: float) -> None:
        def again() -> None:
            if time.monotonic() < deadline:
                flt.inspect(flt_transaction)
                reactor.callLater(0, again)
        reactor.callLater(0, again)

    flt_transaction = request_transaction(head, body)
    plan = [("64 KiB bodies, thread pool", threaded), ("64 KiB bodies, inline", inline)]

    def step() -> None:
        if plan:
            name, feed = plan.pop(0)
            run(name, feed)
        else:
            reactor.stop()

    reactor.callWhenRunning(step)
    reactor.run()
    for name, lateness in results.items():
        print(f"{name:29} tick lateness: {percentiles(lateness).replace('probes', 'ticks ')}")


def main(argv: list[str] | None = None) -> int:
    """Run both parts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--senders", type=int, default=2, help="clients sending bodies or messages (default 2)")
    args = parser.parse_args(argv)
    print("part 1: GET /plain/ latency, one chatproxy process")
    end_to_end(args.seconds, args.senders)
    print("part 2: reactor tick (5 ms) lateness in one process")
    in_process(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
