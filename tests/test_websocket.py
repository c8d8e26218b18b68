"""The WebSocket bridge end to end: a real ``twistd -n chatproxy`` between
independent peers, the ``websockets`` library as client and as upstream
server (plus raw sockets where a library would not misbehave), over ws and
wss on each leg.

Most tests share one proxy process (module scope) whose routes differ by
path: ``/`` and ``/tls`` bridge to a ws and a wss upstream, the other
prefixes carry one option each (limits, rate, pings, idle timeout,
compression, a message filter, tunnel mode).  Each session carries a unique
``?sid=`` so the upstream's record and the access-log line of that session
can be found.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conftest import PKI, ProxyStarter, for_sync_websockets, free_port, metric_samples
from ws_peers import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    RawClient,
    WsUpstream,
    close_payload,
    encode_frame,
    pattern,
    wait_until,
)

WAIT = 10.0
MiB = 1024 * 1024

FILTER_PLUGIN = '''
"""A third-party filter kind for the WebSocket tests: a message hook only."""
from zope.interface import implementer
from twisted.plugin import IPlugin

from chatproxy.filters import DROP, CloseSession, IFilterFactory, IRequestFilter


@implementer(IRequestFilter)
class WordFilter:
    def request(self, request):
        return None

    def message(self, head, payload, binary, upward):
        if b"DROPME" in payload:
            return DROP
        if b"BADWORD" in payload:
            return CloseSession(4400, "bad word")
        return None


@implementer(IPlugin, IFilterFactory)
class WordFilterKind:
    name = "ws-test-words"

    def build(self, options):
        return WordFilter()


kind = WordFilterKind()
'''


# ---------------------------------------------------------------------------
# The shared proxy and its upstreams


@dataclass
class Env:
    """The shared proxy, its ports and the upstreams behind it."""

    pki: PKI
    up: WsUpstream  # ws://
    ups: WsUpstream  # wss://
    upz: WsUpstream  # ws:// offering permessage-deflate
    port: int  # plain listener
    tls_port: int  # TLS listener
    process: Any
    log_path: Path
    gate: socket.socket  # a listener whose accept queue is full: connecting to it hangs
    admin_port: int  # the [admin] listener (/metrics)

    def client_tls(self) -> ssl.SSLContext:
        return sync_client_tls(self.pki)

    def log_entry(self, sid: str, timeout: float = WAIT) -> dict[str, Any]:
        """The access-log record of the session with ``sid`` (bounded wait)."""
        return read_log_entry(self.log_path, sid, timeout)


def read_log_entry(path: Path, sid: str, timeout: float = WAIT) -> dict[str, Any]:
    """The JSON access-log record whose target carries ``sid=SID``, once written."""
    def find() -> dict[str, Any] | None:
        if not path.exists():
            return None
        for line in path.read_text().split("\n")[:-1]:  # whole lines only
            if f"sid={sid}" in line:
                return json.loads(line)
        return None

    return wait_until(find, timeout, message=f"no access-log line for sid={sid} in {path}")


def write_filter_plugin(directory: Path) -> Path:
    """A ``twisted/plugins`` directory (no ``__init__``) holding the test filter kind."""
    plugins = directory / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "ws_test_filter.py").write_text(FILTER_PLUGIN)
    return directory


def sync_client_tls(pki: PKI) -> ssl.SSLContext:
    """The TLS context for ``websockets.sync`` clients (see ``conftest.for_sync_websockets``)."""
    return for_sync_websockets(pki.client_context())


def proxy_config(pki: PKI, port: int, tls_port: int, up: int, ups: int, upz: int,
                 log_path: Path, gate: int, admin: int) -> str:
    dead, demo = free_port(), free_port()
    return textwrap.dedent(f"""\
        [chatproxy]
        access_log = {log_path}
        access_log_format = json

        [admin]
        endpoint = tcp:{admin}:interface=127.0.0.1

        [demo]
        endpoint = tcp:{demo}:interface=127.0.0.1

        [listen:plain]
        endpoint = tcp:{port}:interface=127.0.0.1

        [listen:secure]
        endpoint = tcp:{tls_port}:interface=127.0.0.1
        tls = yes
        certificate = {pki.cert}
        key = {pki.key}

        [upstream:ws]
        servers = http://127.0.0.1:{up}

        [upstream:wss]
        servers = https://localhost:{ups}
        ca = {pki.ca}

        [upstream:deflate]
        servers = http://127.0.0.1:{upz}

        [upstream:slow]
        servers = http://127.0.0.1:{up}
        connect_timeout = 1
        response_timeout = 1

        [upstream:dead]
        servers = http://127.0.0.1:{dead}

        [upstream:gate]
        servers = http://127.0.0.1:{gate}
        connect_timeout = 5

        [upstream:untrusted]
        servers = https://localhost:{ups}

        [upstream:autobahn]
        servers = http://127.0.0.1:{demo}

        [filter:words]
        use = ws-test-words

        [filter:words-drop]
        use = ws-test-words
        refused_message = drop

        [route:ws]
        path = /
        upstream = ws
        websocket = yes

        [route:wss]
        path = /tls
        upstream = wss
        websocket = yes

        [route:limits]
        path = /limits
        upstream = ws
        websocket = yes
        max_message_bytes = 64k
        max_frame_bytes = 16k

        [route:rate]
        path = /rate
        upstream = ws
        websocket = yes
        max_messages_per_second = 10

        [route:buffered]
        path = /buffered
        upstream = ws
        websocket = yes
        max_buffered_bytes = 64k

        [route:idle]
        path = /idle
        upstream = ws
        websocket = yes
        idle_timeout = 1

        [route:ping]
        path = /ping
        upstream = ws
        websocket = yes
        ping_interval = 300ms
        ping_timeout = 300ms

        [route:compress]
        path = /compress
        upstream = deflate
        websocket = yes
        compression = yes

        [route:nocompress]
        path = /nocompress
        upstream = deflate
        websocket = yes

        [route:filtered]
        path = /filtered
        upstream = ws
        websocket = yes
        filters = words

        [route:filtered-drop]
        path = /filtered-drop
        upstream = ws
        websocket = yes
        filters = words-drop

        [route:tunnel]
        path = /tunnel
        upstream = ws
        websocket = tunnel

        [route:tls-tunnel]
        path = /tls/tunnel
        upstream = wss
        websocket = tunnel

        [route:hang]
        path = /hang
        upstream = slow
        websocket = yes

        [route:dead]
        path = /dead
        upstream = dead
        websocket = yes

        [route:gate]
        path = /gate
        upstream = gate
        websocket = yes

        [route:untrusted]
        path = /untrusted
        upstream = untrusted
        websocket = yes

        [route:autobahn-echo]
        path = /autobahn-echo
        rewrite_path = /chat
        upstream = autobahn
        websocket = yes
        """)


@pytest.fixture(scope="module")
def env(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One proxy process (plain and TLS listeners) in front of a ws, a wss and a
    deflate-capable ws upstream, with the test filter plugin on PYTHONPATH."""
    directory = tmp_path_factory.mktemp("ws")
    plugin_dir = write_filter_plugin(directory / "plugin")
    upstreams: list[WsUpstream] = []
    starter = ProxyStarter(directory)
    gate = socket.socket()
    gate.bind(("127.0.0.1", 0))
    gate.listen(0)
    filler = socket.create_connection(gate.getsockname())  # fills the accept queue
    try:
        up = WsUpstream()
        upstreams.append(up)
        ups = WsUpstream(tls=pki)
        upstreams.append(ups)
        upz = WsUpstream(compression="deflate")
        upstreams.append(upz)
        port, tls_port, admin_port = free_port(), free_port(), free_port()
        log_path = directory / "access.log"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH")])))
            process = starter.start(proxy_config(pki, port, tls_port, up.port, ups.port, upz.port,
                                                 log_path, gate.getsockname()[1], admin_port), port=port)
        yield Env(pki, up, ups, upz, port, tls_port, process, log_path, gate, admin_port)
    finally:
        filler.close()
        gate.close()
        starter.stop_all()
        for upstream in upstreams:
            upstream.stop()


