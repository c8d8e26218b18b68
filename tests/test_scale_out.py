"""The reference deployment of README's "Scaling out", started from the repository's own
files (etc/deploy/haproxy.cfg, etc/deploy/redis.conf, etc/deploy/chatproxy.ini) with
only addresses, ports, certificates and servers moved to loopback by a site file:
Debian's HAProxy (TCP mode, PROXY protocol v2, health checks on /readyz) in front of two
chatproxy instances (each a master with its workers) sharing their rate limits in
Debian's redis-server, all real processes started and stopped here.  Checked: traffic
reaches both instances with the client's own address; a limit holds across both; a sticky
client stays on its server whichever instance it reaches; SIGTERM to one instance under
wrk's load loses no request and ends its WebSocket sessions with 1001 while the other's
go on; Redis stopped and started again."""

from __future__ import annotations

import contextlib
import http.client
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ProxyProcess, for_sync_websockets, free_port, replace_each, require_tool, stop_process, wait_for_port, wait_until
from profile_peers import StandIn

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "etc" / "deploy"
WAIT = 30.0


class Process:
    """A server process (HAProxy, Redis) the test started, its output in a file."""

    def __init__(self, args: list[str], log: Path, port: int) -> None:
        self.args, self.log_path, self.port = args, log, port
        self.start()

    def start(self) -> None:
        """Start it (again) and wait for its port."""
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout=WAIT, process=self.process)
        except BaseException:
            self.stop()
            raise RuntimeError(f"{self.args[0]} did not start:\n{self.log_path.read_text(errors='replace')}") from None

    def stop(self) -> None:
        """SIGTERM, bounded wait, SIGKILL if need be."""
        stop_process(self.process)
        self._log.close()


