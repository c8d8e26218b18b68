"""End-to-end tests of the HTTP/1.1 data path: a real ``twistd -n chatproxy`` process
between real clients (http.client, raw sockets, curl) and the recording upstream.

Covers front connections (keep-alive, pipelining, streaming bodies, 100-continue,
bodiless responses, limits, timeouts), upstream connections (pool reuse, abandoned
connections), forwarding headers, error answers and the access log.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import _pattern, basic_config, free_port

MIB = 1024 * 1024


# ---------------------------------------------------------------------------
# Helpers


class RawResponse:
    """One response read off a raw socket."""

    def __init__(self, version: str, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        """The lower-cased names of all headers."""
        return {key.lower() for key, _ in self.headers}

    def json(self) -> dict[str, Any]:
        """The body parsed as JSON (the upstream's /echo record)."""
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<RawResponse {self.status} {self.headers!r} {self.body[:200]!r}>"


class RawClient:
    """A raw TCP client speaking HTTP/1.1 by hand, with bounded waits."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        """Write bytes to the proxy."""
        self.sock.sendall(data)

    def read_response(self, method: str = "GET") -> RawResponse:
        """Read one complete response (the request's method decides whether a body follows)."""
        line = self.file.readline(65537)
        if not line:
            raise ConnectionError("connection closed before a response")
        version, status, reason = (line.decode("latin-1").rstrip("\r\n").split(" ", 2) + [""])[:3]
        assert version.startswith("HTTP/"), line
        headers: list[tuple[str, str]] = []
        while True:
            line = self.file.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        response = RawResponse(version, int(status), reason, headers, b"")
        code = response.status
        if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
            return response
        if (response.header("transfer-encoding") or "").lower() == "chunked":
            parts = []
            while True:
                size_line = self.file.readline(1024)
                if not size_line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.file.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self._read_exactly(size))
                assert self.file.readline(3) == b"\r\n"
            response.body = b"".join(parts)
        elif response.header("content-length") is not None:
            response.body = self._read_exactly(int(response.header("content-length") or 0))
        else:
            response.body = self.file.read()
        return response

    def _read_exactly(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) != n:
            raise ConnectionError(f"connection closed after {len(data)} of {n} body bytes")
        return data

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Whether the proxy closes the connection within ``timeout`` (with nothing more to read)."""
        self.sock.settimeout(timeout)
        try:
            data = self.file.read1(65536) if hasattr(self.file, "read1") else self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (socket.timeout, TimeoutError):
            return False
        finally:
            self.sock.settimeout(10.0)
        return data == b""

    def close(self) -> None:
        """Close the client side."""
        self.file.close()
        self.sock.close()


def request_bytes(method: str, target: str, headers: dict[str, str] | list[tuple[str, str]] | None = None,
                  body: bytes = b"", host: str = "proxy.test", version: str = "HTTP/1.1") -> bytes:
    """A request in wire form (Content-Length added for a body unless given)."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in items}
    lines = [f"{method} {target} {version}"]
    if host and "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in items]
    if body and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def upstream_headers(record: dict[str, Any]) -> dict[str, str]:
    """The headers the upstream received, lower-cased names (last value wins)."""
    return {k.lower(): v for k, v in record["headers"]}


def upstream_header_values(record: dict[str, Any], name: str) -> list[str]:
    """Every value of one header the upstream received."""
    return [v for k, v in record["headers"] if k.lower() == name.lower()]


def sha(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_log_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The access-log lines once at least ``count`` are written (bounded wait)."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = [line for line in path.read_text().split("\n")[:-1] if line.strip()]  # whole lines only
            if len(lines) >= count:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"expected {count} access-log lines in {path}, found {lines!r}")


def wait_for_log_line(path: Path, predicate: Any, timeout: float = 5.0) -> str:
    """The first access-log line satisfying ``predicate`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            # Only whole lines: the proxy may be writing the last one right now.
            lines = path.read_text().split("\n")[:-1]
            for line in lines:
                if line.strip() and predicate(line):
                    return line
        time.sleep(0.05)
    raise AssertionError(f"no matching access-log line in {path}: {lines!r}")


def get(port: int, target: str, method: str = "GET", headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    """One request over a fresh http.client connection; returns the response and its body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def start(proxy: Any, upstream_url: str, *, settings: str = "access_log = off", route: str = "",
          extra: str = "") -> int:
    """Start chatproxy on a basic config; returns its port."""
    port = free_port()
    proxy.start(basic_config(upstream_url, port, settings=settings, route=route, extra=extra), port=port)
    return port


@pytest.fixture
def raw_clients() -> Iterator[list[RawClient]]:
    """Raw clients opened by a test are closed afterwards."""
    clients: list[RawClient] = []
    yield clients
    for client in clients:
        try:
            client.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Front connections: keep-alive and pipelining


def test_keep_alive_serves_several_requests_on_one_connection(proxy, upstream, raw_clients):
    """HTTP/1.1 keep-alive: several requests in turn on one client connection all get
    complete answers, and the connection stays open after each."""
    port = start(proxy, upstream.url)
    client = RawClient(port)
    raw_clients.append(client)
    for i in range(4):
        client.send(request_bytes("GET", f"/echo?i={i}"))
        response = client.read_response()
        assert response.status == 200
        assert response.json()["path"] == f"/echo?i={i}"
        assert (response.header("connection") or "").lower() != "close"
    client.send(request_bytes("POST", "/echo?i=post", body=b"x" * 100))
    response = client.read_response()
    assert response.json()["body_length"] == 100
    assert [r["path"] for r in upstream.requests] == [f"/echo?i={i}" for i in range(4)] + ["/echo?i=post"]


def test_http_client_keep_alive_reuses_the_socket(proxy, upstream):
    """http.client sees keep-alive responses: its socket is the same for three requests."""
    port = start(proxy, upstream.url)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sockets = []
        for i in range(3):
            conn.request("GET", f"/echo?k={i}")
            response = conn.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["path"] == f"/echo?k={i}"
            sockets.append(conn.sock)
        assert sockets[0] is not None and all(s is sockets[0] for s in sockets)
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(proxy, upstream, raw_clients):
    """Requests sent in one write (pipelined, some with bodies) are all answered, in the
    order they were sent, each with its own complete body; a slow first answer does not
    let a later one overtake it."""
    port = start(proxy, upstream.url)
    client = RawClient(port)
    raw_clients.append(client)
    pipeline = b"".join([
        request_bytes("GET", "/slow?delay=0.3&n=1"),
        request_bytes("GET", "/echo?n=2"),
        request_bytes("POST", "/echo?n=3", body=b"hello"),
        request_bytes("GET", "/bytes?n=70000"),
        request_bytes("GET", "/chunked?n=3000&parts=3"),
        request_bytes("POST", "/echo?n=6", headers={"Transfer-Encoding": "chunked"}, body=b"3\r\nabc\r\n0\r\n\r\n"),
        request_bytes("HEAD", "/bytes?n=5"),
        request_bytes("GET", "/echo?n=8"),
    ])
    client.send(pipeline)
    first = client.read_response()
    assert first.status == 200 and first.json()["path"] == "/slow?delay=0.3&n=1"
    assert client.read_response().json()["path"] == "/echo?n=2"
    third = client.read_response().json()
    assert third["path"] == "/echo?n=3" and third["body_length"] == 5 and third["body_sha"] == sha(b"hello")
    assert client.read_response().body == _pattern(70000)
    assert client.read_response().body == _pattern(3000)
    sixth = client.read_response().json()
    assert sixth["path"] == "/echo?n=6" and sixth["body_sha"] == sha(b"abc")
    head = client.read_response("HEAD")
    assert head.status == 200 and head.header("content-length") == "5"
    assert client.read_response().json()["path"] == "/echo?n=8"
    assert [r["path"].split("?", 1)[1] for r in upstream.requests] == [
        "delay=0.3&n=1", "n=2", "n=3", "n=70000", "n=3000&parts=3", "n=6", "n=5", "n=8"]
    # One exchange at a time: the pipelined requests follow each other over one upstream connection.
    assert len({r["client_port"] for r in upstream.requests[:6]}) == 1


def test_http10_request_without_keep_alive_is_closed_after_the_response(proxy, upstream, raw_clients):
    """An HTTP/1.0 request without keep-alive gets its response, then the connection closes."""
    port = start(proxy, upstream.url)
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("GET", "/echo?v=10", version="HTTP/1.0"))
    response = client.read_response()
    assert response.status == 200 and response.json()["path"] == "/echo?v=10"
    assert client.closed_by_peer()


