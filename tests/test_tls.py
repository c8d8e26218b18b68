"""TLS, SNI, self-signed certificates, upstream TLS, the listener ``allow`` gate
and ``trusted_proxies``: a real ``twistd -n chatproxy`` process between real,
independent clients (Python ``ssl``, ``openssl s_client``, ``curl``) and real
upstream servers, all on loopback."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatproxy.config import parse_networks
from chatproxy.http.messages import client_ip, in_networks
from chatproxy.proxy.forwarding import resolve_client
from chatproxy.proxy.tls import DEFAULT_CIPHERS
from conftest import PKI, RecordingUpstream, free_port, wait_for_port
from hostile import fd_count

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
needs_curl = pytest.mark.skipif(CURL is None, reason="the curl command is not installed")
TIMEOUT = 10.0


# ---------------------------------------------------------------------------
# Helpers


def make_config(port: int, servers: str, *, listener: str = "", upstream: str = "",
                settings: str = "access_log = off", extra: str = "") -> str:
    """One listener on 127.0.0.1:port, one upstream ``app``, one catch-all route."""
    return (
        f"[chatproxy]\n{settings}\n\n"
        f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n{listener}\n\n"
        f"[upstream:app]\nservers = {servers}\n{upstream}\n\n"
        f"[route:all]\npath = /\nupstream = app\n\n{extra}"
    )


def tls_listener(pki: PKI, more: str = "") -> str:
    """Listener lines for TLS with the localhost certificate."""
    return f"tls = yes\ncertificate = {pki.cert}\nkey = {pki.key}\n{more}"


def client_context(pki: PKI | None = None, *, min_version: ssl.TLSVersion | None = None,
                   max_version: ssl.TLSVersion | None = None, ciphers: str | None = None,
                   alpn: list[str] | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context; verifies against the test CA when ``pki`` is given, else verifies nothing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if pki is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(pki.ca))
        context.check_hostname = check_hostname
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 / TLSv1_1 are deprecated names
        if min_version is not None:
            context.minimum_version = min_version
        if max_version is not None:
            context.maximum_version = max_version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def legacy_context() -> ssl.SSLContext:
    """A client that can speak only TLS 1.0/1.1 (security level 0 so the local OpenSSL allows it)."""
    return client_context(None, min_version=ssl.TLSVersion.TLSv1, max_version=ssl.TLSVersion.TLSv1_1,
                          ciphers="DEFAULT@SECLEVEL=0")


def tls_connect(port: int, context: ssl.SSLContext, server_hostname: str | None = None,
                host: str = "127.0.0.1") -> ssl.SSLSocket:
    """A completed TLS handshake with ``host:port`` (bounded by TIMEOUT)."""
    raw = socket.create_connection((host, port), timeout=TIMEOUT)
    try:
        return context.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def handshake_error(port: int, context: ssl.SSLContext, server_hostname: str | None = None) -> ssl.SSLError:
    """The SSLError a handshake with ``port`` fails with (fails the test if it succeeds)."""
    with pytest.raises(ssl.SSLError) as info:
        tls_connect(port, context, server_hostname).close()
    return info.value


def http_over(sock: socket.socket, path: str = "/echo", host: str = "localhost") -> tuple[int, bytes]:
    """Send one GET over ``sock`` and read the response (framed by Content-Length); status and body.

    The connection is left open (closing is checked on its own, in
    ``test_connection_close_over_tls_closes_the_connection``).
    """
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a complete response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    assert match is not None, head
    length = int(match.group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed mid-body")
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def get(port: int, path: str = "/echo", *, context: ssl.SSLContext | None = None, host: str = "127.0.0.1",
        headers: list[tuple[str, str]] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET to the proxy (https when ``context`` is given): status, headers, body."""
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)
    try:
        conn.putrequest("GET", path)
        for name, value in headers or []:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def peer_subject_cn(sock: ssl.SSLSocket) -> str:
    """The common name of the certificate the server presented."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def peer_dns_names(sock: ssl.SSLSocket) -> list[str]:
    """The DNS subject alternative names of the certificate the server presented."""
    from cryptography import x509

    der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName))


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` against 127.0.0.1:port, stdin closed at once (bounded)."""
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args],
                          input="", capture_output=True, text=True, timeout=30)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """``curl`` (bounded), output captured."""
    assert CURL is not None
    return subprocess.run([CURL, "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=30)


def client_hello() -> bytes:
    """The bytes of a genuine TLS ClientHello (made by Python's ssl with memory BIOs)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(None).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "a TLS handshake record"
    return hello


def send_and_read_all(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes | None:
    """Connect, send ``payload``, read until EOF; None when the connection was reset instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        data = b""
        try:
            sock.sendall(payload)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return data
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None if not data else data


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound on this machine."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def wait_until(predicate: Any, timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _startup_failure(proxy, text: str) -> tuple[int, str]:
    """Start twistd on ``text`` expecting it to exit by itself (bounded); exit status and output."""
    process = proxy.start(text, port=None)
    try:
        code = process.wait_exit(30)
    except subprocess.TimeoutExpired:
        process.stop()
        pytest.fail("chatproxy kept running with an unusable certificate:\n" + process.output())
    return code, process.output()


def assert_config_error_line(output: str, config_file: Path, option: str) -> str:
    """The output is one line: a configuration error naming the file, [listen:main] and ``option``."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    pattern = rf"^chatproxy: configuration error: {re.escape(str(config_file))}:? \[listen:main\]:? {option}: \S"
    assert re.match(pattern, lines[0]), lines[0]
    return lines[0]


class LegacyTLSServer:
    """A control server that accepts TLS 1.0 to 1.3 and every cipher (security level 0).

    It proves that a client which chatproxy refuses is able to complete a
    handshake at all, so the refusal comes from chatproxy, not from the local
    OpenSSL's policy.
    """

    def __init__(self, pki: PKI) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.context.minimum_version = ssl.TLSVersion.TLSv1
        self.context.set_ciphers("ALL@SECLEVEL=0")
        self.context.load_cert_chain(pki.cert, pki.key)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.results: list[tuple[str | None, str | None]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(TIMEOUT)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    cipher = tls.cipher()
                    self.results.append((tls.version(), cipher[0] if cipher else None))
            except (ssl.SSLError, OSError):
                conn.close()

    def stop(self) -> None:
        """Stop accepting and close the socket."""
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def legacy_server(pki: PKI) -> Iterator[LegacyTLSServer]:
    """A permissive TLS control server on 127.0.0.1."""
    server = LegacyTLSServer(pki)
    yield server
    server.stop()


class TLSRecordingUpstream(RecordingUpstream):
    """conftest's recording upstream behind TLS (handshake in the per-connection thread)."""

    def __init__(self, context: ssl.SSLContext, host: str = "127.0.0.1", url_host: str | None = None) -> None:
        self.context = context
        self.handshake_errors: list[str] = []
        self.client_certificates: list[dict[str, Any]] = []
        self.finished_connections = 0
        super().__init__(host)
        self.url = f"https://{url_host or host}:{self.port}"

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(TIMEOUT)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.handshake_errors.append(repr(e))
            request.close()
            return
        try:
            self.client_certificates.append(tls.getpeercert() or {})
            self.RequestHandlerClass(tls, client_address, self)
        except OSError:
            pass
        finally:
            tls.close()
            self.finished_connections += 1


@pytest.fixture
def tls_upstream(pki: PKI) -> Iterator[Any]:
    """Start HTTPS recording upstreams: ``tls_upstream(cert, key, require_client_cert=False, url_host=...)``."""
    servers: list[TLSRecordingUpstream] = []

    def start(cert: Path = pki.cert, key: Path = pki.key, *, require_client_cert: bool = False,
              url_host: str = "localhost") -> TLSRecordingUpstream:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(pki.ca))
        server = TLSRecordingUpstream(context, url_host=url_host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# ---------------------------------------------------------------------------
# TLS termination: versions, ALPN, ciphers


@pytest.mark.parametrize("version, expected", [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")])
def test_tls12_and_tls13_clients_are_accepted_and_served(proxy, upstream, pki, version, expected):
    """A verifying client pinned to TLS 1.2 or to TLS 1.3 completes the handshake with the
    localhost certificate and gets the upstream's answer over that TLS connection."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki)), port=port)
    context = client_context(pki, min_version=version, max_version=version)
    with tls_connect(port, context, "localhost") as sock:
        assert sock.version() == expected
        status, body = http_over(sock)
    assert status == 200
    headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert headers["x-forwarded-proto"] == "https"


def test_tls12_negotiates_only_modern_ecdhe_aead_suites(proxy, upstream, pki):
    """With TLS 1.2 and the client's default cipher list, the suite chosen is one of the
    ECDHE + AEAD suites of DEFAULT_CIPHERS."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki)), port=port)
    context = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)
    with tls_connect(port, context, "localhost") as sock:
        cipher = sock.cipher()
    assert cipher is not None
    assert cipher[0] in DEFAULT_CIPHERS.split(":")


@pytest.mark.parametrize("minimum, maximum", [
    (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1),
    (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1),
    (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1),
], ids=["tls1.0", "tls1.1", "tls1.0-1.1"])
def test_tls10_and_tls11_clients_are_refused_by_the_server(proxy, upstream, pki, legacy_server, minimum, maximum):
    """A Python client limited to TLS 1.0/1.1 at security level 0 completes a handshake with a
    permissive control server (so the local OpenSSL is willing), but chatproxy answers its
    ClientHello with a protocol_version alert: the refusal comes from the server."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki)), port=port)
    context = client_context(None, min_version=minimum, max_version=maximum, ciphers="DEFAULT@SECLEVEL=0")
    with tls_connect(legacy_server.port, context) as sock:
        assert sock.version() in ("TLSv1", "TLSv1.1")
    error = handshake_error(port, context)
    assert error.reason == "TLSV1_ALERT_PROTOCOL_VERSION", error
    assert upstream.requests == []


@needs_openssl
@pytest.mark.parametrize("flag, name", [("-tls1_1", "TLSv1.1"), ("-tls1", "TLSv1")])
def test_openssl_s_client_old_versions_are_refused_with_a_server_alert(proxy, upstream, pki, legacy_server,
                                                                       flag, name):
    """``openssl s_client -tls1_1``/``-tls1`` with ``-cipher DEFAULT@SECLEVEL=0`` connects to a
    permissive control server with that protocol, while chatproxy sends it the
    "protocol version" alert (so it is the server, not the client, that refuses)."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki)), port=port)
    control = s_client(legacy_server.port, flag, "-cipher", "DEFAULT@SECLEVEL=0", "-brief")
    assert f"Protocol version: {name}\n" in control.stderr, control.stderr
    refused = s_client(port, flag, "-cipher", "DEFAULT@SECLEVEL=0", "-brief")
    assert refused.returncode != 0
    assert "CONNECTION ESTABLISHED" not in refused.stderr
    assert "alert protocol version" in refused.stderr, refused.stderr
    assert "no protocols available" not in refused.stderr


@needs_openssl
def test_openssl_s_client_tls12_and_tls13_succeed(proxy, upstream, pki):
    """``openssl s_client -tls1_2`` and ``-tls1_3`` verify the localhost certificate against the
    test CA and report the requested protocol."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki)), port=port)
    for flag, name in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        result = s_client(port, flag, "-CAfile", str(pki.ca), "-verify_return_error", "-servername", "localhost",
                          "-brief")
        assert result.returncode == 0, result.stderr
        assert f"Protocol version: {name}\n" in result.stderr, result.stderr
        assert "Verification: OK" in result.stderr


def test_min_tls_version_13_refuses_a_tls12_only_client(proxy, upstream, pki):
    """With ``min_tls_version = 1.3`` a client capped at TLS 1.2 gets a protocol_version alert,
    while a TLS 1.3 client is still served."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki, "min_tls_version = 1.3")), port=port)
    error = handshake_error(port, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2), "localhost")
    assert error.reason == "TLSV1_ALERT_PROTOCOL_VERSION", error
    with tls_connect(port, client_context(pki), "localhost") as sock:
        assert sock.version() == "TLSv1.3"
        assert http_over(sock)[0] == 200


def test_alpn_h2_and_http11_offer_selects_http11_when_http2_is_off(proxy, upstream, pki):
    """On a listener with ``http2 = no``, a client offering ALPN ``h2, http/1.1`` is given
    ``http/1.1`` (tests/test_http2.py covers the default, where h2 is chosen)."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki, "http2 = no")), port=port)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = client_context(pki, max_version=version, alpn=["h2", "http/1.1"])
        with tls_connect(port, context, "localhost") as sock:
            assert sock.selected_alpn_protocol() == "http/1.1"
            assert http_over(sock)[0] == 200


def test_alpn_h2_only_offer_connects_without_alpn_when_http2_is_off(proxy, upstream, pki):
    """On a listener with ``http2 = no``, a client offering only ``h2`` is not refused: the
    handshake completes with no ALPN protocol selected, and HTTP/1.1 then works over it."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki, "http2 = no")), port=port)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = client_context(pki, max_version=version, alpn=["h2"])
        with tls_connect(port, context, "localhost") as sock:
            assert sock.selected_alpn_protocol() is None
            assert http_over(sock)[0] == 200


def _read_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no EOF within {timeout}s after {len(data)} bytes: {data[:200]!r}") from None
        if not chunk:
            return data
        data += chunk


def test_connection_close_over_tls_closes_the_connection(proxy, upstream, pki):
    """A request with ``Connection: close`` on a TLS listener is answered and then the connection
    is closed (close_notify, then EOF), exactly as on a plain listener.  (Twisted's TLS transport
    does not shut down while a producer is registered: FrontConnection.close must unregister it.)
    """
    port, plain_port = free_port(), free_port()
    process = proxy.start(make_config(port, upstream.url, listener=tls_listener(pki), extra=(
        f"[listen:plain]\nendpoint = tcp:{plain_port}:interface=127.0.0.1\n")), port=port)
    wait_for_port(plain_port, process=process.process)
    request = b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", plain_port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        assert _read_to_eof(sock).startswith(b"HTTP/1.1 200 ")
    with tls_connect(port, client_context(pki), "localhost") as sock:
        sock.sendall(request)
        assert _read_to_eof(sock).startswith(b"HTTP/1.1 200 ")


def _settled_fd_count(pid: int) -> int:
    """The process's open file descriptors once the count stopped changing
    (connections just closed by clients may still be being released)."""
    count, deadline = fd_count(pid), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.2)
        count, previous = fd_count(pid), count
        if count == previous:
            break
    return count


def _read_response(sock: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """(head, body) of one response with a Content-Length, read off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"EOF inside a response head: {data[:200]!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"EOF after {len(body)} of {length} body bytes"
        body += chunk
    assert len(body) == length
    return head, body


def test_tls_carries_big_bodies_and_pipelined_requests_whole_and_every_client_end_frees_its_socket(
        proxy, upstream, pki):
    """Over TLS (TLS 1.2 and 1.3): a 300 KB upload reaches the upstream
    intact, a 300 KB download arrives intact, three requests written at once
    get three answers in order; then clients that end with close_notify,
    with a bare EOF in the middle of a record, or with a forged record after
    the handshake (which the proxy answers by ending the connection itself)
    all leave the proxy holding no socket for them, and it still serves."""
    port = free_port()
    process = proxy.start(make_config(port, upstream.url, listener=tls_listener(pki)), port=port)
    pid = process.process.pid
    upload = os.urandom(300_000)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = client_context(pki, min_version=version, max_version=version)
        with tls_connect(port, context, "localhost") as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 300000\r\n\r\n" + upload)
            head, _ = _read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert upstream.requests[-1]["body_sha"] == __import__("hashlib").sha256(upload).hexdigest()
            sock.sendall(b"GET /bytes?n=300000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head, body = _read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 ") and body == (bytes(range(256)) * 1200)[:300_000]
            sock.sendall(b"".join(f"GET /bytes?n={n} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                                  for n in (10, 20_000, 30)))
            assert [len(_read_response(sock)[1]) for _ in range(3)] == [10, 20_000, 30]
    baseline = _settled_fd_count(pid)
    for ending in ("close_notify", "eof inside a record", "forged record"):
        for _ in range(20):
            sock = tls_connect(port, client_context(pki), "localhost")
            sock.sendall(b"GET /bytes?n=10 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            _read_response(sock)
            if ending == "close_notify":
                sock.unwrap().close()
                continue
            raw = socket.socket(fileno=sock.detach())
            # A TLS application-data record header announcing 100 bytes: then
            # EOF after 10 of them, or 100 bytes that fail the integrity check.
            raw.sendall(b"\x17\x03\x03\x00\x64" + os.urandom(10 if ending == "eof inside a record" else 100))
            if ending == "forged record":  # the proxy ends the connection itself (after an alert)
                _read_to_eof(raw)  # (under TLS 1.3 the alert is encrypted: its record type says 0x17)
            raw.close()
    deadline = time.monotonic() + 10
    while fd_count(pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fd_count(pid) <= baseline
    with tls_connect(port, client_context(pki), "localhost") as sock:
        sock.sendall(b"GET /bytes?n=5 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert _read_response(sock)[1] == bytes(range(5))


@needs_curl
def test_curl_offering_http2_uses_http11_when_http2_is_off(proxy, upstream, pki):
    """``curl --http2`` (ALPN h2,http/1.1) with the test CA gets its answer over HTTP/1.1 from a
    listener with ``http2 = no``."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki, "http2 = no")), port=port)
    result = curl("--http2", "--cacert", str(pki.ca), "-o", os.devnull, "-w", "%{http_code} %{http_version}",
                  f"https://127.0.0.1:{port}/echo")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 1.1"


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-SHA"])
def test_tls12_client_with_only_legacy_cbc_or_non_ecdhe_ciphers_is_refused(proxy, upstream, pki, legacy_server,
                                                                           cipher):
    """A TLS 1.2 client restricted to a CBC suite (or a non-ECDHE one) gets a handshake_failure
    alert from chatproxy.  For the ECDSA CBC suites a permissive control server with the same
    EC certificate negotiates that very suite, proving the client can use it (AES128-SHA needs an
    RSA certificate, so it has no control: it could never work with the EC test certificate)."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki)), port=port)
    context = client_context(None, max_version=ssl.TLSVersion.TLSv1_2, ciphers=f"{cipher}@SECLEVEL=0")
    if cipher.startswith("ECDHE"):
        with tls_connect(legacy_server.port, context) as sock:
            cipher_used = sock.cipher()
            assert cipher_used is not None and cipher_used[0] == cipher
    error = handshake_error(port, context)
    assert error.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE", error


def test_tls12_client_with_a_modern_suite_is_accepted(proxy, upstream, pki):
    """The same kind of restricted client, pinned to ECDHE-ECDSA-AES128-GCM-SHA256, succeeds:
    the refusals above are about the suites, not about restricting the list."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki)), port=port)
    context = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    with tls_connect(port, context, "localhost") as sock:
        cipher = sock.cipher()
        assert cipher is not None and cipher[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
        assert http_over(sock)[0] == 200


def test_ciphers_option_replaces_the_tls12_suites(proxy, upstream, pki):
    """``ciphers = ECDHE-ECDSA-AES128-SHA`` on a listener makes exactly that (otherwise refused)
    CBC suite work for a TLS 1.2 client, and refuses a client limited to a default AEAD suite."""
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki, "ciphers = ECDHE-ECDSA-AES128-SHA")),
                port=port)
    context = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA@SECLEVEL=0")
    with tls_connect(port, context, "localhost") as sock:
        cipher = sock.cipher()
        assert cipher is not None and cipher[0] == "ECDHE-ECDSA-AES128-SHA"
        assert http_over(sock)[0] == 200
    aead_only = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert handshake_error(port, aead_only, "localhost").reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"