class Deployment:
    """HAProxy, Redis, two upstream servers and two chatproxy instances on loopback."""

    def __init__(self, tmp_path: Path, pki: Any) -> None:
        self.tmp, self.pki = tmp_path, pki
        self.haproxy: Process | None = None
        self.redis: Process | None = None
        self.instances: list[ProxyProcess] = []
        self.servers = [StandIn(ws_prefixes=("/chat",)) for _ in range(2)]
        try:
            self._start(tmp_path, pki)
        except BaseException:
            self.stop()
            raise

    def _start(self, tmp_path: Path, pki: Any) -> None:
        self.redis_port = free_port()
        redis_dir = tmp_path / "redis"
        redis_dir.mkdir()
        redis_conf = tmp_path / "redis.conf"
        redis_conf.write_text(replace_each((DEPLOY / "redis.conf").read_text(), {
            "bind 10.0.0.30": "bind 127.0.0.1", "port 6379": f"port {self.redis_port}",
            "dir /var/lib/redis": f"dir {redis_dir}"}, "etc/deploy/redis.conf"))
        self.redis = Process([require_tool("redis-server", "redis-server"), str(redis_conf)], tmp_path / "redis.log",
                             self.redis_port)
        self.sites: list[Path] = []
        self.ports: list[tuple[int, int]] = []
        self.access_logs: list[Path] = []
        for name in ("a", "b"):
            public, admin = free_port(), free_port()
            access = tmp_path / f"access-{name}.log"
            site = tmp_path / f"site-{name}.ini"
            site.write_text(
                f"[chatproxy]\naccess_log = {access}\nworkers = 2\n"
                f"[listen:public]\nendpoint = haproxy:tcp:{public}:interface=127.0.0.1\nallow = 127.0.0.1/32\n"
                f"certificate = {pki.cert}\nkey = {pki.key}\n"
                f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\nallow = 127.0.0.1/32\n"
                f"[upstream:chat]\nservers = {self.servers[0].url}, {self.servers[1].url}\n"
                f"[filter:per-client]\nrate = 1000\nburst = 100000\nstore = redis://127.0.0.1:{self.redis_port}/0\n"
                # A strict limit of the same kind, on a route of its own, to count against.
                f"[filter:strict]\nuse = rate_limit\nrate = 6/min\nburst = 10\nkey = client\n"
                f"store = redis://127.0.0.1:{self.redis_port}/0\non_store_error = local\n"
                "[route:limited]\npath = /limited\nupstream = chat\nfilters = strict\n")
            self.sites.append(site)
            self.ports.append((public, admin))
            self.access_logs.append(access)
            self.instances.append(self.start_instance(len(self.instances)))
        for public, admin in self.ports:
            wait_for_port(admin, timeout=WAIT)
        self.haproxy_port = free_port()
        (a_public, a_admin), (b_public, b_admin) = self.ports
        haproxy_cfg = tmp_path / "haproxy.cfg"
        haproxy_cfg.write_text(replace_each((DEPLOY / "haproxy.cfg").read_text(), {
            "bind :443": f"bind 127.0.0.1:{self.haproxy_port}",
            "server chatproxy-a 10.0.0.21:8443 check port 9180": f"server chatproxy-a 127.0.0.1:{a_public} check port {a_admin}",
            "server chatproxy-b 10.0.0.22:8443 check port 9180": f"server chatproxy-b 127.0.0.1:{b_public} check port {b_admin}"},
            "etc/deploy/haproxy.cfg"))
        self.haproxy = Process([require_tool("haproxy", "haproxy"), "-db", "-f", str(haproxy_cfg)],
                               tmp_path / "haproxy.log", self.haproxy_port)
        self.context = self.tls_context()

    def tls_context(self) -> ssl.SSLContext:
        """A client context trusting the deployment's CA."""
        return ssl.create_default_context(cafile=str(self.pki.ca))

    def start_instance(self, index: int) -> ProxyProcess:
        """Start instance ``index`` (again): the shipped file and its site file."""
        directory = self.tmp / f"instance-{index}-{len(self.instances)}"
        directory.mkdir()
        return ProxyProcess(directory, [DEPLOY / "chatproxy.ini", self.sites[index]], None)

    def get(self, path: str, source: str = "127.0.0.1", headers: dict[str, str] | None = None) -> Any:
        """One request through HAProxy on a new TLS connection from ``source``: the response."""
        conn = http.client.HTTPSConnection("localhost", self.haproxy_port, context=self.context, timeout=WAIT,
                                           source_address=(source, 0))
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            response.body = response.read()
            return response
        finally:
            conn.close()

    def warm(self) -> bool:
        """Whether a request through HAProxy succeeds now (HAProxy answers nothing until a
        health check passed)."""
        try:
            return bool(self.get("/warm").status == 200)
        except (OSError, http.client.HTTPException):
            return False

    def open_sessions(self) -> list[int]:
        """The WebSocket sessions each instance holds (its /metrics)."""
        counts = []
        for _public, admin in self.ports:
            conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=WAIT)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            counts.append(sum(int(float(v)) for v in re.findall(r"^chatproxy_websocket_sessions(?:\{[^}]*\})? (\S+)$", text,
                                                                 re.M)))
        return counts

    def served_by(self, line_start: str) -> list[int]:
        """How many access-log lines starting with ``line_start`` each instance wrote."""
        return [sum(1 for line in path.read_text().splitlines() if line.startswith(line_start))
                if path.exists() else 0 for path in self.access_logs]

    def stop(self) -> None:
        """Stop everything started (bounded)."""
        for process in (self.haproxy, self.redis):
            if process is not None:
                process.stop()
        for instance in self.instances:
            if instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
                try:
                    instance.process.wait(30)
                except subprocess.TimeoutExpired:
                    instance.process.kill()
        for server in self.servers:
            server.stop()


@pytest.fixture
def deployment(tmp_path, pki):
    """The reference deployment, running."""
    built = Deployment(tmp_path, pki)  # stops what it started if it cannot finish
    try:
        wait_until(lambda: built.warm() and all(built.served_by("127.0.0.1 ")), "HAProxy sending to both instances",
                   timeout=WAIT)
        yield built
    finally:
        built.stop()


