"""TLS: server contexts for listeners (profile, versions, ciphers, groups,
SNI, ALPN, OCSP staples), self-signed certificates, and verified client TLS
for ``https://`` upstreams (service-identity via Twisted).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproxy.config import ConfigError, Listener, Upstream, UpstreamServer
from chatproxy.proxy.openssl_binding import GroupError, session_reused, set_groups, unknown_groups
from chatproxy.proxy import tls_records
from chatproxy.proxy.tls_records import READ_SIZE, feed, read_plaintext, records_waiting, take_records, write_plaintext
from chatproxy.proxy.sending import send
from chatproxy.proxy.stats import Stats
from chatproxy.proxy.tls_profiles import INTERMEDIATE, TLSSettings, listener_settings

#: The intermediate profile's TLS 1.2 suites (ECDHE only: no DH parameters to manage).
DEFAULT_CIPHERS = INTERMEDIATE.ciphers
_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
#: What upstream connections offer with ALPN.
_UPSTREAM_ALPN = b"http/1.1"
#: The most plaintext one TLS record carries.
_RECORD = 2 ** 14
#: The session cache of a listener's contexts (see docs/architecture.md, "TLS").
SESSION_ID_CONTEXT = b"chatproxy"

#: Answers the OCSP status request of a client for one certificate: the DER
#: response to staple, b"" for none; raises SSL.Error to refuse the handshake.
StapleSource = Callable[[], bytes]


class TLSMaterialError(Exception):
    """A certificate or key that cannot be used; ``option`` says which one."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


def select_alpn(offered: Sequence[bytes], supported: Sequence[bytes]) -> bytes | None:
    """The protocol to select: the first of ``supported`` (the server's order) that the client offered."""
    for protocol in supported:
        if protocol in offered:
            return protocol
    return None


def _alpn_selector(supported: tuple[bytes, ...]) -> Any:
    """An ALPN callback choosing the first of ``supported`` the client offers."""
    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        chosen = select_alpn(offered, supported)
        return chosen if chosen is not None else SSL.NO_OVERLAPPING_PROTOCOLS
    return select


def _base_context(settings: TLSSettings) -> SSL.Context:
    """A server context with the versions, suites, groups and options of
    ``settings`` and no certificate yet."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(_VERSIONS[settings.min_version])
    # No compression, no renegotiation; the server's order of suites and
    # groups wins.  No session tickets: sessions are resumed from the
    # server's session cache (TLS 1.2 session IDs, TLS 1.3 stateful
    # tickets), so no ticket key exists to be stolen or rotated.  A client
    # that closes the TCP connection without close_notify (many do) ends the
    # connection as if it had sent one instead of in a fatal error, which
    # would drop its session from the cache (HTTP's own framing tells a
    # truncated message, as with nginx).
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET
                        | getattr(SSL, "OP_NO_RENEGOTIATION", 0) | getattr(SSL, "OP_IGNORE_UNEXPECTED_EOF", 0))
    # An idle connection (a quiet chat session) gives its ~34 KiB of OpenSSL
    # read/write buffers back, as nginx does.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        context.set_cipher_list(settings.ciphers.encode("ascii"))
    except SSL.Error:
        raise TLSMaterialError("ciphers", f"OpenSSL accepts none of the ciphers {settings.ciphers!r}") from None
    context.set_tls13_ciphersuites(settings.tls13_ciphers.encode("ascii"))
    try:
        set_groups(context, settings.groups)
    except GroupError:
        unknown = unknown_groups(settings.groups)
        raise TLSMaterialError("groups", f"OpenSSL does not know the group(s) {', '.join(unknown) or '?'} "
                                         "(for example X25519, P-256, P-384, X25519MLKEM768)") from None
    context.set_session_id(SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_alpn_select_callback(_alpn_selector(settings.alpn))
    return context


def _with_staples(context: SSL.Context, staple: StapleSource | None) -> SSL.Context:
    if staple is not None:
        context.set_ocsp_server_callback(lambda connection, data: staple())
    return context


def server_context(certificate: Path, key: Path, settings: TLSSettings, *, options: tuple[str, str],
                   staple: StapleSource | None = None) -> SSL.Context:
    """A server context for one certificate chain file and its key; errors
    name ``options``' entries (the certificate's option, the key's)."""
    context = _base_context(settings)
    try:
        context.use_certificate_chain_file(str(certificate))
    except (SSL.Error, OSError) as e:
        raise TLSMaterialError(options[0], f"cannot load a PEM certificate chain from {certificate}: {_ssl_reason(e)}") from None
    try:
        context.use_privatekey_file(str(key))
    except SSL.Error as e:
        if "mismatch" in _ssl_reason(e):
            raise TLSMaterialError(options[1], f"the key in {key} does not match the certificate in {certificate}") from None
        raise TLSMaterialError(options[1], f"cannot load a PEM private key from {key}: {_ssl_reason(e)}") from None
    except OSError as e:
        raise TLSMaterialError(options[1], f"cannot load a PEM private key from {key} that matches {certificate}: {_ssl_reason(e)}") from None
    try:
        context.check_privatekey()
    except SSL.Error:
        raise TLSMaterialError(options[1], f"the key in {key} does not match the certificate in {certificate}") from None
    return _with_staples(context, staple)


