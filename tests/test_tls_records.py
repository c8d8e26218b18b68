"""Unit tests of chatproxy.proxy.tls_records: application data in and out of
an established memory-BIO TLS connection, and the conditions it leaves to
pyOpenSSL (which must then see them too)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from chatproxy.proxy import tls, tls_records
from chatproxy.proxy.stats import Stats
from chatproxy.proxy.tls import HandshakeCountingTLSFactory, ServerTLS, memory_context, self_signed
from chatproxy.proxy.tls_profiles import INTERMEDIATE, TLSSettings

needs_direct_path = pytest.mark.skipif(not tls_records.AVAILABLE, reason="this pyOpenSSL hides its memory BIOs")


def _pump(source: SSL.Connection, target: SSL.Connection) -> None:
    try:
        target.bio_write(source.bio_read(2 ** 20))
    except SSL.WantReadError:
        pass


@pytest.fixture
def pair() -> tuple[SSL.Connection, SSL.Connection]:
    """(server, client): two memory-BIO connections with their handshake done."""
    certificate, key = self_signed(["localhost"])
    settings = TLSSettings(INTERMEDIATE.name, INTERMEDIATE.min_version, INTERMEDIATE.ciphers,
                           INTERMEDIATE.tls13_ciphers, tuple(INTERMEDIATE.groups))
    server = SSL.Connection(memory_context(certificate, key, settings), None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_connect_state()
    done: set[int] = set()
    for _ in range(20):
        for side in (client, server):
            try:
                side.do_handshake()
                done.add(id(side))
            except SSL.WantReadError:
                pass
        _pump(client, server)
        _pump(server, client)
    assert len(done) == 2
    return server, client


def _client_records(client: SSL.Connection, data: bytes) -> bytes:
    client.sendall(data)
    return client.bio_read(2 ** 20)


def _read_all(client: SSL.Connection) -> bytes:
    out = b""
    while True:
        try:
            out += client.recv(2 ** 16)
        except SSL.WantReadError:
            return out


@needs_direct_path
def test_plaintext_passes_both_ways_and_big_writes_come_out_whole(pair):
    """Records fed in decrypt to the client's bytes (a read at a time, then
    b"" once OpenSSL wants more); writes of up to a record each, over 32 KiB
    in all, come out of the send BIO in one take and decrypt to the same bytes."""
    server, client = pair
    ssl_objects = tls_records.handles(server)
    request = os.urandom(40_000)
    assert tls_records.feed(ssl_objects, _client_records(client, request))
    received = b""
    while (piece := tls_records.read_plaintext(ssl_objects)):
        received += piece
    assert piece == b"" and received == request
    response = os.urandom(50_000)
    for offset in range(0, len(response), 2 ** 14):
        chunk = response[offset:offset + 2 ** 14]
        assert tls_records.write_plaintext(ssl_objects, chunk) == len(chunk)
    records = tls_records.take_records(ssl_objects)
    assert len(records) > 2 ** 15 and tls_records.take_records(ssl_objects) == b""
    client.bio_write(records)
    assert _read_all(client) == response


@needs_direct_path
def test_half_a_record_wants_more_and_the_rest_completes_it(pair):
    """Part of a record gives b"" (nothing yet); the rest gives the plaintext."""
    server, client = pair
    ssl_objects = tls_records.handles(server)
    records = _client_records(client, b"GET / HTTP/1.1\r\n\r\n")
    assert tls_records.feed(ssl_objects, records[:7])
    assert tls_records.read_plaintext(ssl_objects) == b""
    assert tls_records.feed(ssl_objects, records[7:])
    assert tls_records.read_plaintext(ssl_objects) == b"GET / HTTP/1.1\r\n\r\n"


@needs_direct_path
def test_records_waiting_tells_whether_the_receive_bio_holds_unread_bytes(pair):
    """Two records fed in one go: after the first read, bytes are waiting;
    after the second, none (and a read would indeed find nothing); half a
    record fed counts as waiting."""
    server, client = pair
    ssl_objects = tls_records.handles(server)
    assert not tls_records.records_waiting(ssl_objects)
    assert tls_records.feed(ssl_objects, _client_records(client, b"one") + _client_records(client, b"two"))
    assert tls_records.records_waiting(ssl_objects)
    assert tls_records.read_plaintext(ssl_objects) == b"one"
    assert tls_records.records_waiting(ssl_objects)
    assert tls_records.read_plaintext(ssl_objects) == b"two"
    assert not tls_records.records_waiting(ssl_objects)
    assert tls_records.read_plaintext(ssl_objects) == b""
    assert tls_records.feed(ssl_objects, _client_records(client, b"three")[:4])
    assert tls_records.records_waiting(ssl_objects)


@needs_direct_path
def test_close_notify_is_left_to_pyopenssl_which_then_raises_zero_return(pair):
    """A close_notify is not handled here (None), and pyOpenSSL, asked
    again, sees it and raises ZeroReturnError, which Twisted handles."""
    server, client = pair
    ssl_objects = tls_records.handles(server)
    client.shutdown()
    assert tls_records.feed(ssl_objects, client.bio_read(2 ** 16))
    assert tls_records.read_plaintext(ssl_objects) is None
    with pytest.raises(SSL.ZeroReturnError):
        server.recv(2 ** 15)


@needs_direct_path
def test_a_tampered_record_is_left_to_pyopenssl_which_then_raises_an_error(pair):
    """A record that fails its integrity check is not handled here (None),
    and pyOpenSSL, asked again, raises SSL.Error (the connection fails)."""
    server, client = pair
    ssl_objects = tls_records.handles(server)
    records = bytearray(_client_records(client, b"hello"))
    records[-1] ^= 0x01
    assert tls_records.feed(ssl_objects, bytes(records))
    assert tls_records.read_plaintext(ssl_objects) is None
    with pytest.raises(SSL.Error):
        server.recv(2 ** 15)


@needs_direct_path
def test_nothing_to_take_is_empty(pair):
    """An empty send BIO gives b"" (no exception, nothing to send)."""
    server, _ = pair
    ssl_objects = tls_records.handles(server)
    tls_records.take_records(ssl_objects)  # the handshake's last flight, if any
    assert tls_records.take_records(ssl_objects) == b""


def test_this_pyopenssl_takes_the_direct_path():
    """The pyOpenSSL installed exposes what the direct path reads (if a new
    version hides it, the proxy still works, through pyOpenSSL, but slower:
    this test says so instead of the other tests quietly skipping)."""
    assert tls_records.AVAILABLE


class _Recorder(Protocol):
    """The application protocol under TLS: what it received and how it ended."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = reason


