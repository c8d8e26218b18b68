"""Helpers for the vendor profile tests (``tests/test_profile_*.py``): a
stand-in upstream that records what reaches it and speaks HTTP/1.1 and
WebSocket on one port (optionally over TLS), clients for https and wss with
the host names the profiles expect, and the layering of a test-only INI file
over a shipped profile in ``etc/``.

The shipped profile is always loaded as it is; the test writes a second, small
file with only test-only values (ports, certificates, upstream addresses,
secret files) and starts ``twistd -n chatproxy --config etc/X.ini --config
test.ini``, the way an operator layers a site file over the profile.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import http.client
import json
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from conftest import read_request_body
from ws_peers import wait_until  # noqa: F401 (re-exported for the profile tests)

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
WAIT = 10.0  # the bound on every wait in these helpers
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) chatproxy-profile-test"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# ---------------------------------------------------------------------------
# The shipped profiles


def profile_path(name: str) -> Path:
    """``etc/NAME.ini``."""
    return ETC / f"{name}.ini"


def read_profile(name: str) -> configparser.ConfigParser:
    """The shipped profile, parsed as chatproxy parses it (no interpolation,
    comments on their own lines), to read the operator values it ships with
    (application name, origins, connection ID, ...)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, default_section="\x00none",
                                       empty_lines_in_values=False)
    parser.read(profile_path(name), encoding="utf-8")
    return parser


def option_list(text: str) -> list[str]:
    """A chatproxy list value: items separated by commas and/or newlines."""
    return [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]