# ---------------------------------------------------------------------------
# Streaming bodies


BIG = 20 * MIB
BIG_SETTINGS = "access_log = off\nmax_body_bytes = 64m"


def test_large_content_length_request_body_is_streamed_intact(proxy, upstream):
    """A 20 MiB request body with Content-Length reaches the upstream byte for byte."""
    port = start(proxy, upstream.url, settings=BIG_SETTINGS)
    data = _pattern(BIG)
    response, body = get(port, "/echo", "POST", body=data)
    assert response.status == 200
    record = json.loads(body)
    assert record["body_length"] == BIG and record["body_sha"] == sha(data)
    assert upstream_headers(record)["content-length"] == str(BIG)


def test_large_chunked_request_body_is_streamed_intact(proxy, upstream):
    """A 20 MiB chunked request body reaches the upstream byte for byte, still chunked."""
    port = start(proxy, upstream.url, settings=BIG_SETTINGS)
    data = _pattern(BIG)
    pieces = (data[i : i + 256 * 1024] for i in range(0, BIG, 256 * 1024))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/echo", body=pieces, headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        response = conn.getresponse()
        record = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200
    assert record["body_length"] == BIG and record["body_sha"] == sha(data)
    headers = upstream_headers(record)
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers


@pytest.mark.parametrize("kind", ["bytes", "chunked", "eof"])
def test_large_response_bodies_are_streamed_intact(proxy, upstream, kind):
    """20 MiB response bodies (Content-Length, chunked, and read-until-close upstream framing)
    reach an HTTP/1.1 client complete and unchanged."""
    port = start(proxy, upstream.url)
    target = f"/{kind}?n={BIG}" + ("&parts=40" if kind == "chunked" else "")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200
        assert len(body) == BIG and sha(body) == sha(_pattern(BIG))
        if kind == "bytes":
            assert response.getheader("Content-Length") == str(BIG)
        else:
            # Unknown length upstream: re-framed as chunked for the 1.1 client, which stays usable.
            assert response.getheader("Transfer-Encoding") == "chunked"
            conn.request("GET", "/echo?after=1")
            after = conn.getresponse()
            assert json.loads(after.read())["path"] == "/echo?after=1"
    finally:
        conn.close()


