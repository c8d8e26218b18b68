"""Unit tests of chatproxy.proxy.tls_records: application data in and out of
an established memory-BIO TLS connection, and the conditions it leaves to
pyOpenSSL (which must then see them too)."""

from __future__ import annotations

import os

import pytest
from OpenSSL import SSL

from chatproxy.proxy import tls_records
from chatproxy.proxy.tls import memory_context, self_signed
from chatproxy.proxy.tls_profiles import INTERMEDIATE, TLSSettings

pytestmark = pytest.mark.skipif(not tls_records.AVAILABLE, reason="this pyOpenSSL hides its memory BIOs")


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


def test_plaintext_passes_both_ways_and_big_writes_come_out_whole(pair):
    """Records fed in decrypt to the client's bytes (a read at a time, then
    b"" once OpenSSL wants more); writes of up to a record each, over 32 KiB
    in all, come out of the send BIO in one take and decrypt to the same bytes."""
    server, client = pair
    request = os.urandom(40_000)
    assert tls_records.feed(server, _client_records(client, request))
    received = b""
    while (piece := tls_records.read_plaintext(server)):
        received += piece
    assert piece == b"" and received == request
    response = os.urandom(50_000)
    for offset in range(0, len(response), 2 ** 14):
        chunk = response[offset:offset + 2 ** 14]
        assert tls_records.write_plaintext(server, chunk) == len(chunk)
    records = tls_records.take_records(server)
    assert len(records) > 2 ** 15 and tls_records.take_records(server) == b""
    client.bio_write(records)
    assert _read_all(client) == response


def test_half_a_record_wants_more_and_the_rest_completes_it(pair):
    """Part of a record gives b"" (nothing yet); the rest gives the plaintext."""
    server, client = pair
    records = _client_records(client, b"GET / HTTP/1.1\r\n\r\n")
    assert tls_records.feed(server, records[:7])
    assert tls_records.read_plaintext(server) == b""
    assert tls_records.feed(server, records[7:])
    assert tls_records.read_plaintext(server) == b"GET / HTTP/1.1\r\n\r\n"


def test_close_notify_is_left_to_pyopenssl_which_then_raises_zero_return(pair):
    """A close_notify is not handled here (None), and pyOpenSSL, asked
    again, sees it and raises ZeroReturnError, which Twisted handles."""
    server, client = pair
    client.shutdown()
    assert tls_records.feed(server, client.bio_read(2 ** 16))
    assert tls_records.read_plaintext(server) is None
    with pytest.raises(SSL.ZeroReturnError):
        server.recv(2 ** 15)


def test_a_tampered_record_is_left_to_pyopenssl_which_then_raises_an_error(pair):
    """A record that fails its integrity check is not handled here (None),
    and pyOpenSSL, asked again, raises SSL.Error (the connection fails)."""
    server, client = pair
    records = bytearray(_client_records(client, b"hello"))
    records[-1] ^= 0x01
    assert tls_records.feed(server, bytes(records))
    assert tls_records.read_plaintext(server) is None
    with pytest.raises(SSL.Error):
        server.recv(2 ** 15)


def test_nothing_to_take_is_empty(pair):
    """An empty send BIO gives b"" (no exception, nothing to send)."""
    server, _ = pair
    tls_records.take_records(server)  # the handshake's last flight, if any
    assert tls_records.take_records(server) == b""
