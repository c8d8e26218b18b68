"""ACME end to end against Pebble (Debian's ``pebble``, started by the test
on loopback with its mock DNS ``pebble-challtestsrv``): a real ``twistd``
orders its certificate on first start, answers the HTTP-01 challenges on its
plain listener (which redirects everything else to https), renews at two
thirds of the lifetime without dropping connections, keeps serving its
certificate when a renewal's validation fails; with workers the master alone
orders and the workers load the result.  Plus the renewal decisions."""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chatproxy.config import AcmeAccount, load_config
from chatproxy.process.renewal import Wanted, due, renew_at, retry_delay, wanted_certificates
from conftest import PKI, _issue, free_port, metric_samples, wait_for_port, wait_until
from test_tls import http_over

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")
needs_pebble = pytest.mark.skipif((PEBBLE is None or CHALLTESTSRV is None) and not os.environ.get("CI"),
                                  reason="Debian's pebble package is not installed")
NAME = "chat.chatproxy.test"


class Pebble:
    """Pebble and pebble-challtestsrv on loopback ports, certificates valid ``validity`` seconds."""

    def __init__(self, directory: Path, pki: PKI, http_port: int, validity: int) -> None:
        assert PEBBLE is not None and CHALLTESTSRV is not None, "Debian's pebble package is not installed"
        self.dir = directory
        self.pki = pki
        self.port, self.management, self.dns, self.dns_management = free_port(), free_port(), free_port(), free_port()
        cert, key = directory / "pebble.crt", directory / "pebble.key"
        _issue(pki.ca_certificate, pki.ca_private_key, "localhost", ["localhost", "127.0.0.1"], cert, key)
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": str(cert), "privateKey": str(key), "httpPort": http_port, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
            "certificateValidityPeriod": validity}}
        (directory / "pebble.json").write_text(json.dumps(config))
        self.processes: list[subprocess.Popen[bytes]] = []
        self._run([CHALLTESTSRV, "-management", f"127.0.0.1:{self.dns_management}", "-dns01",
                   f"127.0.0.1:{self.dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
                   "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""], "challtestsrv.log")
        wait_for_port(self.dns_management, process=self.processes[-1])
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        self._run([PEBBLE, "-config", str(directory / "pebble.json"), "-dnsserver", f"127.0.0.1:{self.dns}",
                   "-strict=false"], "pebble.log", env)
        wait_for_port(self.port, process=self.processes[-1])
        wait_for_port(self.management, process=self.processes[-1])

    def _run(self, args: list[str], log: str, env: dict[str, str] | None = None) -> None:
        with (self.dir / log).open("wb") as output:
            self.processes.append(subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT, env=env))

    @property
    def directory_url(self) -> str:
        """The ACME directory."""
        return f"https://127.0.0.1:{self.port}/dir"

    def roots(self) -> bytes:
        """Pebble's root certificate (PEM), which signs what it issues."""
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management}/roots/0", context=context,
                                    timeout=10) as response:
            return bytes(response.read())

    def point(self, host: str, address: str | None) -> None:
        """Make the mock DNS answer ``address`` for ``host`` (None: the default, 127.0.0.1)."""
        path, body = ("add-a", {"host": host + ".", "addresses": [address]}) if address else \
            ("clear-a", {"host": host + "."})
        request = urllib.request.Request(f"http://127.0.0.1:{self.dns_management}/{path}",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def stop(self) -> None:
        """Stop both (bounded)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)


@pytest.fixture
def pebble_factory(tmp_path: Path, pki: PKI) -> Iterator[Any]:
    """Starts Pebble (at most once per test) for a chatproxy plain listener port."""
    started: list[Pebble] = []

    def start(http_port: int, validity: int) -> Pebble:
        directory = tmp_path / "pebble"
        directory.mkdir()
        started.append(Pebble(directory, pki, http_port, validity))
        return started[-1]

    yield start
    for pebble in started:
        pebble.stop()


def _config(tmp_path: Path, pki: PKI, pebble: Pebble, http_port: int, tls_port: int, upstream_url: str,
            extra: str = "") -> str:
    return (
        f"[chatproxy]\naccess_log = off\nstate_directory = {tmp_path}/state\n{extra}\n"
        f"[listen:http]\nendpoint = tcp:{http_port}:interface=127.0.0.1\nredirect_to_https = yes\n"
        f"https_port = {tls_port}\n\n"
        f"[listen:main]\nendpoint = tcp:{tls_port}:interface=127.0.0.1\ntls = yes\n"
        f"certificate = tls/chat.crt\nkey = tls/chat.key\nacme = pebble\nacme_names = {NAME}\n\n"
        f"[acme:pebble]\ndirectory = {pebble.directory_url}\ncontact = ops@chatproxy.test\nca = {pki.ca}\n\n"
        f"[upstream:app]\nservers = {upstream_url}\n\n[route:all]\npath = /\nupstream = app\n"
    )


def _served(port: int, source: str = "127.0.0.1") -> x509.Certificate:
    """The certificate a TLS client gets for SNI chat.chatproxy.test."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as raw:
        with context.wrap_socket(raw, server_hostname=NAME) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)