def test_large_download_with_curl(proxy, upstream, tmp_path):
    """curl downloads a 20 MiB chunked response through the proxy intact."""
    port = start(proxy, upstream.url)
    out = tmp_path / "download.bin"
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--max-time", "60", "-o", str(out),
         f"http://127.0.0.1:{port}/chunked?n={BIG}&parts=7"],
        capture_output=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert sha(out.read_bytes()) == sha(_pattern(BIG))


def test_expect_100_continue(proxy, upstream, raw_clients):
    """A client sending Expect: 100-continue gets 100 Continue before it sends the body,
    then the final response; the upstream receives the whole body (and no Expect)."""
    port = start(proxy, upstream.url)
    client = RawClient(port)
    raw_clients.append(client)
    body = b"0123456789" * 100
    client.send(request_bytes("POST", "/echo?expect=1", headers={"Expect": "100-continue",
                                                                 "Content-Length": str(len(body))}))
    interim = client.read_response()
    assert interim.status == 100
    client.send(body)
    final = client.read_response()
    assert final.status == 200
    record = final.json()
    assert record["body_length"] == len(body) and record["body_sha"] == sha(body)
    assert "expect" not in upstream_headers(record)
    # The connection is still usable.
    client.send(request_bytes("GET", "/echo?next=1"))
    assert client.read_response().json()["path"] == "/echo?next=1"


def test_expect_100_continue_with_curl(proxy, upstream, tmp_path):
    """curl's own Expect: 100-continue upload goes through with the body intact."""
    port = start(proxy, upstream.url)
    data = _pattern(2 * MIB)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "30", "-H", "Expect: 100-continue",
         "--expect100-timeout", "20", "--data-binary", f"@{upload}", "-w", "\n%{http_code}",
         f"http://127.0.0.1:{port}/echo?curl=1"],
        capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition(b"\n")
    assert code == b"200"
    assert json.loads(body)["body_sha"] == sha(data)


def test_head_204_and_304_have_no_body_and_the_connection_stays_usable(proxy, upstream, raw_clients):
    """HEAD, 204 and 304 responses carry no body bytes; the next response on the same
    connection parses cleanly."""
    port = start(proxy, upstream.url)
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("HEAD", "/bytes?n=1000"))
    head = client.read_response("HEAD")
    assert head.status == 200 and head.header("content-length") == "1000"
    client.send(request_bytes("HEAD", "/echo?head=1"))
    assert client.read_response("HEAD").status == 200
    client.send(request_bytes("HEAD", "/chunked?n=1000"))
    assert client.read_response("HEAD").status == 200
    client.send(request_bytes("GET", "/no-content"))
    assert client.read_response().status == 204
    client.send(request_bytes("GET", "/status?code=304"))
    assert client.read_response().status == 304
    client.send(request_bytes("GET", "/echo?after=1"))
    last = client.read_response()
    assert last.status == 200 and last.json()["path"] == "/echo?after=1"
    assert [r["method"] for r in upstream.requests] == ["HEAD", "HEAD", "HEAD", "GET", "GET", "GET"]


# ---------------------------------------------------------------------------
# Limits


LIMIT_SETTINGS = ("access_log = off\nmax_body_bytes = 1000\nmax_headers = 10\nmax_header_bytes = 2048\n"
                  "max_url_bytes = 100")


def test_413_for_too_large_content_length(proxy, upstream, raw_clients):
    """A Content-Length above max_body_bytes gets 413 before any body is read, the
    connection closes, and the upstream never sees the request."""
    port = start(proxy, upstream.url, settings=LIMIT_SETTINGS)
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("POST", "/echo", headers={"Content-Length": "5000"}))
    response = client.read_response()
    assert response.status == 413
    assert 0 < len(response.body) < 200
    assert client.closed_by_peer()
    # At the limit exactly is fine.
    response, body = get(port, "/echo", "POST", body=b"y" * 1000)
    assert response.status == 200 and json.loads(body)["body_length"] == 1000
    assert [r["body_length"] for r in upstream.requests] == [1000]


