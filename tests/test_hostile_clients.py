"""Hostile and careless clients against a real ``twistd``: every connection the
proxy ends releases its socket at once, on every listener kind; refused
answers end cleanly (no reset); upgrade requests chatproxy does not make keep
their bodies; TRACE and TRACK are refused; the listener's response headers go
on every answer, the proxy's own included."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import BIN, RecordingUpstream, free_port, metric_samples, stop_proxy, wait_for_port
from hostile import Outcome, Target, fd_count, send_and_read, wait_for

HSTS = "max-age=63072000; includeSubDomains"


def _config(port_endpoint: str, upstream: RecordingUpstream, *, pki=None, admin: int | None = None,
            extra: str = "") -> str:
    tls = f"tls = yes\ncertificate = {pki.cert}\nkey = {pki.key}\n" if pki is not None else ""
    admin_section = f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n\n" if admin else ""
    return (
        "[chatproxy]\naccess_log = off\nheader_timeout = 1s\nmax_body_bytes = 1k\nmax_url_bytes = 1k\n"
        "max_header_bytes = 4k\ndrain_timeout = 60s\n\n"
        f"{admin_section}"
        f"[listen:main]\nendpoint = {port_endpoint}\n{tls}"
        f"response_headers =\n    Strict-Transport-Security: {HSTS}\n    X-Content-Type-Options: nosniff\n\n"
        # No idle upstream connections are kept: every descriptor left over would be a client's.
        f"[upstream:app]\nservers = {upstream.url}\nmax_idle_connections = 0\n\n"
        f"[upstream:down]\nservers = http://127.0.0.1:{free_port()}\nconnect_timeout = 2s\n\n"
        "[route:app]\npath = /app\nupstream = app\n\n"
        "[route:down]\npath = /down\nupstream = down\n\n"
        f"{extra}"
    )


def _fill_headers() -> bytes:
    return b"".join(b"X-Fill-%d: %s\r\n" % (i, b"f" * 60) for i in range(90))


# (name, request, bytes sent after it, expected status, whether the proxy ends the connection)
TRIGGERS = [
    ("malformed path", b"GET /%2F HTTP/1.1\r\nHost: x\r\n\r\n", b"", 400, True),
    ("not HTTP", b"\x00\x01 garbage\r\n\r\n", b"", 400, True),
    ("silent until header_timeout", b"", b"", 408, True),
    ("body over max_body_bytes", b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", b"b" * 65536,
     413, True),
    ("target over max_url_bytes", b"GET /app/" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"", 414, True),
    ("head over max_header_bytes", b"GET /app HTTP/1.1\r\nHost: x\r\n" + _fill_headers() + b"\r\n", b"", 431, True),
    ("upgrade without a route", b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", b"", 404, True),
    ("upgrade not bridged", b"GET /app HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n", b"",
     200, True),
    ("TRACE", b"TRACE /app HTTP/1.1\r\nHost: x\r\nCookie: session=secret\r\n\r\n", b"", 405, False),
    ("upstream down", b"GET /down HTTP/1.1\r\nHost: x\r\n\r\n", b"", 502, False),
]


def _run_trigger(target: Target, request: bytes, more: bytes, status: int, proxy_ends: bool) -> Outcome:
    outcome = send_and_read(target, request, more=more, stop_when_complete=not proxy_ends)
    assert outcome.status == status, (request[:60], outcome)
    assert outcome.end == ("eof" if proxy_ends else "open"), (request[:60], outcome)
    assert outcome.header("Strict-Transport-Security") == HSTS, (request[:60], outcome)
    return outcome


def _settled(pid: int, baseline: int, admin: int | None) -> None:
    """The proxy is back to ``baseline`` descriptors and no client connection is counted."""
    wait_for(lambda: fd_count(pid) == baseline,
             message=f"the proxy holds {fd_count(pid)} descriptors, {baseline} before the clients")
    if admin is not None:
        assert metric_samples(admin, "chatproxy_client_connections") == [({}, 0.0)]


def _baseline(pid: int, admin: int | None) -> int:
    if admin is not None:
        metric_samples(admin, "chatproxy_client_connections")  # the admin site is set up
    time.sleep(0.3)
    return fd_count(pid)


@pytest.fixture
def app_upstream():
    """A recording upstream for these tests."""
    server = RecordingUpstream()
    yield server
    server.stop()


@pytest.mark.parametrize("kind", ["tcp", "tls", "unix", "haproxy", "haproxy-tls"])
def test_every_connection_the_proxy_ends_releases_its_socket(proxy, pki, app_upstream, tmp_path, kind):
    """On each listener kind, every way the proxy answers and ends a connection (400, 408,
    413 with the body still coming, 414, 431, an upgrade with no route, an upgrade it does not
    make, and the client closing after a 405 or 502) ends it cleanly, not with a reset, the
    answer carries the listener's response headers, and afterwards the process holds exactly the
    descriptors it held before and counts no client connection."""
    port, admin = free_port(), free_port()
    socket_path = str(tmp_path / "proxy.sock")
    endpoint = {"unix": f"unix:{socket_path}", "haproxy": f"haproxy:tcp:{port}:interface=127.0.0.1",
                "haproxy-tls": f"haproxy:tcp:{port}:interface=127.0.0.1"}.get(kind, f"tcp:{port}:interface=127.0.0.1")
    tls = kind.endswith("tls")
    process = proxy.start(_config(endpoint, app_upstream, pki=pki if tls else None, admin=admin), port=admin)
    if kind == "unix":
        wait_for(lambda: os.path.exists(socket_path))
    target = Target(port=port, unix=socket_path if kind == "unix" else None,
                    tls=pki.client_context() if tls else None, proxy_header=kind.startswith("haproxy"))
    pid = process.process.pid
    baseline = _baseline(pid, admin)
    for _round in range(2):
        for _name, request, more, status, ends in TRIGGERS:
            _run_trigger(target, request, more, status, ends)
    _settled(pid, baseline, admin)
    assert not any(r["path"] == "/app" and r["method"] == "TRACE" for r in app_upstream.requests)


def test_two_thousand_refused_tls_connections_leave_nothing_behind(proxy, pki, app_upstream):
    """2,000 TLS clients that each get an answer the proxy makes and closes on (400, 413, 431,
    404 for an upgrade) or that stay silent after the handshake until their 408, many at once:
    afterwards the process holds the descriptors it held before, the client-connection gauge
    is back to 0, memory has not grown with them, and SIGTERM ends the process at once (the
    drain has nothing to wait for)."""
    port, admin = free_port(), free_port()
    process = proxy.start(_config(f"tcp:{port}:interface=127.0.0.1", app_upstream, pki=pki, admin=admin),
                          port=admin)
    pid = process.process.pid
    target = Target(port=port, tls=pki.client_context())
    kinds = [t for t in TRIGGERS if t[0] in ("malformed path", "silent until header_timeout",
                                             "body over max_body_bytes", "head over max_header_bytes",
                                             "upgrade without a route")]
    baseline = _baseline(pid, admin)
    rss_before = _rss_kib(pid)
    jobs = [kinds[i % len(kinds)] for i in range(2000)]
    with ThreadPoolExecutor(max_workers=100) as pool:
        outcomes = list(pool.map(lambda job: _run_trigger(target, *job[1:]), jobs))
    assert len(outcomes) == 2000
    _settled(pid, baseline, admin)
    growth = _rss_kib(pid) - rss_before
    assert growth < 16 * 1024, f"RSS grew by {growth} KiB over 2,000 ended connections"
    started = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(20) == 0
    assert time.monotonic() - started < 5, "SIGTERM waited for connections that no longer exist"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_socket_activated_listener_releases_what_it_ends(tmp_path, app_upstream):
    """A `systemd:` listener (systemd-socket-activate passes the socket) ends the same refused
    and timed-out connections cleanly and releases each of them."""
    import shutil

    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-socket-activate (Debian package systemd) is missing; .ci/run installs it")
        pytest.skip("systemd-socket-activate is not installed")
    port = free_port()
    config = tmp_path / "chatproxy.ini"
    config.write_text("[chatproxy]\nworkers = 1\n" + _config("systemd:domain=INET:name=web", app_upstream)
                      .replace("[chatproxy]\n", ""))
    log = (tmp_path / "out.log").open("wb")
    process = subprocess.Popen([activate, "-l", f"127.0.0.1:{port}", "--fdname=web", str(BIN / "twistd"), "-n", "--pidfile=",
                                "chatproxy", "--config", str(config)], cwd=tmp_path, stdout=log,
                               stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        target = Target(port=port)
        wait_for_port(port)  # the activator listens, then starts chatproxy on the first connection
        _run_trigger(target, *TRIGGERS[0][1:])
        baseline = _baseline(process.pid, None)
        for _name, request, more, status, ends in TRIGGERS:
            _run_trigger(target, request, more, status, ends)
        _settled(process.pid, baseline, None)
    finally:
        stopped = stop_proxy(process)
        log.close()
    assert stopped is None, stopped + ":\n" + (tmp_path / "out.log").read_text(errors="replace")


def test_connections_on_a_listener_a_reload_removed_are_released(proxy, app_upstream, tmp_path):
    """An idle keep-alive connection on a listener that a reload removes is closed and its
    socket released; the listener that stays keeps serving."""
    import socket

    port, gone, admin = free_port(), free_port(), free_port()
    text = _config(f"tcp:{port}:interface=127.0.0.1", app_upstream, admin=admin)
    second = f"[listen:second]\nendpoint = tcp:{gone}:interface=127.0.0.1\n"
    process = proxy.start(text + second, port=admin)
    pid = process.process.pid
    baseline = _baseline(pid, admin)
    sock = socket.create_connection(("127.0.0.1", gone), timeout=10)
    sock.sendall(b"GET /app HTTP/1.1\r\nHost: x\r\n\r\n")
    from hostile import read_until_end

    assert read_until_end(sock, stop_when_complete=True).status == 200
    wait_for(lambda: fd_count(pid) > baseline)
    (tmp_path / "chatproxy.ini").write_text(text)
    process.process.send_signal(signal.SIGHUP)
    assert read_until_end(sock, stop_when_complete=False).end == "eof"
    sock.close()
    wait_for(lambda: "reload done" in process.output())
    _settled(pid, baseline - 1, admin)  # the removed listener's socket is gone too
    outcome = send_and_read(Target(port=port), b"GET /app HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert outcome.status == 200


def test_a_client_that_never_closes_is_cut_off_after_close_timeout(proxy, app_upstream):
    """A client that gets its 400 but keeps its end open (and keeps sending) is read and ignored,
    then cut off once ``close_timeout`` has passed: its socket does not stay open."""
    import socket

    port, admin = free_port(), free_port()
    text = _config(f"tcp:{port}:interface=127.0.0.1", app_upstream, admin=admin).replace(
        "drain_timeout = 60s", "drain_timeout = 60s\nclose_timeout = 3s")
    process = proxy.start(text, port=admin)
    pid = process.process.pid
    baseline = _baseline(pid, admin)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"GET /%2F HTTP/1.1\r\nHost: x\r\n\r\n")
        from hostile import read_until_end

        assert read_until_end(sock, stop_when_complete=True).status == 400
        assert sock.recv(65536) == b""  # the proxy's FIN: it half-closed, and reads on
        assert fd_count(pid) == baseline + 1  # still open: the client has not closed its end
        for _ in range(5):
            sock.sendall(b"more bytes the proxy reads and drops\r\n")  # no reset for these
            time.sleep(0.05)
        _settled(pid, baseline, admin)  # gone once close_timeout passed
    finally:
        sock.close()


# ---------------------------------------------------------------------------
# Upgrade requests chatproxy does not make


def _records(upstream: RecordingUpstream, path: str) -> list[dict]:
    return [r for r in upstream.requests if r["path"] == path]


def _header(record: dict, name: str) -> str | None:
    return next((v for k, v in record["headers"] if k.lower() == name.lower()), None)


BODY = b"chat message body: " + bytes(range(256)) * 8


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("upgrade, path", [("foo", "/app"), ("h2c", "/app"), ("websocket", "/ws")])
@pytest.mark.parametrize("split", [False, True])
def test_an_upgrade_request_not_bridged_keeps_its_body(proxy, app_upstream, framing, upgrade, path, split):
    """A POST asking for an upgrade chatproxy does not make (another protocol, or websocket on a
    POST) is forwarded as an ordinary request: the upstream receives the whole body, framed as
    the client framed it, and no Upgrade; the client gets the upstream's answer, and the
    connection ends after it.  Also when the body arrives after the head, in pieces."""
    port = free_port()
    extra = "[route:ws]\npath = /ws\nupstream = app\nwebsocket = tunnel\n"
    proxy.start(_config(f"tcp:{port}:interface=127.0.0.1", app_upstream, extra=extra).replace(
        "max_body_bytes = 1k", "max_body_bytes = 1m"), port=port)
    if framing == "length":
        framed, length = BODY, f"Content-Length: {len(BODY)}\r\n"
    else:
        framed, length = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (BODY[:100], BODY[100:])) + \
            b"0\r\n\r\n", "Transfer-Encoding: chunked\r\n"
    head = (f"POST {path}/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n"
            f"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n{length}\r\n").encode()
    target = Target(port=port)
    if split:
        import socket

        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(head)
            time.sleep(0.1)
            for i in range(0, len(framed), 300):
                sock.sendall(framed[i:i + 300])
                time.sleep(0.01)
            from hostile import read_until_end

            outcome = read_until_end(sock, stop_when_complete=False)
        finally:
            sock.close()
    else:
        outcome = send_and_read(target, head + framed)
    assert outcome.status == 200, outcome
    assert outcome.end == "eof" and outcome.header("Connection") == "close"
    (record,) = _records(app_upstream, f"{path}/echo")
    assert record["body_length"] == len(BODY)
    assert record["body_sha"] == __import__("hashlib").sha256(BODY).hexdigest()
    assert _header(record, "Upgrade") is None and _header(record, "HTTP2-Settings") is None
    assert "upgrade" not in (_header(record, "Connection") or "").lower()
    assert json.loads(outcome.data.partition(b"\r\n\r\n")[2])["body_length"] == len(BODY)


@pytest.mark.parametrize("framing", ["Content-Length: 5", "Transfer-Encoding: chunked"])
def test_a_websocket_handshake_with_a_body_is_refused_before_the_upstream(proxy, app_upstream, framing):
    """A WebSocket handshake (a GET on a WebSocket route) that carries a body is answered 400
    by the proxy: nothing of it reaches the upstream."""
    port = free_port()
    extra = "[route:ws]\npath = /ws\nupstream = app\nwebsocket = tunnel\n"
    proxy.start(_config(f"tcp:{port}:interface=127.0.0.1", app_upstream, extra=extra), port=port)
    body = b"hello" if "Length" in framing else b"5\r\nhello\r\n0\r\n\r\n"
    request = (f"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{framing}\r\n\r\n"
               ).encode() + body
    outcome = send_and_read(Target(port=port), request)
    assert outcome.status == 400 and outcome.end == "eof"
    assert app_upstream.requests == []


# ---------------------------------------------------------------------------
# TRACE, TRACK, CONNECT


def test_trace_is_answered_405_and_never_forwarded(proxy, app_upstream):
    """TRACE gets 405 with an Allow header from the proxy on a route without a methods list
    (and where no route matches); the upstream never sees it (nor the client's cookie); the
    connection stays usable."""
    port = free_port()
    proxy.start(_config(f"tcp:{port}:interface=127.0.0.1", app_upstream), port=port)
    import socket

    from hostile import read_until_end

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for path in ("/app/x", "/nowhere"):
            sock.sendall(f"TRACE {path} HTTP/1.1\r\nHost: x\r\nCookie: session=secret\r\n\r\n".encode())
            outcome = read_until_end(sock, stop_when_complete=True)
            assert outcome.status == 405 and outcome.end == "open", outcome
            assert "GET" in (outcome.header("Allow") or "") and "TRACE" not in (outcome.header("Allow") or "")
        sock.sendall(b"GET /app/after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until_end(sock, stop_when_complete=True).status == 200
    assert [r["method"] for r in app_upstream.requests] == ["GET"]


@pytest.mark.parametrize("request_bytes, status", [
    (b"TRACK /app HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GET /app HTTP/1.1\r\nHost: x\r\n\r\nTRACK /app HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"\x00\x01 /app HTTP/1.1\r\nHost: x\r\n\r\n", 400),
])
def test_methods_llhttp_does_not_know(proxy, app_upstream, request_bytes, status):
    """TRACK (which llhttp has no name for) is answered 405 like TRACE, another unknown method
    name 501, a request line that starts with no method name at all 400; each after the
    answers to the requests before it, then the connection is closed."""
    port = free_port()
    proxy.start(_config(f"tcp:{port}:interface=127.0.0.1", app_upstream), port=port)
    outcome = send_and_read(Target(port=port), request_bytes)
    statuses = [int(part[:3]) for part in outcome.data.split(b"HTTP/1.1 ")[1:]]
    assert statuses[-1] == status and outcome.end == "eof", outcome
    assert len(statuses) == request_bytes.count(b"HTTP/1.1\r\n")
    assert all(r["method"] == "GET" for r in app_upstream.requests)


def test_a_route_naming_trace_forwards_it(proxy, app_upstream):
    """A route whose ``methods`` names TRACE forwards it (the operator asked for it)."""
    port = free_port()
    extra = "[route:trace]\npath = /debug\nmethods = GET, TRACE\nupstream = app\n"
    proxy.start(_config(f"tcp:{port}:interface=127.0.0.1", app_upstream, extra=extra), port=port)
    outcome = send_and_read(Target(port=port), b"TRACE /debug HTTP/1.1\r\nHost: x\r\n\r\n", stop_when_complete=True)
    assert outcome.status == 200
    assert [r["method"] for r in app_upstream.requests] == ["TRACE"]


def test_connect_is_refused(proxy, app_upstream):
    """CONNECT (a tunnel request to another host) is answered 400 and the connection closed."""
    port = free_port()
    proxy.start(_config(f"tcp:{port}:interface=127.0.0.1", app_upstream), port=port)
    outcome = send_and_read(Target(port=port), b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
    assert outcome.status in (400, 405) and outcome.end == "eof"
    assert app_upstream.requests == []


# ---------------------------------------------------------------------------
# The listener's response headers on the proxy's own answers


def test_every_kind_of_answer_carries_the_listeners_response_headers(proxy, pki, app_upstream):
    """With ``response_headers`` on a TLS listener, HSTS is on a proxied 200, a 404 (no
    route), a 403 (a filter), a 429 (rate limit), a 502 (upstream down), the 101 of a
    WebSocket tunnel and of a bridged session, and a bridged handshake the upstream refused."""
    from ws_peers import WsUpstream

    ws = WsUpstream()
    try:
        port = free_port()
        extra = (
            "[filter:deny]\nuse = ip_allowlist\nallow = 192.0.2.0/24\n\n"
            "[filter:slow]\nuse = rate_limit\nrate = 0.01\nburst = 1\n\n"
            "[route:denied]\npath = /denied\nupstream = app\nfilters = deny\n\n"
            "[route:limited]\npath = /limited\nupstream = app\nfilters = slow\n\n"
            f"[upstream:ws]\nservers = http://127.0.0.1:{ws.port}\n\n"
            "[route:tunnel]\npath = /tunnel\nupstream = ws\nwebsocket = tunnel\n\n"
            "[route:bridge]\npath = /bridge\nupstream = ws\nwebsocket = yes\n"
        )
        proxy.start(_config(f"tcp:{port}:interface=127.0.0.1", app_upstream, pki=pki, extra=extra), port=port)
        target = Target(port=port, tls=pki.client_context())

        def get(path: str, extra_headers: str = "") -> Outcome:
            return send_and_read(target, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra_headers}\r\n".encode(),
                                 stop_when_complete=True)

        answers = {
            200: get("/app/echo"),
            404: get("/nowhere"),
            403: get("/denied"),
            502: get("/down"),
        }
        get("/limited")
        answers[429] = get("/limited")
        def handshake(path: str) -> Outcome:
            sock = target.connect()
            try:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                             "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(4096)
                    assert chunk, data
                    data += chunk
                return Outcome(data, "open")
            finally:
                sock.close()

        answers[101] = handshake("/tunnel")
        answers["101 bridge"] = handshake("/bridge")
        answers["403 bridge"] = handshake("/bridge/refuse/403")  # the upstream refuses: its status
        for status, outcome in answers.items():
            status = int(str(status)[:3])
            assert outcome.status == status, (status, outcome)
            assert outcome.header("Strict-Transport-Security") == HSTS, (status, outcome)
            assert outcome.header("X-Content-Type-Options") == "nosniff", (status, outcome)
    finally:
        ws.stop()