def test_the_reference_deployment(deployment):
    """Both instances serve, with the client's own address (PROXY protocol v2) in their
    access logs; a limit of 10 per client holds across both instances; a client with the
    sticky cookie reaches the same upstream server through either instance; Redis stopped:
    the strict limit falls back to each worker's own bucket (on_store_error = local) and
    requests are still served; Redis back: one shared limit again."""
    d = deployment
    sent = 0
    while not all(d.served_by("127.0.0.2 ")):  # both instances, the client's own address (bounded)
        assert sent < 40, d.served_by("127.0.0.2 ")
        assert d.get(f"/who/{sent}", source="127.0.0.2").status == 200
        sent += 1
        wait_until(lambda: sum(d.served_by("127.0.0.2 ")) == sent, "the access logs")

    statuses = [d.get("/limited/x", source="127.0.0.3").status for _ in range(16)]
    assert statuses.count(200) == 10 and statuses.count(429) == 6, statuses
    while not all(d.served_by("127.0.0.3 ")):  # counted against one limit by both instances (bounded)
        assert len(statuses) < 40, d.served_by("127.0.0.3 ")
        statuses.append(d.get("/limited/x", source="127.0.0.3").status)
        assert statuses[-1] == 429, statuses

    first = d.get("/session/start", source="127.0.0.4")
    cookie = first.getheader("Set-Cookie").split(";")[0]
    assert cookie.startswith("chat_server=")
    landed = [len(server.requests) for server in d.servers]
    for n in range(8):
        assert d.get(f"/session/{n}", source="127.0.0.4", headers={"Cookie": cookie}).status == 200
    sent = 8
    while not all(d.served_by("127.0.0.4 ")):  # ... through both instances (bounded)
        assert sent < 40, d.served_by("127.0.0.4 ")
        assert d.get(f"/session/{sent}", source="127.0.0.4", headers={"Cookie": cookie}).status == 200
        sent += 1
    grown = [len(server.requests) - before for server, before in zip(d.servers, landed)]
    assert sorted(grown) == [0, sent], grown  # one server had them all

    d.redis.stop()
    statuses = [d.get("/limited/y", source="127.0.0.5").status for _ in range(8)]
    assert statuses == [200] * 8, statuses  # each worker's own bucket of 10
    d.redis.start()
    wait_until(lambda: d.get("/limited/z", source="127.0.0.6").status == 429, "the shared limit back",
               timeout=WAIT)


def test_rolling_restart_under_load(deployment):
    """wrk drives HTTPS requests through HAProxy during a rolling restart -- SIGTERM to
    instance A, A started again and taken back by HAProxy, then SIGTERM to B -- and no
    request fails (HAProxy sees /readyz turn 503 and retries refused connections on the
    other instance; in-flight requests finish; a restarted instance gets traffic once its
    checks pass); A's WebSocket sessions get 1001 while B's keep working; each drained
    instance exits 0."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    d = deployment
    wrk = require_tool("wrk", "wrk")
    sessions: list[Any] = []
    with contextlib.ExitStack() as opened:
        # HAProxy balances by least connections, weighted while an instance is in
        # slowstart: open sessions until each instance holds some (bounded).
        while min(d.open_sessions()) == 0:
            assert len(sessions) < 40, d.open_sessions()
            sessions.append(opened.enter_context(connect(f"wss://localhost:{d.haproxy_port}/chat/room-{len(sessions)}",
                                                         ssl=for_sync_websockets(d.tls_context()),
                                                         open_timeout=WAIT)))
            wait_until(lambda: sum(d.open_sessions()) == len(sessions), "the sessions counted by the instances")
        on_b = d.open_sessions()[1]
        load = subprocess.Popen([wrk, "-t1", "-c8", "-d25s", f"https://localhost:{d.haproxy_port}/load"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2)  # let the load run before the restart (not a timing assertion)
        first = d.instances[0]
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(45) == 0
        codes = {}
        for n, ws in enumerate(sessions):
            try:
                ws.send(f"still here {n}")
                codes[n] = ("open", ws.recv(timeout=10))
            except ConnectionClosed as closed:
                codes[n] = ("closed", closed.rcvd.code if closed.rcvd else None)
        states = [state for state, _ in codes.values()]
        assert states.count("open") == on_b and "closed" in states, codes
        assert all(value == 1001 for state, value in codes.values() if state == "closed"), codes
        assert all(value == f"still here {n}" for n, (state, value) in codes.items() if state == "open"), codes

        served = d.served_by("127.0.0.1 ")[0]
        d.instances[0] = d.start_instance(0)  # A again, with the same files
        wait_until(lambda: d.warm() and d.served_by("127.0.0.1 ")[0] > served,  # new connections (wrk's stay on B)
                   "HAProxy sending to the restarted instance A", timeout=WAIT)
        second = d.instances[1]
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(45) == 0
        output, _ = load.communicate(timeout=60)
        requests = int(re.search(r"(\d+) requests in", output).group(1))
        assert requests > 0 and "Non-2xx" not in output and "Socket errors" not in output, output