def test_413_for_too_large_chunked_body(proxy, upstream, raw_clients):
    """A chunked body that grows past max_body_bytes gets 413 and the connection closes;
    the upstream never receives a complete over-limit body."""
    port = start(proxy, upstream.url, settings=LIMIT_SETTINGS)
    client = RawClient(port)
    raw_clients.append(client)
    chunks = b"".join(b"258\r\n" + b"z" * 600 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    client.send(request_bytes("POST", "/echo", headers={"Transfer-Encoding": "chunked"}) + chunks)
    response = client.read_response()
    assert response.status == 413
    assert client.closed_by_peer()
    assert all(r["body_length"] <= 1000 for r in upstream.requests)


def test_431_for_too_many_headers(proxy, upstream, raw_clients):
    """More request headers than max_headers: 431, connection closed, nothing forwarded."""
    port = start(proxy, upstream.url, settings=LIMIT_SETTINGS)
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("GET", "/echo", headers=[(f"X-H{i}", "v") for i in range(20)]))
    response = client.read_response()
    assert response.status == 431
    assert client.closed_by_peer()
    # Within the limit it works.
    response, _ = get(port, "/echo", headers={f"X-H{i}": "v" for i in range(5)})
    assert response.status == 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("trickle", [False, True], ids=["one-write", "trickled"])
def test_431_for_too_large_headers(proxy, upstream, raw_clients, trickle):
    """A request head larger than max_header_bytes gets 431 and the connection closes,
    whether the head arrives at once or in small pieces."""
    port = start(proxy, upstream.url, settings=LIMIT_SETTINGS)
    client = RawClient(port)
    raw_clients.append(client)
    data = request_bytes("GET", "/echo", headers={"X-Big": "b" * 4000})
    if trickle:
        for i in range(0, len(data), 500):
            try:
                client.send(data[i : i + 500])
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.01)
    else:
        client.send(data)
    response = client.read_response()
    assert response.status == 431
    assert client.closed_by_peer()
    assert upstream.requests == []


def test_414_for_too_long_url(proxy, upstream, raw_clients):
    """A request target longer than max_url_bytes gets 414 and the connection closes;
    a target within the limit is forwarded."""
    port = start(proxy, upstream.url, settings=LIMIT_SETTINGS)
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("GET", "/echo?q=" + "a" * 200))
    response = client.read_response()
    assert response.status == 414
    assert client.closed_by_peer()
    ok_target = "/echo?q=" + "a" * (100 - len("/echo?q="))
    response, body = get(port, ok_target)
    assert response.status == 200 and json.loads(body)["path"] == ok_target
    assert len(upstream.requests) == 1


def test_route_max_body_bytes_overrides_the_global_limit(proxy, upstream):
    """A route's max_body_bytes replaces the global limit for that route."""
    port = start(proxy, upstream.url, settings=LIMIT_SETTINGS, route="max_body_bytes = 5000")
    response, body = get(port, "/echo", "POST", body=b"r" * 3000)
    assert response.status == 200 and json.loads(body)["body_length"] == 3000
    response, _ = get(port, "/echo", "POST", body=b"r" * 6000)
    assert response.status == 413


# ---------------------------------------------------------------------------
# Timeouts


def test_header_timeout_cuts_off_a_partial_head(proxy, upstream, raw_clients):
    """A client that sends part of a request head and stops gets 408 and is disconnected
    around header_timeout."""
    port = start(proxy, upstream.url, settings="access_log = off\nheader_timeout = 1\nidle_timeout = 30")
    client = RawClient(port)
    raw_clients.append(client)
    started = time.monotonic()
    client.send(b"GET /echo HTTP/1.1\r\nHost: proxy.test\r\nX-Partial: ye")
    client.sock.settimeout(6)
    response = client.read_response()
    elapsed = time.monotonic() - started
    assert response.status == 408
    assert client.closed_by_peer()
    assert 0.5 <= elapsed < 6
    assert upstream.requests == []


def test_header_timeout_is_not_extended_by_a_trickling_client(proxy, upstream, raw_clients):
    """A client sending its head one byte at a time is still cut off at header_timeout
    (each byte does not restart the clock)."""
    port = start(proxy, upstream.url, settings="access_log = off\nheader_timeout = 1\nidle_timeout = 30")
    client = RawClient(port)
    raw_clients.append(client)
    data = b"GET /echo HTTP/1.1\r\nHost: proxy.test\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"
    started = time.monotonic()
    answered = False
    for byte in data:
        readable, _, _ = select.select([client.sock], [], [], 0.1)
        if readable:
            answered = True
            break
        try:
            client.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            answered = True
            break
        if time.monotonic() - started > 8:
            break
    assert answered, "the proxy waited for the whole trickled head"
    response = client.read_response()
    assert response.status == 408
    assert time.monotonic() - started < 8
    assert upstream.requests == []


