"""HTTP/2 to clients against a real ``twistd``: ALPN, the same routes,
filters, limits and WebSocket bridging as HTTP/1.1, header mapping, flow
control, the protections HTTP/2 needs, drain and reload.  Clients: curl,
nghttp and h2load (Debian's curl and nghttp2-client), and an ``h2`` client
(tests/h2peers.py) for what they will not do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import h2.errors
import h2.settings
import pytest
from hyperframe.frame import (ContinuationFrame, HeadersFrame, PingFrame, PriorityFrame, RstStreamFrame, SettingsFrame,
                              WindowUpdateFrame)

from conftest import RecordingUpstream, free_port, metric_samples, require_tool
from h2peers import H2Client, StreamResult, masked_frame, unframe
from hostile import fd_count, wait_for
from ws_peers import WsUpstream


def _tool(name: str) -> str:
    return require_tool(name, "nghttp2-client" if name in ("nghttp", "h2load") else name)


class Env:
    """A TLS listener (h2 and http/1.1) in front of a recording upstream and a WebSocket upstream."""

    def __init__(self, proxy, pki, tmp_path: Path, settings: str = "", listener: str = "", extra: str = "") -> None:
        self.pki = pki
        self.upstream = RecordingUpstream()
        self.ws = WsUpstream()
        self.port, self.admin = free_port(), free_port()
        self.config_text = (
            f"[chatproxy]\naccess_log = {tmp_path / 'access.log'}\naccess_log_format = json\n{settings}\n"
            f"[admin]\nendpoint = tcp:{self.admin}:interface=127.0.0.1\n\n"
            f"[listen:main]\nendpoint = tcp:{self.port}:interface=127.0.0.1\ntls = yes\n"
            f"certificate = {pki.cert}\nkey = {pki.key}\n{listener}\n"
            "response_headers = Strict-Transport-Security: max-age=60\n\n"
            f"[upstream:app]\nservers = {self.upstream.url}\n\n"
            f"[upstream:ws]\nservers = http://127.0.0.1:{self.ws.port}\n\n"
            "[filter:local-only]\nuse = ip_allowlist\nallow = 192.0.2.0/24\n\n"
            "[route:app]\npath = /\nupstream = app\n\n"
            "[route:denied]\npath = /denied\nupstream = app\nfilters = local-only\n\n"
            "[route:bridge]\npath = /chat\nupstream = ws\nwebsocket = yes\n\n"
            "[route:tunnel]\npath = /tunnel\nupstream = ws\nwebsocket = tunnel\n\n"
            "[route:readonly]\npath = /readonly\nupstream = app\nmethods = GET\nrewrite_path = /ro\n\n"
            f"{extra}"
        )
        self.access_log = tmp_path / "access.log"
        self.process = proxy.start(self.config_text, port=self.port)

    def client(self, **kwargs) -> H2Client:
        """A new HTTP/2 connection."""
        return H2Client(self.port, self.pki.ca, **kwargs)

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """curl with the test CA against the listener."""
        return subprocess.run([_tool("curl"), "-s", "--cacert", str(self.pki.ca), "--max-time", "20", *args],
                              capture_output=True, text=True, timeout=30)

    def url(self, path: str) -> str:
        """The listener's https URL for ``path``."""
        return f"https://localhost:{self.port}{path}"

    def stop(self) -> None:
        """Stop the upstreams."""
        self.upstream.stop()
        self.ws.stop()


@pytest.fixture
def env(proxy, pki, tmp_path):
    """A proxy serving HTTP/2 and HTTP/1.1 on one TLS listener."""
    environment = Env(proxy, pki, tmp_path, settings="idle_timeout = 30s")
    yield environment
    environment.stop()


def _header(record: dict, name: str) -> str | None:
    return next((v for k, v in record["headers"] if k.lower() == name.lower()), None)


# ---------------------------------------------------------------------------
# ALPN and the routes


