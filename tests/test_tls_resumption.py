"""TLS session resumption with several workers: a client that reconnects
resumes its session whatever worker count (each client address is steered to
one worker: chatproxy.process.steering), with ``openssl s_client
-sess_out/-sess_in`` and Python's ``ssl``, over a real ``twistd`` master and
its workers on loopback; clients from many addresses still reach every
worker.  Where a client's address tells nothing (a plain listener, a
``haproxy:`` endpoint) connections spread by address and port.  Also the
steering programs themselves against a reuseport group."""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

from chatproxy.process.steering import attach, worker_for
from conftest import PKI, free_port, metric_samples, wait_for_port
from test_tls import http_over, make_config, tls_listener

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
RECONNECTS = 10


def _workers() -> int:
    """What ``workers = auto`` gives here (at least two workers are wanted: one CPU gets a file that sets 2)."""
    return os.cpu_count() or 1


def _start(proxy, upstream, pki: PKI) -> tuple[int, int]:
    """A TLS listener and an admin listener served by ``workers = auto`` (2 where there is one CPU)."""
    port, admin = free_port(), free_port()
    settings = "access_log = off" + ("\nworkers = 2" if _workers() < 2 else "")
    text = make_config(port, upstream.url, listener=tls_listener(pki), settings=settings,
                       extra=f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n")
    proxy.start(text, port=port, workers=None)
    wait_for_port(admin)
    deadline = time.monotonic() + 30
    while True:  # every worker ready
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the workers never became ready"
        time.sleep(0.1)
    return port, admin


def _s_client(port: int, version: str, pki: PKI, *args: str) -> str:
    """One ``openssl s_client`` connection that sends a request and reads the answer; its output."""
    assert OPENSSL is not None
    result = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", version, "-CAfile", str(pki.ca),
         "-servername", "localhost", "-ign_eof", *args],
        input="GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "HTTP/1.1 200" in result.stdout, result.stdout[-2000:]
    return result.stdout


@needs_openssl
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_reconnects_resume_every_time_with_workers_auto(proxy, upstream, pki, tmp_path, version):
    """With ``workers = auto`` (two workers or more), ``openssl s_client`` saves its session
    and reconnects 10 times, each time with the session of the connection before
    (-sess_in/-sess_out; TLS 1.3 tickets are used once): all 10 reconnects are "Reused", with TLS 1.2 (session IDs) and
    TLS 1.3 (tickets), and the workers count 10 resumed handshakes."""
    port, admin = _start(proxy, upstream, pki)
    session = tmp_path / "session-0.pem"
    assert "New, " in _s_client(port, version, pki, "-sess_out", str(session))
    resumed = 0
    for attempt in range(1, RECONNECTS + 1):
        following = tmp_path / f"session-{attempt}.pem"
        output = _s_client(port, version, pki, "-sess_in", str(session), "-sess_out", str(following))
        resumed += "Reused, " in output
        if following.exists():  # a TLS 1.3 reconnect gets new tickets; a TLS 1.2 one keeps its session
            session = following
    assert resumed == RECONNECTS, f"{resumed}/{RECONNECTS} reconnects resumed"
    counted = sum(value for labels, value in metric_samples(admin, "chatproxy_tls_handshakes_total")
                  if labels["resumed"] == "true")
    assert counted == RECONNECTS


def _python_client(pki: PKI) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    return context


