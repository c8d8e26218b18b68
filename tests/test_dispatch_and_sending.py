"""The reactor-level shortcuts of the data path, on real loopback sockets and a
private epoll reactor (not the global one): bytes sent at once when the socket
can take them (plain and TLS), and events dispatched without the per-event log
context (chatproxy.process.dispatch)."""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from chatproxy.config import load_config
from chatproxy.process.dispatch import dispatch_directly, poll
from chatproxy.proxy.core import ProxyCore
from chatproxy.proxy.sending import send
from chatproxy.proxy.stats import Stats
from chatproxy.proxy.tls import HandshakeCountingTLSFactory, ServerTLS, memory_context, self_signed
from chatproxy.proxy.tls_profiles import INTERMEDIATE, TLSSettings


class _Keeper(Protocol):
    """Remembers its connection and what it read."""

    def __init__(self, made: list[_Keeper]) -> None:
        self.made = made
        self.received = b""

    def connectionMade(self) -> None:
        self.made.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _factory(made: list[_Keeper]) -> Factory:
    return Factory.forProtocol(lambda: _Keeper(made))  # type: ignore[arg-type]


def _turn(reactor: EPollReactor, until: Any, turns: int = 2000) -> None:
    """Run reactor iterations until ``until()`` is true (a bounded loop)."""
    for _ in range(turns):
        if until():
            return
        reactor.iterate(0.01)
    raise AssertionError("the condition never came true")


@pytest.fixture
def reactor() -> Any:
    """A private epoll reactor, its ports and connections closed afterwards."""
    reactor = EPollReactor()
    yield reactor
    for selectable in list(reactor.getReaders()) + list(reactor.getWriters()):
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)
        selectable.connectionLost(Failure(ConnectionDone()))


def _writing(reactor: EPollReactor, transport: Any) -> bool:
    return transport in reactor.getWriters()