def _issued_by_pebble(certificate: x509.Certificate) -> bool:
    return "Pebble" in certificate.issuer.rfc4514_string()


@needs_pebble
def test_first_start_issues_then_renews_and_a_failed_validation_keeps_the_certificate(
        proxy, upstream, pki, tmp_path, pebble_factory):
    """No certificate at first start: a self-signed stand-in serves while chatproxy orders one
    from Pebble, answering HTTP-01 on its plain listener; the key is written 0600 and the
    certificate, issued for chat.chatproxy.test, verifies against Pebble's root.  At two thirds
    of its 30 s lifetime it is renewed (a new serial) while a connection opened before stays
    usable.  When the next renewal's validation fails (the mock DNS sends Pebble elsewhere), the
    renewed certificate keeps serving and the failure is logged with the next try."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebble_factory(http_port, validity=30)
    process = proxy.start(_config(tmp_path, pki, pebble, http_port, tls_port, upstream.url), port=tls_port)
    first = wait_until(lambda: _issued_by_pebble(c := _served(tls_port)) and c, "the first certificate", 30)
    assert (tmp_path / "tls/chat.key").stat().st_mode & 0o777 == 0o600
    assert first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == [NAME]
    roots = tmp_path / "pebble-root.pem"
    roots.write_bytes(pebble.roots())
    verifying = ssl.create_default_context(cafile=str(roots))
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
        with verifying.wrap_socket(raw, server_hostname=NAME) as held:  # open across the renewal
            assert http_over(held, host=NAME)[0] == 200
            second = wait_until(lambda: (c := _served(tls_port)).serial_number != first.serial_number and c,
                                "the renewal", 40)
            assert _issued_by_pebble(second)
            assert http_over(held, host=NAME)[0] == 200
    pebble.point(NAME, "127.0.0.2")  # nothing answers HTTP-01 there
    wait_until(lambda: "validation failed" in process.output(), "the failed renewal", 40)
    assert "the certificate in place keeps serving; next try in" in process.output()
    assert _served(tls_port).serial_number == second.serial_number
    assert not list((tmp_path / "state/acme/challenges").glob("*"))


@needs_pebble
def test_with_workers_the_master_orders_and_every_worker_serves_it(proxy, upstream, pki, tmp_path, pebble_factory):
    """With workers = 2 the master orders the certificate once and the workers load it:
    clients from several addresses (reaching both workers) get Pebble's certificate, the
    master's log shows one order, and every worker reports its expiry in
    chatproxy_certificate_expiry_seconds; plain http is redirected to https."""
    http_port, tls_port, admin = free_port(), free_port(), free_port()
    pebble = pebble_factory(http_port, validity=3600)
    text = _config(tmp_path, pki, pebble, http_port, tls_port, upstream.url) + \
        f"\n[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n"
    process = proxy.start(text, port=tls_port, workers=2)
    wait_until(lambda: all(_issued_by_pebble(_served(tls_port, f"127.0.0.{n}")) for n in range(2, 10)),
               "every worker's certificate", 40)
    assert process.output().count("ACME: ordering a certificate for [listen:main]") == 1
    expiry = [(labels, value) for labels, value in metric_samples(admin, "chatproxy_certificate_expiry_seconds")
              if labels["listener"] == "main"]
    assert {labels["worker"] for labels, _ in expiry} == {"1", "2"}
    assert all(3000 < value <= 3600 for _, value in expiry), expiry
    redirect = subprocess.run(["curl", "-sS", "-o", os.devnull, "-w", "%{http_code} %{redirect_url}",
                               f"http://127.0.0.1:{http_port}/chat?x=1", "-H", f"Host: {NAME}"],
                              capture_output=True, text=True, timeout=30)
    assert redirect.stdout == f"301 https://{NAME}:{tls_port}/chat?x=1", redirect


# ---------------------------------------------------------------------------
# Decisions


def _certificate(not_before: datetime.datetime, days: float, names: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(not_before).not_valid_after(not_before + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))


def test_renewal_is_due_at_two_thirds_of_the_lifetime_with_jitter():
    """A 90-day certificate renews between day 57 and day 60 (2/3 less up to 1/30)."""
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    certificate = _certificate(start, 90, ["a.example.test"])
    for seed in range(20):
        when = renew_at(certificate, random.Random(seed))
        assert start + datetime.timedelta(days=57) <= when <= start + datetime.timedelta(days=60)


def test_due_says_why_an_order_is_needed(tmp_path):
    """Missing files, a certificate that lacks a name, and a lapsed renewal time each need an
    order; a fresh certificate covering the names gives the time to renew instead."""
    account = AcmeAccount("ca", "https://ca.example.test/dir", "f")
    wanted = Wanted("[listen:x]", account, ("a.example.test",), tmp_path / "c.crt", tmp_path / "c.key")
    now = datetime.datetime.now(datetime.timezone.utc)
    assert due(wanted, now, random.Random(0))[0] == "no certificate yet"
    (tmp_path / "c.key").write_text("key")
    fresh = _certificate(now - datetime.timedelta(days=1), 90, ["a.example.test"])
    (tmp_path / "c.crt").write_bytes(fresh.public_bytes(serialization.Encoding.PEM))
    reason, when = due(wanted, now, random.Random(0))
    assert reason is None and when is not None and when > now
    other = _certificate(now - datetime.timedelta(days=1), 90, ["b.example.test"])
    (tmp_path / "c.crt").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    assert "does not cover a.example.test" in (due(wanted, now, random.Random(0))[0] or "")
    old = _certificate(now - datetime.timedelta(days=80), 90, ["a.example.test"])
    (tmp_path / "c.crt").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    assert "renewal due" in (due(wanted, now, random.Random(0))[0] or "")


def test_retries_back_off_up_to_six_hours():
    """A failed order is tried again after about 1, 2, 4 ... minutes, at most 6 hours."""
    assert [round(retry_delay(n, random.Random(0)) / 60) for n in (1, 2, 3)] == [1, 2, 4]
    assert retry_delay(20, random.Random(0)) <= 6 * 3600


def test_the_listener_and_sni_certificates_acme_keeps(tmp_path, pki):
    """A listener's acme/acme_names and an sni line ending in acme:NAME are each a wanted
    certificate of that account, the files not existing yet."""
    path = tmp_path / "c.ini"
    path.write_text(
        "[listen:http]\nendpoint = tcp:8080:interface=127.0.0.1\nredirect_to_https = yes\n\n"
        "[listen:main]\nendpoint = tcp:8443:interface=127.0.0.1\ntls = yes\ncertificate = a.crt\nkey = a.key\n"
        "acme = ca\nacme_names = a.example.test, www.a.example.test\n"
        "sni = b.example.test: b.crt b.key acme:ca\n\n"
        "[acme:ca]\ndirectory = https://ca.example.test/dir\ncontact = mailto:ops@example.test\n\n"
        "[upstream:app]\nservers = http://127.0.0.1:9\n\n[route:all]\nupstream = app\n")
    wanted = wanted_certificates(load_config([path]))
    assert [(w.label, w.names, w.certificate.name) for w in wanted] == [
        ("[listen:main]", ("a.example.test", "www.a.example.test"), "a.crt"),
        ("[listen:main] sni b.example.test", ("b.example.test",), "b.crt")]
    assert wanted[0].account.contact == ("mailto:ops@example.test",)
