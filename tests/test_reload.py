"""SIGHUP reloads the configuration and certificates of a running twistd without
dropping what runs: requests under load all succeed, WebSocket sessions on
unchanged routes stay open, sessions on removed routes get 1012, listeners
are opened and closed, a bad configuration changes nothing."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import threading
import time
from typing import Any

import pytest

from conftest import free_port, http_get, metric_samples, wait_for_port
from ws_peers import WsUpstream


@pytest.fixture
def ws_upstream():
    """An echoing WebSocket upstream."""
    server = WsUpstream()
    yield server
    server.stop()


def _metric(admin_port: int, name: str, **labels: str) -> float:
    """One sample from the admin listener's /metrics (0 when absent)."""
    return next((value for found, value in metric_samples(admin_port, name)
                 if all(found.get(k) == v for k, v in labels.items())), 0.0)


def _reload_and_wait(process: Any, admin_port: int, result: str = "success",
                     counter: str = "chatproxy_config_reloads_total") -> None:
    """Send SIGHUP and wait (bounded) until the reload counter for ``result`` goes up (with
    several workers: the master's, which counts a reload once every worker is done)."""
    before = _metric(admin_port, counter, result=result)
    process.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _metric(admin_port, counter, result=result) > before:
            return
        time.sleep(0.05)
    raise AssertionError(f"no reload with result {result} within 20 s:\n" + process.output()[-3000:])


def _wait_for_workers(admin: int, workers: int) -> str:
    """Wait (bounded) until the admin listener answers and, with several workers, every worker
    does; returns the name of the counter that counts whole reloads (the master's with workers)."""
    wait_for_port(admin)
    deadline = time.monotonic() + 20
    while workers > 1 and _metric(admin, "chatproxy_workers", state="answering") < workers:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    return "chatproxy_config_reloads_total" if workers == 1 else "chatproxy_master_reloads_total"


def _config(*, main: int, admin: int, app: str, ws: int, extra_listener: int | None = None,
            old_chat: bool = True, new_route: bool = False, access_log: str = "off", window: str = "2") -> str:
    """The configuration the reload tests switch between."""
    text = (
        f"[chatproxy]\naccess_log = {access_log}\nreload_close_window = {window}\n\n"
        f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n\n"
        f"[listen:main]\nendpoint = tcp:{main}:interface=127.0.0.1\n\n"
        f"[upstream:app]\nservers = {app}\n\n"
        f"[upstream:ws]\nservers = http://127.0.0.1:{ws}\n\n"
        "[route:chat]\npath = /chat\nupstream = ws\nwebsocket = yes\n\n"
    )
    if old_chat:
        text += "[route:old-chat]\npath = /old-chat\nupstream = ws\nwebsocket = yes\n\n"
    if new_route:
        text += "[route:new]\npath = /new\nupstream = app\n\n"
    if extra_listener is not None:
        text += f"[listen:second]\nendpoint = tcp:{extra_listener}:interface=127.0.0.1\n\n"
    text += "[route:all]\npath = /\nupstream = app\n"
    return text