def write_overlay(directory: Path, name: str, text: str) -> Path:
    """Write the test-only INI layered over a profile."""
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def run_check(configs: Iterable[Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m chatproxy check --config A --config B ...`` (bounded)."""
    args = [sys.executable, "-m", "chatproxy", "check"]
    for config in configs:
        args += ["--config", str(config)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


# ---------------------------------------------------------------------------
# The stand-in upstream


@dataclass
class WsSession:
    """One WebSocket session at the stand-in."""

    path: str
    headers: list[tuple[str, str]]
    received: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    wfile: Any = None

    def header(self, name: str) -> str | None:
        """The first value of a handshake request header."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def send(self, opcode: int, payload: bytes) -> None:
        """One unmasked frame to the client (the proxy)."""
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([n])
        elif n < 65536:
            head += bytes([126]) + struct.pack("!H", n)
        else:
            head += bytes([127]) + struct.pack("!Q", n)
        with self.lock:
            self.wfile.write(head + payload)
            self.wfile.flush()


Responder = Callable[[dict[str, Any]], "tuple[int, dict[str, str], bytes] | None"]


class StandInHandler(BaseHTTPRequestHandler):
    """Records every request; answers with a JSON description of it (or what
    the server's ``responder`` says); on the server's WebSocket paths accepts
    the upgrade and relays each message to every session on the same path (a
    chat room)."""

    protocol_version = "HTTP/1.1"
    server: StandIn

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        return read_request_body(self)

    def _handle(self) -> None:
        upgrade = self.headers.get("Upgrade", "").lower() == "websocket"
        body = b"" if upgrade else self._body()
        record = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("utf-8", "replace"),
            "body_sha": hashlib.sha256(body).hexdigest(),
            "websocket": upgrade,
        }
        self.server.requests.append(record)
        if upgrade:
            if any(urlsplit(self.path).path.startswith(prefix) for prefix in self.server.ws_prefixes):
                self._websocket()
                return
            self._answer(400, {"Content-Type": "text/plain"}, b"no WebSocket here\n")
            self.close_connection = True
            return
        answer = self.server.responder(record) if self.server.responder is not None else None
        if answer is None:
            answer = (200, {"Content-Type": "application/json"}, json.dumps(record).encode())
        self._answer(*answer)

    def _answer(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle

    # -- WebSocket (RFC 6455, server side, no extensions)

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        self.wfile.flush()
        self.close_connection = True
        room = urlsplit(self.path).path
        session = WsSession(self.path, list(self.headers.items()), wfile=self.wfile)
        with self.server.lock:
            self.server.sessions.append(session)
            self.server.rooms.setdefault(room, []).append(session)
        try:
            self._relay(session, room)
        except (OSError, ValueError, struct.error):
            pass
        finally:
            with self.server.lock:
                self.server.rooms[room].remove(session)
            session.ended.set()

    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) < n:
            raise ValueError("connection closed")
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        mask = self._read(4) if b1 & 0x80 else b"\0\0\0\0"
        data = self._read(n)
        return bool(b0 & 0x80), b0 & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def _relay(self, session: WsSession, room: str) -> None:
        opcode, parts = 0, list[bytes]()
        while True:
            fin, op, payload = self._frame()
            if op == 0x8:  # close: answer with the same code, end
                session.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                session.send(0x8, payload[:2])
                return
            if op == 0x9:
                session.send(0xA, payload)
                continue
            if op == 0xA:
                continue
            if op != 0:
                opcode, parts = op, []
            parts.append(payload)
            if not fin:
                continue
            data = b"".join(parts)
            session.received.append(data.decode() if opcode == 1 else data)
            with self.server.lock:
                members = list(self.server.rooms.get(room, []))
            for member in members:  # a chat room: everyone on this path gets it
                try:
                    member.send(opcode, data)
                except OSError:
                    pass


class StandIn(ThreadingHTTPServer):
    """A stand-in upstream on 127.0.0.1 (plain, or TLS with ``certificate``).

    ``requests`` lists every request head that reached it (WebSocket
    handshakes included, ``websocket`` True); ``sessions`` the accepted
    WebSocket sessions.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, ws_prefixes: tuple[str, ...] = (), responder: Responder | None = None,
                 certificate: tuple[Path, Path] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), StandInHandler)
        self.ws_prefixes = ws_prefixes
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.sessions: list[WsSession] = []
        self.rooms: dict[str, list[WsSession]] = {}
        self.lock = threading.Lock()
        self.port = int(self.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        if certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(certificate[0]), str(certificate[1]))
            self.socket = context.wrap_socket(self.socket, server_side=True)
            self.url = f"https://localhost:{self.port}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a refused TLS handshake or a dropped connection is part of some tests

    def paths(self) -> list[str]:
        """The request targets that reached the stand-in, in order."""
        return [r["path"] for r in self.requests]

    def stop(self) -> None:
        """Stop serving."""
        self.shutdown()
        self.server_close()


def header_values(record: dict[str, Any], name: str) -> list[str]:
    """The values of a header in a recorded request, in order."""
    return [v for k, v in record["headers"] if k.lower() == name.lower()]


def header(record: dict[str, Any], name: str) -> str | None:
    """The single value of a header in a recorded request (None if absent)."""
    values = header_values(record, name)
    assert len(values) <= 1, f"{name} appears {len(values)} times: {values}"
    return values[0] if values else None


# ---------------------------------------------------------------------------
# Clients


@dataclass
class Response:
    """A response as the client saw it."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """An HTTP/1.1 client for one chatproxy listener (https with ``tls``),
    one keep-alive connection reopened when the proxy closes it. Requests
    carry ``Host: host`` and a browser-like User-Agent and Accept unless the
    test sets them."""

    def __init__(self, port: int, host: str, tls: ssl.SSLContext | None = None) -> None:
        self.port, self.host, self.tls = port, host, tls
        self.connection: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.connection is None:
            if self.tls is not None:
                self.connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls, timeout=WAIT)
            else:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def request(self, method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> Response:
        """Send one request (the target exactly as given) and read the response."""
        given = {k.lower() for k in (headers or {})}
        sent = {"Host": self.host, "User-Agent": USER_AGENT, "Accept": "*/*"}
        sent = {k: v for k, v in sent.items() if k.lower() not in given}
        sent.update(headers or {})
        for attempt in (1, 2):
            connection = self._connect()
            try:
                connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in sent.items():
                    connection.putheader(name, value)
                if body is not None and "content-length" not in given:
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
                response = connection.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        raise AssertionError("unreachable")

    def get(self, target: str, **headers: str) -> Response:
        return self.request("GET", target, {k.replace("_", "-"): v for k, v in headers.items()})


def tls12_context(ca: Path) -> ssl.SSLContext:
    """A client context trusting ``ca``, at most TLS 1.2, for ``websockets.sync``
    clients (see ``sync_client_tls`` in test_websocket.py: CPython's SSLSocket
    is not safe for the concurrent read and write such a client does while TLS
    1.3 session tickets arrive)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def ws_connect(port: int, host: str, target: str, tls: ssl.SSLContext | None, origin: str | None = None,
               headers: dict[str, str] | None = None) -> Any:
    """A ``websockets`` (sync) client session through chatproxy: the socket to
    127.0.0.1:port, the URL (and so the Host header) with ``host``."""
    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    scheme = "wss" if tls is not None else "ws"
    options: dict[str, Any] = {"sock": sock, "open_timeout": WAIT, "close_timeout": 5, "ping_interval": None,
                               "compression": None, "user_agent_header": USER_AGENT, "proxy": None}
    if tls is not None:
        options.update(ssl=tls, server_hostname="localhost")
    if origin is not None:
        options["origin"] = origin
    if headers:
        options["additional_headers"] = headers
    try:
        return connect(f"{scheme}://{host}:{port}{target}", **options)
    except BaseException:
        sock.close()
        raise


def ws_refused(port: int, host: str, target: str, tls: ssl.SSLContext | None, origin: str | None = None,
               headers: dict[str, str] | None = None) -> int:
    """Attempt a WebSocket handshake that must fail; the HTTP status it got."""
    from websockets.exceptions import InvalidStatus

    try:
        session = ws_connect(port, host, target, tls, origin, headers)
    except InvalidStatus as refused:
        return int(refused.response.status_code)
    session.close()
    raise AssertionError(f"the WebSocket handshake on {target} was accepted")