# ---------------------------------------------------------------------------
# SNI


@pytest.fixture
def sni_proxy(proxy, upstream, pki) -> int:
    """A TLS listener with the localhost default certificate and an SNI entry for chat.example.test."""
    port = free_port()
    listener = tls_listener(pki, f"sni = chat.example.test: {pki.chat_cert} {pki.chat_key}")
    proxy.start(make_config(port, upstream.url, listener=listener), port=port)
    return port


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_sni_chat_name_gets_the_chat_certificate(sni_proxy, pki, version):
    """SNI ``chat.example.test`` is answered with the chat.example.test certificate (a client
    verifying that host name against the CA succeeds, subject and SAN say chat.example.test),
    ALPN still works on the switched context, and a request is proxied."""
    context = client_context(pki, min_version=version, max_version=version, alpn=["http/1.1"])
    with tls_connect(sni_proxy, context, "chat.example.test") as sock:
        assert peer_subject_cn(sock) == "chat.example.test"
        assert peer_dns_names(sock) == ["chat.example.test"]
        assert sock.selected_alpn_protocol() == "http/1.1"
        status, body = http_over(sock, host="chat.example.test")
    assert status == 200
    assert json.loads(body)["path"] == "/echo"


@pytest.mark.parametrize("server_hostname", [None, "localhost", "unknown.example.test", "example.test"])
def test_sni_other_or_absent_name_gets_the_default_certificate(sni_proxy, pki, server_hostname):
    """Without SNI, or with a name that has no SNI entry, the default (localhost) certificate is
    presented."""
    context = client_context(pki, check_hostname=False)
    with tls_connect(sni_proxy, context, server_hostname) as sock:
        assert peer_subject_cn(sock) == "localhost"
        assert "localhost" in peer_dns_names(sock)