def test_alpn_offers_h2_then_http11(env, proxy, pki, tmp_path):
    """curl gets HTTP/2 when it offers h2 and HTTP/1.1 when it offers only that; openssl sees h2
    chosen from 'h2,http/1.1'; a listener with http2 = no negotiates http/1.1."""
    result = env.curl("-o", "/dev/null", "-w", "%{http_version}", "--http2", env.url("/echo"))
    assert result.stdout == "2"
    result = env.curl("-o", "/dev/null", "-w", "%{http_version}", "--http1.1", env.url("/echo"))
    assert result.stdout == "1.1"
    openssl = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{env.port}", "-alpn", "h2,http/1.1",
                              "-servername", "localhost"], input="", capture_output=True, text=True, timeout=30)
    assert "ALPN protocol: h2" in openssl.stdout
    other = Env(proxy, pki, tmp_path, listener="http2 = no")
    try:
        result = other.curl("-o", "/dev/null", "-w", "%{http_version}", "--http2", other.url("/echo"))
        assert result.stdout == "1.1"
    finally:
        other.stop()


def test_requests_reach_the_upstream_as_http11_with_the_same_rules(env):
    """A GET over HTTP/2 reaches the upstream as HTTP/1.1 with Host from :authority, the
    forwarding headers, the cookie crumbs joined into one Cookie; the response comes back
    with the listener's response headers; the access log says HTTP/2 and the requests
    metric counts it as h2."""
    client = env.client()
    try:
        result = client.get("/echo?q=1", headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-custom", b"yes")])
    finally:
        client.close()
    assert result.status == 200 and result.header(b"strict-transport-security") == b"max-age=60"
    (record,) = env.upstream.requests
    assert record["version"] == "HTTP/1.1" and record["path"] == "/echo?q=1"
    assert _header(record, "Host") == "localhost"
    assert _header(record, "Cookie") == "a=1; b=2" and _header(record, "X-Custom") == "yes"
    assert _header(record, "X-Forwarded-Proto") == "https" and _header(record, "X-Forwarded-For") == "127.0.0.1"
    line = json.loads(wait_for(lambda: env.access_log.exists() and env.access_log.read_text().strip()).splitlines()[-1])
    assert line["version"] == "2" and line["target"] == "/echo?q=1"
    samples = metric_samples(env.admin, "chatproxy_requests_total")
    assert any(labels.get("protocol") == "h2" and labels.get("status") == "200" for labels, _ in samples)


def test_every_kind_of_answer_over_h2(env):
    """403 from a filter, 405 for TRACE, HEAD without a body, a chunked upstream response, a 5 MB body streamed, a POST body
    with and without content-length: all as on HTTP/1.1."""
    client = env.client()
    try:
        assert client.get("/denied/x").status == 403
        assert client.get("/x", method="TRACE").status == 405
        head = client.get("/bytes?n=1000", method="HEAD")
        assert head.status == 200 and head.data == b"" and head.header(b"content-length") == b"1000"
        chunked = client.get("/chunked?n=10000&parts=7")
        assert chunked.status == 200 and len(chunked.data) == 10000
        big = client.get("/bytes?n=5000000")
        assert big.status == 200 and len(big.data) == 5000000
        body = os.urandom(100000)
        posted = client.get("/echo", method="POST", body=body, headers=[(b"content-length", b"100000")])
        unframed = client.get("/echo", method="POST", body=body)
    finally:
        client.close()
    for result in (posted, unframed):
        assert result.status == 200
        assert json.loads(result.data)["body_length"] == 100000
    methods = [(r["method"], _header(r, "Transfer-Encoding"), _header(r, "Content-Length")) for r in env.upstream.requests
               if r["method"] == "POST"]
    assert methods == [("POST", None, "100000"), ("POST", "chunked", None)]


def test_curl_and_nghttp_against_the_routes(env, tmp_path):
    """Independent clients over HTTP/2: curl gets the upstream's answer on a plain route (path
    rewritten by a route too), the proxy's own 403 from a filter and 405 for TRACE;
    nghttp fetches a body whole and posts one that reaches the upstream whole."""
    def code(*args: str) -> str:
        return env.curl("-o", "/dev/null", "-w", "%{http_version} %{http_code}", "--http2", *args).stdout

    assert code(env.url("/echo")) == "2 200"
    assert code(env.url("/denied")) == "2 403"
    assert code("-X", "TRACE", env.url("/echo")) == "2 405"
    assert code(env.url("/readonly/x")) == "2 200"
    assert env.upstream.requests[-1]["path"] == "/ro"  # rewrite_path replaces the whole path
    nghttp = subprocess.run([_tool("nghttp"), env.url("/bytes?n=20000")], capture_output=True, timeout=60)
    assert nghttp.returncode == 0 and len(nghttp.stdout) == 20000, nghttp.stderr
    body = tmp_path / "body"
    body.write_bytes(os.urandom(50000))
    posted = subprocess.run([_tool("nghttp"), "-d", str(body), env.url("/echo")], capture_output=True, text=True,
                            timeout=60)
    assert posted.returncode == 0, posted.stderr
    assert json.loads(posted.stdout)["body_length"] == 50000


def test_the_waf_inspects_h2_requests_and_their_bodies(proxy, pki, tmp_path):
    """The waf (ModSecurity with the CRS) on a route refuses, over HTTP/2, SQL injection in the
    query and in a JSON body sent without content-length (403, nothing reaches the upstream),
    and passes a benign JSON chat message; with inspect_responses = yes, a page leaking a
    MySQL error is replaced by a 403 and an ordinary page passes."""
    environment = Env(proxy, pki, tmp_path, extra="[filter:firewall]\nuse = waf\n\n"
                                                  "[route:guarded]\npath = /guarded\nupstream = app\nfilters = firewall\n"
                                                  "[filter:leaks]\nuse = waf\ninspect_responses = yes\n\n"
                                                  "[route:pages]\npath = /page\nupstream = app\nfilters = leaks\n")
    client = environment.client()
    try:
        assert client.get("/guarded/x?q=" + "%27%20or%20%271%27%3D%271%27%20--").status == 403
        json_type = [(b"content-type", b"application/json")]
        attack = json.dumps({"message": "1' UNION SELECT password FROM users --"}).encode()
        assert client.get("/guarded/echo", method="POST", body=attack, headers=json_type).status == 403
        benign = json.dumps({"message": "Hi, I'd like to check order 4512 please"}).encode()
        assert client.get("/guarded/echo", method="POST", body=benign, headers=json_type).status == 200
        leak = client.get("/page?leak=sql&chunked=1")
        assert leak.status == 403 and b"SQL" not in leak.data
        page = client.get("/page?text=hello")
        assert page.status == 200 and page.data == b"hello"
    finally:
        client.close()
        environment.stop()
    assert [r["method"] for r in environment.upstream.requests] == ["POST", "GET", "GET"]


# ---------------------------------------------------------------------------
# Header mapping


@pytest.mark.parametrize("headers, why", [
    ([(b"X-Upper", b"1")], "upper-case name"),
    ([(b"connection", b"keep-alive")], "connection-specific"),
    ([(b"transfer-encoding", b"chunked")], "connection-specific"),
    ([(b"upgrade", b"foo")], "connection-specific"),
    ([(b"te", b"gzip")], "TE other than trailers"),
    ([(b"host", b"other.example")], "Host naming another authority"),
    ([(b"x-bad", b"a\r\nb")], "a CR LF in a value"),
])
def test_malformed_requests_get_a_stream_error_and_the_connection_lives(env, headers, why):
    """A malformed header block is refused with RST_STREAM (PROTOCOL_ERROR), nothing reaches the
    upstream, and the next request on the same connection is served."""
    client = env.client()
    try:
        bad = client.get("/echo", headers=headers)
        assert bad.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR, why
        assert client.get("/echo").status == 200
    finally:
        client.close()
    assert len(env.upstream.requests) == 1


@pytest.mark.parametrize("body", [b"x" * 20, b"x" * 5], ids=["longer", "shorter"])
def test_content_length_must_match_the_data(env, body):
    """A body longer or shorter than its content-length is malformed: h2 makes it a connection
    error (GOAWAY, PROTOCOL_ERROR); nothing reaches the upstream as a whole request, and
    another connection is served."""
    client = env.client()
    try:
        stream_id = client.request("/echo", method="POST", body=body, headers=[(b"content-length", b"10")])
        client.until(lambda: client.goaway is not None or client.closed or client.streams[stream_id].reset)
        assert client.streams[stream_id].status == 0
        if client.goaway is not None:
            assert client.goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    finally:
        client.close()
    assert not any(r["method"] == "POST" and r["body_length"] == 10 for r in env.upstream.requests)
    _served(env)


class _RawUpstream:
    """An upstream that records the raw bytes of each request (trailers included) and answers 200."""

    def __init__(self) -> None:
        import threading

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            data = b""
            conn.settimeout(10)
            try:
                while not data.endswith(b"\r\n\r\n") or (b"chunked" in data and b"\r\n0\r\n" not in data):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.received.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            except OSError:
                pass
            finally:
                conn.close()

    def stop(self) -> None:
        """Stop listening."""
        self.server.close()


def test_trailers_are_passed_to_a_chunked_upstream(proxy, pki, tmp_path):
    """Trailers after an HTTP/2 request body without content-length go to the upstream in the
    chunked body's last chunk."""
    raw = _RawUpstream()
    environment = Env(proxy, pki, tmp_path, extra=f"[upstream:raw]\nservers = http://127.0.0.1:{raw.port}\n\n"
                                                  "[route:raw]\npath = /raw\nupstream = raw\n")
    client = environment.client()
    try:
        stream_id = client.request("/raw", method="POST", headers=[(b"te", b"trailers")], body=b"hello", end=False)
        client.conn.send_headers(stream_id, [(b"x-checksum", b"abc123")], end_stream=True)
        client.flush()
        assert client.response(stream_id).status == 200
    finally:
        client.close()
        environment.stop()
        raw.stop()
    (request,) = raw.received
    assert b"Transfer-Encoding: chunked" in request
    assert request.endswith(b"5\r\nhello\r\n0\r\nx-checksum: abc123\r\n\r\n")


# ---------------------------------------------------------------------------
# Flow control


def test_a_slow_reader_on_one_stream_holds_neither_the_others_nor_memory(env):
    """A stream whose window the client never reopens stops at its window (the upstream is
    paused, its 20 MB are not buffered by the proxy) while other streams on the same connection
    are served."""
    client = env.client(ack_data=False, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    try:
        slow = client.request("/bytes?n=20000000")
        client.until(lambda: len(client.streams[slow].data) >= 65535)
        client.ack_data = True
        client.conn.increment_flow_control_window(10_000_000)  # the connection window is not what holds it
        client.flush()
        fast = client.get("/echo")
        assert fast.status == 200
        assert len(client.streams[slow].data) <= 65535 and not client.streams[slow].ended
        rss = int([line.split()[1] for line in Path(f"/proc/{env.process.process.pid}/status").read_text()
                   .splitlines() if line.startswith("VmRSS:")][0])
        assert rss < 200_000, f"the proxy holds {rss} KiB: the slow stream's body was buffered"
    finally:
        client.close()


def test_request_bodies_flow_through_the_window(env):
    """A 3 MB upload on one stream goes through as the window reopens (the proxy acknowledges
    what it sent on), and arrives whole."""
    client = env.client()
    try:
        stream_id = client.request("/echo", method="POST", body=os.urandom(3_000_000))
        result = client.response(stream_id)
    finally:
        client.close()
    assert result.status == 200 and json.loads(result.data)["body_length"] == 3_000_000


# ---------------------------------------------------------------------------
# WebSocket over HTTP/2 (RFC 8441)


def _websocket(client: H2Client, path: str, origin: bytes | None = None) -> int:
    headers = [(b"sec-websocket-version", b"13")] + ([(b"origin", origin)] if origin else [])
    stream_id = client.conn.get_next_available_stream_id()
    client.conn.send_headers(stream_id, [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                                         (b":path", path.encode()), (b":authority", b"localhost")] + headers)
    client.streams[stream_id] = StreamResult()
    client.flush()
    return stream_id


def _open_websocket(client: H2Client, path: str) -> tuple[int, StreamResult]:
    """An extended CONNECT for a WebSocket on ``path``, answered 200: its stream id and result."""
    client.until(lambda: client.server_settings.get(8) == 1)
    stream_id = _websocket(client, path)
    result = client.streams[stream_id]
    client.until(lambda: result.status == 200)
    return stream_id, result


def _close_code(client: H2Client, result: StreamResult, timeout: float = 20) -> int:
    """The code of the first close frame the stream carries (read until it comes)."""
    client.until(lambda: any(op == 8 for op, _ in unframe(result.data)), timeout=timeout)
    close = [payload for op, payload in unframe(result.data) if op == 8][0]
    return int.from_bytes(close[:2], "big")


@pytest.mark.parametrize("path", ["/chat", "/tunnel"])
def test_websocket_over_h2_is_bridged_or_tunnelled(env, path):
    """The proxy advertises SETTINGS_ENABLE_CONNECT_PROTOCOL; an extended CONNECT for websocket on
    a bridge or tunnel route gets 200 (with the listener's headers), messages are echoed by the
    HTTP/1.1 WebSocket upstream, and a close passes through with its code."""
    client = env.client()
    try:
        client.until(lambda: client.server_settings.get(8) == 1)
        stream_id = _websocket(client, path)
        result = client.streams[stream_id]
        client.until(lambda: result.status)
        assert result.status == 200 and result.header(b"strict-transport-security") == b"max-age=60"
        client.conn.send_data(stream_id, masked_frame(1, b"hello over h2"))
        client.flush()
        client.until(lambda: (1, b"hello over h2") in unframe(result.data))
        client.conn.send_data(stream_id, masked_frame(8, (4001).to_bytes(2, "big") + b"bye"))
        client.flush()
        assert _close_code(client, result, timeout=10) == 4001
    finally:
        client.close()


def test_websocket_over_h2_goes_through_the_routes_filters(proxy, pki, tmp_path):
    """A filter that refuses the handshake refuses the extended CONNECT: the stream gets 403."""
    environment = Env(proxy, pki, tmp_path, extra="[route:guarded]\npath = /guarded\nupstream = ws\nwebsocket = yes\n"
                                                  "filters = local-only\n")
    client = environment.client()
    try:
        client.until(lambda: client.server_settings.get(8) == 1)
        stream_id = _websocket(client, "/guarded")
        result = client.response(stream_id)
        assert result.status == 403
    finally:
        client.close()
        environment.stop()


# ---------------------------------------------------------------------------
# Protections: each attack on a real twistd, another client served meanwhile


def _served(environment: Env) -> None:
    """Another client's request is answered."""
    other = environment.client()
    try:
        assert other.get("/echo").status == 200
    finally:
        other.close()


def test_rapid_reset_is_cut_off(env):
    """A client that opens and resets streams as fast as it can (CVE-2023-44487) gets GOAWAY
    with ENHANCE_YOUR_CALM and is disconnected; other clients are served."""
    client = env.client()
    try:
        for _ in range(600):
            stream_id = client.request("/slow?delay=5")
            client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            client.flush()
            if client.closed:
                break
        client.until(lambda: client.goaway is not None)
        assert client.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        client.close()
    _served(env)


@pytest.mark.parametrize("frame_factory, why", [
    (lambda: PingFrame(0, opaque_data=b"12345678"), "PING flood"),
    (lambda: SettingsFrame(0, settings={4: 65535}), "SETTINGS flood"),
    (lambda: PriorityFrame(3, depends_on=0, stream_weight=16), "PRIORITY flood"),
    (lambda: WindowUpdateFrame(0, window_increment=1), "WINDOW_UPDATE flood"),
], ids=["ping", "settings", "priority", "window-update"])
def test_control_frame_floods_are_cut_off(env, frame_factory, why):
    """Thousands of PING, SETTINGS, PRIORITY or WINDOW_UPDATE frames get GOAWAY
    (ENHANCE_YOUR_CALM); others are served."""
    client = env.client()
    try:
        payload = b"".join(frame_factory().serialize() for _ in range(3000))
        try:
            client.send_raw(payload)
        except OSError:
            pass
        client.until(lambda: client.goaway is not None)
        assert client.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, why
    finally:
        client.close()
    _served(env)


def test_continuation_flood_is_cut_off(env):
    """A HEADERS frame followed by endless CONTINUATION frames (never END_HEADERS) is a
    connection error: the proxy does not keep accumulating the header block."""
    client = env.client()
    try:
        client.read(2)
        block = client.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                                            (b":authority", b"localhost")])
        headers = HeadersFrame(1, data=block)  # no END_HEADERS
        client.send_frame(headers)
        sent = 0
        try:
            for _ in range(2000):
                client.send_frame(ContinuationFrame(1, data=b"x" * 1000))
                sent += 1
        except OSError:
            pass
        client.until(lambda: client.goaway is not None or client.closed)
        assert sent < 2000 or client.goaway is not None
    finally:
        client.close()
    _served(env)