def test_idle_keep_alive_connection_is_closed_at_idle_timeout(proxy, upstream, raw_clients):
    """A keep-alive connection with no further request is closed after idle_timeout; before
    that it is usable."""
    port = start(proxy, upstream.url, settings="access_log = off\nheader_timeout = 30\nidle_timeout = 1")
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("GET", "/echo?idle=1"))
    assert client.read_response().status == 200
    client.send(request_bytes("GET", "/echo?idle=2"))
    assert client.read_response().status == 200
    started = time.monotonic()
    assert client.closed_by_peer(timeout=6)
    assert 0.5 <= time.monotonic() - started < 6
    assert len(upstream.requests) == 2


# ---------------------------------------------------------------------------
# Upstream connections


def test_upstream_keep_alive_connection_is_reused(proxy, upstream):
    """Sequential requests (even from different clients) reach the upstream over the same
    pooled keep-alive connection."""
    port = start(proxy, upstream.url)
    for i in range(3):
        response, body = get(port, f"/echo?pool={i}")
        assert response.status == 200
    ports = {r["client_port"] for r in upstream.requests}
    assert len(upstream.requests) == 3 and len(ports) == 1


def test_abandoned_response_closes_the_upstream_connection(proxy, upstream):
    """A client that hangs up mid-download abandons its upstream connection: it is closed,
    never reused, and later requests get fresh, correct answers (no stale bytes)."""
    port = start(proxy, upstream.url)
    response, _ = get(port, "/echo?warm=1")  # puts one connection into the pool
    assert response.status == 200
    warm_port = upstream.requests[0]["client_port"]
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(request_bytes("GET", f"/bytes?n={BIG}"))
        received = b""
        while len(received) < 8192:
            chunk = sock.recv(4096)
            assert chunk
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        # Stop reading for a moment: buffers fill up and the proxy stops reading from the
        # upstream, leaving most of the body unread on that connection.
        time.sleep(0.5)
    finally:
        sock.close()
    download = upstream.requests[-1]
    assert download["path"] == f"/bytes?n={BIG}"
    abandoned_port = download["client_port"]
    assert abandoned_port == warm_port  # the download used the pooled connection
    for i in range(4):
        response, body = get(port, f"/echo?after={i}")
        assert response.status == 200
        assert json.loads(body)["path"] == f"/echo?after={i}"
    after = upstream.requests[-4:]
    assert [r["path"] for r in after] == [f"/echo?after={i}" for i in range(4)]
    assert all(r["client_port"] != abandoned_port for r in after)
    # The replacement connection is pooled in its turn.
    assert len({r["client_port"] for r in after}) == 1


def test_response_with_unread_request_body_does_not_pool_the_connection(proxy, upstream):
    """When a client's request is refused before its body was read (413 from the proxy), the
    next requests still work on fresh connections."""
    port = start(proxy, upstream.url, settings="access_log = off\nmax_body_bytes = 100")
    response, _ = get(port, "/echo", "POST", body=b"q" * 500)
    assert response.status == 413
    response, body = get(port, "/echo?ok=1")
    assert response.status == 200 and json.loads(body)["path"] == "/echo?ok=1"


# ---------------------------------------------------------------------------
# Forwarding headers


def _listener_config(upstream_url: str, port: int, listener_extra: str = "", upstream_extra: str = "",
                     settings: str = "access_log = off") -> str:
    return (
        f"[chatproxy]\n{settings}\n\n"
        f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n{listener_extra}\n\n"
        f"[upstream:app]\nservers = {upstream_url}\n{upstream_extra}\n\n"
        f"[route:all]\npath = /\nupstream = app\n"
    )


def test_hop_by_hop_request_headers_are_removed(proxy, upstream, raw_clients):
    """Hop-by-hop request headers, and those named in Connection, do not reach the
    upstream; end-to-end headers do."""
    port = start(proxy, upstream.url)
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("GET", "/echo", headers=[
        ("Connection", "keep-alive, X-Secret"), ("Connection", "x-other"), ("X-Secret", "1"), ("X-Other", "2"),
        ("Keep-Alive", "timeout=300"), ("Proxy-Connection", "keep-alive"), ("TE", "trailers"),
        ("Trailer", "X-T"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("X-Custom", "kept"),
        ("Authorization", "Bearer kept"),
    ]))
    response = client.read_response()
    headers = upstream_headers(response.json())
    for name in ("connection", "x-secret", "x-other", "keep-alive", "proxy-connection", "te", "trailer",
                 "proxy-authorization"):
        assert name not in headers, name
    assert headers["x-custom"] == "kept" and headers["authorization"] == "Bearer kept"


