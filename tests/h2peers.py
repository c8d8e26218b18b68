"""A small synchronous HTTP/2 client for the HTTP/2 tests, on the ``h2``
library: well-behaved requests, and what a hostile client sends (raw frames
with ``hyperframe``, resets, floods, windows it never opens)."""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from hyperframe.frame import DataFrame, Frame, GoAwayFrame

WAIT = 10.0


@dataclass
class StreamResult:
    """What came back on one stream."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def status(self) -> int:
        """The :status of the (final) response head, 0 if none."""
        statuses = [int(v) for k, v in self.headers if k == b":status"]
        return statuses[-1] if statuses else 0

    def header(self, name: bytes) -> bytes | None:
        """A response header, or None."""
        return next((v for k, v in self.headers if k == name), None)


class H2Client:
    """One HTTP/2 connection over TLS to the proxy (ALPN h2)."""

    def __init__(self, port: int, ca: Any, *, settings: dict[int, int] | None = None, ack_data: bool = True) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=WAIT),
                                        server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        self.ack_data = ack_data
        self.streams: dict[int, StreamResult] = {}
        self.server_settings: dict[int, int] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self._buffer = b""
        self.flush()

    def flush(self) -> None:
        """Send what h2 has queued."""
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        """Bytes on the connection, past h2 (hostile frames)."""
        self.sock.sendall(data)

    def send_frame(self, frame: Frame) -> None:
        """One frame, serialised by hyperframe."""
        self.send_raw(frame.serialize())

    def request(self, path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None,
                body: bytes | None = None, end: bool = True) -> int:
        """Open a stream with a request; returns its id."""
        stream_id = self.conn.get_next_available_stream_id()
        block = [(b":method", method.encode()), (b":scheme", b"https"), (b":path", path.encode()),
                 (b":authority", b"localhost")] + (headers or [])
        self.conn.send_headers(stream_id, block, end_stream=body is None and end)
        self.streams[stream_id] = StreamResult()
        self.flush()
        if body is not None:
            self.send_body(stream_id, body, end)
        return stream_id

    def send_body(self, stream_id: int, body: bytes, end: bool = True) -> None:
        """DATA frames as the windows and the frame size allow (reading while they are closed)."""
        sent = 0
        while sent < len(body):
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                if not self.read():
                    return
                continue
            piece = body[sent:sent + window]
            self.conn.send_data(stream_id, piece)
            sent += len(piece)
            self.flush()
        if end:
            self.conn.end_stream(stream_id)
            self.flush()

    def read(self, timeout: float = WAIT) -> bool:
        """Read once and handle the events; False once the connection is closed."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        self._buffer += data
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                break
            raw, self._buffer = self._buffer[:9 + length], self._buffer[9 + length:]
            self._frame(raw)
        self.flush()
        return True

    def _frame(self, raw: bytes) -> None:
        """One whole frame from the server.  The ``h2`` library ends its
        connection state at GOAWAY, but a graceful GOAWAY lets the streams open
        finish: after it, DATA is read from the frames themselves."""
        if self.goaway is None:
            for event in self.conn.receive_data(raw):
                self._event(event)
            return
        frame, length = Frame.parse_frame_header(memoryview(raw[:9]))
        frame.parse_body(memoryview(raw[9:9 + length]))
        if isinstance(frame, DataFrame):
            result = self.streams.setdefault(frame.stream_id, StreamResult())
            result.data += frame.data
            result.ended = result.ended or "END_STREAM" in frame.flags
        elif isinstance(frame, GoAwayFrame):
            self.goaway.error_code = frame.error_code

    def _event(self, event: Any) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            self.streams.setdefault(event.stream_id, StreamResult()).headers += event.headers
        elif isinstance(event, h2.events.DataReceived):
            self.streams.setdefault(event.stream_id, StreamResult()).data += event.data
            if self.ack_data:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self.streams.setdefault(event.stream_id, StreamResult()).trailers += event.headers
        elif isinstance(event, h2.events.StreamEnded):
            self.streams.setdefault(event.stream_id, StreamResult()).ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.streams.setdefault(event.stream_id, StreamResult()).reset = event.error_code
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.server_settings.update({int(k): v.new_value for k, v in event.changed_settings.items()})
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def until(self, predicate: Any, timeout: float = WAIT) -> Any:
        """Read until ``predicate()`` is true (bounded); its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met within {timeout}s")
            if not self.read(remaining):
                value = predicate()
                if value:
                    return value
                raise AssertionError("the connection closed before the condition was met")

    def response(self, stream_id: int, timeout: float = WAIT) -> StreamResult:
        """Wait for a stream to end or be reset."""
        result = self.streams[stream_id]
        self.until(lambda: result.ended or result.reset is not None, timeout)
        return result

    def get(self, path: str, **kwargs: Any) -> StreamResult:
        """A whole request and its response."""
        return self.response(self.request(path, **kwargs))

    def close(self) -> None:
        """Close the socket."""
        try:
            self.sock.close()
        except OSError:
            pass


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client's WebSocket frame (FIN, masked)."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    return head + key + masked


def unframe(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of every whole server frame in ``data``."""
    frames = []
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        start = 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        if len(data) < start + length:
            break
        frames.append((opcode, data[start:start + length]))
        data = data[start + length:]
    return frames