def memory_context(certificate: x509.Certificate, key: Any, settings: TLSSettings) -> SSL.Context:
    """A server context for a certificate and key held in memory (an ACME
    listener's stand-in until its first certificate is issued)."""
    context = _base_context(settings)
    context.use_certificate(certificate)
    context.use_privatekey(key)
    return context


def _ssl_reason(error: Exception) -> str:
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        return str(error.args[0][-1][-1])
    return str(error)


def creates_its_own_files(listener: Listener) -> bool:
    """Whether the listener's certificate files may be missing because
    chatproxy makes them (``create_self_signed``, ``acme``)."""
    return listener.create_self_signed or listener.acme is not None


def check_listener_tls(listener: Listener) -> None:
    """Load a listener's certificates and keys, and its TLS settings, to prove they are usable.

    Raises :class:`chatproxy.config.ConfigError` naming file, section and
    option.  Files that chatproxy will create (``create_self_signed``,
    ``acme``) are not checked while they do not exist.
    """
    if not listener.tls:
        return
    section = f"listen:{listener.name}"
    try:
        _base_context(listener_settings(listener))
        build_server_tls(listener)
    except TLSMaterialError as e:
        raise ConfigError(e.message, listener.source, section, e.option) from None
    except FileNotFoundError:
        if not creates_its_own_files(listener):
            raise


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Creates the server side of each TLS connection; SNI picks the context.

    The contexts can be replaced (a renewed certificate) while the listener
    runs: connections already open keep the context they started with."""

    def __init__(self, default: SSL.Context, by_host: dict[str, SSL.Context]) -> None:
        self._default = default
        self._by_host = by_host
        self.replace(default, by_host)

    def replace(self, default: SSL.Context, by_host: dict[str, SSL.Context]) -> None:
        """New connections use these contexts from now on."""
        if by_host:
            default.set_tlsext_servername_callback(self._pick)
        self._default, self._by_host = default, by_host

    def _pick(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if not name:
            return
        context = pick_sni(self._by_host, name.decode("ascii", "replace"))
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A fresh server-side ``SSL.Connection`` for one client."""
        return SSL.Connection(self._default, None)


def pick_sni(by_host: dict[str, Any], name: str) -> Any:
    """The entry for an SNI name: exact (case-insensitive, trailing dot
    ignored), else ``*.parent`` one label up; None when there is none."""
    host = name.lower().rstrip(".")
    found = by_host.get(host)
    if found is None and "." in host:
        found = by_host.get("*." + host.split(".", 1)[1])
    return found