def test_hop_by_hop_response_headers_are_removed(proxy, upstream, raw_clients):
    """Hop-by-hop response headers and those the upstream names in Connection do not reach
    the client; the others do."""
    port = start(proxy, upstream.url)
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("GET", "/echo"))
    response = client.read_response()
    names = response.header_names()
    assert "x-hop" not in names and "keep-alive" not in names
    assert (response.header("connection") or "").lower() in ("", "keep-alive")
    assert response.header("x-upstream") == "recording"
    assert response.header("content-type") == "application/json"
    chunked = RawClient(port)
    raw_clients.append(chunked)
    chunked.send(request_bytes("GET", "/chunked?n=10"))
    reply = chunked.read_response()
    assert reply.body == _pattern(10)
    assert [v for k, v in reply.headers if k.lower() == "transfer-encoding"] == ["chunked"]


def test_forwarding_headers_replace_client_values_from_an_untrusted_peer(proxy, upstream):
    """Without trusted_proxies, client-sent X-Forwarded-* values are dropped: the upstream sees
    the TCP peer, the listener's scheme, the client's Host and the listener port; Via is
    appended to."""
    port = start(proxy, upstream.url)
    response, body = get(port, "/echo", headers={
        "Host": "chat.example.test:8443",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.test",
        "X-Forwarded-Port": "1",
        "Via": "1.0 earlier",
    })
    record = json.loads(body)
    assert upstream_header_values(record, "x-forwarded-for") == ["127.0.0.1"]
    assert upstream_header_values(record, "x-forwarded-proto") == ["http"]
    assert upstream_header_values(record, "x-forwarded-host") == ["chat.example.test:8443"]
    assert upstream_header_values(record, "x-forwarded-port") == [str(port)]
    assert upstream_header_values(record, "via") == ["1.0 earlier, 1.1 chatproxy"]
    assert upstream_header_values(record, "host") == ["chat.example.test:8443"]


def test_forwarding_headers_from_a_trusted_proxy_are_kept(proxy, upstream):
    """With trusted_proxies covering the peer, the client's X-Forwarded-For is kept and the
    peer appended, and its X-Forwarded-Proto/Host/Port are passed on."""
    port = free_port()
    proxy.start(_listener_config(upstream.url, port, "trusted_proxies = 127.0.0.1/32"), port=port)
    response, body = get(port, "/echo", headers={
        "X-Forwarded-For": "203.0.113.9, 198.51.100.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "public.example.test",
        "X-Forwarded-Port": "443",
    })
    record = json.loads(body)
    assert upstream_header_values(record, "x-forwarded-for") == ["203.0.113.9, 198.51.100.7, 127.0.0.1"]
    assert upstream_header_values(record, "x-forwarded-proto") == ["https"]
    assert upstream_header_values(record, "x-forwarded-host") == ["public.example.test"]
    assert upstream_header_values(record, "x-forwarded-port") == ["443"]
    # Without a client value, the proxy still adds its own.
    response, body = get(port, "/echo")
    record = json.loads(body)
    assert upstream_header_values(record, "x-forwarded-for") == ["127.0.0.1"]
    assert upstream_header_values(record, "x-forwarded-proto") == ["http"]


def test_forwarding_headers_when_the_trusted_network_excludes_the_peer(proxy, upstream):
    """trusted_proxies that do not cover the peer: its X-Forwarded-For is replaced."""
    port = free_port()
    proxy.start(_listener_config(upstream.url, port, "trusted_proxies = 10.0.0.0/8"), port=port)
    response, body = get(port, "/echo", headers={"X-Forwarded-For": "203.0.113.9"})
    assert upstream_header_values(json.loads(body), "x-forwarded-for") == ["127.0.0.1"]


@pytest.mark.parametrize("query", [
    "a=1&b=%20x",
    "q=%2F%2e%2E%7e%7E&x=a+b&y=%zz&z=;&&empty=&=v",
    "path=/a/../b//c&u=%252e",
    "k=%E2%82%AC&k=2&K=3",
    "just-a-token",
])
def test_query_string_passes_byte_for_byte(proxy, upstream, query):
    """The query string reaches the upstream exactly as the client sent it."""
    port = start(proxy, upstream.url)
    response, body = get(port, f"/echo?{query}")
    assert response.status == 200
    assert json.loads(body)["path"] == f"/echo?{query}"


def test_host_header_client_is_forwarded(proxy, upstream):
    """host_header = client (the default): the upstream gets the client's Host header."""
    port = free_port()
    proxy.start(_listener_config(upstream.url, port, upstream_extra="host_header = client"), port=port)
    response, body = get(port, "/echo", headers={"Host": "Chat.Example.Test:9000"})
    assert upstream_header_values(json.loads(body), "host") == ["Chat.Example.Test:9000"]


