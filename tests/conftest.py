"""Shared fixtures: generated certificates, a real upstream HTTP server, and a
real ``twistd -n chatproxy`` process on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
ROOT = Path(__file__).resolve().parent.parent
#: What a copy of the checkout leaves out: version control, build output, caches, virtualenvs.
CHECKOUT_JUNK = (".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "dropin.cache", ".mypy_cache",
                 ".pytest_cache", ".venv", ".venv-*", "venv")


# ---------------------------------------------------------------------------
# Certificates


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _issue(ca_cert: Any, ca_key: Any, common_name: str, names: list[str], path_cert: Path, path_key: Path,
           client: bool = False) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # What strict validators (cryptography's, which sslyze uses) require of a CA-issued certificate.
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    path_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(path_key, key)


class PKI:
    """A throwaway CA with server certificates for loopback tests."""

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.dir = directory
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chatproxy test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca = directory / "ca.crt"
        self.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.ca_certificate, self.ca_private_key = ca_cert, ca_key  # to issue more certificates
        self.cert, self.key = directory / "localhost.crt", directory / "localhost.key"
        _issue(ca_cert, ca_key, "localhost", ["localhost", "127.0.0.1", "::1"], self.cert, self.key)
        self.chat_cert, self.chat_key = directory / "chat.crt", directory / "chat.key"
        _issue(ca_cert, ca_key, "chat.example.test", ["chat.example.test"], self.chat_cert, self.chat_key)
        self.wrong_host_cert, self.wrong_host_key = directory / "wrong.crt", directory / "wrong.key"
        _issue(ca_cert, ca_key, "elsewhere.example.test", ["elsewhere.example.test"], self.wrong_host_cert,
               self.wrong_host_key)
        self.client_cert, self.client_key = directory / "client.crt", directory / "client.key"
        _issue(ca_cert, ca_key, "chatproxy client", [], self.client_cert, self.client_key, client=True)
        self.other_key = directory / "other.key"
        _write_key(self.other_key, ec.generate_private_key(ec.SECP256R1()))

    def client_context(self) -> Any:
        """An ``ssl.SSLContext`` trusting this CA."""
        import ssl

        context = ssl.create_default_context(cafile=str(self.ca))
        return context


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA and certificates for localhost, chat.example.test and a client."""
    return PKI(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------------
# Ports


def require_tool(name: str, package: str) -> str:
    """The path of the command ``name`` (from the Debian ``package``): the test
    is skipped without it, and fails instead under CI, whose .ci/run installs it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} (Debian package {package}) is missing; .ci/run installs it")
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return path


def copy_checkout(source: Path, destination: Path, *also_ignore: str) -> Path:
    """A copy of ``source`` (the checkout, or a project in it) at ``destination``
    without :data:`CHECKOUT_JUNK` nor the ``also_ignore`` patterns."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(*CHECKOUT_JUNK, *also_ignore))
    return destination


def replace_each(text: str, replacements: dict[str, str], where: str) -> str:
    """``text`` with each key of ``replacements`` replaced by its value; each must be
    in the text (``where`` names the file in the failure), so a shipped file that
    changed fails the test instead of being used unedited."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in {where}"
        text = text.replace(old, new)
    return text


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM a server process the test started (if it still runs), wait at most
    ``timeout``, then SIGKILL it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def admin_ready(admin_port: int) -> bool:
    """Whether the admin listener's /readyz answers 200 (False while it cannot be reached)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=10) as response:
            return bool(response.status == 200)
    except OSError:
        return False


#: The ports free_port handed out lately: the kernel can give the same free
#: port to two binds in a row (about once in 10,000 here), and a test that asks
#: for two ports (a listener and the admin endpoint) must get two.
_RECENT_PORTS: deque[int] = deque(maxlen=256)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, and not one of the last 256 this
    function handed out."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port
    raise RuntimeError("no free port that was not handed out lately")


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0, process: Any = None) -> None:
    """Wait until something accepts connections on ``port`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


# ---------------------------------------------------------------------------
# The recording upstream


def wait_until(check: Any, what: str, timeout: float = 20.0) -> Any:
    """Call ``check`` until it returns something true, and return that; fail after ``timeout``
    seconds (a bound on a wait, not a timing threshold) naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.1)