def test_sni_name_is_matched_case_insensitively(sni_proxy, pki):
    """SNI ``CHAT.Example.TEST`` selects the chat.example.test certificate too."""
    context = client_context(pki, check_hostname=False)
    with tls_connect(sni_proxy, context, "CHAT.Example.TEST") as sock:
        assert peer_subject_cn(sock) == "chat.example.test"


@needs_openssl
def test_sni_seen_by_openssl_s_client(sni_proxy, pki):
    """``openssl s_client -servername chat.example.test`` sees subject CN chat.example.test and
    verifies it for that name; ``-noservername`` sees CN localhost."""
    chat = s_client(sni_proxy, "-servername", "chat.example.test", "-CAfile", str(pki.ca),
                    "-verify_hostname", "chat.example.test", "-verify_return_error")
    assert chat.returncode == 0, chat.stderr
    assert re.search(r"subject=\s*CN\s*=\s*chat\.example\.test", chat.stdout), chat.stdout
    default = s_client(sni_proxy, "-noservername", "-CAfile", str(pki.ca))
    assert default.returncode == 0, default.stderr
    assert re.search(r"subject=\s*CN\s*=\s*localhost", default.stdout), default.stdout


@needs_curl
def test_sni_curl_verifies_chat_host(sni_proxy, pki):
    """curl to https://chat.example.test:PORT (resolved to 127.0.0.1) verifies against the CA,
    which needs the chat certificate, and gets the upstream's answer."""
    result = curl("--cacert", str(pki.ca), "--resolve", f"chat.example.test:{sni_proxy}:127.0.0.1",
                  "-w", "\n%{http_code}", f"https://chat.example.test:{sni_proxy}/echo")
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition("\n")
    assert code == "200"
    assert dict((k.lower(), v) for k, v in json.loads(body)["headers"])["host"] == f"chat.example.test:{sni_proxy}"


