"""OCSP stapling end to end: a test CA whose certificates name a local
``openssl ocsp`` responder, a real ``twistd`` that fetches, verifies, caches
and staples the responses, and ``openssl s_client -status`` as the client;
a good, a revoked and a must-staple certificate, a responder that is down,
the disk cache, and workers (the master fetches, the workers staple).  Plus
unit tests of the verification rules."""

from __future__ import annotations

import datetime
import random
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from chatproxy.proxy.ocsp import (OCSPError, StapleSlot, Verified, next_fetch, request_der, retry_delay,
                                  target_from_chain, verify_response)
from conftest import free_port, wait_until
from test_tls import make_config

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
NOW = datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class OCSPPKI:
    """A CA and server certificates whose AIA names a responder on ``port``:
    ``good``, ``revoked``, ``staple`` (must-staple); each chain file holds the
    certificate and the CA; ``index`` is the responder's database."""

    def __init__(self, directory: Path, port: int) -> None:
        self.dir, self.port = directory, port
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(_name("OCSP test CA")).issuer_name(_name("OCSP test CA"))
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(hours=1)).not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256()))
        self.ca, self.ca_key_file = directory / "ca.crt", directory / "ca.key"
        self.ca.write_bytes(_pem(self.ca_cert))
        self.ca_key_file.write_bytes(_key_pem(self.ca_key))
        self.certs: dict[str, x509.Certificate] = {}
        self.index = directory / "index.txt"
        self.index.write_text("")
        for name, revoked, staple in (("good", False, False), ("revoked", True, False), ("staple", False, True)):
            self.issue(name, staple, revoked=revoked)

    def issue(self, name: str, staple: bool, url: str | None = None, days: int = 20,
              names: tuple[str, ...] = (), revoked: bool = False) -> x509.Certificate:
        """Write NAME.crt (chain) and NAME.key for NAME.ocsp.test (and ``names``), valid ``days``,
        and its line in the responder's index (valid, or revoked)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(_name(f"{name}.ocsp.test")).issuer_name(self.ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(hours=1)).not_valid_after(NOW + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in (f"{name}.ocsp.test", *names)]),
                           critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP,
                x509.UniformResourceIdentifier(url or f"http://127.0.0.1:{self.port}"))]), critical=False))
        if staple:
            builder = builder.add_extension(x509.TLSFeature([x509.TLSFeatureType.status_request]), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        (self.dir / f"{name}.crt").write_bytes(_pem(cert) + _pem(self.ca_cert))
        (self.dir / f"{name}.key").write_bytes(_key_pem(key))
        expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        when = NOW.strftime("%y%m%d%H%M%SZ") if revoked else ""
        with self.index.open("a") as index:
            index.write(f"{'R' if revoked else 'V'}\t{expiry}\t{when}\t{cert.serial_number:X}\tunknown\t"
                        f"/CN={name}.ocsp.test\n")
        self.certs[name] = cert
        return cert


class Responder:
    """``openssl ocsp`` answering for the OCSPPKI on its port (responses valid 30 minutes)."""

    def __init__(self, pki: OCSPPKI) -> None:
        self.pki = pki
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it says it listens (bounded; a probe connection would hang
        ``openssl ocsp``, which serves one connection at a time)."""
        assert OPENSSL is not None
        log = self.pki.dir / f"responder-{time.monotonic_ns()}.log"
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [OPENSSL, "ocsp", "-index", str(self.pki.index), "-port", str(self.pki.port), "-rsigner",
                 str(self.pki.ca), "-rkey", str(self.pki.ca_key_file), "-CA", str(self.pki.ca), "-nmin", "30",
                 "-ignore_err"], stdout=output, stderr=subprocess.STDOUT)
        wait_until(lambda: "waiting for OCSP client connections" in log.read_text(), "the responder")

    def stop(self) -> None:
        """Stop it (bounded)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def ocsp_pki(tmp_path: Path) -> OCSPPKI:
    """The CA and its three certificates, naming a responder on a free port."""
    directory = tmp_path / "ocsp-pki"
    directory.mkdir()
    return OCSPPKI(directory, free_port())


@pytest.fixture
def responder(ocsp_pki: OCSPPKI) -> Iterator[Responder]:
    """The responder, not started."""
    running = Responder(ocsp_pki)
    yield running
    running.stop()


def _config(port: int, upstream_url: str, pki: OCSPPKI, settings: str = "access_log = off") -> str:
    """A listener whose default certificate is the good one, with SNI for the revoked and must-staple ones."""
    listener = (f"tls = yes\ncertificate = {pki.dir}/good.crt\nkey = {pki.dir}/good.key\n"
                f"sni =\n    revoked.ocsp.test: {pki.dir}/revoked.crt {pki.dir}/revoked.key\n"
                f"    staple.ocsp.test: {pki.dir}/staple.crt {pki.dir}/staple.key\n")
    return make_config(port, upstream_url, listener=listener, settings=settings)


def _status(port: int, name: str, pki: OCSPPKI) -> subprocess.CompletedProcess[str]:
    """``openssl s_client -status`` for SNI ``name`` (bounded)."""
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-status", "-servername",
                           f"{name}.ocsp.test", "-CAfile", str(pki.ca)],
                          input="", capture_output=True, text=True, timeout=30)


def _staple(port: int, name: str) -> bytes:
    """The OCSP response stapled in a handshake with SNI ``name`` (a pyOpenSSL client)."""
    stapled: list[bytes] = []
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_ocsp_client_callback(lambda connection, der, data: stapled.append(der) or True)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        connection = SSL.Connection(context, raw)
        connection.set_tlsext_host_name(name.encode("ascii"))
        connection.request_ocsp()
        connection.set_connect_state()
        deadline = time.monotonic() + 10
        while True:  # the socket has a timeout, so pyOpenSSL asks to be called again
            try:
                connection.do_handshake()
                break
            except SSL.WantReadError:
                assert time.monotonic() < deadline, "no handshake within 10 s"
                select.select([raw], [], [], 1)
    return stapled[0]




def _stapled_good(port: int, name: str, pki: OCSPPKI) -> bool:
    result = _status(port, name, pki)
    return "OCSP Response Status: successful" in result.stdout and "Cert Status: good" in result.stdout


# ---------------------------------------------------------------------------
# A real proxy and a real responder


def test_good_certificate_is_stapled_revoked_is_not_must_staple_is_served(proxy, upstream, ocsp_pki, responder):
    """With the responder up: s_client -status gets a verified "good" response for the good
    certificate and for the must-staple one (whose handshake succeeds), and no response for the
    revoked certificate (the log says the responder called it revoked)."""
    responder.start()
    port = free_port()
    process = proxy.start(_config(port, upstream.url, ocsp_pki), port=port)
    wait_until(lambda: _stapled_good(port, "good", ocsp_pki), "the good certificate's staple")
    staple = ocsp_pki.dir / "stapled.der"
    staple.write_bytes(_staple(port, "good.ocsp.test"))
    assert OPENSSL is not None
    checked = subprocess.run([OPENSSL, "ocsp", "-respin", str(staple), "-CAfile", str(ocsp_pki.ca), "-issuer",
                              str(ocsp_pki.ca), "-cert", str(ocsp_pki.dir / "good.crt")],
                             capture_output=True, text=True, timeout=30)
    assert "Response verify OK" in checked.stderr + checked.stdout, checked
    assert ": good" in checked.stdout, checked.stdout
    wait_until(lambda: _stapled_good(port, "staple", ocsp_pki), "the must-staple certificate's staple")
    wait_until(lambda: "is revoked" in process.output(), "the revoked answer in the log")
    revoked = _status(port, "revoked", ocsp_pki)
    assert "OCSP response: no response sent" in revoked.stdout, revoked.stdout
    assert "CN = revoked.ocsp.test" in revoked.stdout


def test_responder_down_nothing_stapled_and_must_staple_refused(proxy, upstream, ocsp_pki, responder):
    """With the responder down from the start: the good certificate is served without a staple
    ("no response sent"), the failure is logged with the next try, and a client asking for OCSP
    on the must-staple certificate is refused the handshake (never served without a good staple)."""
    port = free_port()
    process = proxy.start(_config(port, upstream.url, ocsp_pki), port=port)
    wait_until(lambda: "nothing is stapled; next try in" in process.output(), "the failed fetch in the log")
    plain = _status(port, "good", ocsp_pki)
    assert plain.returncode == 0 and "OCSP response: no response sent" in plain.stdout, plain.stdout
    refused = _status(port, "staple", ocsp_pki)
    assert refused.returncode != 0
    assert "CONNECTION ESTABLISHED" not in refused.stdout + refused.stderr


def test_the_disk_cache_staples_after_a_restart_while_the_responder_is_down(proxy, upstream, ocsp_pki, responder,
                                                                            tmp_path):
    """A response fetched once is kept on disk (state_directory/ocsp, mode 0600): a proxy
    started again while the responder is down staples it at once."""
    responder.start()
    port = free_port()
    first = proxy.start(_config(port, upstream.url, ocsp_pki), port=port)
    wait_until(lambda: _stapled_good(port, "good", ocsp_pki), "the first staple")
    assert first.stop() == 0
    responder.stop()
    cached = list((tmp_path / "state" / "ocsp").glob("*.der"))
    assert len(cached) >= 2 and all(path.stat().st_mode & 0o777 == 0o600 for path in cached)
    proxy.start(_config(port, upstream.url, ocsp_pki), port=port)
    assert _stapled_good(port, "good", ocsp_pki)


def test_with_workers_the_master_fetches_and_every_worker_staples(proxy, upstream, ocsp_pki, responder):
    """With workers = 2 the master fetches once per certificate and the workers staple what it
    stored: clients from several addresses (which reach both workers) all get the staple."""
    responder.start()
    port = free_port()
    process = proxy.start(_config(port, upstream.url, ocsp_pki), port=port, workers=2)
    wait_until(lambda: "OCSP: stapling a good response for CN=good.ocsp.test" in process.output(), "the fetch")
    assert OPENSSL is not None

    def all_stapled() -> bool:
        for n in range(2, 12):
            result = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-bind", f"127.0.0.{n}:0",
                                     "-status", "-servername", "good.ocsp.test"],
                                    input="", capture_output=True, text=True, timeout=30)
            if "Cert Status: good" not in result.stdout:
                return False
        return True

    wait_until(all_stapled, "every worker's staple")
    assert process.output().count("OCSP: stapling a good response for CN=good.ocsp.test") == 1


# ---------------------------------------------------------------------------
# Verification rules


def _response(pki: OCSPPKI, name: str, *, status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
              this_update: datetime.datetime = NOW, next_update: datetime.datetime | None = None,
              signer: tuple[Any, Any] | None = None, certificates: list[x509.Certificate] | None = None) -> bytes:
    cert = pki.certs[name]
    key, responder_cert = signer or (pki.ca_key, pki.ca_cert)
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=pki.ca_cert, algorithm=hashes.SHA1(), cert_status=status, this_update=this_update,
        next_update=next_update if next_update is not None else this_update + datetime.timedelta(hours=2),
        revocation_time=NOW if status == ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=None).responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert)
    if certificates:
        builder = builder.certificates(certificates)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _target(pki: OCSPPKI, name: str) -> Any:
    target = target_from_chain(x509.load_pem_x509_certificates((pki.dir / f"{name}.crt").read_bytes()))
    assert target is not None
    return target


def test_a_response_signed_by_the_issuer_verifies_good_or_revoked(ocsp_pki):
    """A current response signed by the CA verifies; "good" is stapleable, "revoked" is not."""
    good = verify_response(_target(ocsp_pki, "good"), _response(ocsp_pki, "good"), NOW)
    assert good.good
    revoked = verify_response(_target(ocsp_pki, "revoked"),
                              _response(ocsp_pki, "revoked", status=ocsp.OCSPCertStatus.REVOKED), NOW)
    assert not revoked.good


@pytest.mark.parametrize("case", ["expired", "future", "other-certificate", "foreign-signer", "not-ocsp"])
def test_responses_that_must_not_be_stapled_are_refused(ocsp_pki, case):
    """Expired (nextUpdate past), from the future, about another certificate, signed by a key the
    issuer did not delegate to, and not an OCSP response at all: each raises OCSPError."""
    target = _target(ocsp_pki, "good")
    stranger = ec.generate_private_key(ec.SECP256R1())
    stranger_cert = (x509.CertificateBuilder().subject_name(_name("stranger")).issuer_name(_name("stranger"))
                     .public_key(stranger.public_key()).serial_number(1).not_valid_before(NOW)
                     .not_valid_after(NOW + datetime.timedelta(days=1)).sign(stranger, hashes.SHA256()))
    der = {
        "expired": lambda: _response(ocsp_pki, "good", this_update=NOW - datetime.timedelta(hours=3)),
        "future": lambda: _response(ocsp_pki, "good", this_update=NOW + datetime.timedelta(hours=1)),
        "other-certificate": lambda: _response(ocsp_pki, "revoked"),
        "foreign-signer": lambda: _response(ocsp_pki, "good", signer=(stranger, stranger_cert),
                                            certificates=[stranger_cert]),
        "not-ocsp": lambda: b"garbage",
    }[case]()
    with pytest.raises(OCSPError):
        verify_response(target, der, NOW)


def test_a_delegated_responder_certificate_for_ocsp_signing_is_accepted(ocsp_pki):
    """A response signed by a responder certificate the CA issued with id-kp-OCSPSigning (carried
    in the response) verifies; the same without that extended key usage is refused."""
    target = _target(ocsp_pki, "good")
    key = ec.generate_private_key(ec.SECP256R1())

    def responder_cert(usage: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(_name("responder")).issuer_name(ocsp_pki.ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - datetime.timedelta(hours=1))
                   .not_valid_after(NOW + datetime.timedelta(days=1)))
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        return builder.sign(ocsp_pki.ca_key, hashes.SHA256())

    delegated = responder_cert(True)
    assert verify_response(target, _response(ocsp_pki, "good", signer=(key, delegated), certificates=[delegated]),
                           NOW).good
    plain = responder_cert(False)
    with pytest.raises(OCSPError, match="OCSP signing"):
        verify_response(target, _response(ocsp_pki, "good", signer=(key, plain), certificates=[plain]), NOW)


def test_request_and_target_from_the_chain(ocsp_pki):
    """The chain file gives the certificate, its issuer, the responder URL and must-staple; the
    request names the certificate's serial; a chain without the issuer is an error."""
    target = _target(ocsp_pki, "staple")
    assert (target.url, target.must_staple) == (f"http://127.0.0.1:{ocsp_pki.port}", True)
    assert ocsp.load_der_ocsp_request(request_der(target)).serial_number == ocsp_pki.certs["staple"].serial_number
    with pytest.raises(OCSPError, match="issuer"):
        target_from_chain([ocsp_pki.certs["good"]])