def _connect(port: int, context: ssl.SSLContext, source: str, session: ssl.SSLSession | None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    try:
        return context.wrap_socket(raw, server_hostname="localhost", session=session)
    except BaseException:
        raw.close()
        raise


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_clients_from_many_addresses_reach_every_worker_and_each_resumes(proxy, upstream, pki, version):
    """Clients from 24 loopback addresses (127.0.0.2 ...) each connect, make a request and
    reconnect with their session: every reconnect resumes, and the handshakes were spread
    over every worker (the master's /metrics, by worker label)."""
    port, admin = _start(proxy, upstream, pki)
    context = _python_client(pki)
    context.minimum_version = context.maximum_version = version
    addresses = [f"127.0.0.{n}" for n in range(2, 26)]
    for source in addresses:
        with _connect(port, context, source, None) as first:
            assert http_over(first)[0] == 200
            session = first.session
        with _connect(port, context, source, session) as again:
            assert http_over(again)[0] == 200
            assert again.session_reused, source
    per_worker: collections.Counter[str] = collections.Counter()
    for labels, value in metric_samples(admin, "chatproxy_tls_handshakes_total"):
        per_worker[labels["worker"]] += int(value)
    workers = max(_workers(), 2)
    assert sum(per_worker.values()) == 2 * len(addresses)
    assert len(per_worker) == workers, per_worker
    expected = collections.Counter(str(worker_for(a, workers) + 1) for a in addresses)
    assert per_worker == collections.Counter({w: 2 * n for w, n in expected.items()})


@contextlib.contextmanager
def _steered_group(family: int, listen_on: str, client_ports: bool = False) -> Iterator[tuple[list[socket.socket], int]]:
    """Three SO_REUSEPORT listening sockets on one loopback port with the steering
    program for 3 workers attached: (the sockets, the port), closed afterwards."""
    group: list[socket.socket] = []
    try:
        for _ in range(3):
            sock = socket.socket(family, socket.SOCK_STREAM)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((listen_on, group[0].getsockname()[1] if len(group) > 1 else 0))
            sock.listen(16)
            sock.settimeout(5)
        attach(group[0], 3, client_ports=client_ports)
        yield group, group[0].getsockname()[1]
    finally:
        for sock in group:
            sock.close()


def _accepted_from(source: str, port: int, group: list[socket.socket], client_ports: bool) -> int:
    """Connect from ``source`` to ``port``; the index of the socket ``worker_for`` names,
    after that socket accepted the connection (times out if the kernel chose another)."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.bind((source, 0))
        client.connect(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
        chosen = worker_for(source, 3, client.getsockname()[1] if client_ports else None)
        accepted, _ = group[chosen].accept()
        accepted.close()
    return chosen


def test_the_steering_program_sends_each_address_to_its_socket():
    """The BPF program attached to a group of three SO_REUSEPORT sockets makes the kernel
    hand each connection to the socket ``worker_for`` names, from IPv4 and IPv6 clients
    (IPv4 ones on a dual-stack socket too), every time."""
    for family, listen_on, clients in (
        (socket.AF_INET, "127.0.0.1", [f"127.0.0.{n}" for n in range(2, 20)]),
        (socket.AF_INET6, "::", ["::1", *(f"127.0.0.{n}" for n in range(2, 12))]),
    ):
        with _steered_group(family, listen_on) as (group, port):
            for source in clients:
                for _ in range(2):
                    _accepted_from(source, port, group, client_ports=False)


def _requests_by_worker(admin: int) -> collections.Counter[str]:
    """Requests answered so far, by worker (the master's /metrics)."""
    counts: collections.Counter[str] = collections.Counter()
    for labels, value in metric_samples(admin, "chatproxy_requests_total"):
        counts[labels["worker"]] += int(value)
    return counts


def _one_request(port: int, context: ssl.SSLContext | None, proxy_header: bool = False) -> int:
    """One connection from 127.0.0.1 making one request (over TLS with ``context``,
    after a PROXY header naming a client at 203.0.113.7 with ``proxy_header``); its source port."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(10)
    try:
        raw.bind(("127.0.0.1", 0))
        source_port = raw.getsockname()[1]
        raw.connect(("127.0.0.1", port))
        if proxy_header:
            raw.sendall(f"PROXY TCP4 203.0.113.7 127.0.0.1 40000 {port}\r\n".encode())
        sock = context.wrap_socket(raw, server_hostname="localhost") if context is not None else raw
        with sock:
            assert http_over(sock)[0] == 200
    finally:
        raw.close()
    return source_port


def test_connections_spread_by_port_where_an_address_tells_nothing(proxy, upstream, pki):
    """With two workers or more, connections from one address (127.0.0.1) to a plain
    listener, or to a TLS listener behind a ``haproxy:`` endpoint (where every
    connection comes from the balancer), each go to the worker their address and
    port pick, so they reach every worker; on a TLS listener clients reach directly
    they all go to the one worker their address picks (so sessions resume)."""
    plain, direct, balanced, admin = free_port(), free_port(), free_port(), free_port()
    settings = "access_log = off" + ("\nworkers = 2" if _workers() < 2 else "")
    text = make_config(plain, upstream.url, settings=settings, extra=(
        f"[listen:direct]\nendpoint = tcp:{direct}:interface=127.0.0.1\n{tls_listener(pki)}\n\n"
        f"[listen:balanced]\nendpoint = haproxy:tcp:{balanced}:interface=127.0.0.1\n{tls_listener(pki)}\n\n"
        f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n"))
    proxy.start(text, port=plain, workers=None)
    wait_for_port(admin)
    wait_for_port(direct)
    wait_for_port(balanced)
    workers = max(_workers(), 2)
    context = _python_client(pki)
    for port, tls, proxied in ((plain, None, False), (balanced, context, True), (direct, context, False)):
        before = _requests_by_worker(admin)
        ports = [_one_request(port, tls, proxied) for _ in range(24)]
        served = _requests_by_worker(admin) - before
        if port == direct:
            assert served == {str(worker_for("127.0.0.1", workers) + 1): 24}
        else:
            expected = collections.Counter(str(worker_for("127.0.0.1", workers, p) + 1) for p in ports)
            assert served == expected
            assert len(served) == workers, served


def test_the_steering_program_with_client_ports_sends_each_connection_to_its_socket():
    """The program with ``client_ports`` makes the kernel hand each connection from one
    address to the socket ``worker_for(address, 3, source port)`` names, IPv4 (also on
    a dual-stack socket) and IPv6, and connections from one address reach every socket."""
    for family, listen_on, source in ((socket.AF_INET, "127.0.0.1", "127.0.0.1"),
                                      (socket.AF_INET6, "::", "::1"), (socket.AF_INET6, "::", "127.0.0.1")):
        with _steered_group(family, listen_on, client_ports=True) as (group, port):
            chosen = {_accepted_from(source, port, group, client_ports=True) for _ in range(30)}
        assert chosen == {0, 1, 2}