def test_sni_wildcard_entry_matches_one_label(proxy, upstream, pki):
    """An ``sni = *.example.test: ...`` entry answers ``anything.example.test`` but not
    ``a.b.example.test`` (a wildcard covers exactly one label) nor ``example.test``."""
    port = free_port()
    listener = tls_listener(pki, f"sni = *.example.test: {pki.chat_cert} {pki.chat_key}")
    proxy.start(make_config(port, upstream.url, listener=listener), port=port)
    context = client_context(pki, check_hostname=False)
    for name, expected in (("anything.example.test", "chat.example.test"), ("a.b.example.test", "localhost"),
                           ("example.test", "localhost")):
        with tls_connect(port, context, name) as sock:
            assert peer_subject_cn(sock) == expected, name


# ---------------------------------------------------------------------------
# create_self_signed


def _self_signed_config(port: int, upstream_url: str) -> str:
    return make_config(port, upstream_url, listener=(
        "tls = yes\ncertificate = tls/sub/self.crt\nkey = tls/sub/self.key\ncreate_self_signed = yes"))


def test_create_self_signed_creates_files_logs_them_and_serves(proxy, upstream, tmp_path):
    """With ``create_self_signed = yes`` and no files, chatproxy creates the certificate and a
    0600 key (paths relative to the config file, directories made), logs where, serves HTTPS
    with that certificate (verification disabled), and curl -k gets the upstream's answer."""
    port = free_port()
    process = proxy.start(_self_signed_config(port, upstream.url), port=port)
    cert, key = tmp_path / "tls/sub/self.crt", tmp_path / "tls/sub/self.key"
    assert cert.is_file() and key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    output = process.output()
    line = next((l for l in output.splitlines() if "self-signed" in l), "")
    assert str(cert) in line and str(key) in line, output
    with tls_connect(port, client_context(None)) as sock:
        served = sock.getpeercert(binary_form=True)
        assert peer_subject_cn(sock) == "localhost"
        assert http_over(sock)[0] == 200
    assert served == ssl.PEM_cert_to_DER_cert(cert.read_text())
    if CURL is not None:
        result = curl("-k", "-o", os.devnull, "-w", "%{http_code}", f"https://127.0.0.1:{port}/echo")
        assert result.stdout == "200", result.stderr