def new_sid() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Leg:
    """One way through the shared proxy: ws or wss to the proxy, ws or wss behind it."""

    env: Env
    client: str
    upstream_scheme: str

    @property
    def upstream(self) -> WsUpstream:
        return self.env.ups if self.upstream_scheme == "wss" else self.env.up

    @property
    def port(self) -> int:
        return self.env.tls_port if self.client == "wss" else self.env.port

    @property
    def ssl(self) -> ssl.SSLContext | None:
        """For ``websockets.sync`` clients (see sync_client_tls)."""
        return sync_client_tls(self.env.pki) if self.client == "wss" else None

    @property
    def raw_ssl(self) -> ssl.SSLContext | None:
        return self.env.pki.client_context() if self.client == "wss" else None

    def path(self, path: str, sid: str, query: str = "") -> str:
        prefix = "/tls" if self.upstream_scheme == "wss" else ""
        return f"{prefix}{path}?sid={sid}" + (f"&{query}" if query else "")

    def url(self, path: str, sid: str, query: str = "") -> str:
        return f"{self.client}://localhost:{self.port}{self.path(path, sid, query)}"

    def connect(self, path: str = "/chat", sid: str | None = None, query: str = "", **options: Any) -> ClientConnection:
        """A ``websockets`` client session through the proxy."""
        return ws_connect(self.url(path, sid or new_sid(), query), self.ssl, **options)

    def raw(self, **options: Any) -> RawClient:
        """A raw-socket client connected to the proxy."""
        return RawClient(self.port, tls=self.raw_ssl, **options)


def ws_connect(url: str, context: ssl.SSLContext | None = None, **options: Any) -> ClientConnection:
    options = {"ssl": context, "proxy": None, "open_timeout": WAIT, "close_timeout": 5, "ping_interval": None,
               "compression": None, "max_size": None, "legacy": True, **options}
    if not url.startswith("wss:"):
        options.pop("ssl")
    return connect(url, **options)


def sid_of(ws: ClientConnection) -> str:
    assert ws.request is not None
    return ws.request.path.split("sid=", 1)[1].split("&", 1)[0]


COMBOS = ["ws-ws", "wss-ws", "ws-wss", "wss-wss"]


@pytest.fixture(params=COMBOS)
def leg(request: pytest.FixtureRequest, env: Env) -> Leg:
    """Each combination of client scheme (to the proxy) and upstream scheme."""
    client, upstream = request.param.split("-")
    return Leg(env, client, upstream)


@pytest.fixture(params=["ws-ws", "wss-wss"])
def leg2(request: pytest.FixtureRequest, env: Env) -> Leg:
    """Plain throughout, and TLS on both legs."""
    client, upstream = request.param.split("-")
    return Leg(env, client, upstream)


@pytest.fixture
def plain(env: Env) -> Leg:
    """ws to the proxy, ws to the upstream."""
    return Leg(env, "ws", "ws")


def closed_with(ws: ClientConnection, timeout: float = WAIT) -> tuple[int | None, str | None]:
    """Read until the session closes; the close code and reason the client received."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as closed:
        return (closed.rcvd.code, closed.rcvd.reason) if closed.rcvd is not None else (None, None)
    except TimeoutError:
        pass
    raise AssertionError(f"the session did not close within {timeout}s")


def proxy_fds(process: Any) -> int:
    return len(os.listdir(f"/proc/{process.process.pid}/fd"))


def proxy_rss(process: Any) -> int:
    """The proxy process's resident set size in bytes."""
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------
# Handshake


def test_echo_text_binary_empty_in_order(leg):
    """Text, binary and empty messages go through unchanged and in order, each
    way; the session ends with one access-log line (101, messages and bytes each
    way, close code)."""
    messages: list[str | bytes] = ["hello", b"\x00\x01\x02binary", "", b"", "unicode ✓ 日本語", pattern(5000)]
    messages += [f"numbered {i}" for i in range(50)]
    with leg.connect("/echo") as ws:
        sid = sid_of(ws)
        for message in messages:
            ws.send(message)
        received = [ws.recv(timeout=WAIT) for _ in messages]
    assert received == messages
    assert [type(m) for m in received] == [type(m) for m in messages]
    session = leg.upstream.session(sid).wait_ended()
    assert session.received == messages
    assert session.close_code == 1000
    entry = leg.env.log_entry(sid)
    total = sum(len(m.encode() if isinstance(m, str) else m) for m in messages)
    assert entry["status"] == 101
    assert entry["websocket"] == {"messages_up": str(len(messages)), "messages_down": str(len(messages)),
                                  "bytes_up": str(total), "bytes_down": str(total), "close": "1000"}
    assert entry["duration"] > 0


def test_subprotocol_is_the_one_the_upstream_chose(leg):
    """The offered subprotocols reach the upstream as offered; the client's 101
    carries the one the upstream chose (its preference, not the client's first),
    and none when the upstream chose none."""
    with leg.connect(subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        session = leg.upstream.session(sid_of(ws))
        assert session.subprotocol == "chat.v2"
        offered = ", ".join(session.header("Sec-WebSocket-Protocol")).replace(" ", "")
        assert offered == "chat.v1,chat.v2"
        ws.send("still works")
        assert ws.recv(timeout=WAIT) == "still works"
    with leg.connect(subprotocols=["something.else"]) as ws:
        assert ws.subprotocol is None
        assert ws.response is not None and "Sec-WebSocket-Protocol" not in ws.response.headers
        assert leg.upstream.session(sid_of(ws)).subprotocol is None
    with leg.connect() as ws:
        assert ws.subprotocol is None
        assert leg.upstream.session(sid_of(ws)).header("Sec-WebSocket-Protocol") == []


def test_handshake_forwards_path_headers_cookies_origin_and_forwarding(leg):
    """The upstream handshake carries the path and query, the client's own headers
    and cookies, Origin and User-Agent, chatproxy's forwarding headers (spoofed ones
    replaced, X-Forwarded-Proto https where TLS ended here), a Host as the client
    sent it, and neither the hop-by-hop headers nor the client's own WebSocket
    handshake headers; the upstream's Set-Cookie lines reach the client unchanged."""
    sid = new_sid()
    headers = [
        ("X-Chat-Tenant", "acme"),
        ("Cookie", "session=abc; theme=dark"),
        ("Authorization", "Bearer token-123"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "gopher"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic c2VjcmV0"),
    ]
    with leg.connect("/app/socket", sid=sid, query="room=42&lang=fr", additional_headers=headers,
                     origin="https://chat.example.test", user_agent_header="test-agent/1.0") as ws:
        assert ws.response is not None
        assert ws.response.headers.get_all("Set-Cookie") == list(WsUpstream.COOKIES)
        client_key = ws.request.headers["Sec-WebSocket-Key"]  # type: ignore[union-attr]
        session = leg.upstream.session(sid)
    prefix = "/tls" if leg.upstream_scheme == "wss" else ""
    assert session.path == f"{prefix}/app/socket?sid={sid}&room=42&lang=fr"
    assert session.header("X-Chat-Tenant") == ["acme"]
    assert session.header("Cookie") == ["session=abc; theme=dark"]
    assert session.header("Authorization") == ["Bearer token-123"]
    assert session.header("Origin") == ["https://chat.example.test"]
    assert session.header("User-Agent") == ["test-agent/1.0"]
    assert session.header("X-Forwarded-For") == ["127.0.0.1"]
    assert session.header("X-Forwarded-Proto") == ["https" if leg.client == "wss" else "http"]
    assert session.header("X-Forwarded-Host") == [f"localhost:{leg.port}"]
    assert session.header("X-Forwarded-Port") == [str(leg.port)]
    assert session.header("Host") == [f"localhost:{leg.port}"]
    assert any("chatproxy" in via for via in session.header("Via"))
    assert session.header("Keep-Alive") == [] and session.header("Proxy-Authorization") == []
    assert session.header("Sec-WebSocket-Key") != [client_key]
    assert len(session.header("Sec-WebSocket-Key")) == 1
    assert session.header("Sec-WebSocket-Extensions") == []
    assert session.header("Upgrade")[0].lower() == "websocket"


def test_headers_named_in_connection_are_not_forwarded(leg2):
    """Headers the client lists in its Connection header are hop-by-hop: the
    upstream handshake does not carry them; the others are forwarded."""
    client = leg2.raw()
    sid = new_sid()
    try:
        assert client.handshake(leg2.path("/chat", sid), connection="Upgrade, X-Hop-Secret",
                                headers=("X-Hop-Secret: for the proxy only", "X-Kept: yes")) == 101
        session = leg2.upstream.session(sid)
        assert session.header("X-Hop-Secret") == []
        assert session.header("X-Kept") == ["yes"]
    finally:
        client.close()


def test_two_cookie_lines_are_joined_as_one_cookie_list(plain):
    """A client sending its cookies on two Cookie lines: the upstream gets every
    cookie, joined with '; ' as a Cookie header must be (', ' would glue two
    cookies into one value)."""
    headers = [("Cookie", "a=1"), ("Cookie", "b=2")]
    with plain.connect(additional_headers=headers) as ws:
        session = plain.upstream.session(sid_of(ws))
    assert "; ".join(session.header("Cookie")) == "a=1; b=2"


def test_refused_handshake_gets_the_upstreams_status(leg):
    """An upstream refusing the handshake (403, 401, 404) gives the client that
    status, not a 101; the access log records it."""
    for status in (403, 401, 404):
        sid = new_sid()
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(leg.url(f"/refuse/{status}", sid), leg.ssl)
        assert refused.value.response.status_code == status
        assert leg.env.log_entry(sid)["status"] == status


def test_unreachable_upstream_gets_502(env):
    """Nothing listens at the upstream's address: the client gets 502."""
    sid = new_sid()
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"ws://localhost:{env.port}/dead?sid={sid}")
    assert refused.value.response.status_code == 502
    assert env.log_entry(sid)["status"] == 502


def test_upstream_tls_is_verified(env):
    """A wss upstream whose certificate the proxy does not trust (no ``ca`` for
    the test CA): the upstream handshake never happens, the client gets 502."""
    sid = new_sid()
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"ws://localhost:{env.port}/untrusted?sid={sid}")
    assert refused.value.response.status_code == 502
    assert sid not in env.ups.sessions