def test_send_puts_bytes_on_the_socket_without_waiting_for_the_reactor(reactor: Any) -> None:
    """A small write on an idle TCP connection is on the socket when send()
    returns: nothing is queued and the reactor is not asked to watch for
    writability (no extra turn, no epoll_ctl)."""
    made: list[_Keeper] = []
    port = reactor.listenTCP(0, _factory(made), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    _turn(reactor, lambda: made)
    transport = made[0].transport
    send(transport, b"hello")
    assert not transport.dataBuffer and not transport._tempDataBuffer
    assert not _writing(reactor, transport)
    assert client.recv(100) == b"hello"
    client.close()


def test_send_queues_what_the_socket_does_not_take_and_keeps_the_order(reactor: Any) -> None:
    """More than the socket buffers hold: the rest is queued behind what was
    sent, the reactor writes it when it can, and the peer reads every byte in
    order, including bytes sent while the queue is not yet empty."""
    made: list[_Keeper] = []
    port = reactor.listenTCP(0, _factory(made), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    _turn(reactor, lambda: made)
    transport = made[0].transport
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB
    send(transport, big)
    assert _writing(reactor, transport)  # the kernel did not take it all
    send(transport, b"tail")  # must go behind the queued bytes
    expected = big + b"tail"
    received = bytearray()
    client.setblocking(False)

    def read_some() -> bool:
        try:
            received.extend(client.recv(1 << 20))
        except BlockingIOError:
            pass
        return len(received) >= len(expected)

    _turn(reactor, read_some, turns=20000)
    assert bytes(received) == expected
    client.close()


def _tls_listener(reactor: EPollReactor, made: list[_Keeper]) -> int:
    certificate, key = self_signed(["localhost"])
    settings = TLSSettings(INTERMEDIATE.name, "1.2", INTERMEDIATE.ciphers or "", INTERMEDIATE.tls13_ciphers,
                           INTERMEDIATE.groups)
    creator = ServerTLS(memory_context(certificate, key, settings), {})
    factory = HandshakeCountingTLSFactory(creator, _factory(made), Stats(), "main")
    factory._clock = reactor
    return int(reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port)


def test_tls_records_go_out_at_once_and_arrive_whole(reactor: Any) -> None:
    """Over TLS the records a write makes are on the socket when the write
    returns (the memory BIO's output is not queued for another reactor turn),
    and the client decrypts exactly what was written, small and large."""
    made: list[_Keeper] = []
    port = _tls_listener(reactor, made)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    received = bytearray()
    expected = b"hello" + bytes(range(256)) * 4096
    done = threading.Event()

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping")
            while len(received) < len(expected):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)
        done.set()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    _turn(reactor, lambda: made and made[0].received == b"ping")
    tls_transport = made[0].transport
    tcp_transport = tls_transport.transport
    tls_transport.write(b"hello")
    assert not tcp_transport.dataBuffer and not tcp_transport._tempDataBuffer
    assert not _writing(reactor, tcp_transport)
    tls_transport.write(expected[5:])
    _turn(reactor, done.is_set, turns=20000)
    thread.join(5)
    assert bytes(received) == expected


def test_dispatch_directly_only_takes_over_twisteds_epoll_reactor() -> None:
    """The epoll reactor polls with chatproxy's loop afterwards; any other
    reactor (here an in-memory one) is left as it is."""
    epoll = EPollReactor()
    assert dispatch_directly(epoll) is True
    assert epoll.doIteration.func is poll  # type: ignore[attr-defined]
    memory = MemoryReactorClock()
    assert dispatch_directly(memory) is False
    assert "doIteration" not in vars(memory)


class _Reader:
    """A read descriptor on one end of a socket pair: counts its reads, and
    can be made to fail in a way that escapes the reactor's own handling."""

    def __init__(self, sock: socket.socket, broken: bool = False) -> None:
        self.sock = sock
        self.broken = broken
        self.reads = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> Any:
        self.reads += 1
        self.sock.recv(100)
        return ValueError("stop reading") if self.broken else None

    def connectionLost(self, reason: Any) -> None:
        if self.broken:
            raise RuntimeError("connectionLost failed")


def test_poll_hands_each_event_to_its_descriptor_and_logs_what_escapes() -> None:
    """Events reach their descriptors; when closing one descriptor raises
    (outside what _doReadOrWrite catches itself), the failure is logged and
    the other descriptors of the same turn are still served."""
    reactor = EPollReactor()
    dispatch_directly(reactor)
    pairs = [socket.socketpair() for _ in range(2)]
    broken, fine = _Reader(pairs[0][0], broken=True), _Reader(pairs[1][0])
    reactor.addReader(broken)
    reactor.addReader(fine)
    failures: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        for a, b in pairs:
            b.send(b"x")
        _turn(reactor, lambda: broken.reads and fine.reads)
        fine_reads = fine.reads
        pairs[1][1].send(b"y")
        _turn(reactor, lambda: fine.reads > fine_reads)
    finally:
        globalLogPublisher.removeObserver(observer)
        reactor.removeAll()
        for a, b in pairs:
            a.close()
            b.close()
    assert any(event["log_failure"].check(RuntimeError) for event in failures)
    assert broken not in reactor.getReaders()


def test_an_upstream_connection_reads_without_the_endpoints_wrapper(reactor: Any, tmp_path: Any) -> None:
    """A new upstream connection takes its reads straight from the transport
    (not through the client endpoint's pass-through wrapper), and still
    learns when the server closes it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    config_path = tmp_path / "chatproxy.ini"
    config_path.write_text(
        "[chatproxy]\naccess_log = off\n[listen:main]\nendpoint = tcp:8080:interface=127.0.0.1\n"
        f"[upstream:app]\nservers = http://127.0.0.1:{server.getsockname()[1]}\n"
        "[route:all]\npath = /\nupstream = app\n")
    core = ProxyCore(reactor, load_config([config_path]))
    connected: list[Any] = []
    core.pools["app"].servers[0].connect().addCallback(connected.append)
    _turn(reactor, lambda: connected)
    connection = connected[0]
    assert connection.transport.protocol is connection
    peer, _ = server.accept()
    peer.close()
    _turn(reactor, lambda: connection._closed)
    server.close()