def test_create_self_signed_certificate_verifies_for_localhost_and_loopback(proxy, upstream, tmp_path):
    """The created certificate, trusted as its own CA, verifies for localhost and 127.0.0.1."""
    port = free_port()
    proxy.start(_self_signed_config(port, upstream.url), port=port)
    context = ssl.create_default_context(cafile=str(tmp_path / "tls/sub/self.crt"))
    for name in ("localhost", "127.0.0.1"):
        with tls_connect(port, context, name) as sock:
            assert http_over(sock)[0] == 200


def test_create_self_signed_second_start_reuses_the_files(proxy, upstream, tmp_path):
    """A second start with the same configuration keeps the files unchanged, logs no creation and
    presents the same certificate."""
    port = free_port()
    first = proxy.start(_self_signed_config(port, upstream.url), port=port)
    cert, key = tmp_path / "tls/sub/self.crt", tmp_path / "tls/sub/self.key"
    with tls_connect(port, client_context(None)) as sock:
        served_first = sock.getpeercert(binary_form=True)
    assert first.stop() == 0
    cert_bytes, key_bytes = cert.read_bytes(), key.read_bytes()
    port2 = free_port()
    second = proxy.start(_self_signed_config(port2, upstream.url), port=port2)
    with tls_connect(port2, client_context(None)) as sock:
        served_second = sock.getpeercert(binary_form=True)
    assert served_second == served_first
    assert cert.read_bytes() == cert_bytes and key.read_bytes() == key_bytes
    assert "self-signed" not in second.output()


@pytest.mark.parametrize("present", ["key", "certificate"])
def test_create_self_signed_with_only_one_file_present_overwrites_nothing(proxy, upstream, tmp_path, present):
    """When only the key (or only the certificate) exists, ``create_self_signed`` does not
    replace it: startup is refused with one line naming the section and the file left untouched."""
    existing = tmp_path / ("tls/sub/self.key" if present == "key" else "tls/sub/self.crt")
    existing.parent.mkdir(parents=True)
    existing.write_text("operator's file\n")
    existing.chmod(0o644)
    port = free_port()
    code, output = _startup_failure(proxy, _self_signed_config(port, upstream.url))
    assert code == 2, output
    assert_config_error_line(output, proxy.dir / "chatproxy.ini", "(certificate|key)")
    assert existing.read_text() == "operator's file\n"
    assert stat.S_IMODE(existing.stat().st_mode) == 0o644
    assert sorted(p.name for p in existing.parent.iterdir()) == [existing.name]


def test_create_self_signed_that_cannot_be_written_stops_startup_with_one_line(proxy, upstream, tmp_path):
    """When the certificate cannot be created (its directory would have to be made inside a
    regular file) twistd exits non-zero with one line naming the listener, and no traceback."""
    (tmp_path / "blocker").write_text("a file, not a directory\n")
    port = free_port()
    text = make_config(port, upstream.url, listener=(
        "tls = yes\ncertificate = blocker/self.crt\nkey = blocker/self.key\ncreate_self_signed = yes"))
    code, output = _startup_failure(proxy, text)
    assert code != 0, output
    assert "Traceback" not in output, output
    # twistd has already redirected stderr into its log here, so the line carries a log prefix.
    errors = [line for line in output.splitlines() if "chatproxy: [listen:main]" in line]
    assert len(errors) == 1, output
    assert "[listen:main]" in errors[0] and "self-signed" in errors[0], errors[0]


# ---------------------------------------------------------------------------
# Upstream TLS


def test_upstream_https_verified_with_the_configured_ca(proxy, tls_upstream, pki):
    """``verify`` defaults to yes: with ``ca = <test CA>`` an https://localhost upstream with a
    certificate for localhost is reached, the request arrives over TLS, the answer comes back."""
    server = tls_upstream()
    port = free_port()
    proxy.start(make_config(port, server.url, upstream=f"ca = {pki.ca}"), port=port)
    status, _, body = get(port)
    assert status == 200
    assert json.loads(body)["path"] == "/echo"
    assert len(server.requests) == 1


def test_upstream_https_by_ip_address_is_verified_against_ip_san(proxy, tls_upstream, pki):
    """An https://127.0.0.1 upstream is verified against the certificate's IP address SAN."""
    server = tls_upstream(url_host="127.0.0.1")
    port = free_port()
    proxy.start(make_config(port, server.url, upstream=f"ca = {pki.ca}"), port=port)
    assert get(port)[0] == 200


def test_upstream_https_without_ca_uses_system_trust_and_fails(proxy, tls_upstream, pki):
    """Without ``ca`` the system trust store is used, which does not know the test CA: 502, and
    no request reaches the upstream application."""
    server = tls_upstream()
    port = free_port()
    proxy.start(make_config(port, server.url), port=port)
    assert get(port)[0] == 502
    assert server.requests == []


def test_upstream_https_wrong_host_certificate_fails_even_with_the_right_ca(proxy, tls_upstream, pki):
    """A certificate issued by the configured CA but for elsewhere.example.test does not pass for
    https://localhost: 502 and nothing reaches the upstream application."""
    server = tls_upstream(pki.wrong_host_cert, pki.wrong_host_key)
    port = free_port()
    proxy.start(make_config(port, server.url, upstream=f"ca = {pki.ca}"), port=port)
    assert get(port)[0] == 502
    assert server.requests == []