def test_client_gone_while_the_upstream_is_being_connected(env):
    """The client disappears while chatproxy is still connecting to the upstream
    (TCP not yet accepted): the connection attempt is abandoned, so the upstream
    never gets a WebSocket handshake for a client that is gone, and the session is
    logged."""
    sid = new_sid()
    client = RawClient(env.port)
    client.send_request(f"/gate?sid={sid}")
    time.sleep(0.3)  # chatproxy's SYN waits: the gate's accept queue is full
    client.reset()
    time.sleep(0.2)
    env.gate.settimeout(1.5)
    env.gate.accept()[0].close()  # the filler: room for one more connection
    try:
        late, _ = env.gate.accept()  # chatproxy's SYN is retried after 1 s
    except socket.timeout:
        late = None
    if late is not None:
        with late:
            late.settimeout(1.5)
            try:
                data = late.recv(4096)
            except socket.timeout:
                data = b""
        assert not data.startswith(b"GET"), "a WebSocket handshake was sent for a client that is gone"
    assert env.log_entry(sid)["status"] == 499
    socket.create_connection(env.gate.getsockname()).close()  # fill the queue again for any later use


def test_upstream_handshake_not_in_time_gets_504(env):
    """The upstream accepts the connection but never answers the handshake: after
    connect_timeout + response_timeout (2 s here) the client gets 504."""
    sid = new_sid()
    started = time.monotonic()
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"wss://localhost:{env.tls_port}/hang?sid={sid}", env.client_tls())
    assert refused.value.response.status_code == 504
    assert 1.5 < time.monotonic() - started < 8
    assert env.log_entry(sid)["status"] == 504


def test_messages_sent_during_the_upstream_handshake_are_kept(leg2):
    """A client that sends frames right behind its upgrade request (same write,
    and again while the upstream is still deciding) loses none of them: its 101
    comes only once the upstream accepted, the upstream gets them all, in
    order, and they come back."""
    sid = new_sid()
    client = leg2.raw()
    try:
        early = encode_frame(OP_TEXT, b"early one") + encode_frame(OP_BINARY, b"\x01early two")
        sender = threading.Timer(0.15, lambda: client.send(OP_TEXT, b"while waiting"))
        sender.start()
        started = time.monotonic()
        assert client.handshake(leg2.path("/delay", sid), extra=early) == 101
        assert time.monotonic() - started >= 0.4  # the 101 came once the upstream (0.5 s) accepted
        sender.join(WAIT)
        got = [client.recv_message() for _ in range(3)]
        assert got == [(OP_TEXT, b"early one"), (OP_BINARY, b"\x01early two"), (OP_TEXT, b"while waiting")]
        session = leg2.upstream.session(sid)
        assert session.received == ["early one", b"\x01early two", "while waiting"]
        client.send(OP_CLOSE, close_payload(1000))
        assert client.recv_close() == (1000, "")
    finally:
        client.close()


def test_upstream_speaking_first_is_delivered_first(leg2):
    """An upstream that sends a message as soon as it accepted: the client gets it
    as its first message."""
    with leg2.connect(query="greet") as ws:
        assert ws.recv(timeout=WAIT) == "hello from upstream"
        ws.send("then me")
        assert ws.recv(timeout=WAIT) == "then me"


# ---------------------------------------------------------------------------
# Messages