def test_too_many_streams_and_oversized_headers(env):
    """Over SETTINGS_MAX_CONCURRENT_STREAMS (100) or the header list size, the connection gets
    GOAWAY; other clients are served."""
    client = env.client()
    try:
        client.until(lambda: client.server_settings.get(3) == 100)
        for _ in range(100):
            client.request("/slow?delay=3")
        block = client.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/echo"),
                                            (b":authority", b"localhost")])
        client.send_frame(HeadersFrame(201, data=block, flags=["END_HEADERS", "END_STREAM"]))  # the 101st
        client.until(lambda: client.goaway is not None or client.closed or client.streams.get(201))
    finally:
        client.close()
    big = env.client()
    try:
        big.get("/echo", headers=[(b"x-big", b"v" * 40000)])
    except AssertionError:
        pass  # the connection was closed, as it should be
    finally:
        big.close()
    assert big.goaway is not None or big.closed
    _served(env)


def test_a_zero_window_stall_and_idle_connections_are_cut_off(proxy, pki, tmp_path):
    """A client that never opens its window has its stream reset after idle_timeout; a connection
    with no stream is closed (GOAWAY) after idle_timeout; others are served meanwhile."""
    environment = Env(proxy, pki, tmp_path, settings="idle_timeout = 2s")
    try:
        client = environment.client(ack_data=False, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        stream_id = client.request("/bytes?n=100000")
        result = client.streams[stream_id]
        client.until(lambda: result.reset is not None, timeout=15)
        assert result.reset == h2.errors.ErrorCodes.CANCEL and result.data == b""
        client.close()
        idle = environment.client()
        idle.until(lambda: idle.goaway is not None or idle.closed, timeout=15)
        idle.close()
        _served(environment)
    finally:
        environment.stop()


def test_the_http11_limits_apply_to_streams(proxy, pki, tmp_path):
    """The request limits of HTTP/1.1 hold over HTTP/2: 413 for a body over max_body_bytes, 414 for
    a path over max_url_bytes, 431 for more than max_headers fields."""
    environment = Env(proxy, pki, tmp_path, settings="max_body_bytes = 1k\nmax_url_bytes = 200\nmax_headers = 20")
    client = environment.client()
    try:
        assert client.get("/echo", method="POST", body=b"b" * 5000).status == 413
        assert client.get("/" + "a" * 300).status == 414
        assert client.get("/echo", headers=[(b"x-%d" % i, b"v") for i in range(30)]).status == 431
    finally:
        client.close()
        environment.stop()


def _attack(environment: Env, kind: str) -> None:
    """One hostile HTTP/2 client of ``kind``, until the proxy cuts it off (bounded)."""
    client = environment.client(ack_data=kind != "zero-window",
                                settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0} if kind == "zero-window"
                                else None)
    try:
        if kind == "rapid-reset":
            for _ in range(600):
                client.conn.reset_stream(client.request("/slow?delay=5"), h2.errors.ErrorCodes.CANCEL)
                client.flush()
        elif kind == "ping-flood":
            client.send_raw(b"".join(PingFrame(0, opaque_data=b"12345678").serialize() for _ in range(3000)))
        elif kind == "continuation-flood":
            client.read(2)
            block = client.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                                                (b":authority", b"localhost")])
            client.send_frame(HeadersFrame(1, data=block))
            for _ in range(2000):
                client.send_frame(ContinuationFrame(1, data=b"x" * 1000))
        elif kind == "oversized-headers":
            client.request("/echo", headers=[(b"x-big", b"v" * 40000)])
        else:  # zero-window: asks for a big body and never opens its window
            client.request("/bytes?n=1000000")
        client.until(lambda: client.goaway is not None or client.closed or
                     any(r.reset is not None for r in client.streams.values()), timeout=15)
    except (OSError, AssertionError):
        pass  # cut off: what the proxy should do
    finally:
        client.close()