class _Load:
    """Requests in a loop from several threads until stopped: keep-alive
    connections and a new connection per request; every failure is kept."""

    def __init__(self, port: int, keep_alive: int = 3, fresh: int = 2) -> None:
        self.port = port
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._keep_alive, daemon=True) for _ in range(keep_alive)]
        self.threads += [threading.Thread(target=self._fresh, daemon=True) for _ in range(fresh)]

    def __enter__(self) -> _Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(30)

    def _record(self, status: int, body: bytes) -> None:
        with self._lock:
            if status == 200 and b'"path": "/load' in body:
                self.done += 1
            else:
                self.failures.append(f"{status} {body[:80]!r}")

    def _keep_alive(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                conn.request("GET", f"/load/{n}")
                response = conn.getresponse()
                self._record(response.status, response.read())
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            except Exception as e:  # a reset, a refused connection, a timeout
                with self._lock:
                    self.failures.append(f"keep-alive: {e!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def _fresh(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                status, body = http_get(self.port, f"/load/fresh/{n}")
                self._record(status, body)
            except Exception as e:
                with self._lock:
                    self.failures.append(f"new connection: {e!r}")


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_under_load_keeps_requests_and_sessions_on_unchanged_routes(proxy, upstream, ws_upstream, workers):
    """While requests run from several threads (keep-alive and new connections) and WebSocket
    sessions are open, two reloads add a route and a listener, remove a route, then remove the
    listener again: no request fails, sessions on the unchanged route still exchange messages,
    sessions on the removed route end with 1012, the new route and listener serve, and the
    removed listener refuses connections; with one process and with a master and two workers."""
    from websockets.sync.client import connect

    main, admin, second = free_port(), free_port(), free_port()
    config = proxy.write(_config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port))
    process = proxy.start(configs=[config], port=main, workers=workers)
    counter = _wait_for_workers(admin, workers)
    with contextlib.ExitStack() as stack:
        kept = [stack.enter_context(connect(f"ws://127.0.0.1:{main}/chat?sid=k{i}", open_timeout=10))
                for i in range(4)]
        doomed = [stack.enter_context(connect(f"ws://127.0.0.1:{main}/old-chat?sid=d{i}", open_timeout=10))
                  for i in range(4)]
        for session in kept + doomed:
            session.send("before")
            assert session.recv(timeout=10) == "before"
        assert http_get(main, "/new")[1].find(b'"path": "/new"') >= 0  # served by route "all" for now
        with _Load(main) as load:
            deadline = time.monotonic() + 20
            while load.done < 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            config.write_text(_config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port,
                                      extra_listener=second, old_chat=False, new_route=True))
            _reload_and_wait(process, admin, counter=counter)
            during = load.done
            wait_for_port(second)
            assert http_get(second, "/via-second")[0] == 200
            config.write_text(_config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port,
                                      old_chat=False, new_route=True))
            _reload_and_wait(process, admin, counter=counter)
            deadline = time.monotonic() + 20
            while load.done < during + 200 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert load.failures == [], load.failures[:10]
        assert load.done >= during + 200, "the load did not keep running through the reloads"
        for i, session in enumerate(kept):
            session.send(f"after {i}")
            assert session.recv(timeout=10) == f"after {i}"
        for session in doomed:
            with pytest.raises(Exception):
                while True:
                    session.recv(timeout=15)
            assert session.close_code == 1012
        refused = False
        try:
            socket.create_connection(("127.0.0.1", second), timeout=5).close()
        except OSError:
            refused = True
        assert refused, "the removed listener still accepts connections"
        status, body = http_get(main, "/new/x")
        assert status == 200 and b'"path": "/new/x"' in body
        assert _metric(admin, counter, result="failure") == 0
        assert "reload done" in process.output()


def test_a_configuration_that_fails_validation_changes_nothing(proxy, upstream, ws_upstream, tmp_path):
    """A reload whose files do not validate is logged with file, section and option and counted
    as a failure; the old configuration keeps serving (its routes, its sessions); fixing the file
    and reloading again applies it."""
    from websockets.sync.client import connect

    main, admin = free_port(), free_port()
    config = proxy.write(_config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port))
    process = proxy.start(configs=[config], port=main)
    wait_for_port(admin)
    with connect(f"ws://127.0.0.1:{main}/old-chat?sid=x", open_timeout=10) as session:
        broken = _config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port, old_chat=False,
                         new_route=True).replace("[route:new]\npath = /new\n", "[route:new]\npath = /new\nbogus = 1\n")
        config.write_text(broken)
        _reload_and_wait(process, admin, result="failure")
        assert _metric(admin, "chatproxy_config_last_reload_successful") == 0
        output = process.output()
        assert "reload refused" in output and f"{config} [route:new] bogus" in output
        session.send("still here")
        assert session.recv(timeout=10) == "still here"
        status, body = http_get(main, "/new/y")
        assert status == 200  # still routed by "all": the broken file's route is not in force
        config.write_text(broken.replace("bogus = 1\n", "rewrite_path = /rewritten\n"))
        _reload_and_wait(process, admin)
        assert _metric(admin, "chatproxy_config_last_reload_successful") == 1
        status, body = http_get(main, "/new/y")
        assert status == 200 and b'"path": "/rewritten"' in body
        with pytest.raises(Exception):
            while True:
                session.recv(timeout=15)
        assert session.close_code == 1012


