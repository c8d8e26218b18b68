"""Independent WebSocket peers for the bridge tests: an upstream server built on
the ``websockets`` library (asyncio, in a thread with its own loop) that the
test steers with control messages, and a raw-socket client for what a
well-behaved client library will not do (pipelined frames, invalid frames,
ignored pings, abrupt resets, not reading at all)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

WAIT = 10.0  # the bound on every wait in these helpers


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` recognisable bytes (different per ``seed``)."""
    block = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (block * (n // 256 + 1))[:n]


def wait_until(predicate: Any, timeout: float = WAIT, interval: float = 0.02, message: str = "") -> Any:
    """Poll ``predicate`` until it returns something true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# The upstream


@dataclass
class UpstreamSession:
    """What one WebSocket session at the upstream saw and did."""

    path: str
    sid: str
    headers: list[tuple[str, str]]
    subprotocol: str | None
    extensions: list[str]
    received: list[Any] = field(default_factory=list)
    fragments: list[int] = field(default_factory=list)  # frames per received message
    received_bytes: int = 0
    received_count: int = 0
    sent_bytes: int = 0
    close_code: int | None = None
    close_reason: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    resume: asyncio.Event | None = None
    connection: ServerConnection | None = None

    def header(self, name: str) -> list[str]:
        """The values of one request header, in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def wait_ended(self, timeout: float = WAIT) -> UpstreamSession:
        """Wait (bounded) for the session to end at the upstream."""
        assert self.ended.wait(timeout), f"upstream session {self.sid} did not end within {timeout}s"
        return self


class WsUpstream:
    """A ``websockets`` server in its own thread and event loop.

    Paths starting ``/refuse/CODE`` are refused with that HTTP status; paths
    containing ``/hang`` never answer the handshake; ``/delay`` answers it
    after 0.5 s.  Accepted sessions echo every message, except text messages
    starting with ``!``, which are commands:

    ``!close CODE REASON`` close with that code; ``!drop`` reset the TCP
    connection; ``!send COUNT SIZE`` send COUNT binary messages of SIZE bytes;
    ``!flood TOTAL SIZE`` send SIZE-byte binary messages until TOTAL bytes
    went out or the session ends (``sent_bytes`` counts what was handed over);
    ``!badutf8`` send a text frame that is not UTF-8; ``!fragments`` send one
    text message in three frames; ``!stopread`` stop reading until
    :meth:`resume`; ``!deaf`` stop reading the socket altogether (no pongs).
    ``!say TEXT`` send TEXT (``!say64 BASE64``: the text decoded).  ``!rawclose HEX`` write a close frame
    with that payload straight to the socket (``websockets`` would refuse an invalid one), then read on.
    A ``greet`` query parameter makes the upstream speak first; with ``sink`` it keeps what it receives
    (no echo).
    """

    SUBPROTOCOLS = ("chat.v2", "chat.v1")
    COOKIES = ("upstream_session=u-123; Path=/; HttpOnly", "lb=node-7; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT")

    def __init__(self, tls: Any = None, compression: str | None = None) -> None:
        self.tls = tls
        self.compression = compression
        self.sessions: dict[str, UpstreamSession] = {}
        self.requests: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ws-upstream", daemon=True)
        self.thread.start()
        self.server = self.call(self._start())
        self.port = int(self.server.sockets[0].getsockname()[1])

    # -- running things on the upstream's loop

    def call(self, coroutine: Any, timeout: float = WAIT) -> Any:
        """Run a coroutine on the upstream's loop and wait (bounded) for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> Any:
        self._stopping = asyncio.Event()
        context = None
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        return await serve(
            self._handler, "127.0.0.1", 0, ssl=context,
            process_request=self._process_request, process_response=self._process_response,
            select_subprotocol=self._select_subprotocol, compression=self.compression,
            max_size=None, ping_interval=None, close_timeout=5, open_timeout=WAIT,
        )

    def stop(self) -> None:
        """Close the server and every session, stop the loop and the thread."""
        async def close() -> None:
            self._stopping.set()
            self.server.close(close_connections=True)
            await asyncio.wait_for(self.server.wait_closed(), WAIT)

        try:
            self.call(close(), timeout=WAIT + 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
            self.loop.close()

    # -- the handshake

    @staticmethod
    def _sid(path: str) -> str:
        values = parse_qs(urlsplit(path).query).get("sid")
        return values[0] if values else path

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append({"path": request.path, "headers": list(request.headers.raw_items())})
        path = urlsplit(request.path).path
        if "/refuse/" in path:
            status = int(path.rsplit("/refuse/", 1)[1].split("/")[0])
            return connection.respond(status, "refused by the test upstream\n")
        if "/hang" in path:
            await self._park()
            return connection.respond(503, "too late\n")
        if "/delay" in path:
            await asyncio.sleep(0.5)
        return None

    def _process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        if response.status_code == 101:
            for cookie in self.COOKIES:
                response.headers["Set-Cookie"] = cookie  # (adds a line)

    def _select_subprotocol(self, connection: ServerConnection, offered: Any) -> str | None:
        for choice in self.SUBPROTOCOLS:  # the upstream's preference, not the client's order
            if choice in offered:
                return choice
        return None

    # -- sessions

    def session(self, sid: str, timeout: float = WAIT) -> UpstreamSession:
        """The session whose request carried ``?sid=SID`` (waits for it, bounded)."""
        return wait_until(lambda: self.sessions.get(sid), timeout, message=f"no upstream session {sid}")

    def resume(self, session: UpstreamSession) -> None:
        """Let a session that got ``!stopread`` read again."""
        if session.resume is not None:
            self.loop.call_soon_threadsafe(session.resume.set)

    async def _handler(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None and ws.response is not None
        sid = self._sid(request.path)
        session = UpstreamSession(
            path=request.path, sid=sid, headers=list(request.headers.raw_items()), subprotocol=ws.subprotocol,
            extensions=ws.response.headers.get_all("Sec-WebSocket-Extensions"), connection=ws,
        )
        self.sessions[sid] = session
        try:
            query = parse_qs(urlsplit(request.path).query, keep_blank_values=True)
            sink = "sink" in query
            if "greet" in query:
                await ws.send("hello from upstream")
            while True:
                parts = []
                async for fragment in ws.recv_streaming():
                    parts.append(fragment)
                message = "".join(parts) if parts and isinstance(parts[0], str) else b"".join(parts)
                session.received_bytes += len(message)
                session.received_count += 1
                session.fragments.append(len(parts))
                if not sink:
                    session.received.append(message)
                if isinstance(message, str) and message.startswith("!"):
                    await self._command(ws, session, message)
                elif not sink:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            session.close_code = ws.close_code
            session.close_reason = ws.close_reason
            session.ended.set()

    async def _park(self, until: asyncio.Event | None = None, timeout: float = 30) -> None:
        """Wait for ``until``, the server stopping, or ``timeout``."""
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if until is not None:
            waits.append(asyncio.ensure_future(until.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _command(self, ws: ServerConnection, session: UpstreamSession, command: str) -> None:
        words = command[1:].split(" ", 2)
        verb = words[0]
        if verb == "close":
            await ws.close(int(words[1]), words[2] if len(words) > 2 else "")
        elif verb == "drop":
            assert ws.transport is not None
            ws.transport.abort()
        elif verb == "send":
            count, size = int(words[1]), int(words[2])
            for i in range(count):
                await ws.send(pattern(size, i))
        elif verb == "flood":
            total, size = int(words[1]), int(words[2])
            chunk = pattern(size)
            while session.sent_bytes < total:
                await ws.send(chunk)
                session.sent_bytes += size
        elif verb == "badutf8":
            await ws.send(b"bad \xc3\x28 text", text=True)
        elif verb == "fragments":
            await ws.send(["frag-one ", "frag-two ", "frag-three"])
        elif verb == "stopread":
            session.resume = asyncio.Event()
            await ws.send("stopped reading")
            await self._park(session.resume)
        elif verb == "deaf":
            assert ws.transport is not None
            ws.transport.pause_reading()
            await ws.send("deaf now")
            await self._park()
        elif verb == "say":
            await ws.send(command[5:])
        elif verb == "say64":
            await ws.send(base64.b64decode(words[1]).decode())
        elif verb == "rawclose":
            assert ws.transport is not None
            payload = bytes.fromhex(words[1]) if len(words) > 1 else b""
            ws.transport.write(bytes([0x88, len(payload)]) + payload)


# ---------------------------------------------------------------------------
# A raw client

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    """One WebSocket frame (masked, as a client must)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else _xor(payload, key)
    return head + key + masked


def _xor(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    whole = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(whole, "little")).to_bytes(n, "little")


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame."""
    return struct.pack("!H", code) + reason.encode()


class RawClient:
    """A WebSocket client on a plain (or TLS-wrapped) socket, frame by frame."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None, rcvbuf: int | None = None,
                 timeout: float = WAIT) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        self.sock: socket.socket = tls.wrap_socket(sock, server_hostname="localhost") if tls is not None else sock
        self.buffer = b""
        self.status = 0
        self.response_head = ""

    def send_request(self, path: str, extra: bytes = b"", protocols: str | None = None,
                     headers: tuple[str, ...] = (), connection: str = "Upgrade") -> None:
        """Send the upgrade request (then ``extra`` bytes in the same write)."""
        lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Upgrade: websocket", f"Connection: {connection}",
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", *headers]
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {protocols}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + extra)

    def handshake(self, path: str, extra: bytes = b"", protocols: str | None = None,
                  headers: tuple[str, ...] = (), connection: str = "Upgrade") -> int:
        """Send the upgrade request (then ``extra`` bytes in the same write) and
        read the response head; returns its status."""
        self.send_request(path, extra, protocols, headers, connection)
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed during the handshake: {self.buffer!r}")
            self.buffer += data
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        self.response_head = head.decode("latin-1")
        self.status = int(self.response_head.split()[1])
        return self.status

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """Send one frame."""
        self.sock.sendall(encode_frame(opcode, payload, fin))

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = self.sock.recv(max(65536, n - len(self.buffer)))
            if not data:
                raise ConnectionError("connection closed")
            self.buffer += data
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def recv_frame(self) -> tuple[bool, int, bytes]:
        """One frame: (fin, opcode, payload)."""
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        key = self._read(4) if b1 & 0x80 else None
        payload = self._read(n)
        if key is not None:
            payload = _xor(payload, key)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv_message(self, answer_pings: bool = True) -> tuple[int, bytes]:
        """One whole data message (or a close frame): (opcode, payload).  Pings
        are answered (or ignored) on the way."""
        opcode, parts = None, []
        while True:
            fin, op, payload = self.recv_frame()
            if op == OP_PING:
                if answer_pings:
                    self.send(OP_PONG, payload)
                continue
            if op == OP_PONG:
                continue
            if op == OP_CLOSE:
                return op, payload
            if opcode is None:
                opcode = op
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def recv_close(self, answer_pings: bool = True) -> tuple[int, str]:
        """Read until the close frame; returns its code and reason (data is skipped)."""
        while True:
            op, payload = self.recv_message(answer_pings)
            if op == OP_CLOSE:
                if len(payload) < 2:
                    return 1005, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    def reset(self) -> None:
        """Close abruptly: a TCP reset, no close frame."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        """Close the socket."""
        try:
            self.sock.close()
        except OSError:
            pass


__all__ = ["RawClient", "UpstreamSession", "WsUpstream", "close_payload", "encode_frame", "pattern",
           "wait_until"]
