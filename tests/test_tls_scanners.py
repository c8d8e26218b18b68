"""What operators' TLS scanners say of a listener with a CA-signed
certificate as shipped (no TLS option set): sslyze's check against Mozilla's
intermediate profile (and modern, with ``tls_profile = modern``), and
testssl.sh's findings, OCSP stapling from a local ``openssl ocsp`` responder
included.  sslyze runs from its own virtual environment (``.venv-sslyze``,
made by ``.ci/run``; it pins an older ``cryptography``), testssl.sh is
Debian's; both only on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import free_port, wait_until
from test_ocsp import OCSPPKI, Responder, _stapled_good
from test_tls import make_config
from test_tls_resumption import _s_client

ROOT = Path(__file__).resolve().parent.parent
SSLYZE = os.environ.get("CHATPROXY_SSLYZE") or next(
    (str(p) for p in (ROOT / ".venv-sslyze/bin/sslyze",) if p.exists()), None) or shutil.which("sslyze")
TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")
needs_sslyze = pytest.mark.skipif(SSLYZE is None and not os.environ.get("CI"),
                                  reason="sslyze is not installed (python3 -m venv .venv-sslyze && "
                                         ".venv-sslyze/bin/pip install sslyze)")
needs_testssl = pytest.mark.skipif(TESTSSL is None and not os.environ.get("CI"),
                                   reason="Debian's testssl.sh is not installed")
HOST = "scan.ocsp.test"


@pytest.fixture
def scanned(proxy, upstream, tmp_path: Path):
    """A listener as shipped (HSTS as the vendor profiles set it) with a certificate from a
    test CA that names a running local OCSP responder: its port and the PKI, once stapling."""
    (tmp_path / "ca").mkdir()
    pki = OCSPPKI(tmp_path / "ca", free_port())
    pki.issue("scan", staple=False, days=80, names=("localhost",))
    responder = Responder(pki)
    responder.start()
    port = free_port()
    listener = (f"tls = yes\ncertificate = {pki.dir}/scan.crt\nkey = {pki.dir}/scan.key\n"
                "response_headers =\n    Strict-Transport-Security: max-age=63072000\n")
    proxy.start(make_config(port, upstream.url, listener=listener), port=port)
    wait_until(lambda: _stapled_good(port, "scan", pki), "the OCSP staple")
    yield port, pki
    responder.stop()


def _sslyze(port: int, pki: OCSPPKI, profile: str) -> subprocess.CompletedProcess[str]:
    assert SSLYZE is not None, "sslyze is not installed (.ci/run makes .venv-sslyze)"
    return subprocess.run([SSLYZE, f"--mozilla_config={profile}", f"--certinfo_ca_file={pki.ca}",
                           f"{HOST}:{port}{{127.0.0.1}}"], capture_output=True, text=True, timeout=300)


@needs_sslyze
def test_sslyze_finds_the_default_listener_compliant_with_mozilla_intermediate(scanned):
    """``sslyze --mozilla_config=intermediate`` reports the listener compliant (versions,
    suites, groups -- X25519, secp256r1, secp384r1 only -- certificate, vulnerabilities)."""
    port, pki = scanned
    result = _sslyze(port, pki, "intermediate")
    assert "OK - Compliant" in result.stdout, result.stdout[-3000:]
    assert result.returncode == 0
    assert "Supported curves:                  X25519, secp256r1, secp384r1" in result.stdout


@needs_sslyze
def test_sslyze_finds_the_modern_profile_compliant_with_mozilla_modern(proxy, upstream, tmp_path):
    """``tls_profile = modern`` passes ``sslyze --mozilla_config=modern`` (TLS 1.3 only)."""
    (tmp_path / "ca").mkdir()
    pki = OCSPPKI(tmp_path / "ca", free_port())
    pki.issue("scan", staple=False, days=80)
    port = free_port()
    proxy.start(make_config(port, upstream.url, listener=(
        f"tls = yes\ncertificate = {pki.dir}/scan.crt\nkey = {pki.dir}/scan.key\ntls_profile = modern\n"
        "ocsp_stapling = no\n")), port=port)
    result = _sslyze(port, pki, "modern")
    assert "OK - Compliant" in result.stdout, result.stdout[-3000:]


def _resumes_by_session_id(port: int, pki: OCSPPKI, tmp_path: Path) -> bool:
    """testssl's probe for resumption by ID (TLS 1.3, no ticket extension, the saved session
    offered again), with the first connection kept open for a request so that the server's
    session message arrives.  testssl's own ``s_client`` reads /dev/null and quits right after
    the handshake: it saves a session only when the server's NewSessionTicket beats that
    (against chatproxy about one run in four on an idle machine, against nginx never), and
    testssl then reports "not supported"."""
    session = tmp_path / "id-session.pem"
    _s_client(port, "-tls1_3", pki, "-no_ticket", "-sess_out", str(session))
    return "Reused, " in _s_client(port, "-tls1_3", pki, "-no_ticket", "-sess_in", str(session))


@needs_testssl
def test_testssl_finds_nothing_high_and_sees_the_staple(scanned, tmp_path):
    """testssl.sh (protocols, ciphers, forward secrecy, server preferences and defaults,
    vulnerabilities, headers) finds nothing of severity HIGH or CRITICAL; it sees TLS 1.2 and
    1.3 only, the server's cipher order, the groups X25519, P-256 and P-384, OCSP stapling,
    session resumption by ID, and HSTS."""
    port, pki = scanned
    assert TESTSSL is not None
    report = tmp_path / "testssl.json"
    result = subprocess.run([TESTSSL, "--warnings", "batch", "--color", "0", "--quiet", "--add-ca", str(pki.ca),
                             "--ip", "127.0.0.1", "--jsonfile", str(report), f"https://{HOST}:{port}/echo"],
                            capture_output=True, text=True, timeout=900)
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    findings = {item["id"]: item for item in json.loads(report.read_text())}
    bad = [item for item in findings.values() if item["severity"] in ("HIGH", "CRITICAL")]
    assert bad == [], bad
    assert findings["TLS1"]["finding"] == "not offered" and findings["TLS1_1"]["finding"] == "not offered"
    assert findings["TLS1_3"]["finding"].startswith("offered")
    assert findings["cipher_order"]["severity"] == "OK", findings["cipher_order"]
    assert sorted(findings["PFS_ECDHE_curves"]["finding"].split()) == ["X25519", "prime256v1", "secp384r1"]
    assert findings["OCSP_stapling"]["finding"].startswith("offered"), findings["OCSP_stapling"]
    by_id = findings["sessionresumption_ID"]
    assert by_id["finding"].startswith("supported") or (
        by_id["finding"] == "not supported" and _resumes_by_session_id(port, pki, tmp_path)), by_id
    assert findings["HSTS_time"]["severity"] == "OK", findings["HSTS_time"]