def test_a_normal_client_is_served_throughout_the_attacks(proxy, pki, tmp_path):
    """While hostile HTTP/2 clients run one after another and side by side (rapid reset, PING
    and CONTINUATION floods, oversized headers, a zero window), a normal HTTP/2 client making
    requests all along gets every one of them answered 200."""
    environment = Env(proxy, pki, tmp_path, settings="idle_timeout = 3s")
    results: list[int] = []
    stop = threading.Event()

    def normal_client() -> None:
        client = environment.client()
        try:
            while not stop.is_set() and len(results) < 5000:
                results.append(client.get("/echo").status)
        except (OSError, AssertionError) as error:
            results.append(-1)
            raise AssertionError(f"the normal client failed: {error}") from error
        finally:
            client.close()

    worker = threading.Thread(target=normal_client)
    worker.start()
    try:
        kinds = ["rapid-reset", "ping-flood", "continuation-flood", "oversized-headers", "zero-window"]
        attackers = [threading.Thread(target=_attack, args=(environment, kind)) for kind in kinds * 2]
        for attacker in attackers:
            attacker.start()
        for attacker in attackers:
            attacker.join(60)
        assert not any(attacker.is_alive() for attacker in attackers)
    finally:
        stop.set()
        worker.join(30)
        environment.stop()
    assert results and set(results) == {200}, f"{len(results)} requests, statuses {set(results)}"


