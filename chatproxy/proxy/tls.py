"""TLS: server contexts for listeners (SNI, versions, ciphers, ALPN) and
verified client TLS for ``https://`` upstreams (service-identity via Twisted).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Any

from collections import Counter

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from chatproxy.config import ConfigError, Listener, Upstream, UpstreamServer

# Mozilla's "intermediate" TLS 1.2 suites (ECDHE only: no DH parameters to manage).
# TLS 1.3 suites are OpenSSL's defaults and all modern.
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
_ALPN = b"http/1.1"


class TLSMaterialError(Exception):
    """A certificate or key that cannot be used; ``option`` says which one."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


def alpn_protocols(listener: Listener) -> tuple[bytes, ...]:
    """What a listener's ALPN offers, in the server's order of preference."""
    return (b"h2", _ALPN) if listener.http2 else (_ALPN,)


def _alpn_selector(protocols: tuple[bytes, ...]) -> Any:
    """An ALPN callback choosing the first of ``protocols`` the client offers."""
    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in protocols:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS
    return select


def _context(certificate: Path, key: Path, min_version: str, ciphers: str | None, *, options: tuple[str, str],
             alpn: tuple[bytes, ...] = (_ALPN,)) -> SSL.Context:
    """A server context for one certificate; errors name ``options``' entries."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(_VERSIONS[min_version])
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    # An idle connection (a quiet chat session) gives its ~34 KiB of OpenSSL
    # read/write buffers back, as nginx does.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        context.set_cipher_list((ciphers or DEFAULT_CIPHERS).encode("ascii"))
    except SSL.Error:
        raise TLSMaterialError("ciphers", f"OpenSSL accepts none of the ciphers {ciphers!r}") from None
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
    context.set_session_id(b"chatproxy")
    context.set_alpn_select_callback(_alpn_selector(alpn))
    return context


def _ssl_reason(error: Exception) -> str:
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        return str(error.args[0][-1][-1])
    return str(error)


def check_listener_tls(listener: Listener) -> None:
    """Load a listener's certificates and keys to prove they are usable.

    Raises :class:`chatproxy.config.ConfigError` naming file, section and
    option.  Files that ``create_self_signed`` will create are not checked.
    """
    if not listener.tls:
        return
    try:
        build_server_tls(listener)
    except TLSMaterialError as e:
        raise ConfigError(e.message, listener.source, f"listen:{listener.name}", e.option) from None
    except FileNotFoundError:
        if not listener.create_self_signed:
            raise


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Creates the server side of each TLS connection; SNI picks the context."""

    def __init__(self, default: SSL.Context, by_host: dict[str, SSL.Context]) -> None:
        self._default = default
        self._by_host = by_host
        if by_host:
            default.set_tlsext_servername_callback(self._pick)

    def _pick(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if not name:
            return
        host = name.decode("ascii", "replace").lower().rstrip(".")
        context = self._by_host.get(host)
        if context is None and "." in host:
            context = self._by_host.get("*." + host.split(".", 1)[1])
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A fresh server-side ``SSL.Connection`` for one client."""
        return SSL.Connection(self._default, None)


def build_server_tls(listener: Listener) -> ServerTLS:
    """The TLS connection creator for a listener with ``tls = yes``."""
    assert listener.certificate is not None and listener.key is not None
    if listener.create_self_signed and not (listener.certificate.exists() and listener.key.exists()):
        raise FileNotFoundError(str(listener.certificate))
    alpn = alpn_protocols(listener)
    default = _context(listener.certificate, listener.key, listener.min_tls_version, listener.ciphers,
                       options=("certificate", "key"), alpn=alpn)
    by_host = {
        entry.host: _context(entry.certificate, entry.key, listener.min_tls_version, listener.ciphers,
                             options=("sni", "sni"), alpn=alpn)
        for entry in listener.sni
    }
    return ServerTLS(default, by_host)


def create_self_signed(certificate: Path, key: Path, hostnames: tuple[str, ...] = ("localhost",)) -> None:
    """Write a new self-signed certificate (EC P-256, one year) and its key.

    The subject alternative names cover ``hostnames`` plus 127.0.0.1 and ::1.
    The key file is created readable by its owner only.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    alt_names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    certificate.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already exists
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_bytes)
    certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(path: Path) -> Any:
    from cryptography import x509
    from OpenSSL import crypto

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
        self._context.set_alpn_protos([_ALPN])
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
        acceptableProtocols=[_ALPN],
    )


class _HandshakeCountingTLS(TLSMemoryBIOProtocol):
    """A server TLS connection that counts a handshake that failed (no shared
    protocol version or cipher, garbage instead of a ClientHello, ...)."""

    factory: HandshakeCountingTLSFactory

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        if not self._handshakeDone and reason is not None and reason.check(SSL.Error):
            self.factory.failures[self.factory.listener] += 1
        super()._tlsShutdownFinished(reason)  # type: ignore[no-untyped-call]


class HandshakeCountingTLSFactory(TLSMemoryBIOFactory):
    """TLS for one listener that counts failed handshakes in ``failures[listener]``."""

    protocol = _HandshakeCountingTLS
    noisy = False

    def __init__(self, creator: Any, wrapped: Any, failures: Counter[str], listener: str) -> None:
        super().__init__(creator, False, wrapped)
        self.failures = failures
        self.listener = listener