def test_host_header_upstream_uses_the_server_authority(proxy, upstream):
    """host_header = upstream: the upstream gets its own host:port as Host, the client's
    in X-Forwarded-Host."""
    port = free_port()
    proxy.start(_listener_config(upstream.url, port, upstream_extra="host_header = upstream"), port=port)
    response, body = get(port, "/echo", headers={"Host": "chat.example.test"})
    record = json.loads(body)
    assert upstream_header_values(record, "host") == [f"127.0.0.1:{upstream.port}"]
    assert upstream_header_values(record, "x-forwarded-host") == ["chat.example.test"]


# ---------------------------------------------------------------------------
# Errors


MALFORMED = {
    "bad-request-line": b"GARBAGE\r\n\r\n",
    "space-before-colon": b"GET /echo HTTP/1.1\r\nHost : proxy.test\r\n\r\n",
    "cl-and-te": (b"POST /echo HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "invalid-chunk-size": b"POST /echo HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "missing-host": b"GET /echo HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET /echo HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    "bad-host": b"GET /echo HTTP/1.1\r\nHost: a b\r\n\r\n",
    "bad-content-length": b"POST /echo HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 1x\r\n\r\n",
    "two-content-lengths": (b"POST /echo HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 1\r\n"
                            b"Content-Length: 2\r\n\r\nab"),
    "bare-lf": b"GET /echo HTTP/1.1\nHost: proxy.test\n\n",
    "obs-fold": b"GET /echo HTTP/1.1\r\nHost: proxy.test\r\nX-A: 1\r\n folded\r\n\r\n",
    "origin-form-without-slash": b"GET echo HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
}


@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_request_gets_400_and_the_connection_closes(proxy, upstream, raw_clients, tmp_path, payload):
    """A malformed request gets a short 400, the connection is closed (nothing after it is
    read), the upstream gets nothing, and the access log has a 400 line."""
    log_path = tmp_path / "access.log"
    port = start(proxy, upstream.url, settings=f"access_log = {log_path}")
    client = RawClient(port)
    raw_clients.append(client)
    client.send(payload + request_bytes("GET", "/echo?smuggled=1"))
    response = client.read_response()
    assert response.status == 400
    assert 0 < len(response.body) < 200
    assert response.header("connection") == "close"
    assert client.closed_by_peer()
    assert all("smuggled" not in r["path"] for r in upstream.requests)
    assert all(r["body_length"] == 0 for r in upstream.requests)
    lines = read_log_lines(log_path, 1)
    assert '" 400 ' in lines[-1]


def test_502_when_the_upstream_cannot_be_reached(proxy, tmp_path):
    """A route whose server refuses connections gets a short 502, logged."""
    log_path = tmp_path / "access.log"
    dead = f"http://127.0.0.1:{free_port()}"
    port = start(proxy, dead, settings=f"access_log = {log_path}\naccess_log_format = json")
    response, body = get(port, "/echo")
    assert response.status == 502
    assert 0 < len(body) < 200
    record = json.loads(read_log_lines(log_path, 1)[-1])
    assert record["status"] == 502 and record["upstream"] == dead and record["route"] == "all"


def test_502_when_the_upstream_answers_garbage(proxy, upstream, tmp_path):
    """An upstream answer that is not HTTP gets a short 502, logged; the proxy keeps working."""
    log_path = tmp_path / "access.log"
    port = start(proxy, upstream.url, settings=f"access_log = {log_path}\naccess_log_format = json")
    response, body = get(port, "/garbage")
    assert response.status == 502
    assert 0 < len(body) < 200
    assert b"NOT HTTP" not in body
    assert json.loads(read_log_lines(log_path, 1)[-1])["status"] == 502
    response, body = get(port, "/echo?after=1")
    assert response.status == 200 and json.loads(body)["path"] == "/echo?after=1"


def test_504_when_the_upstream_does_not_answer_in_time(proxy, upstream, tmp_path):
    """An upstream that does not answer within response_timeout gets a short 504 (logged),
    and the request is not sent again, even over a pooled connection."""
    log_path = tmp_path / "access.log"
    port = free_port()
    proxy.start(_listener_config(upstream.url, port, upstream_extra="response_timeout = 1",
                                 settings=f"access_log = {log_path}\naccess_log_format = json"), port=port)
    response, _ = get(port, "/echo?warm=1")  # the /slow request then goes over a pooled connection
    assert response.status == 200
    started = time.monotonic()
    response, body = get(port, "/slow?delay=3")
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert 0 < len(body) < 200
    assert elapsed < 2.9
    assert [r["path"] for r in upstream.requests].count("/slow?delay=3") == 1
    statuses = [json.loads(line)["status"] for line in read_log_lines(log_path, 2)]
    assert statuses[-1] == 504


def test_upstream_failure_after_the_response_started_breaks_the_client_connection(proxy, upstream, tmp_path):
    """An upstream that dies mid-body: the client connection is closed so http.client raises
    IncompleteRead instead of seeing a complete-looking body; the access log has the line."""
    log_path = tmp_path / "access.log"
    port = start(proxy, upstream.url, settings=f"access_log = {log_path}\naccess_log_format = json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/truncate?n=200000")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()
    record = json.loads(read_log_lines(log_path, 1)[-1])
    assert record["target"] == "/truncate?n=200000"
    assert record["bytes"] < 200000
    response, body = get(port, "/echo?after=1")
    assert response.status == 200


class BrokenUpstream:
    """An upstream that answers every request with ``prefix`` and then closes the connection:
    a response cut short after it started."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(self.prefix)
                except OSError:
                    pass

    def stop(self) -> None:
        """Stop accepting."""
        self.listener.close()


@pytest.fixture
def broken_chunked() -> Iterator[BrokenUpstream]:
    """An upstream whose chunked response stops after its first chunk."""
    server = BrokenUpstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    yield server
    server.stop()


def test_truncated_chunked_response_raises_incomplete_read(proxy, broken_chunked):
    """An upstream chunked body cut short: the HTTP/1.1 client never gets the final chunk, and
    http.client raises IncompleteRead."""
    port = start(proxy, broken_chunked.url)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/cut")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()


def test_truncated_response_to_http10_client_is_not_a_clean_close(proxy, broken_chunked, raw_clients):
    """For an HTTP/1.0 client the body is delimited by the connection close, so a body cut
    short upstream must end with a reset, never with the clean close that marks a complete
    body."""
    port = start(proxy, broken_chunked.url)
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("GET", "/cut", version="HTTP/1.0"))
    received = b""
    with pytest.raises(OSError):
        while True:
            chunk = client.sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert b"0\r\n\r\n" not in received


# ---------------------------------------------------------------------------
# Access log


def test_access_log_combined_format(proxy, upstream, tmp_path):
    """access_log = FILE with the combined format: one line per request with client,
    request line, status, bytes, duration, route and upstream."""
    log_path = tmp_path / "access.log"
    port = start(proxy, upstream.url, settings=f"access_log = {log_path}\naccess_log_format = combined")
    response, body = get(port, "/bytes?n=1234", headers={"User-Agent": "test-agent/1", "Referer": "http://r.test/"})
    assert response.status == 200
    response, _ = get(port, "/status?code=404")
    lines = read_log_lines(log_path, 2)
    assert len(lines) == 2
    first = lines[0]
    assert first.startswith("127.0.0.1 - - [")
    assert '"GET /bytes?n=1234 HTTP/1.1" 200 1234 "http://r.test/" "test-agent/1" ' in first
    assert first.endswith(f"route=all upstream={upstream.url}")
    duration = float(first.split()[-3])
    assert 0 <= duration < 10
    assert '"GET /status?code=404 HTTP/1.1" 404 0 ' in lines[1]


def test_access_log_json_format(proxy, upstream, tmp_path):
    """access_log = FILE with the JSON format: one JSON object per request with client,
    method, target, status, bytes, duration, route and upstream."""
    log_path = tmp_path / "access.log"
    port = start(proxy, upstream.url, settings=f"access_log = {log_path}\naccess_log_format = json")
    get(port, "/bytes?n=777")
    get(port, "/echo", "POST", body=b"abc")
    lines = read_log_lines(log_path, 2)
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["client"] == "127.0.0.1"
    assert first["method"] == "GET" and first["target"] == "/bytes?n=777"
    assert first["status"] == 200 and first["bytes"] == 777
    assert isinstance(first["duration"], (int, float)) and 0 <= first["duration"] < 10
    assert first["route"] == "all" and first["upstream"] == upstream.url
    assert second["method"] == "POST" and second["status"] == 200 and second["bytes"] > 0


def test_access_log_records_proxy_errors(proxy, upstream, tmp_path, raw_clients):
    """Answers the proxy makes itself (413, 431, 408) get an access-log line too."""
    log_path = tmp_path / "access.log"
    port = start(proxy, upstream.url, settings=f"access_log = {log_path}\naccess_log_format = json\n"
                                                "max_body_bytes = 10\nmax_headers = 5\nheader_timeout = 1")
    response, _ = get(port, "/echo", "POST", body=b"x" * 50)
    assert response.status == 413
    client = RawClient(port)
    raw_clients.append(client)
    client.send(request_bytes("GET", "/echo", headers=[(f"X-{i}", "v") for i in range(10)]))
    assert client.read_response().status == 431
    slow = RawClient(port)
    raw_clients.append(slow)
    slow.send(b"GET /echo HTT")
    assert slow.read_response().status == 408
    statuses = sorted(json.loads(line)["status"] for line in read_log_lines(log_path, 3))
    assert statuses == [408, 413, 431]