@pytest.mark.parametrize("which", ["unknown-ca", "wrong-host"])
def test_upstream_https_verify_no_accepts_any_certificate(proxy, tls_upstream, pki, which):
    """``verify = no`` reaches both an upstream whose CA is unknown (no ``ca``) and one whose
    certificate names another host."""
    server = tls_upstream() if which == "unknown-ca" else tls_upstream(pki.wrong_host_cert, pki.wrong_host_key)
    port = free_port()
    proxy.start(make_config(port, server.url, upstream="verify = no"), port=port)
    assert get(port)[0] == 200
    assert len(server.requests) == 1


@pytest.mark.parametrize("verify", ["yes", "no"])
def test_upstream_client_certificate_is_presented(proxy, tls_upstream, pki, verify):
    """``client_certificate``/``client_key`` are presented to an upstream that requires a client
    certificate from the test CA (with verification on or off for the server): 200 and the
    upstream saw the client certificate's subject."""
    server = tls_upstream(require_client_cert=True)
    port = free_port()
    options = f"verify = {verify}\nclient_certificate = {pki.client_cert}\nclient_key = {pki.client_key}\n"
    if verify == "yes":
        options += f"ca = {pki.ca}\n"
    proxy.start(make_config(port, server.url, upstream=options), port=port)
    assert get(port)[0] == 200
    subject = dict(item[0] for item in server.client_certificates[0]["subject"])
    assert subject["commonName"] == "chatproxy client"


def test_upstream_client_certificate_and_key_in_one_file(proxy, tls_upstream, pki, tmp_path):
    """``client_certificate`` naming one PEM file holding both certificate and key (no
    ``client_key``) also works."""
    combined = tmp_path / "client.pem"
    combined.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    server = tls_upstream(require_client_cert=True)
    port = free_port()
    proxy.start(make_config(port, server.url, upstream=f"ca = {pki.ca}\nclient_certificate = {combined}"), port=port)
    assert get(port)[0] == 200


@pytest.mark.parametrize("verify", ["yes", "no"])
def test_upstream_requiring_client_certificate_without_one_gives_502(proxy, tls_upstream, pki, verify):
    """Without ``client_certificate`` an upstream requiring one refuses the handshake: 502, the
    upstream application sees no request and its TLS layer recorded the refusal."""
    server = tls_upstream(require_client_cert=True)
    port = free_port()
    upstream_options = f"ca = {pki.ca}" if verify == "yes" else "verify = no"
    proxy.start(make_config(port, server.url, upstream=upstream_options), port=port)
    assert get(port)[0] == 502
    assert server.requests == []
    wait_until(lambda: server.handshake_errors, what="the upstream to record the failed handshake")
    assert "CERTIFICATE" in server.handshake_errors[0].upper()


@pytest.mark.parametrize("options", ["max_idle_connections = 0", "idle_connection_timeout = 300ms"])
def test_upstream_tls_connection_is_closed_when_not_kept(proxy, tls_upstream, pki, options):
    """An https upstream connection chatproxy does not keep (pool size 0, or idle past
    ``idle_connection_timeout``) is really closed: the upstream's connection ends within a few
    seconds, long before its own 10 s read timeout.  (TLS close needs the producer unregistered.)"""
    server = tls_upstream()
    port = free_port()
    proxy.start(make_config(port, server.url, upstream=f"ca = {pki.ca}\n{options}"), port=port)
    assert get(port)[0] == 200
    wait_until(lambda: server.finished_connections >= 1, timeout=5.0,
               what="chatproxy to close its TLS connection to the upstream")


def test_upstream_tls_connection_is_reused(proxy, tls_upstream, pki):
    """Two sequential requests to an https upstream reuse one pooled TLS connection (one
    handshake, the same client port at the upstream)."""
    server = tls_upstream()
    port = free_port()
    proxy.start(make_config(port, server.url, upstream=f"ca = {pki.ca}"), port=port)
    assert get(port)[0] == 200
    assert get(port)[0] == 200
    assert len(server.requests) == 2
    assert server.requests[0]["client_port"] == server.requests[1]["client_port"]
    assert len(server.client_certificates) == 1


# ---------------------------------------------------------------------------
# The listener allow gate


@pytest.fixture
def gated(proxy, upstream, pki) -> Any:
    """Start a proxy with a TLS and a plain listener, both with the given ``allow``; returns ports."""

    def start(allow: str) -> tuple[int, int]:
        tls_port, plain_port = free_port(), free_port()
        text = make_config(tls_port, upstream.url, listener=tls_listener(pki, f"allow = {allow}"), extra=(
            f"[listen:plain]\nendpoint = tcp:{plain_port}:interface=127.0.0.1\nallow = {allow}\n"))
        process = proxy.start(text, port=tls_port)
        wait_for_port(plain_port, process=process.process)
        return tls_port, plain_port

    return start


def test_allow_outside_network_drops_tls_client_before_server_hello(gated, upstream):
    """With ``allow = 10.0.0.0/8`` a loopback client is closed at accept: a genuine ClientHello
    gets EOF (or a reset) with not one byte back, so no ServerHello; a Python TLS client fails
    its handshake with EOF/reset rather than any TLS alert or certificate error."""
    tls_port, _ = gated("10.0.0.0/8")
    answer = send_and_read_all(tls_port, client_hello())
    assert answer in (b"", None), answer[:20] if answer else answer
    with pytest.raises((ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError)):
        tls_connect(tls_port, client_context(None)).close()
    assert upstream.requests == []