def _server_protocol(stock: bool) -> tuple[Any, StringTransport, _Recorder, SSL.Connection]:
    """(TLS protocol, its transport, the application protocol, a client
    connection) for a listener's TLS (or, ``stock``, Twisted's own protocol)."""
    certificate, key = self_signed(["localhost"])
    settings = TLSSettings(INTERMEDIATE.name, INTERMEDIATE.min_version, INTERMEDIATE.ciphers,
                           INTERMEDIATE.tls13_ciphers, tuple(INTERMEDIATE.groups))
    creator = ServerTLS(memory_context(certificate, key, settings), {})
    application = _Recorder()
    wrapped = Factory.forProtocol(lambda: application)
    factory: Any = TLSMemoryBIOFactory(creator, False, wrapped) if stock else \
        HandshakeCountingTLSFactory(creator, wrapped, Stats(), "l")
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_connect_state()
    return protocol, transport, application, client


def _client_out(client: SSL.Connection) -> bytes:
    try:
        return client.bio_read(2 ** 20)
    except SSL.WantReadError:
        return b""


def _handshake(protocol: Any, transport: StringTransport, client: SSL.Connection, *, then: bytes = b"") -> None:
    """Complete the handshake; ``then``: application data the client sends in
    the same read as its last handshake flight."""
    for _ in range(10):
        try:
            client.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        if done and then:
            client.sendall(then)
        out = _client_out(client)
        if out:
            protocol.dataReceived(out)
        if transport.value():
            client.bio_write(transport.value())
            transport.clear()
        if done and protocol._handshakeDone:
            return
    raise AssertionError("no handshake")