def build_server_tls(listener: Listener) -> ServerTLS:
    """The TLS connection creator for a listener with ``tls = yes``, from its
    files as they are (no staples).  Raises FileNotFoundError when files
    chatproxy makes itself do not exist yet."""
    assert listener.certificate is not None and listener.key is not None
    if creates_its_own_files(listener) and not (listener.certificate.exists() and listener.key.exists()):
        raise FileNotFoundError(str(listener.certificate))
    settings = listener_settings(listener)
    default = server_context(listener.certificate, listener.key, settings, options=("certificate", "key"))
    by_host = {
        entry.host: server_context(entry.certificate, entry.key, settings, options=("sni", "sni"))
        for entry in listener.sni if entry.certificate.exists() or entry.acme is None
    }
    return ServerTLS(default, by_host)


def self_signed(hostnames: Sequence[str], days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed server certificate (EC P-256) for ``hostnames``
    plus 127.0.0.1 and ::1, and its key.  It carries what strict validators
    look for: subject and authority key identifiers, the names as subject
    alternative names, key usage ``digitalSignature`` (critical), extended key
    usage ``serverAuth``, and ``CA:FALSE``."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    alt_names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    subject_key = x509.SubjectKeyIdentifier.from_public_key(private_key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(subject_key, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    return certificate, private_key


def write_private_key(path: Path, key: Any) -> None:
    """Write a PEM private key (PKCS#8, unencrypted) readable by its owner
    only, replacing ``path`` at once (a reader sees the old file or the new one)."""
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    write_file(path, key_bytes, 0o600)


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` with ``mode`` through a temporary file and a
    rename, so that no reader ever sees half a file; missing directories are made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def create_self_signed(certificate: Path, key: Path, hostnames: tuple[str, ...] = ("localhost",)) -> None:
    """Write a new self-signed certificate (see :func:`self_signed`, one
    year) and its key, the key file readable by its owner only."""
    cert, private_key = self_signed(hostnames)
    write_private_key(key, private_key)
    write_file(certificate, cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(path: Path) -> Any:
    certificates = x509.load_pem_x509_certificates(path.read_bytes())
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates]
    )


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Client TLS without certificate checks, for ``verify = no`` upstreams."""

    def __init__(self, hostname: str, client: ssl.PrivateCertificate | None) -> None:
        self._hostname = hostname.encode("idna") if not _is_ip(hostname) else None
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        self._context.set_alpn_protos([_UPSTREAM_ALPN])
        if client is not None:
            self._context.use_certificate(client.original)
            self._context.use_privatekey(client.privateKey.original)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A fresh client-side ``SSL.Connection``."""
        connection = SSL.Connection(self._context, None)
        if self._hostname:
            connection.set_tlsext_host_name(self._hostname)
        connection.set_app_data(tlsProtocol)
        return connection


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def build_client_tls(upstream: Upstream, server: UpstreamServer) -> Any:
    """The TLS connection creator used to reach one ``https://`` server."""
    client: ssl.PrivateCertificate | None = None
    if upstream.client_certificate is not None:
        pem = upstream.client_certificate.read_bytes()
        if upstream.client_key is not None:
            pem += b"\n" + upstream.client_key.read_bytes()
        client = ssl.PrivateCertificate.loadPEM(pem)
    if not upstream.verify:
        return _UnverifiedClientTLS(server.host, client)
    trust = _load_ca(upstream.ca) if upstream.ca is not None else ssl.platformTrust()
    return ssl.optionsForClientTLS(
        server.host,
        trustRoot=trust,
        clientCertificate=client,
        acceptableProtocols=[_UPSTREAM_ALPN],
    )


class _HandshakeCountingTLS(TLSMemoryBIOProtocol):
    """A server TLS connection that counts its handshake: completed (new or
    resumed session) or failed (no shared protocol version or cipher, garbage
    instead of a ClientHello, ...), and sends its records at once when the
    socket can take them (:func:`chatproxy.proxy.sending.send`).

    Once the handshake is done, application data moves through
    :mod:`chatproxy.proxy.tls_records` (the same OpenSSL calls without
    pyOpenSSL's per-call wrappers); whatever that leaves aside (a
    close_notify, an alert, a failed write, the handshake itself) takes
    Twisted's own path, which pyOpenSSL's exceptions drive."""

    factory: HandshakeCountingTLSFactory
    #: The connection's OpenSSL objects for :mod:`chatproxy.proxy.tls_records`
    #: (set by the factory with the connection); None: that path is unavailable.
    _handles: tls_records.Handles | None = None

    def dataReceived(self, data: bytes) -> None:
        handles = self._handles
        if handles is not None and self._handshakeDone and not self._appSendBuffer and feed(handles, data):
            self._flushReceiveBIO()
        else:
            super().dataReceived(data)  # type: ignore[no-untyped-call]

    def _flushReceiveBIO(self) -> None:
        handles = self._handles
        if handles is None or not self._handshakeDone:
            super()._flushReceiveBIO()  # type: ignore[no-untyped-call]
            return
        while not self._lostTLSConnection:
            data = read_plaintext(handles)
            if data is None:
                super()._flushReceiveBIO()  # type: ignore[no-untyped-call]  # raises what Twisted handles
                return
            if not data:
                break  # OpenSSL needs more bytes from the client
            if not self._aborted:
                self.wrappedProtocol.dataReceived(data)
            if len(data) < READ_SIZE and not records_waiting(handles):
                break  # the same as the failing read that would say so, for less
        self._flushSendBIO()

    def _write(self, data: bytes) -> None:
        handles = self._handles
        if handles is None or not self._handshakeDone or self._lostTLSConnection:
            super()._write(data)  # type: ignore[no-untyped-call]
            return
        if type(data) is not bytes:
            data = bytes(data)  # a bytearray or memoryview, which Twisted's write takes too
        offset, size = 0, len(data)
        while offset < size:
            chunk = data if offset == 0 and size <= _RECORD else data[offset:offset + _RECORD]
            taken = write_plaintext(handles, chunk)
            if not taken:
                super()._write(data[offset:])  # type: ignore[no-untyped-call]  # buffers or fails as Twisted does
                return
            offset += taken
            self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        # Twisted's version queues every record with transport.write: one
        # more reactor turn and two epoll_ctl calls for each response.
        handles = self._handles
        if handles is not None:
            records = take_records(handles)
        else:
            try:
                records = self._tlsConnection.bio_read(2 ** 15)
            except SSL.WantReadError:
                return  # nothing in the send BIO
        if records:
            send(self.transport, records)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        # As Twisted drops the connection: its OpenSSL objects (and their
        # buffers) go now, not when a collection finds this protocol's cycles.
        self._handles = None

    def _checkHandshakeStatus(self) -> None:
        done = self._handshakeDone
        super()._checkHandshakeStatus()  # type: ignore[no-untyped-call]
        if self._handshakeDone and not done:
            resumed = session_reused(self._tlsConnection)
            self.factory.stats.tls_handshakes[(self.factory.listener, resumed)] += 1

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        if not self._handshakeDone and reason is not None and reason.check(SSL.Error):
            self.factory.stats.tls_handshake_failures[self.factory.listener] += 1
        super()._tlsShutdownFinished(reason)  # type: ignore[no-untyped-call]


class HandshakeCountingTLSFactory(TLSMemoryBIOFactory):
    """TLS for one listener that counts its handshakes in ``stats``."""

    protocol = _HandshakeCountingTLS
    noisy = False

    def __init__(self, creator: Any, wrapped: Any, stats: Stats, listener: str) -> None:
        super().__init__(creator, False, wrapped)
        self.stats = stats
        self.listener = listener
        if tls_records.AVAILABLE:
            self._creatorCallable = _with_handles(self._creatorCallable)


def _with_handles(create: Callable[[Any], SSL.Connection]) -> Callable[[Any], SSL.Connection]:
    """``create`` (what makes a TLS protocol's connection), also giving the
    protocol the connection's OpenSSL objects for :mod:`chatproxy.proxy.tls_records`."""
    def create_with_handles(tls_protocol: Any) -> SSL.Connection:
        connection = create(tls_protocol)
        tls_protocol._handles = tls_records.handles(connection)
        return connection
    return create_with_handles