def test_allow_outside_network_drops_plain_client_without_http_response(gated, upstream):
    """On a plain listener with ``allow = 10.0.0.0/8`` a loopback client that sends a request
    reads EOF (or a reset): no HTTP response, and nothing reaches the upstream."""
    _, plain_port = gated("10.0.0.0/8")
    answer = send_and_read_all(plain_port, b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert answer in (b"", None), answer
    assert upstream.requests == []


def test_allow_loopback_network_admits_tls_and_plain_clients(gated, upstream, pki):
    """With ``allow = 127.0.0.0/8`` the same ClientHello gets a ServerHello (a TLS handshake
    record), and both a TLS and a plain request are proxied."""
    tls_port, plain_port = gated("127.0.0.0/8")
    with socket.create_connection(("127.0.0.1", tls_port), timeout=TIMEOUT) as sock:
        sock.sendall(client_hello())
        assert sock.recv(5)[:1] == b"\x16", "a TLS handshake record (ServerHello) comes back"
    assert get(tls_port, context=client_context(pki), host="localhost")[0] == 200
    assert get(plain_port)[0] == 200
    assert len(upstream.requests) == 2


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_allow_ipv6_loopback_listener(proxy, upstream, pki):
    """A TLS listener on ``tcp6:PORT:interface=\\:\\:1`` with ``allow = ::1/128`` serves a client
    connecting from ::1 (verifying the certificate's ::1 address SAN); a second ::1 listener that
    allows only 127.0.0.0/8 drops the same client."""
    port, refused_port = free_port("::1"), free_port("::1")
    text = make_config(free_port(), upstream.url, extra=(
        f"[listen:v6]\nendpoint = tcp6:{port}:interface=\\:\\:1\n{tls_listener(pki, 'allow = ::1/128')}\n\n"
        f"[listen:v6refused]\nendpoint = tcp6:{refused_port}:interface=\\:\\:1\nallow = 127.0.0.0/8\n"))
    process = proxy.start(text, port=None)
    wait_for_port(port, host="::1", process=process.process)
    wait_for_port(refused_port, host="::1", process=process.process)
    context = client_context(pki)
    with tls_connect(port, context, "::1", host="::1") as sock:
        status, body = http_over(sock, host="[::1]")
    assert status == 200
    assert dict((k.lower(), v) for k, v in json.loads(body)["headers"])["x-forwarded-for"] == "::1"
    assert send_and_read_all(refused_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", host="::1") in (b"", None)


# ---------------------------------------------------------------------------
# trusted_proxies


@pytest.mark.parametrize("peer, forwarded_for, trusted, expected", [
    # an untrusted peer: the header is ignored
    ("203.0.113.50", ["198.51.100.1"], "127.0.0.0/8", "203.0.113.50"),
    ("203.0.113.50", ["198.51.100.1"], "", "203.0.113.50"),
    ("127.0.0.1", ["198.51.100.1"], "", "127.0.0.1"),
    ("127.0.0.1", ["198.51.100.1"], "10.0.0.0/8", "127.0.0.1"),
    # a trusted peer: walk right to left, skipping trusted hops
    ("127.0.0.1", [], "127.0.0.0/8", "127.0.0.1"),
    ("127.0.0.1", ["198.51.100.1"], "127.0.0.0/8", "198.51.100.1"),
    ("127.0.0.1", [" 198.51.100.1 "], "127.0.0.0/8", "198.51.100.1"),
    ("127.0.0.1", ["198.51.100.1", " 10.1.2.3", " 10.4.5.6"], "127.0.0.0/8, 10.0.0.0/8", "198.51.100.1"),
    ("127.0.0.1", ["6.6.6.6", " 203.0.113.9", " 10.4.5.6"], "127.0.0.0/8, 10.0.0.0/8", "203.0.113.9"),
    ("127.0.0.1", ["10.0.0.1", "10.0.0.2"], "127.0.0.0/8, 10.0.0.0/8", "10.0.0.1"),
    ("10.9.8.7", ["198.51.100.1", "10.0.0.2"], "10.0.0.0/8", "198.51.100.1"),
    # garbage stops the walk at the nearest believable hop; nothing to its left is believed
    ("127.0.0.1", ["198.51.100.1", "unknown"], "127.0.0.0/8", "127.0.0.1"),
    ("127.0.0.1", ["198.51.100.1", "garbage", "10.0.0.7"], "127.0.0.0/8, 10.0.0.0/8", "10.0.0.7"),
    ("127.0.0.1", ["198.51.100.1", "", "10.0.0.7"], "127.0.0.0/8, 10.0.0.0/8", "10.0.0.7"),
    ("127.0.0.1", ["198.51.100.1:4711"], "127.0.0.0/8", "127.0.0.1"),
    ("127.0.0.1", ["198.51.100.1/32"], "127.0.0.0/8", "127.0.0.1"),
    ("127.0.0.1", ["999.1.1.1"], "127.0.0.0/8", "127.0.0.1"),
    # IPv6, brackets, and IPv4-mapped IPv6 normalised
    ("::1", ["[2001:DB8::1]"], "::1/128", "2001:db8::1"),
    ("::1", ["[2001:db8::1]:8443"], "::1/128", "2001:db8::1"),
    ("::1", ["2001:0DB8:0:0::1"], "::1/128", "2001:db8::1"),
    ("127.0.0.1", ["::ffff:198.51.100.1"], "127.0.0.0/8", "198.51.100.1"),
    ("127.0.0.1", ["198.51.100.1", "::ffff:10.0.0.7"], "127.0.0.0/8, 10.0.0.0/8", "198.51.100.1"),
    ("::ffff:127.0.0.1", ["198.51.100.1"], "127.0.0.0/8", "198.51.100.1"),
    ("10.1.1.1", ["198.51.100.1"], "::ffff:10.0.0.0/104", "198.51.100.1"),
    ("::1", ["198.51.100.1", "::1"], "::1/128", "198.51.100.1"),
])
def test_resolve_client_table(peer, forwarded_for, trusted, expected):
    """resolve_client believes X-Forwarded-For only from a trusted peer, walks it right to left
    past trusted hops, stops at garbage (keeping the nearest believable hop), and returns
    canonical addresses (IPv4-mapped IPv6 unmapped, IPv6 lower-case and compressed)."""
    networks = parse_networks(trusted) if trusted else ()
    assert resolve_client(peer, forwarded_for, networks) == expected


@pytest.mark.parametrize("host, expected", [
    ("::ffff:127.0.0.1", "127.0.0.1"), ("2001:DB8:0::1", "2001:db8::1"), ("127.0.0.1", "127.0.0.1"),
    ("not-an-ip", "not-an-ip"),
])
def test_client_ip_normalises(host, expected):
    """client_ip writes addresses canonically and unmaps IPv4-mapped IPv6."""
    assert client_ip(host) == expected


def test_in_networks_handles_mapped_and_garbage():
    """in_networks matches IPv4-mapped IPv6 against IPv4 networks and never matches garbage."""
    networks = parse_networks("127.0.0.0/8, ::1")
    assert in_networks("::ffff:127.0.0.2", networks)
    assert in_networks("::1", networks)
    assert not in_networks("::2", networks)
    assert not in_networks("garbage", networks)
    assert not in_networks("", networks)


def test_trusted_proxies_end_to_end_access_log_and_forwarded_headers(proxy, upstream, tmp_path):
    """Through a real process: on a listener trusting 127.0.0.0/8 the access log's client is the
    address resolved from X-Forwarded-For and the upstream's X-Forwarded-For extends the client's
    list with the peer (the other X-Forwarded-* passed on as sent); on a listener trusting only
    10.0.0.0/8 all four spoofed headers are replaced, the log shows 127.0.0.1 and the upstream's
    X-Forwarded-For holds only the peer."""
    trusted_port, untrusted_port = free_port(), free_port()
    log_path = tmp_path / "access.log"
    text = make_config(
        trusted_port, upstream.url, listener="trusted_proxies = 127.0.0.0/8",
        settings=f"access_log = {log_path}\naccess_log_format = json",
        extra=f"[listen:untrusted]\nendpoint = tcp:{untrusted_port}:interface=127.0.0.1\n"
              f"trusted_proxies = 10.0.0.0/8\n")
    process = proxy.start(text, port=trusted_port)
    wait_for_port(untrusted_port, process=process.process)
    cases = [
        # (port, path, X-Forwarded-For header lines, logged client, upstream X-Forwarded-For)
        (trusted_port, "/echo/1", ["198.51.100.23, 127.0.0.9"], "198.51.100.23",
         "198.51.100.23, 127.0.0.9, 127.0.0.1"),
        (trusted_port, "/echo/2", ["198.51.100.23, 10.9.9.9"], "10.9.9.9", "198.51.100.23, 10.9.9.9, 127.0.0.1"),
        (trusted_port, "/echo/3", ["198.51.100.23, not-an-ip"], "127.0.0.1",
         "198.51.100.23, not-an-ip, 127.0.0.1"),
        (trusted_port, "/echo/4", ["198.51.100.1", "203.0.113.2"], "203.0.113.2",
         "198.51.100.1, 203.0.113.2, 127.0.0.1"),
        (trusted_port, "/echo/5", ["::ffff:198.51.100.77"], "198.51.100.77", "::ffff:198.51.100.77, 127.0.0.1"),
        (trusted_port, "/echo/6", [], "127.0.0.1", "127.0.0.1"),
        (untrusted_port, "/echo/7", ["198.51.100.23"], "127.0.0.1", "127.0.0.1"),
        (untrusted_port, "/echo/8", [], "127.0.0.1", "127.0.0.1"),
    ]
    for port, path, xff, _, expected_header in cases:
        headers = [("X-Forwarded-For", value) for value in xff] + [
            ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "spoof.example"), ("X-Forwarded-Port", "4711")]
        status, _, body = get(port, path, headers=headers)
        assert status == 200
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["x-forwarded-for"] == expected_header, path
        trusted = port == trusted_port
        assert seen["x-forwarded-proto"] == ("https" if trusted else "http"), path
        assert seen["x-forwarded-host"] == ("spoof.example" if trusted else f"127.0.0.1:{port}"), path
        assert seen["x-forwarded-port"] == ("4711" if trusted else str(port)), path

    def records() -> dict[str, dict[str, Any]] | None:
        if not log_path.exists():
            return None
        whole_lines = log_path.read_text().split("\n")[:-1]  # the last one may be half written
        found = {r["target"]: r for r in map(json.loads, whole_lines)}
        return found if len(found) >= len(cases) else None

    logged = wait_until(records, what="the access log lines")
    for _, path, _, client, _ in cases:
        assert logged[path]["client"] == client, path


# ---------------------------------------------------------------------------
# Unusable listener certificates are refused at startup


def test_listener_key_not_matching_certificate_is_refused_at_startup(proxy, upstream, pki):
    """A listener whose key does not belong to its certificate stops twistd (status 2) with one
    line naming the file, the [listen:main] section and the ``key`` option, and no traceback."""
    port = free_port()
    text = make_config(port, upstream.url, listener=f"tls = yes\ncertificate = {pki.cert}\nkey = {pki.other_key}")
    code, output = _startup_failure(proxy, text)
    assert code == 2, output
    line = assert_config_error_line(output, proxy.dir / "chatproxy.ini", "key")
    assert str(pki.other_key) in line and str(pki.cert) in line, line
    assert re.search(r"does not match|mismatch", line), line
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_sni_key_not_matching_certificate_is_refused_at_startup(proxy, upstream, pki):
    """An ``sni`` entry whose key does not match its certificate is refused the same way, naming
    the ``sni`` option."""
    port = free_port()
    text = make_config(port, upstream.url,
                       listener=tls_listener(pki, f"sni = chat.example.test: {pki.chat_cert} {pki.other_key}"))
    code, output = _startup_failure(proxy, text)
    assert code == 2, output
    line = assert_config_error_line(output, proxy.dir / "chatproxy.ini", "sni")
    assert str(pki.other_key) in line and str(pki.chat_cert) in line, line
    assert re.search(r"does not match|mismatch", line), line


def test_listener_certificate_file_that_is_not_a_certificate_is_refused(proxy, upstream, pki, tmp_path):
    """A ``certificate`` file holding no PEM certificate is refused with one line naming the
    ``certificate`` option and the file, no traceback."""
    bogus = tmp_path / "bogus.crt"
    bogus.write_text("not a certificate\n")
    port = free_port()
    code, output = _startup_failure(proxy, make_config(
        port, upstream.url, listener=f"tls = yes\ncertificate = {bogus}\nkey = {pki.key}"))
    assert code == 2, output
    assert str(bogus) in assert_config_error_line(output, proxy.dir / "chatproxy.ini", "certificate")


def test_listener_ciphers_accepted_by_no_openssl_suite_are_refused(proxy, upstream, pki):
    """``ciphers = NOT-A-CIPHER`` is refused at startup with one line naming the ``ciphers``
    option of [listen:main], no traceback."""
    port = free_port()
    code, output = _startup_failure(proxy, make_config(
        port, upstream.url, listener=tls_listener(pki, "ciphers = NOT-A-CIPHER")))
    assert code == 2, output
    assert "NOT-A-CIPHER" in assert_config_error_line(output, proxy.dir / "chatproxy.ini", "ciphers")