def test_a_listener_that_cannot_open_refuses_the_whole_reload(proxy, upstream, ws_upstream):
    """A new listener on a port already in use makes the reload fail as a whole: the other
    changes of that file (a new route) are not applied and the running listeners keep serving."""
    main, admin = free_port(), free_port()
    config = proxy.write(_config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port))
    process = proxy.start(configs=[config], port=main)
    wait_for_port(admin)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config.write_text(_config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port,
                                  extra_listener=busy, new_route=True).replace("[route:new]\npath = /new\n",
                                                                               "[route:new]\npath = /new\n"
                                                                               "rewrite_path = /rewritten\n"))
        _reload_and_wait(process, admin, result="failure")
    assert "[listen:second]: cannot listen on" in process.output()
    status, body = http_get(main, "/new/z")
    assert status == 200 and b'"path": "/new/z"' in body


def test_reload_rereads_certificates_and_reopens_the_access_log(proxy, upstream, pki, tmp_path):
    """After the certificate files are replaced, SIGHUP makes new TLS connections get the new
    certificate while a connection opened before keeps working; a renamed (rotated) access log
    is reopened at its configured path; failed TLS handshakes are counted per listener."""
    main, admin = free_port(), free_port()
    cert, key = tmp_path / "served.crt", tmp_path / "served.key"
    shutil.copy(pki.cert, cert)
    shutil.copy(pki.key, key)
    access_log = tmp_path / "access.log"
    text = (
        f"[chatproxy]\naccess_log = {access_log}\n\n[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n\n"
        f"[listen:main]\nendpoint = tcp:{main}:interface=127.0.0.1\ntls = yes\ncertificate = {cert}\nkey = {key}\n\n"
        f"[upstream:app]\nservers = {upstream.url}\n\n[route:all]\npath = /\nupstream = app\n"
    )
    process = proxy.start(text, port=main)
    wait_for_port(admin)

    def subject() -> str:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", main), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                peer = tls.getpeercert()
                return dict(item[0] for item in peer["subject"])["commonName"]

    assert subject() == "localhost"
    early = http.client.HTTPSConnection("localhost", main, timeout=10, context=pki.client_context())
    early.request("GET", "/before")
    assert early.getresponse().read()
    shutil.copy(pki.chat_cert, cert)
    shutil.copy(pki.chat_key, key)
    deadline = time.monotonic() + 10
    while not access_log.exists() or b"/before" not in access_log.read_bytes():
        assert time.monotonic() < deadline, "the access log never got the first request"
        time.sleep(0.05)
    access_log.rename(tmp_path / "access.log.1")
    _reload_and_wait(process, admin)
    assert subject() == "chat.example.test"
    early.request("GET", "/after-on-old-connection")
    assert early.getresponse().status == 200
    early.close()
    deadline = time.monotonic() + 10
    while not access_log.exists() or b"/after-on-old-connection" not in access_log.read_bytes():
        assert time.monotonic() < deadline, "the access log was not reopened at its path"
        time.sleep(0.05)
    assert b"/after" not in (tmp_path / "access.log.1").read_bytes()
    with socket.create_connection(("127.0.0.1", main), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to a TLS listener
        raw.settimeout(10)
        while raw.recv(4096):
            pass
    deadline = time.monotonic() + 10
    while _metric(admin, "chatproxy_tls_handshake_failures_total", listener="main") < 1:
        assert time.monotonic() < deadline, "the failed handshake was not counted"
        time.sleep(0.05)


def test_an_access_log_that_cannot_be_reopened_does_not_block_the_reload(proxy, upstream, ws_upstream, tmp_path):
    """If the access log path cannot be opened again at reload (rotation left something this
    user cannot write), the reload still applies, with a warning, and requests are still logged
    to the file that was open."""
    main, admin = free_port(), free_port()
    access_log = tmp_path / "access.log"
    config = proxy.write(_config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port,
                                 access_log=str(access_log)))
    process = proxy.start(configs=[config], port=main)
    wait_for_port(admin)
    assert http_get(main, "/first")[0] == 200
    access_log.rename(tmp_path / "rotated.log")
    access_log.symlink_to(tmp_path / "missing-directory" / "access.log")  # cannot be opened
    config.write_text(_config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port,
                              access_log=str(access_log), new_route=True))
    _reload_and_wait(process, admin)
    assert "cannot reopen the access log" in process.output()
    status, body = http_get(main, "/new/applied")
    assert status == 200
    deadline = time.monotonic() + 10
    while b"/new/applied" not in (tmp_path / "rotated.log").read_bytes():
        assert time.monotonic() < deadline, "the request was not logged to the file still open"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_endpoint_written_differently_keeps_its_socket(proxy, upstream, ws_upstream, workers):
    """Rewriting a listener's endpoint in another form for the same address (`tcp:P:...` to
    `tcp:port=P:...`) keeps its socket: the reload succeeds and an open WebSocket session on it
    stays open, with one process and with workers."""
    from websockets.sync.client import connect

    main, admin = free_port(), free_port()
    text = _config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port)
    config = proxy.write(text)
    process = proxy.start(configs=[config], port=main, workers=workers)
    counter = _wait_for_workers(admin, workers)
    with connect(f"ws://127.0.0.1:{main}/chat?sid=kept", open_timeout=10) as session:
        config.write_text(text.replace(f"endpoint = tcp:{main}:interface=127.0.0.1",
                                       f"endpoint = tcp:port={main}:interface=127.0.0.1"))
        _reload_and_wait(process, admin, counter=counter)
        session.send("still")
        assert session.recv(timeout=10) == "still"
    assert http_get(main, "/after")[0] == 200
    assert _metric(admin, counter, result="failure") == 0