def test_refresh_and_retry_times():
    """The next fetch is halfway through the validity (up to 10% earlier), at least a minute
    away; retries double from a minute up to an hour, and come before the response in hand expires."""
    rng = random.Random(1)
    verified = Verified(b"", ocsp.OCSPCertStatus.GOOD, NOW, NOW + datetime.timedelta(hours=10))
    assert 4.5 * 3600 <= next_fetch(verified, NOW, rng) <= 5 * 3600
    assert next_fetch(None, NOW, rng) == 0
    assert next_fetch(verified, NOW + datetime.timedelta(hours=9, minutes=59), rng) == 60
    assert [round(retry_delay(n, None, NOW, random.Random(0)) / 60) for n in (1, 2, 3, 7, 12)] == [1, 2, 4, 60, 60]
    nearly = Verified(b"", ocsp.OCSPCertStatus.GOOD, NOW, NOW + datetime.timedelta(minutes=30))
    assert retry_delay(10, nearly, NOW, rng) <= 15 * 60


def test_the_slot_staples_only_a_current_good_response():
    """A slot gives the DER of a current good response; nothing once it expired or for a revoked
    one; a must-staple slot without one raises SSL.Error (the handshake is refused)."""
    good = Verified(b"der", ocsp.OCSPCertStatus.GOOD, NOW, NOW + datetime.timedelta(hours=1))
    assert StapleSlot(False, good).answer(NOW) == b"der"
    assert StapleSlot(False, good).answer(NOW + datetime.timedelta(hours=2)) == b""
    revoked = Verified(b"der", ocsp.OCSPCertStatus.REVOKED, NOW, NOW + datetime.timedelta(hours=1))
    assert StapleSlot(False, revoked).answer(NOW) == b""
    with pytest.raises(SSL.Error):
        StapleSlot(True, None).answer(NOW)
