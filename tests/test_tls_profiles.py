"""Mozilla's TLS profiles on a listener: the groups offered for key exchange
(X25519, P-256, P-384 by default; the ``groups`` option), ``tls_profile =
modern``, the TLS 1.3 suites, ALPN selection, and the quick-start
certificate's extensions.  Real ``twistd`` processes and ``openssl s_client``
on loopback, plus unit tests of the decisions."""

from __future__ import annotations

import io
import shutil
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from chatproxy.config import Listener, load_config
from chatproxy.process.check import main
from chatproxy.proxy.tls import create_self_signed, select_alpn
from chatproxy.proxy.openssl_binding import unknown_groups
from chatproxy.proxy.tls_profiles import GROUPS, INTERMEDIATE, MODERN, listener_settings
from chatproxy.proxy.validate import validate
from conftest import PKI, free_port
from test_tls import client_context, handshake_error, http_over, make_config, tls_connect, tls_listener

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client -brief`` against 127.0.0.1:port with ``args`` (bounded)."""
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-brief", *args],
                          input="", capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------------------
# Decisions


def test_listener_settings_follow_the_profile_and_the_listener_options():
    """A listener gets its profile's versions, suites and groups unless it sets
    ``min_tls_version``, ``ciphers`` or ``groups`` itself."""
    plain = listener_settings(Listener("a", "tcp:1", "f", tls=True))
    assert (plain.profile, plain.min_version, plain.ciphers, plain.groups) == (
        "intermediate", "1.2", INTERMEDIATE.ciphers, ("X25519", "P-256", "P-384"))
    modern = listener_settings(Listener("a", "tcp:1", "f", tls=True, tls_profile="modern"))
    assert (modern.min_version, modern.groups) == ("1.3", GROUPS)
    assert MODERN.tls13_ciphers == "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
    own = listener_settings(Listener("a", "tcp:1", "f", tls=True, min_tls_version="1.3", ciphers="X",
                                     groups=("P-384",)))
    assert (own.min_version, own.ciphers, own.groups) == ("1.3", "X", ("P-384",))


def test_alpn_selection_takes_the_servers_first_protocol_the_client_offers():
    """ALPN picks by the server's list order, whatever the client's order; None without overlap."""
    assert select_alpn([b"h2", b"http/1.1"], [b"http/1.1"]) == b"http/1.1"
    assert select_alpn([b"http/1.1", b"h2"], [b"h2", b"http/1.1"]) == b"h2"
    assert select_alpn([b"h2"], [b"http/1.1"]) is None


def test_unknown_group_names_are_found():
    """OpenSSL's group names are accepted one by one; a made-up one is reported."""
    assert unknown_groups(["X25519", "P-256", "P-384", "NoSuchGroup"]) == ["NoSuchGroup"]


def test_quick_start_certificate_carries_key_identifiers_names_and_key_usage(tmp_path):
    """The self-signed certificate has SKI and AKI (the same key id: it is its own issuer),
    SANs for localhost and the loopback addresses, critical key usage digitalSignature only,
    extended key usage serverAuth, and CA:FALSE."""
    create_self_signed(tmp_path / "c.crt", tmp_path / "c.key")
    cert = x509.load_pem_x509_certificate((tmp_path / "c.crt").read_bytes())
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_encipherment
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


@pytest.mark.parametrize(("options", "option", "fragment"), [
    ("groups = X25519, NoSuchGroup", "groups", "NoSuchGroup"),
    ("groups = X25519 P-256", "groups", "not a group name"),
    ("tls_profile = old", "tls_profile", "intermediate, modern"),
    ("tls_profile = modern\nmin_tls_version = 1.2", "min_tls_version", "TLS 1.3 only"),
])
def test_bad_tls_options_name_the_option(tmp_path, pki, options, option, fragment):
    """A group OpenSSL does not know, a malformed group list, an unknown profile, and a
    TLS 1.2 minimum with the TLS 1.3-only profile are errors naming [listen:main] and the option."""
    path = tmp_path / "c.ini"
    path.write_text(make_config(8443, "http://127.0.0.1:9", listener=tls_listener(pki, options)))
    with pytest.raises(Exception) as info:
        validate(load_config([path]), {})
    text = str(info.value)
    assert f"{path} [listen:main] {option}:" in text and fragment in text, text


# ---------------------------------------------------------------------------
# A running listener


def _groups_proxy(proxy, upstream, pki: PKI, more: str = "") -> int:
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=tls_listener(pki, more)), port=port)
    return port