def _wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("wrk (Debian package wrk) is missing; .ci/run installs it")
        pytest.skip("wrk is not installed (Debian package wrk)")
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_wrk_sees_no_error_across_reloads(proxy, upstream, ws_upstream, workers):
    """wrk drives keep-alive load while the configuration is reloaded three times (a route
    added, changed, removed): wrk reports no socket error (connect, read, write, timeout) and
    no non-2xx response."""
    import subprocess

    main, admin = free_port(), free_port()
    base = _config(main=main, admin=admin, app=upstream.url, ws=ws_upstream.port)
    config = proxy.write(base)
    process = proxy.start(configs=[config], port=main, workers=workers)
    counter = _wait_for_workers(admin, workers)
    load = subprocess.Popen([_wrk(), "-t", "1", "-c", "16", "-d", "8s", "--latency", f"http://127.0.0.1:{main}/load"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1)
        for extra in ("[route:new]\npath = /new\nupstream = app\n",
                      "[route:new]\npath = /new\nupstream = app\nrewrite_path = /changed\n", ""):
            config.write_text(base + "\n" + extra)
            _reload_and_wait(process, admin, counter=counter)
            time.sleep(0.5)
        output, _ = load.communicate(timeout=30)
    finally:
        if load.poll() is None:
            load.kill()
    assert "requests in" in output, output
    assert "Socket errors" not in output, output
    assert "Non-2xx or 3xx responses" not in output, output
    assert _metric(admin, counter, result="success") == 3