@needs_direct_path
def test_listener_tls_moves_application_data_through_the_direct_path(monkeypatch):
    """Once the handshake is done, a listener's TLS protocol reads and writes
    application data with tls_records, on the OpenSSL objects its factory
    handed it with the connection (not through pyOpenSSL's wrappers)."""
    calls: list[str] = []
    for name in ("read_plaintext", "write_plaintext", "take_records"):
        def counted(*args: Any, _real: Any = getattr(tls, name), _name: str = name) -> Any:
            calls.append(_name)
            return _real(*args)
        monkeypatch.setattr(tls, name, counted)
    protocol, transport, application, client = _server_protocol(stock=False)
    _handshake(protocol, transport, client, then=b"ping")
    assert protocol._handles == tls_records.handles(protocol._tlsConnection)
    protocol.write(b"pong")
    client.bio_write(transport.value())
    assert b"".join(application.data) == b"ping" and _read_all(client) == b"pong"
    assert {"read_plaintext", "write_plaintext", "take_records"} <= set(calls)


@needs_direct_path
def test_listener_tls_reads_each_record_once_and_stops_when_nothing_is_left(monkeypatch):
    """Two records in one read are both delivered with one read each: once
    the receive BIO is empty, the protocol does not make the read that would
    only find nothing; a record split over two reads is delivered when its
    second half arrives."""
    reads: list[bytes | None] = []

    def counted(handles: Any) -> bytes | None:
        data = tls_records.read_plaintext(handles)
        reads.append(data)
        return data
    protocol, transport, application, client = _server_protocol(stock=False)
    _handshake(protocol, transport, client)
    monkeypatch.setattr(tls, "read_plaintext", counted)
    client.sendall(b"one")
    first = _client_out(client)
    client.sendall(b"two")
    protocol.dataReceived(first + _client_out(client))
    assert application.data == [b"one", b"two"] and reads == [b"one", b"two"]
    client.sendall(b"three")
    third = _client_out(client)
    protocol.dataReceived(third[:4])
    protocol.dataReceived(third[4:])
    assert application.data[-1] == b"three" and reads[2:] == [b"", b"three"]


@pytest.mark.parametrize("stock", [True, False], ids=["twisted", "chatproxy"])
def test_listener_tls_behaves_as_twisteds_own_protocol(stock):
    """A listener's TLS protocol (with the direct path) does what Twisted's
    memory-BIO protocol does, which the same test runs on too: a request in
    the read that ends the handshake is delivered; bytes, a bytearray and a
    100 KB write reach the client whole; good data then a forged record in one
    read delivers the data and then fails the connection with an SSL error;
    writes after a close_notify are dropped."""
    protocol, transport, application, client = _server_protocol(stock)
    _handshake(protocol, transport, client, then=b"GET / HTTP/1.1\r\n\r\n")
    assert b"".join(application.data) == b"GET / HTTP/1.1\r\n\r\n"
    big = os.urandom(100_000)
    for data in (b"head", bytearray(b"array"), big):
        protocol.write(data)
    client.bio_write(transport.value())
    transport.clear()
    assert _read_all(client) == b"headarray" + big
    client.sendall(b"good")
    good = _client_out(client)
    client.sendall(b"bad")
    forged = bytearray(_client_out(client))
    forged[-1] ^= 0x01
    transport.clear()
    protocol.dataReceived(good + bytes(forged))
    assert application.data[-1] == b"good"
    assert transport.disconnecting  # (OpenSSL's alert, if any, is in the transport's buffer)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert application.lost is not None and application.lost.check(SSL.Error)


@pytest.mark.parametrize("stock", [True, False], ids=["twisted", "chatproxy"])
def test_listener_tls_close_notify_after_data_delivers_the_data_and_ends_cleanly(stock):
    """Data and a close_notify in one read: the data is delivered, the
    connection ends without an error, and a later write sends nothing."""
    protocol, transport, application, client = _server_protocol(stock)
    _handshake(protocol, transport, client)
    transport.clear()
    client.sendall(b"last words")
    client.shutdown()
    protocol.dataReceived(_client_out(client))
    assert b"".join(application.data) == b"last words"
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert application.lost is not None and not application.lost.check(SSL.Error)
    sent = transport.value()
    protocol.write(b"too late")
    assert transport.value() == sent