def read_request_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The whole request body a test upstream's handler received (Content-Length or chunked)."""
    length = handler.headers.get("Content-Length")
    if length is not None:
        return handler.rfile.read(int(length))
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(handler.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            body += handler.rfile.read(size)
            handler.rfile.readline()
    return b""


SQL_ERROR_PAGE = (b"<p>You have an error in your SQL syntax; check the manual that corresponds to your MySQL "
                  b"server version for the right syntax to use near '\\'' at line 1</p>")


class UpstreamHandler(BaseHTTPRequestHandler):
    """A small HTTP/1.1 upstream whose behaviour the path chooses.

    ``/echo...``: 200 with a JSON description of the request it received.
    ``/bytes?n=N``: N bytes, Content-Length.  ``/chunked?n=N&parts=P``: N bytes
    in P chunks.  ``/eof?n=N``: N bytes, no length, closed at the end.
    ``/status?code=C``: that status.  ``/slow?delay=S``: answers after S
    seconds.  ``/truncate?n=N``: announces N bytes, sends half, closes.
    ``/garbage``: not HTTP at all.  ``/no-content``: 204.
    ``/page?text=T&type=M&pad=N&status=C&chunked=1&cut=1``: ``T`` after N
    bytes of padding, as media type M (default text/html), with that status,
    chunked when asked (in 8 KiB chunks), cut short (announced whole, half
    sent, closed) when asked; ``leak=sql`` instead of ``text``: a MySQL
    error message (data a web application firewall keeps from clients).
    """

    protocol_version = "HTTP/1.1"
    server: RecordingUpstream

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        return read_request_body(self)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._body() if self.command not in ("GET", "HEAD") or self.headers.get("Content-Length") or \
            self.headers.get("Transfer-Encoding") else b""
        record = {
            "method": self.command,
            "path": self.path,
            "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_length": len(body),
            "body_sha": __import__("hashlib").sha256(body).hexdigest(),
            "client_port": self.client_address[1],
        }
        self.server.requests.append(record)
        route = url.path
        if route.startswith("/slow"):
            time.sleep(float(query.get("delay", "1")))
        if route.startswith("/bytes"):
            n = int(query.get("n", "100"))
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if self.command != "HEAD":
                self._send_pattern(n)
        elif route.startswith("/chunked"):
            n, parts = int(query.get("n", "100")), int(query.get("parts", "4"))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                data = _pattern(n)
                step = max(1, -(-n // parts))
                for i in range(0, n, step):
                    piece = data[i : i + step]
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
        elif route.startswith("/eof"):
            n = int(query.get("n", "100"))
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self._send_pattern(n)
            self.close_connection = True
        elif route.startswith("/status"):
            code = int(query.get("code", "200"))
            self.send_response(code)
            if code not in (204, 304):
                self.send_header("Content-Length", "0")
            self.end_headers()
        elif route.startswith("/no-content"):
            self.send_response(204)
            self.end_headers()
        elif route.startswith("/truncate"):
            n = int(query.get("n", "1000"))
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            self._send_pattern(n // 2)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif route.startswith("/page"):
            self._send_page(query)
        elif route.startswith("/garbage"):
            self.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")
            self.close_connection = True
        else:
            payload = json.dumps(record).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Upstream", "recording")
            self.send_header("Connection", "keep-alive, X-Hop")
            self.send_header("X-Hop", "must not reach the client")
            self.send_header("Keep-Alive", "timeout=5")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    def _send_page(self, query: dict[str, str]) -> None:
        text = SQL_ERROR_PAGE if query.get("leak") == "sql" else query.get("text", "hello").encode()
        page = b"a" * int(query.get("pad", "0")) + text
        chunked = query.get("chunked") == "1"
        self.send_response(int(query.get("status", "200")))
        self.send_header("Content-Type", query.get("type", "text/html"))
        self.send_header("Transfer-Encoding", "chunked") if chunked else \
            self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if query.get("cut") == "1":
            self.wfile.write(page[: len(page) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif chunked:
            for i in range(0, len(page), 8192):
                self.wfile.write(b"%x\r\n%b\r\n" % (len(page[i : i + 8192]), page[i : i + 8192]))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(page)

    def _send_pattern(self, n: int) -> None:
        data = _pattern(n)
        for i in range(0, n, 65536):
            self.wfile.write(data[i : i + 65536])

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = do_TRACE = _handle


def _pattern(n: int) -> bytes:
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


class RecordingUpstream(ThreadingHTTPServer):
    """The upstream server; ``requests`` lists what reached it."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # many proxied connections at once (HTTP/2 streams) must not wait in SYN retries

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), UpstreamHandler)
        self.requests: list[dict[str, Any]] = []
        self.port = self.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection the proxy abandoned (reset) is expected, not worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    """A running recording upstream on 127.0.0.1."""
    server = RecordingUpstream()
    yield server
    server.stop()


# ---------------------------------------------------------------------------
# The proxy under test


#: How long teardown gives a proxy to exit after SIGTERM.  The tests' configurations leave
#: ``drain_timeout`` at its default (30 s) unless they say otherwise, so a proxy still running
#: after this bound is a drain that hangs on something, not one that is merely slow.
STOP_TIMEOUT = 10.0


def stop_proxy(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> str | None:
    """SIGTERM a chatproxy process (if it still runs) and wait for it, at most ``timeout``
    (:data:`STOP_TIMEOUT`, below the default ``drain_timeout``), then SIGKILL it.  Returns
    what was wrong -- it did not exit in time, or not with status 0 -- or None after a clean
    exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            return f"chatproxy did not exit within {timeout:g}s of SIGTERM (killed)"
    if process.returncode != 0:
        return f"chatproxy exited with status {process.returncode}, not 0"
    return None


class ProxyProcess:
    """A ``twistd -n chatproxy`` subprocess with its config files and output.

    Its end is checked: :meth:`stop` (teardown) asserts that SIGTERM makes it
    exit with status 0 within :data:`STOP_TIMEOUT`.  A test that ends it in
    another way says so: :meth:`wait_exit` (it exits by itself and the test
    asserts the status) or :meth:`kill` (SIGKILL on purpose)."""

    def __init__(self, directory: Path, configs: list[Path], wait_port: int | None) -> None:
        self.dir = directory
        self.configs = configs
        self.log_path = directory / "twistd.out"
        #: Why teardown does not check this process's exit (None: it does).
        self.exit_left_to_test: str | None = None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        args = [TWISTD, "-n", "--pidfile=", "chatproxy"]
        for config in configs:
            args += ["--config", str(config)]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(args, cwd=directory, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait_port is not None:
            try:
                wait_for_port(wait_port, process=self.process)
            except Exception:
                self._reap()
                raise RuntimeError("chatproxy did not start:\n" + self.output())

    def output(self) -> str:
        """Everything the process printed so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait (bounded) for the proxy to exit by itself -- a start that must fail, or a
        SIGTERM the test sent -- and return its status, which the test asserts; teardown
        leaves that exit to the test.  Raises ``subprocess.TimeoutExpired`` like
        ``Popen.wait``."""
        status = self.process.wait(timeout)
        self.exit_left_to_test = f"the test waited for its exit (status {status}) and checks it"
        return status

    def kill(self) -> int:
        """SIGKILL the proxy on purpose (a test of what an unclean death leaves behind) and
        reap it (bounded); teardown does not expect a clean exit from it.  Returns the status."""
        self.exit_left_to_test = "killed on purpose by the test"
        self.process.kill()
        return self.process.wait(10)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Stop the proxy and check that it drained cleanly: SIGTERM (if it still runs), then
        assert that it exited with status 0 within ``timeout`` (10 s, below the default
        ``drain_timeout`` of 30 s, so a drain that hangs fails instead of being SIGKILLed
        quietly).  A process whose exit the test took over (:meth:`wait_exit`, :meth:`kill`)
        or that was already checked is only reaped.  Returns the exit status."""
        if self.exit_left_to_test is not None:
            return self._reap()
        self.exit_left_to_test = "already stopped and checked"  # one check, even if stop() is called again
        problem = stop_proxy(self.process, timeout)
        self._log.close()
        if problem is not None:
            raise AssertionError(problem + ":\n" + self.output()[-4000:])
        return int(self.process.returncode)

    def _reap(self) -> int:
        """SIGKILL the process if it still runs, wait for it (bounded), close the log; its status."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._log.close()
        return int(self.process.returncode)


class ProxyStarter:
    """Writes a config and starts chatproxy on it; stops everything at teardown."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.processes: list[ProxyProcess] = []

    def write(self, text: str, name: str = "chatproxy.ini") -> Path:
        """Write a config file (dedented) into the test directory."""
        path = self.dir / name
        path.write_text(textwrap.dedent(text))
        return path

    def start(self, text: str | None = None, *, port: int | None, configs: list[Path] | None = None,
              workers: int | None = 1) -> ProxyProcess:
        """Start twistd on ``text`` (or ``configs``) and wait for ``port``.

        ``workers``: a first layered file sets ``[chatproxy] workers`` (one
        process unless a test asks for more; a test's own files may still set
        it); None leaves the files as they are (the default: one per CPU)."""
        paths = configs if configs is not None else [self.write(text or "")]
        if workers is not None:
            paths = [self.write(f"[chatproxy]\nworkers = {workers}\n", "00-workers.ini"), *paths]
        process = ProxyProcess(self.dir, paths, port)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        """Stop every started process (:meth:`ProxyProcess.stop`: each must exit 0 on
        SIGTERM within the bound); all are stopped before the first failure is raised."""
        failures: list[AssertionError] = []
        for process in self.processes:
            try:
                process.stop()
            except AssertionError as failure:
                failures.append(failure)
        if failures:
            raise AssertionError("\n\n".join(str(failure) for failure in failures))


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyStarter]:
    """Start chatproxy processes for a test; all are stopped afterwards, and each must
    exit 0 on SIGTERM within the bound (:meth:`ProxyProcess.stop`)."""
    starter = ProxyStarter(tmp_path)
    yield starter
    starter.stop_all()


def basic_config(upstream_url: str, port: int, *, tls: PKI | None = None, extra: str = "",
                 route: str = "", settings: str = "access_log = off") -> str:
    """A one-listener, one-upstream config proxying everything."""
    tls_lines = f"tls = yes\ncertificate = {tls.cert}\nkey = {tls.key}\n" if tls else ""
    return (
        f"[chatproxy]\n{settings}\n\n"
        f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n{tls_lines}\n"
        f"[upstream:app]\nservers = {upstream_url}\n\n"
        f"[route:all]\npath = /\nupstream = app\n{route}\n{extra}"
    )


# ---------------------------------------------------------------------------
# Talking to a running proxy


def for_sync_websockets(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` limited to TLS 1.2, for ``websockets.sync`` clients.  That client reads
    its socket in a background thread while the caller writes to it; with TLS 1.3 the
    server's post-handshake messages (session tickets) arrive just then, and CPython's
    SSLSocket is not safe for concurrent read and write: about one connection in 150-300
    hangs before its handshake request is sent, until the proxy's header timeout answers
    408 (seen against websockets' own server as well, so not a chatproxy fault).  Raw and
    asyncio clients keep TLS 1.3."""
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def http_get(port: int, path: str, tls: Any = None, source: str | None = None,
             source_port: int = 0) -> tuple[int, bytes]:
    """GET ``path`` on a new connection (over TLS to ``localhost`` with the ``ssl.SSLContext`` ``tls``),
    from the loopback address ``source`` (and ``source_port``) if given (workers take clients by
    address, or by address and port): status and body."""
    import http.client

    conn: http.client.HTTPConnection
    bind = (source, source_port) if source is not None else None
    if tls is not None:
        conn = http.client.HTTPSConnection("localhost", port, timeout=10, context=tls, source_address=bind)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=bind)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def metric_samples(admin_port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name`` on the admin listener's /metrics (parsed by prometheus_client)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [(dict(sample.labels), float(sample.value)) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]