@needs_openssl
def test_only_x25519_p256_and_p384_are_accepted_by_default_tls13(proxy, upstream, pki):
    """With TLS 1.3, a client offering only X25519, P-256 or P-384 is served with that group;
    one offering only X448, P-521 or a finite-field group (ffdhe2048) is refused."""
    port = _groups_proxy(proxy, upstream, pki)
    for group, shown in (("X25519", "X25519"), ("P-256", "prime256v1"), ("P-384", "secp384r1")):
        result = s_client(port, "-tls1_3", "-groups", group, "-CAfile", str(pki.ca), "-servername", "localhost")
        assert result.returncode == 0, (group, result.stderr)
        assert f"Server Temp Key: {shown}" in result.stderr or shown in result.stderr, result.stderr
    for group in ("X448", "P-521", "ffdhe2048"):
        result = s_client(port, "-tls1_3", "-groups", group)
        assert result.returncode != 0, (group, result.stderr)
        assert "CONNECTION ESTABLISHED" not in result.stderr


@needs_openssl
def test_tls12_key_exchange_uses_only_the_profiles_groups(proxy, upstream, pki):
    """With TLS 1.2 (where the client's groups also bound the curve of an ECDSA certificate,
    P-256 here, so every client lists P-256), a client offering X448, P-521 and ffdhe2048
    before P-256 gets P-256, and one offering P-384 and P-256 gets P-256: the server's order."""
    port = _groups_proxy(proxy, upstream, pki)
    for offered in ("X448:P-521:ffdhe2048:P-256", "P-384:P-256"):
        result = s_client(port, "-tls1_2", "-groups", offered)
        assert result.returncode == 0, (offered, result.stderr)
        assert "prime256v1" in result.stderr, result.stderr
    assert s_client(port, "-tls1_2", "-groups", "X448:P-521").returncode != 0


@needs_openssl
def test_groups_option_replaces_the_list(proxy, upstream, pki):
    """``groups = P-384`` leaves exactly P-384: X25519 alone is refused, P-384 is served."""
    port = _groups_proxy(proxy, upstream, pki, "groups = P-384")
    assert s_client(port, "-tls1_3", "-groups", "X25519").returncode != 0
    served = s_client(port, "-tls1_3", "-groups", "P-384:X25519")
    assert served.returncode == 0 and "secp384r1" in served.stderr, served.stderr


@needs_openssl
def test_the_servers_group_order_wins(proxy, upstream, pki):
    """A TLS 1.2 client listing P-256 before X25519 gets X25519, the server's first choice."""
    port = _groups_proxy(proxy, upstream, pki)
    result = s_client(port, "-tls1_2", "-groups", "P-256:X25519")
    assert result.returncode == 0, result.stderr
    assert "X25519" in result.stderr, result.stderr


def test_modern_profile_refuses_tls12_and_serves_tls13(proxy, upstream, pki):
    """``tls_profile = modern`` refuses a TLS 1.2 client with a protocol_version alert and
    serves TLS 1.3."""
    port = _groups_proxy(proxy, upstream, pki, "tls_profile = modern")
    error = handshake_error(port, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2), "localhost")
    assert error.reason == "TLSV1_ALERT_PROTOCOL_VERSION", error
    with tls_connect(port, client_context(pki), "localhost") as sock:
        assert sock.version() == "TLSv1.3"
        assert http_over(sock)[0] == 200


@needs_openssl
def test_tls13_offers_only_the_profiles_three_suites(proxy, upstream, pki):
    """TLS 1.3 with TLS_AES_128_CCM_SHA256 alone (not in the profile) is refused; each of the
    profile's three suites is served."""
    port = _groups_proxy(proxy, upstream, pki)
    assert s_client(port, "-tls1_3", "-ciphersuites", "TLS_AES_128_CCM_SHA256").returncode != 0
    for suite in ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"):
        result = s_client(port, "-tls1_3", "-ciphersuites", suite)
        assert result.returncode == 0 and suite in result.stderr, result.stderr


def test_check_describes_the_profile(tmp_path, pki):
    """``python -m chatproxy check`` prints the listener's TLS version and profile."""
    path = tmp_path / "c.ini"
    path.write_text(make_config(8443, "http://127.0.0.1:9", listener=tls_listener(pki, "tls_profile = modern")))
    out, err = io.StringIO(), io.StringIO()
    assert main(["check", "--config", str(path)], out, err) == 0, err.getvalue()
    assert f"TLS 1.3+ (modern) certificate {pki.cert}" in out.getvalue()