# ---------------------------------------------------------------------------
# Drain, reload, accounting


def test_drain_sends_goaway_and_lets_streams_finish(env):
    """SIGTERM: the HTTP/2 connection gets GOAWAY (NO_ERROR) with the last stream id while a
    stream is in flight; that stream gets its whole response (nghttp shows both), then the
    process exits 0."""
    nghttp = subprocess.Popen([_tool("nghttp"), "-v", env.url("/slow?delay=1.5")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: env.upstream.requests)  # the stream is in flight
    env.process.process.send_signal(signal.SIGTERM)
    output, _ = nghttp.communicate(timeout=30)
    assert "recv GOAWAY frame" in output and "last_stream_id=13, error_code=NO_ERROR" in output, output
    goaway, status = output.index("recv GOAWAY frame"), output.index(":status: 200")
    assert goaway < status, "GOAWAY came after the response: not a drain"
    assert nghttp.returncode == 0 and "flags=0x01, stream_id=13" in output  # END_STREAM: the whole response
    assert env.process.wait_exit(20) == 0


def test_drain_closes_websocket_streams_with_1001(env):
    """SIGTERM while a WebSocket runs over an HTTP/2 stream: the client gets GOAWAY, then a close
    frame 1001 (going away) on the stream, as an HTTP/1.1 WebSocket would; the process exits 0."""
    client = env.client()
    try:
        stream_id, result = _open_websocket(client, "/chat")
        client.conn.send_data(stream_id, masked_frame(1, b"before drain"))
        client.flush()
        client.until(lambda: (1, b"before drain") in unframe(result.data))
        env.process.process.send_signal(signal.SIGTERM)
        assert _close_code(client, result) == 1001
        assert client.goaway is not None and client.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    finally:
        client.close()
    assert env.process.wait_exit(20) == 0


def test_a_reload_applies_to_new_streams(env):
    """On an open HTTP/2 connection, a reload that adds a route applies to the next stream."""
    client = env.client()
    try:
        assert client.get("/echo").status == 200
        config = env.process.configs[-1]
        config.write_text(env.config_text + "[route:more]\npath = /more\nupstream = app\nrewrite_path = /rewritten\n")
        env.process.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload done" in env.process.output())
        result = client.get("/more")
        assert result.status == 200 and json.loads(result.data)["path"] == "/rewritten"
    finally:
        client.close()


def test_a_reload_that_removes_its_route_closes_a_websocket_stream_with_1012(env):
    """A WebSocket over an HTTP/2 stream whose route a reload removed gets a close frame 1012
    (service restart) within reload_close_window, as on HTTP/1.1; a plain request on the same
    connection is still served afterwards."""
    client = env.client()
    try:
        _, result = _open_websocket(client, "/chat")
        config = env.process.configs[-1]
        config.write_text(env.config_text.replace("[route:bridge]\npath = /chat\nupstream = ws\nwebsocket = yes\n",
                                                  "").replace("[chatproxy]\n", "[chatproxy]\nreload_close_window = 1s\n"))
        env.process.process.send_signal(signal.SIGHUP)
        assert _close_code(client, result) == 1012
        assert client.get("/echo").status == 200
    finally:
        client.close()


def test_ended_h2_connections_release_their_sockets(env):
    """Many HTTP/2 connections (plain requests, resets, malformed blocks, WebSockets) leave no
    descriptor behind once they end, and the client-connection gauge is back to 0."""
    pid = env.process.process.pid
    metric_samples(env.admin, "chatproxy_client_connections")
    time.sleep(0.3)
    baseline = fd_count(pid)
    for i in range(30):
        client = env.client()
        try:
            if i % 3 == 0:
                client.get("/echo")
            elif i % 3 == 1:
                client.get("/echo", headers=[(b"connection", b"x")])
            else:
                stream_id = _websocket(client, "/chat")
                client.until(lambda: client.streams[stream_id].status)
        finally:
            client.close()
    wait_for(lambda: fd_count(pid) <= baseline + 2, message=f"{fd_count(pid)} descriptors, {baseline} before")
    wait_for(lambda: metric_samples(env.admin, "chatproxy_client_connections") == [({}, 0.0)])


def test_h2load_against_the_proxy(env):
    """h2load, many streams on a few connections: every request succeeds."""
    result = subprocess.run([_tool("h2load"), "-n", "2000", "-c", "4", "-m", "50", env.url("/echo")],
                            capture_output=True, text=True, timeout=120)
    assert "2000 succeeded" in result.stdout, result.stdout