def test_large_messages_of_16_mib(leg2):
    """16 MiB messages (the default limit), binary and text, each way, unchanged."""
    big = pattern(16 * MiB, 3)
    text = ("0123456789abcdef" * (MiB // 16)) * 16
    with leg2.connect() as ws:
        ws.send(big)
        assert ws.recv(timeout=30) == big
        ws.send(text)
        assert ws.recv(timeout=30) == text
        ws.send("!send 1 %d" % (16 * MiB))
        assert ws.recv(timeout=30) == pattern(16 * MiB, 0)


def test_message_over_max_message_bytes_closes_1009(plain):
    """A message over the route's max_message_bytes (64k, here in 12k frames)
    ends the session with 1009 on both legs; the upstream never sees that
    message; the access log says 1009."""
    with plain.connect("/limits") as ws:
        sid = sid_of(ws)
        ws.send(pattern(10000))
        assert ws.recv(timeout=WAIT) == pattern(10000)
        try:
            ws.send([pattern(12000, i) for i in range(6)])  # 72000 bytes
        except ConnectionClosed:
            pass  # closed before the last fragment went out
        code, _ = closed_with(ws)
    assert code == 1009
    session = plain.upstream.session(sid).wait_ended()
    assert session.received == [pattern(10000)]
    assert session.close_code == 1009
    assert plain.env.log_entry(sid)["websocket"]["close"] == "1009"


def test_upstream_message_over_max_message_bytes_is_not_delivered(plain):
    """A message from the upstream over the limits: the session ends with 1009 on
    both legs and the client never gets the message."""
    with plain.connect("/limits") as ws:
        sid = sid_of(ws)
        ws.send("!send 1 70000")
        assert closed_with(ws)[0] == 1009
    assert plain.upstream.session(sid).wait_ended().close_code == 1009


def test_frame_over_max_frame_bytes_closes_1009(plain):
    """Frames are limited on their own (16k here, messages 64k): a 48k message in
    12k frames passes (reassembled: the upstream gets it as one frame), a
    single 20k frame ends the session with 1009."""
    with plain.connect("/limits", query="sink") as ws:
        sid = sid_of(ws)
        ws.send([pattern(12000, 1), pattern(12000, 2), pattern(12000, 3), pattern(12000, 4)])
        session = plain.upstream.session(sid)
        wait_until(lambda: session.received_count == 1)
        assert session.received_bytes == 48000 and session.fragments == [1]
        ws.send(pattern(20000))
        code, _ = closed_with(ws)
    assert code == 1009
    assert session.wait_ended().received_count == 1


def test_fragmented_messages_are_reassembled_both_ways(leg2):
    """Fragmented messages are relayed whole (as documented, the bridge
    reassembles): the client's three-frame text message reaches the upstream as
    one frame, and the upstream's three-frame message reaches the client as one."""
    with leg2.connect() as ws:
        sid = sid_of(ws)
        ws.send(["part one, ", "part two, ", "part three ✓"])
        assert ws.recv(timeout=WAIT) == "part one, part two, part three ✓"
        ws.send([b"\x00bin", b"ary", b"\xff"])
        assert ws.recv(timeout=WAIT) == b"\x00binary\xff"
        ws.send("!fragments")
        fragments = list(ws.recv_streaming())
        assert fragments == ["frag-one frag-two frag-three"]
    assert leg2.upstream.session(sid).fragments == [1, 1, 1]


def test_raw_fragments_with_control_frames_between(leg2):
    """A raw client interleaves a ping between the fragments of a message: the
    ping is answered, the message arrives whole at the upstream and back."""
    client = leg2.raw()
    sid = new_sid()
    try:
        assert client.handshake(leg2.path("/chat", sid)) == 101
        client.send(OP_TEXT, b"one ", fin=False)
        client.send(OP_PING, b"are you there")
        client.send(OP_CONT, "two ✓ ".encode(), fin=False)
        client.send(OP_CONT, b"three", fin=True)
        fin, op, payload = client.recv_frame()
        assert (op, payload) == (0xA, b"are you there")
        assert client.recv_message() == (OP_TEXT, "one two ✓ three".encode())
        assert leg2.upstream.session(sid).received == ["one two ✓ three"]
    finally:
        client.close()


def test_invalid_utf8_from_the_client_closes_1007(leg2):
    """A text message from the client that is not UTF-8 ends the session with 1007
    on both legs; the upstream never gets it; the access log says 1007."""
    with leg2.connect() as ws:
        sid = sid_of(ws)
        ws.send("fine")
        assert ws.recv(timeout=WAIT) == "fine"
        ws.send(b"bad \xc3\x28 text", text=True)
        code, _ = closed_with(ws)
    assert code == 1007
    session = leg2.upstream.session(sid).wait_ended()
    assert session.received == ["fine"]
    assert session.close_code == 1007
    assert leg2.env.log_entry(sid)["websocket"]["close"] == "1007"


def test_invalid_utf8_from_the_upstream_closes_1007(leg2):
    """A text message from the upstream that is not UTF-8 ends the session with
    1007 on both legs; the client never gets it."""
    with leg2.connect() as ws:
        sid = sid_of(ws)
        ws.send("!badutf8")
        assert closed_with(ws)[0] == 1007
    assert leg2.upstream.session(sid).wait_ended().close_code == 1007
    assert leg2.env.log_entry(sid)["websocket"]["close"] == "1007"


def test_whole_frames_of_every_length_encoding_batched_in_one_write(leg2):
    """The bridge parses, masks and frames whole unfragmented messages of up to
    64 KiB itself (the fast path) and leaves the rest to Autobahn.  Messages at
    each boundary -- empty, 125/126 bytes (7-bit/16-bit length), 1024/1025
    (unmasked by chatproxy or by Autobahn's masker), 65535 (the largest on the
    fast path), 65536 and 70000 (Autobahn) -- as ASCII and multi-byte UTF-8
    text and as binary, all sent in one write (many frames per read, the last
    ones possibly cut): every one reaches the upstream exactly, and its echo
    comes back exactly, in order."""
    client = leg2.raw()
    sid = new_sid()
    try:
        assert client.handshake(leg2.path("/chat", sid)) == 101
        sizes = [0, 1, 125, 126, 127, 1023, 1024, 1025, 4096, 65535, 65536, 70000]
        sent: list[tuple[int, bytes]] = []
        for size in sizes:
            sent.append((OP_TEXT, (b"a" * size)))
            utf8 = ("\u00e9\u2713" * size).encode()[:size]
            while True:  # cut back to a whole character
                try:
                    utf8.decode()
                    break
                except UnicodeDecodeError:
                    utf8 = utf8[:-1]
            sent.append((OP_TEXT, utf8))
            sent.append((OP_BINARY, pattern(size, size) if size else b""))
        client.sock.sendall(b"".join(encode_frame(op, payload) for op, payload in sent))
        for op, payload in sent:
            assert client.recv_message() == (op, payload)
        received = leg2.upstream.session(sid).received
        assert received == [payload.decode() if op == OP_TEXT else payload for op, payload in sent]
        client.send(OP_CLOSE, close_payload(1000))
        assert client.recv_close()[0] == 1000
    finally:
        client.close()


@pytest.mark.parametrize("name, frame", [
    ("unmasked", encode_frame(OP_TEXT, b"hello", mask=False)),
    ("16-bit length for 5 bytes", b"\x81\xfe\x00\x05" + encode_frame(OP_TEXT, b"hello")[2:]),
    ("RSV1 without an extension", bytes([0xC1]) + encode_frame(OP_TEXT, b"hello")[1:]),
    ("reserved opcode", bytes([0x83]) + encode_frame(OP_TEXT, b"hello")[1:]),
])
def test_protocol_errors_in_whole_small_frames_still_close_1002(plain, name, frame):
    """Frames that look like the bridge's fast path (whole, small) but break the
    protocol are still refused as Autobahn refuses them: the session ends with
    1002 on both legs and the upstream never gets the message."""
    client = plain.raw()
    sid = new_sid()
    try:
        assert client.handshake(plain.path("/chat", sid)) == 101
        client.send(OP_TEXT, b"fine")
        assert client.recv_message() == (OP_TEXT, b"fine")
        client.sock.sendall(frame)
        assert client.recv_close()[0] == 1002, name
        session = plain.upstream.session(sid).wait_ended()
        assert session.received == ["fine"]
        assert session.close_code == 1002
    finally:
        client.close()


# ---------------------------------------------------------------------------
# Close


def read_to_end(client: RawClient) -> bytes:
    """Whatever the client still receives until the connection ends (EOF; on TLS
    the peer's close_notify or EOF); a reset raises ConnectionResetError."""
    data, client.buffer = client.buffer, b""
    while True:
        chunk = client.sock.recv(65536)
        if not chunk:
            return data
        data += chunk


CLOSES = [(1000, "bye"), (1001, "going away"), (1008, "policy violated"), (1011, "oops"), (1014, "bad gateway"),
          (4000, "app code"), (4999, "last app code é")]


@pytest.mark.parametrize("code,reason", CLOSES)
def test_close_from_client_reaches_upstream_unchanged(leg2, code, reason):
    """The client closes with a code and reason: the upstream gets exactly that
    code and reason, the client gets the close answered, the log records the code."""
    ws = leg2.connect()
    sid = sid_of(ws)
    ws.send("x")
    assert ws.recv(timeout=WAIT) == "x"
    ws.close(code, reason)
    session = leg2.upstream.session(sid).wait_ended()
    assert (session.close_code, session.close_reason) == (code, reason)
    assert ws.close_code == code
    assert leg2.env.log_entry(sid)["websocket"]["close"] == str(code)


@pytest.mark.parametrize("code,reason", CLOSES)
def test_close_from_upstream_reaches_client_unchanged(leg2, code, reason):
    """The upstream closes with a code and reason: the client gets exactly that
    code and reason; the log records the code."""
    with leg2.connect() as ws:
        sid = sid_of(ws)
        ws.send(f"!close {code} {reason}")
        assert closed_with(ws) == (code, reason)
    session = leg2.upstream.session(sid).wait_ended()
    assert session.close_code == code
    assert leg2.env.log_entry(sid)["websocket"]["close"] == str(code)


def test_close_without_status_code(leg2):
    """A raw client closes with an empty close frame (no code): the upstream sees
    a close with no status (1005), and the client's close is answered."""
    client = leg2.raw()
    sid = new_sid()
    try:
        assert client.handshake(leg2.path("/chat", sid)) == 101
        client.send(OP_CLOSE, b"")
        assert client.recv_close()[0] in (1000, 1005)
        assert leg2.upstream.session(sid).wait_ended().close_code == 1005
    finally:
        client.close()


INVALID_CLOSES = [(f"code {code}", close_payload(code, "x")) for code in (0, 999, 1004, 1005, 1006, 1015, 1016,
                                                                         2999, 5000)]
INVALID_CLOSES += [("1-byte payload", b"\x03"), ("reason not UTF-8", close_payload(1000) + b"bad \xc3\x28")]


@pytest.mark.parametrize("name, payload", INVALID_CLOSES, ids=[name for name, _ in INVALID_CLOSES])
def test_invalid_close_from_the_client_is_not_relayed(leg2, name, payload):
    """A client's invalid close frame (a code not allowed on the wire, a 1-byte
    payload, a reason that is not UTF-8) is never passed on: the client gets
    1002 and then a clean end of the connection, the upstream gets 1002 (not
    the invalid bytes), and the access log says 1002."""
    client = leg2.raw()
    sid = new_sid()
    try:
        assert client.handshake(leg2.path("/chat", sid)) == 101
        client.send(OP_TEXT, b"fine")
        assert client.recv_message() == (OP_TEXT, b"fine")
        client.send(OP_CLOSE, payload)
        assert client.recv_close()[0] == 1002
        assert read_to_end(client) == b""
    finally:
        client.close()
    session = leg2.upstream.session(sid).wait_ended()
    assert (session.received, session.close_code) == (["fine"], 1002)
    assert leg2.env.log_entry(sid)["websocket"]["close"] == "1002"


@pytest.mark.parametrize("name, payload", INVALID_CLOSES, ids=[name for name, _ in INVALID_CLOSES])
def test_invalid_close_from_the_upstream_is_not_relayed(leg2, name, payload):
    """The same invalid close frames sent by the upstream: the upstream gets 1002
    on its own leg, the client gets 1002 (the code chatproxy uses for the other
    leg) and, once it answers, a clean end; the access log says 1002."""
    client = leg2.raw()
    sid = new_sid()
    try:
        assert client.handshake(leg2.path("/chat", sid)) == 101
        client.send(OP_TEXT, b"!rawclose " + payload.hex().encode())
        assert client.recv_close()[0] == 1002
        client.send(OP_CLOSE, close_payload(1002))
        assert read_to_end(client) == b""
    finally:
        client.close()
    assert leg2.upstream.session(sid).wait_ended().close_code == 1002
    assert leg2.env.log_entry(sid)["websocket"]["close"] == "1002"


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_messages_in_flight_reach_the_client_before_its_failure_close(env, scheme):
    """Autobahn testsuite case 3.4, behind chatproxy: a text message, then a
    frame with RSV = 7, then a ping, in one write, to an echo upstream (the
    demo chat, Autobahn: it answers frames in order, so it echoes the message
    before it answers chatproxy's close).  The client gets the echo first (it
    was in flight when the client failed), then its 1002 close, and no pong
    (nothing but the close is sent to a peer once it broke the protocol);
    answering the close ends the connection cleanly."""
    tls = scheme == "wss"
    client = RawClient(env.tls_port if tls else env.port, tls=env.pki.client_context() if tls else None)
    sid = new_sid()
    try:
        assert client.handshake(f"/autobahn-echo?sid={sid}") == 101
        client.sock.sendall(encode_frame(OP_TEXT, b"hello") + bytes([0xF1]) + encode_frame(OP_TEXT, b"rsv")[1:]
                            + encode_frame(OP_PING, b"ping"))
        frames = [client.recv_frame()[1:]]
        while frames[-1][0] != OP_CLOSE:
            frames.append(client.recv_frame()[1:])
        assert frames[0] == (OP_TEXT, b"hello")
        assert [op for op, _ in frames] == [OP_TEXT, OP_CLOSE]
        assert frames[1][1][:2] == close_payload(1002)
        client.send(OP_CLOSE, close_payload(1002))
        assert read_to_end(client) == b""
    finally:
        client.close()
    entry = env.log_entry(sid)["websocket"]
    assert (entry["messages_up"], entry["messages_down"], entry["close"]) == ("1", "1", "1002")


def test_client_close_is_answered_after_what_the_upstream_still_sent(env):
    """A client that reads nothing while the upstream floods it (so chatproxy
    holds the upstream back) closes with 1000: the upstream gets the close at
    once, and the client, reading again, still gets every message the
    upstream sent before answering, then the upstream's answer (its code and
    reason passed through) and a clean end."""
    client = RawClient(env.port, rcvbuf=16384)
    sid = new_sid()
    try:
        assert client.handshake(f"/flood?sid={sid}") == 101
        client.send(OP_TEXT, b"!flood %d %d" % (512 * MiB, 65536))
        session = env.up.session(sid)
        previous = -1
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and session.sent_bytes != previous:  # until the upstream is held back
            previous = session.sent_bytes
            time.sleep(0.5)
        assert 0 < session.sent_bytes < 64 * MiB
        client.send(OP_CLOSE, close_payload(1000, "bye"))
        received = 0
        while True:
            op, payload = client.recv_message()
            if op == OP_CLOSE:
                break
            received += len(payload)
        assert payload == close_payload(1000, "bye")
        assert session.wait_ended().close_code == 1000
        assert received >= session.sent_bytes
        assert read_to_end(client) == b""
    finally:
        client.close()
    entry = env.log_entry(sid)["websocket"]
    assert entry["close"] == "1000" and int(entry["bytes_down"]) == received


def test_client_close_is_answered_when_the_upstream_never_answers(env):
    """The upstream stops reading, so it never answers the client's close that
    chatproxy passes on: the wait is bounded by the close handshake timeout
    (5 s), after which the upstream connection is dropped and the client's
    close answered with its own code and reason; the connection then ends
    cleanly."""
    client = RawClient(env.port)
    sid = new_sid()
    try:
        assert client.handshake(f"/chat?sid={sid}") == 101
        client.send(OP_TEXT, b"!deaf")
        assert client.recv_message() == (OP_TEXT, b"deaf now")
        client.send(OP_CLOSE, close_payload(1000, "bye"))
        assert client.recv_close() == (1000, "bye")
        assert read_to_end(client) == b""
    finally:
        client.close()
    assert env.log_entry(sid)["websocket"]["close"] == "1000"


def test_upstream_close_still_relays_what_the_client_sent_before_answering(leg2):
    """The upstream closes with 4000: the client gets that close; a message the
    client sends before its answer is still relayed to the upstream (whose
    close is answered only with the client's answer, passed through); then
    the connection ends cleanly."""
    client = leg2.raw()
    sid = new_sid()
    try:
        assert client.handshake(leg2.path("/chat", sid)) == 101
        client.send(OP_TEXT, b"!close 4000 bye")
        assert client.recv_close() == (4000, "bye")
        client.send(OP_TEXT, b"sent before my answer")
        client.send(OP_CLOSE, close_payload(4000, "bye too"))
        assert read_to_end(client) == b""
    finally:
        client.close()
    session = leg2.upstream.session(sid).wait_ended()
    assert session.close_code == 4000
    entry = leg2.env.log_entry(sid)["websocket"]
    assert (entry["messages_up"], entry["close"]) == ("2", "4000")
    assert entry["bytes_up"] == str(len(b"!close 4000 bye") + len(b"sent before my answer"))


def test_abrupt_upstream_loss_closes_the_client_with_1011(leg):
    """The upstream's TCP connection is reset without a close frame: the client is
    closed with 1011 and the log records 1011."""
    with leg.connect() as ws:
        sid = sid_of(ws)
        ws.send("!drop")
        code, _ = closed_with(ws)
    assert code == 1011
    assert leg.env.log_entry(sid)["websocket"]["close"] == "1011"


def test_abrupt_client_loss_closes_the_upstream_with_1001(leg):
    """The client's TCP connection is reset without a close frame: the upstream is
    closed with 1001 and the log records 1001."""
    client = leg.raw()
    sid = new_sid()
    assert client.handshake(leg.path("/chat", sid)) == 101
    client.send(OP_TEXT, b"about to vanish")
    assert client.recv_message() == (OP_TEXT, b"about to vanish")
    client.reset()
    session = leg.upstream.session(sid).wait_ended()
    assert session.close_code == 1001
    assert leg.env.log_entry(sid)["websocket"]["close"] == "1001"


def test_client_closing_tcp_without_close_frame_closes_upstream_1001(leg2):
    """The client closes its TCP connection cleanly but without a close frame: the
    upstream is closed with 1001."""
    client = leg2.raw()
    sid = new_sid()
    assert client.handshake(leg2.path("/chat", sid)) == 101
    client.close()
    assert leg2.upstream.session(sid).wait_ended().close_code == 1001


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_failed_client_leg_gets_its_close_frame_and_a_clean_end(env, scheme):
    """A client breaking the protocol (a frame with RSV bits, no extension)
    gets chatproxy's 1002 close frame, over TLS as over TCP (not lost to an
    abort); once it answers with its own close, chatproxy closes the connection
    cleanly: the socket reads EOF, not a reset."""
    tls = scheme == "wss"
    client = RawClient(env.tls_port if tls else env.port, tls=env.pki.client_context() if tls else None)
    sid = new_sid()
    try:
        assert client.handshake(f"/chat?sid={sid}") == 101
        client.sock.sendall(bytes([0xF1]) + encode_frame(OP_TEXT, b"rsv")[1:])
        assert client.recv_close()[0] == 1002
        client.send(OP_CLOSE, close_payload(1002))
        assert read_to_end(client) == b""
    finally:
        client.close()
    assert env.up.session(sid).wait_ended().close_code == 1002
    assert env.log_entry(sid)["websocket"]["close"] == "1002"


# ---------------------------------------------------------------------------
# Liveness


def test_pings_answered_keep_the_session(env):
    """On a route with ping_interval 300ms the client receives pings; a client
    answering them keeps its session through quiet periods."""
    client = RawClient(env.port)
    sid = new_sid()
    try:
        assert client.handshake(f"/ping?sid={sid}") == 101
        pings = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            fin, op, payload = client.recv_frame()
            assert op == OP_PING
            pings += 1
            client.send(0xA, payload)
        assert pings >= 2
        client.send(OP_TEXT, b"still here")
        assert client.recv_message() == (OP_TEXT, b"still here")
    finally:
        client.close()
    env.up.session(sid).wait_ended()


def test_ping_timeout_finds_a_half_open_client(env):
    """A client that stops answering pings is dropped after ping_timeout; the
    upstream is closed with 1001."""
    client = RawClient(env.port)
    sid = new_sid()
    try:
        assert client.handshake(f"/ping?sid={sid}") == 101
        session = env.up.session(sid)
        assert session.ended.wait(5), "the half-open client was not found"
        assert session.close_code == 1001
    finally:
        client.close()


def test_ping_timeout_finds_a_half_open_upstream(env):
    """An upstream that stops reading (no pongs): the proxy finds it after
    ping_timeout and closes the client with 1011."""
    with ws_connect(f"ws://localhost:{env.port}/ping?sid={new_sid()}") as ws:
        ws.send("!deaf")
        assert ws.recv(timeout=WAIT) == "deaf now"
        started = time.monotonic()
        code, _ = closed_with(ws, timeout=5)
    assert code == 1011
    assert time.monotonic() - started < 4


def test_idle_timeout_closes_quiet_sessions(env):
    """idle_timeout = 1: a session with messages flowing stays open past it; a
    silent session is closed with 1001 on both legs."""
    with ws_connect(f"ws://localhost:{env.port}/idle?sid={new_sid()}") as ws:
        sid = sid_of(ws)
        for i in range(6):
            ws.send(f"keepalive {i}")
            assert ws.recv(timeout=WAIT) == f"keepalive {i}"
            time.sleep(0.3)
        started = time.monotonic()
        assert closed_with(ws, timeout=5) == (1001, "idle timeout")
    assert time.monotonic() - started < 2.5
    assert env.up.session(sid).wait_ended().close_code == 1001
    assert env.log_entry(sid)["websocket"]["close"] == "1001"


# ---------------------------------------------------------------------------
# Limits and filters


def test_message_rate_limit_closes_1008(env):
    """max_messages_per_second = 10: a client sending far faster is closed with
    1008, so is the upstream, and the log says 1008; a client within the rate is not."""
    with ws_connect(f"ws://localhost:{env.port}/rate?sid={new_sid()}") as ws:
        for i in range(5):
            ws.send(f"slow {i}")
            assert ws.recv(timeout=WAIT) == f"slow {i}"
            time.sleep(0.11)
    with ws_connect(f"ws://localhost:{env.port}/rate?sid={new_sid()}&sink") as ws:  # the upstream keeps reading
        sid = sid_of(ws)
        for i in range(100):
            try:
                ws.send(f"fast {i}")
            except ConnectionClosed:
                break
        code, _ = closed_with(ws)
    assert code == 1008
    session = env.up.session(sid).wait_ended()
    assert session.close_code == 1008
    assert 15 <= session.received_count <= 25  # the burst allowance (2 s worth), then the close
    assert env.log_entry(sid)["websocket"]["close"] == "1008"


def test_message_filter_drops_and_closes(env):
    """A third-party filter's message hook: a message it drops never arrives (in
    either direction) and the session goes on; its CloseSession(4400, 'bad
    word') closes both legs with that code and reason."""
    with ws_connect(f"ws://localhost:{env.port}/filtered?sid={new_sid()}") as ws:
        sid = sid_of(ws)
        ws.send("hello")
        assert ws.recv(timeout=WAIT) == "hello"
        ws.send("please DROPME now")
        ws.send(b"binary DROPME too")
        ws.send("after the drop")
        assert ws.recv(timeout=WAIT) == "after the drop"
        ws.send("!say64 " + base64.b64encode(b"downward DROPME").decode())  # the command itself passes
        ws.send("!say downward ok")
        assert ws.recv(timeout=WAIT) == "downward ok"
        ws.send("a BADWORD here")
        assert closed_with(ws) == (4400, "bad word")
    session = env.up.session(sid).wait_ended()
    assert session.received[:2] == ["hello", "after the drop"] and len(session.received) == 4
    assert (session.close_code, session.close_reason) == (4400, "bad word")
    entry = env.log_entry(sid)
    assert entry["websocket"]["close"] == "4400"


def _filter_metric(env: Env, name: str, labels: dict[str, str]) -> float:
    """The value of one labelled sample of ``name`` on the proxy's /metrics (0 when absent)."""
    return next((value for found, value in metric_samples(env.admin_port, name) if found == labels), 0.0)


def test_refused_message_drop_keeps_the_session(env):
    """refused_message = drop: a message the filter refuses (CloseSession) is not
    relayed, in either direction, and the session goes on: the next message on
    the same session passes.  Each refusal is counted as the filter's
    ``refused`` outcome and as a ``websocket_dropped`` event on /metrics, and
    logged in one line naming the filter, the direction and the client."""
    refused = {"filter": "words-drop", "outcome": "refused"}
    dropped = {"event": "websocket_dropped"}
    refused_before = _filter_metric(env, "chatproxy_filter_outcomes_total", refused)
    dropped_before = _filter_metric(env, "chatproxy_events_total", dropped)
    with ws_connect(f"ws://localhost:{env.port}/filtered-drop?sid={new_sid()}") as ws:
        sid = sid_of(ws)
        ws.send("a BADWORD here")
        ws.send("after the refusal")
        assert ws.recv(timeout=WAIT) == "after the refusal"
        ws.send("!say64 " + base64.b64encode(b"downward BADWORD").decode())  # the command itself passes
        ws.send("!say downward ok")
        assert ws.recv(timeout=WAIT) == "downward ok"
        ws.send("still open")
        assert ws.recv(timeout=WAIT) == "still open"
    session = env.up.session(sid).wait_ended()
    assert "a BADWORD here" not in session.received and "after the refusal" in session.received
    assert session.close_code == 1000
    assert env.log_entry(sid)["websocket"]["close"] == "1000"
    assert _filter_metric(env, "chatproxy_filter_outcomes_total", refused) == refused_before + 2
    assert _filter_metric(env, "chatproxy_events_total", dropped) == dropped_before + 2
    for direction in ("client to upstream", "upstream to client"):
        line = f"filter words-drop refused a message (4400) and dropped it, {direction}, client 127.0.0.1"
        wait_until(lambda: line in env.process.output(), message=f"no log line {line!r}")


# ---------------------------------------------------------------------------
# Compression


def test_compression_is_off_by_default(env):
    """On a route without compression, a client offering permessage-deflate gets
    no extension, and the upstream is offered none."""
    with ws_connect(f"ws://localhost:{env.port}/nocompress?sid={new_sid()}", compression="deflate") as ws:
        assert ws.response is not None and ws.response.headers.get_all("Sec-WebSocket-Extensions") == []
        ws.send("plain " * 1000)
        assert ws.recv(timeout=WAIT) == "plain " * 1000
        session = env.upz.session(sid_of(ws))
    assert session.header("Sec-WebSocket-Extensions") == []
    assert session.extensions == []


@pytest.mark.parametrize("client_offers", [True, False])
def test_compression_is_negotiated_on_each_leg(env, client_offers):
    """compression = yes: permessage-deflate is negotiated with the client when it
    offers it, and with the upstream independently of the client; messages pass
    unchanged either way."""
    options = {"compression": "deflate"} if client_offers else {}
    with ws_connect(f"ws://localhost:{env.port}/compress?sid={new_sid()}", **options) as ws:
        assert ws.response is not None
        client_extensions = ws.response.headers.get_all("Sec-WebSocket-Extensions")
        assert any("permessage-deflate" in e for e in client_extensions) == client_offers
        for message in ["compress me " * 10000, pattern(MiB), "", "✓"]:
            ws.send(message)
            assert ws.recv(timeout=WAIT) == message
        session = env.upz.session(sid_of(ws))
    assert any("permessage-deflate" in e for e in session.header("Sec-WebSocket-Extensions"))
    assert any("permessage-deflate" in e for e in session.extensions)


# ---------------------------------------------------------------------------
# Flow control


def _rss_settled(process: Any, seconds: float = 0.5) -> int:
    time.sleep(seconds)
    return proxy_rss(process)


def test_slow_client_stops_the_upstream_and_memory_stays_bounded(proxy, pki, tmp_path):
    """A client that stops reading while the upstream tries to send 512 MiB:
    chatproxy stops reading from the upstream (what the upstream managed to hand
    over stays far below 512 MiB) and its memory grows by less than 64 MiB; when
    the client reads again the flow resumes.  The reverse too: an upstream that
    stops reading while the client floods stops the client, memory bounded, and
    everything arrives once it reads again."""
    upstream = WsUpstream()
    try:
        port = free_port()
        log_path = tmp_path / "access.log"
        process = proxy.start(textwrap.dedent(f"""\
            [chatproxy]
            access_log = {log_path}
            access_log_format = json
            [listen:main]
            endpoint = tcp:{port}:interface=127.0.0.1
            [upstream:app]
            servers = http://127.0.0.1:{upstream.port}
            [route:ws]
            path = /
            upstream = app
            websocket = yes
            """), port=port)
        # A few sessions first, so the baseline includes the bridge's code and buffers.
        for _ in range(3):
            with ws_connect(f"ws://localhost:{port}/warm?sid={new_sid()}") as ws:
                ws.send(pattern(MiB))
                assert ws.recv(timeout=WAIT) == pattern(MiB)
        baseline = _rss_settled(process)

        # Downward: the client stops reading.
        client = RawClient(port, rcvbuf=16384)
        sid = new_sid()
        assert client.handshake(f"/flood?sid={sid}") == 101
        client.send(OP_TEXT, b"!flood %d %d" % (512 * MiB, 65536))
        session = upstream.session(sid)
        previous = -1
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:  # until the upstream is stopped (no progress for 0.5 s)
            time.sleep(0.5)
            if session.sent_bytes == previous:
                break
            previous = session.sent_bytes
        stalled_at = session.sent_bytes
        assert 0 < stalled_at < 64 * MiB, f"the upstream sent {stalled_at} bytes to a client reading nothing"
        grown = proxy_rss(process) - baseline
        assert grown < 64 * MiB, f"the proxy grew by {grown / MiB:.1f} MiB"
        received = 0
        while received < stalled_at + 16 * MiB:  # reading again: the flow resumes
            op, payload = client.recv_message()
            assert op == OP_BINARY and len(payload) == 65536
            received += len(payload)
        assert session.sent_bytes > stalled_at
        client.reset()
        assert session.wait_ended().close_code == 1001
        assert read_log_entry(log_path, sid)["websocket"]["close"] == "1001"

        # Upward: the upstream stops reading, the client floods.
        with ws_connect(f"ws://localhost:{port}/sink?sid={new_sid()}&sink") as ws:
            session = upstream.session(sid_of(ws))
            ws.send("!stopread")
            assert ws.recv(timeout=WAIT) == "stopped reading"
            baseline = proxy_rss(process)
            total, chunk = 128 * MiB, pattern(65536)
            sent = [0]

            def flood() -> None:
                try:
                    while sent[0] < total:
                        ws.send(chunk)
                        sent[0] += len(chunk)
                except ConnectionClosed:
                    pass

            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            previous = -1
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                time.sleep(0.5)
                if sent[0] == previous:
                    break
                previous = sent[0]
            assert sent[0] < 64 * MiB, f"the client could send {sent[0]} bytes to an upstream reading nothing"
            grown = proxy_rss(process) - baseline
            assert grown < 64 * MiB, f"the proxy grew by {grown / MiB:.1f} MiB"
            upstream.resume(session)
            sender.join(30)
            assert not sender.is_alive()
            wait_until(lambda: session.received_bytes >= total + len("!stopread"), 30)
            assert session.received_count == 1 + total // 65536
    finally:
        upstream.stop()


def test_slow_client_vanishing_closes_the_upstream_at_once(env):
    """A client that stopped reading (so chatproxy stopped reading the upstream)
    disappears: the upstream is closed with 1001 at once, not after the close
    handshake timeout, and the session is logged."""
    client = RawClient(env.port, rcvbuf=16384)
    sid = new_sid()
    assert client.handshake(f"/flood?sid={sid}") == 101
    client.send(OP_TEXT, b"!flood %d %d" % (512 * MiB, 65536))
    session = env.up.session(sid)
    previous = -1
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and session.sent_bytes != previous:  # until the upstream is held back
        previous = session.sent_bytes
        time.sleep(0.5)
    assert session.sent_bytes < 64 * MiB
    client.reset()
    started = time.monotonic()
    assert session.wait_ended().close_code == 1001
    assert time.monotonic() - started < 2.5
    assert env.log_entry(sid, timeout=3)["websocket"]["close"] == "1001"


def test_max_buffered_bytes_closes_a_slow_reader_with_1013(env):
    """max_buffered_bytes = 64k: large messages keep coming for a client that
    reads nothing; once chatproxy has to hold more than that for it, the session
    is closed with 1013 (upstream, client once it reads again, and log)."""
    client = RawClient(env.port, rcvbuf=16384)
    sid = new_sid()
    try:
        assert client.handshake(f"/buffered?sid={sid}") == 101
        client.send(OP_TEXT, b"!send 64 262144")
        session = env.up.session(sid).wait_ended(timeout=WAIT)
        assert session.close_code == 1013
        assert client.recv_close()[0] == 1013  # reading again: what was sent, then the close
        client.send(OP_CLOSE, close_payload(1013))
        assert env.log_entry(sid)["websocket"]["close"] == "1013"
    finally:
        client.close()


def test_slow_upstream_1013_the_held_back_client_is_read_again(env):
    """max_buffered_bytes = 64k, the other way round: the upstream reads nothing
    while the client floods, so chatproxy stops reading the client and closes
    the session with 1013.  From then on nothing is relayed, so chatproxy reads
    the client again, discarding its messages: the client can still hand over
    far more than the socket buffers hold (64 MiB) and then its answer to the
    close, instead of being stuck until the close handshake times out."""
    import select

    client = RawClient(env.port)
    sid = new_sid()
    try:
        assert client.handshake(f"/buffered?sid={sid}") == 101
        client.send(OP_TEXT, b"!deaf")
        assert client.recv_message() == (OP_TEXT, b"deaf now")
        frame = encode_frame(OP_BINARY, pattern(262144))
        rest = b""
        client.sock.setblocking(False)
        deadline = time.monotonic() + WAIT
        while True:  # flood until chatproxy's close frame arrives
            assert time.monotonic() < deadline, "no close frame from chatproxy"
            readable, writable, _ = select.select([client.sock], [client.sock], [], 0.5)
            if readable:
                break
            if writable:
                rest = rest or frame
                try:
                    rest = rest[client.sock.send(rest):]
                except BlockingIOError:
                    pass
        client.sock.settimeout(WAIT)
        client.sock.sendall(rest)  # the frame cut short
        assert client.recv_close()[0] == 1013
        for _ in range(64 * MiB // 262144):  # held back, this would block, then be reset
            client.sock.sendall(frame)
        client.send(OP_CLOSE, close_payload(1013))
        assert env.log_entry(sid)["websocket"]["close"] == "1013"
    finally:
        client.close()


# ---------------------------------------------------------------------------
# Many sessions, and nothing left behind


def test_many_concurrent_sessions(env):
    """200 sessions at once (half over TLS), each exchanging its own messages:
    every session gets exactly its own messages back, in order; afterwards the
    proxy holds no more file descriptors than before."""
    from websockets.asyncio.client import connect as async_connect

    before = proxy_fds(env.process)
    context = env.pki.client_context()

    async def session(i: int) -> list[Any]:
        tls = i % 2 == 1
        url = f"{'wss' if tls else 'ws'}://localhost:{env.tls_port if tls else env.port}/many?sid=many{i}"
        options: dict[str, Any] = {"ssl": context} if tls else {}
        async with async_connect(url, proxy=None, open_timeout=30, compression=None, ping_interval=None,
                                 **options) as ws:
            out = [f"session {i} message {j}" for j in range(5)] + [pattern(1000, i)]
            for message in out:
                await ws.send(message)
            back = [await asyncio.wait_for(ws.recv(), 30) for _ in out]
            assert back == out
            return back

    async def run() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(*(session(i) for i in range(200))), 60)

    results = asyncio.run(run())
    assert len(results) == 200
    wait_until(lambda: all(env.up.session(f"many{i}").ended.is_set() for i in range(200)), 15)
    assert all(env.up.session(f"many{i}").close_code == 1000 for i in range(200))
    wait_until(lambda: proxy_fds(env.process) <= before, 10,
               message=f"the proxy holds {proxy_fds(env.process)} fds, {before} before")


def test_nothing_left_open_after_abrupt_endings(env):
    """After sessions ending every abrupt way (client reset, upstream reset, client
    gone during the upstream handshake), the proxy has closed every connection."""
    before = proxy_fds(env.process)
    for _ in range(5):
        client = RawClient(env.port)
        assert client.handshake(f"/x?sid={new_sid()}") == 101
        client.reset()
        with ws_connect(f"ws://localhost:{env.port}/x?sid={new_sid()}") as ws:
            ws.send("!drop")
            closed_with(ws)
        client = RawClient(env.tls_port, tls=env.pki.client_context())
        client.sock.sendall(b"GET /delay?sid=%s HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                            b"Sec-WebSocket-Version: 13\r\n\r\n" % new_sid().encode())
        time.sleep(0.05)
        client.reset()
    wait_until(lambda: proxy_fds(env.process) <= before, 10,
               message=f"the proxy holds {proxy_fds(env.process)} fds, {before} before")


# ---------------------------------------------------------------------------
# Tunnel mode


@pytest.mark.parametrize("code,reason", [(1000, "done"), (4001, "app close")])
def test_tunnel_mode_relays_messages_and_close_codes(leg, code, reason):
    """websocket = tunnel: after the upstream's 101 the bytes are spliced; echoes,
    the upstream's subprotocol choice and close codes both ways come through
    unchanged, and the session is logged with status 101."""
    with leg.connect("/tunnel", subprotocols=["chat.v1", "chat.v2"]) as ws:
        sid = sid_of(ws)
        assert ws.subprotocol == "chat.v2"
        for message in ["text ✓", b"\x00binary", "", pattern(MiB)]:
            ws.send(message)
            assert ws.recv(timeout=WAIT) == message
        ws.send(f"!close {code} {reason}")
        assert closed_with(ws) == (code, reason)
    assert leg.upstream.session(sid).wait_ended().close_code == code
    with leg.connect("/tunnel") as ws:
        sid = sid_of(ws)
        ws.close(code, reason)
    assert (leg.upstream.session(sid).wait_ended().close_code, leg.upstream.session(sid).close_reason) == \
        (code, reason)
    assert leg.env.log_entry(sid)["status"] == 101


def test_tunnel_mode_does_not_parse_frames(plain):
    """In tunnel mode chatproxy does not read frames: a text frame that is not
    UTF-8 reaches the upstream, which (not chatproxy) closes with 1007; and a
    refused upgrade gets the upstream's status."""
    client = plain.raw()
    sid = new_sid()
    try:
        assert client.handshake(plain.path("/tunnel", sid)) == 101
        client.send(OP_TEXT, b"bad \xc3\x28")
        assert client.recv_close()[0] == 1007  # from the upstream itself
        # websockets fails the connection (closes TCP right after its close
        # frame): whether the answer still reaches it is a race.
        assert plain.upstream.session(sid).wait_ended().close_code in (1006, 1007)
    finally:
        client.close()
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(plain.url("/tunnel/refuse/403", new_sid()))
    assert refused.value.response.status_code == 403


def test_abrupt_loss_in_tunnel_mode_closes_the_other_side(leg2):
    """Tunnel mode: the upstream vanishing closes the client's connection, and the
    client vanishing closes the upstream's."""
    with leg2.connect("/tunnel") as ws:
        ws.send("!drop")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=WAIT)
    client = leg2.raw()
    sid = new_sid()
    assert client.handshake(leg2.path("/tunnel", sid)) == 101
    client.reset()
    assert leg2.upstream.session(sid).wait_ended().close_code == 1006



@pytest.mark.parametrize("length, code, reason, problem", [
    (0, None, None, None),
    (2, 1000, None, None),
    (5, 1000, b"bye", None),
    (2, 1001, None, None), (2, 1002, None, None), (2, 1003, None, None),
    (2, 1007, None, None), (2, 1011, None, None), (2, 1013, None, None), (2, 1014, None, None),
    (2, 3000, None, None), (2, 4999, None, None),
    (11, 4000, "é ✓".encode(), None),
    (125, 1000, b"r" * 123, None),
    (2, 0, None, "invalid close code 0"),
    (2, 999, None, "invalid close code 999"),
    (2, 1004, None, "invalid close code 1004"),
    (2, 1005, None, "invalid close code 1005"),
    (2, 1006, None, "invalid close code 1006"),
    (2, 1015, None, "invalid close code 1015"),
    (2, 1016, None, "invalid close code 1016"),
    (2, 2999, None, "invalid close code 2999"),
    (2, 5000, None, "invalid close code 5000"),
    (2, 65535, None, "invalid close code 65535"),
    (1, None, None, "close frame with a 1-byte payload"),
    (126, 1000, b"r" * 124, "close frame with a 126-byte payload (control frames carry at most 125)"),
    (4, 1000, b"\xc3\x28", "close reason is not UTF-8"),
    (5, 1000, b"\xed\xa0\x80", "close reason is not UTF-8"),  # a surrogate
    (4, 1000, b"\xc0\xaf", "close reason is not UTF-8"),  # overlong
])
def test_close_frame_rule(length, code, reason, problem):
    """The close-frame rule (RFC 6455 5.5, 7.4), a pure function: a payload of 0
    or 2-125 bytes, a code of 1000-1003, 1007-1014 or 3000-4999, a UTF-8 reason;
    anything else is named."""
    from chatproxy.proxy.websocket.closing import close_frame_problem

    assert close_frame_problem(length, code, reason) == problem


_LEG_OPTIONS = dict(logOctets=False, logFrames=False, _perMessageCompress=None, maxFramePayloadSize=0,
                    maxMessagePayloadSize=0, autoFragmentSize=0)


@pytest.mark.parametrize("options, fast_in, fast_out", [
    ({}, 0xFFFF, 0xFFFF),  # no limits: the longest 16-bit length
    ({"maxFramePayloadSize": 1000}, 1000, 0xFFFF),  # frames from the peer only
    ({"maxMessagePayloadSize": 4096, "maxFramePayloadSize": 4096}, 4096, 4096),
    ({"maxMessagePayloadSize": 4096, "maxFramePayloadSize": 100}, 100, 4096),
    ({"maxMessagePayloadSize": 1 << 20, "maxFramePayloadSize": 1 << 20}, 0xFFFF, 0xFFFF),
    ({"autoFragmentSize": 512}, 0xFFFF, -1),  # what it sends is fragmented by Autobahn
    ({"logFrames": True}, -1, -1),
    ({"logOctets": True}, -1, -1),
    ({"_perMessageCompress": object()}, -1, -1),  # compression negotiated
])
def test_an_open_leg_settles_the_fast_paths_limits_from_its_options(options, fast_in, fast_out):
    """settle() turns a leg's options into the two limits the fast path reads
    per message: the largest payload it takes in and sends out, -1 for none."""
    from types import SimpleNamespace

    from chatproxy.proxy.websocket.frames import settle

    leg = SimpleNamespace(**{**_LEG_OPTIONS, **options})
    settle(leg)
    assert (leg.fast_in, leg.fast_out) == (fast_in, fast_out)


def test_fast_path_steps_aside_for_an_autobahn_with_other_internals(monkeypatch):
    """If Autobahn's protocol lacks an attribute the fast path reads (a future version), the
    frame goes to Autobahn's own processing and the fast path is turned off for good, instead
    of the session failing."""
    from autobahn.twisted.websocket import WebSocketServerProtocol

    import chatproxy.proxy.websocket.frames as frames_module
    from chatproxy.proxy.websocket.legs import ClientLeg

    calls: list[bytes] = []
    monkeypatch.setattr(WebSocketServerProtocol, "processData", lambda self: calls.append(self.data) or False)
    monkeypatch.setattr(frames_module, "_FAST_PATH", True)
    leg = ClientLeg()
    leg.data = b"\x81\x80abcd"  # a whole masked empty text frame
    leg.state = frames_module._OPEN
    leg.current_frame = None
    leg.fast_in = leg.fast_out = 100  # as settle() would have left them
    assert leg.processData() is False  # inside_message is missing
    assert calls == [b"\x81\x80abcd"]
    assert frames_module._FAST_PATH is False

    monkeypatch.setattr(frames_module, "_FAST_PATH", True)
    other = ClientLeg()
    frames_module.settle(other)  # the options it reads once are missing too
    assert frames_module._FAST_PATH is False
    assert other.fast_in == other.fast_out == -1
