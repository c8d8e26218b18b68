"""Plain listeners that answer themselves: ``redirect_to_https = yes`` sends
every request to the same host and target on https (301 for GET and HEAD,
308 for the other methods), and ACME HTTP-01 challenges are answered from
the challenge directory.  ``curl`` against a real ``twistd``, plus unit
tests of the decision and the configuration errors."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from chatproxy.config import ConfigError, Listener, load_config
from chatproxy.http.messages import RequestHead
from chatproxy.proxy.plain import https_location, plain_answer
from conftest import free_port

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="the curl command is not installed")


def _head(target: str = "/a/b?c=d", method: str = "GET", host: str = "chat.example.test") -> RequestHead:
    path, _, query = target.partition("?")
    return RequestHead(method, target, path, query, "1.1", (), host, host, "192.0.2.1", "192.0.2.1", False, "http")


REDIRECTING = Listener("http", "tcp:80", "f", redirect_to_https=True)


def test_get_and_head_get_301_other_methods_308_to_the_same_host_and_target():
    """GET and HEAD are answered 301, POST and DELETE 308, with Location https://HOST/TARGET."""
    for method, status in (("GET", 301), ("HEAD", 301), ("POST", 308), ("DELETE", 308)):
        answer = plain_answer(REDIRECTING, _head(method=method), None)
        assert answer is not None and answer.status == status
        assert (b"Location", b"https://chat.example.test/a/b?c=d") in answer.headers


def test_location_port_ipv6_and_absolute_form():
    """A non-443 https_port is written out, an IPv6 host gets brackets, an absolute-form
    target gives its path and query; no host: no location."""
    assert https_location(_head(), 8443) == "https://chat.example.test:8443/a/b?c=d"
    assert https_location(_head(host="2001:db8::1"), 443) == "https://[2001:db8::1]/a/b?c=d"
    absolute = RequestHead("GET", "http://chat.example.test/x?y", "/x", "y", "1.1", (), "chat.example.test",
                           "chat.example.test", "c", "c", False, "http")
    assert https_location(absolute, 443) == "https://chat.example.test/x?y"
    assert https_location(_head(host=""), 443) is None
    missing = plain_answer(REDIRECTING, _head(host=""), None)
    assert missing is not None and missing.status == 400


def test_acme_challenges_are_answered_before_the_redirect():
    """With ACME configured, a known token gets its key authorization (200), an unknown or
    malformed one 404; a listener without redirect routes everything else (None)."""
    tokens = {"tok_en-1": b"tok_en-1.thumb"}
    known = plain_answer(REDIRECTING, _head("/.well-known/acme-challenge/tok_en-1"), tokens.get)
    assert known is not None and (known.status, known.body) == (200, b"tok_en-1.thumb")
    for target in ("/.well-known/acme-challenge/other", "/.well-known/acme-challenge/a.b"):
        unknown = plain_answer(REDIRECTING, _head(target), tokens.get)
        assert unknown is not None and unknown.status == 404
    plain = Listener("http", "tcp:80", "f")
    assert plain_answer(plain, _head("/.well-known/acme-challenge/tok_en-1"), tokens.get).status == 200
    assert plain_answer(plain, _head(), tokens.get) is None
    assert plain_answer(REDIRECTING, _head("/.well-known/acme-challenge/tok_en-1"), None).status == 301


@pytest.mark.parametrize(("listener", "route", "option", "fragment"), [
    ("tls = yes\nredirect_to_https = yes\n", "", "redirect_to_https", "only meaningful with tls = no"),
    ("https_port = 8443\n", "", "https_port", "only meaningful with redirect_to_https = yes"),
    ("redirect_to_https = yes\nhttps_port = 70000\n", "", "https_port", "1-65535"),
    ("redirect_to_https = yes\n", "listeners = main\n", "listeners", "serves no route"),
])
def test_redirect_options_errors_name_the_option(tmp_path: Path, pki, listener, route, option, fragment):
    """Redirect options on a TLS listener, https_port without redirect_to_https, a port out of
    range, and a route naming a redirecting listener are errors naming the option."""
    tls = f"certificate = {pki.cert}\nkey = {pki.key}\n" if "tls = yes" in listener else ""
    path = tmp_path / "c.ini"
    path.write_text(f"[listen:main]\nendpoint = tcp:8080:interface=127.0.0.1\n{listener}{tls}\n"
                    f"[upstream:app]\nservers = http://127.0.0.1:9\n\n[route:all]\nupstream = app\n{route}")
    with pytest.raises(ConfigError) as info:
        load_config([path])
    assert info.value.option == option and fragment in str(info.value), str(info.value)


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
                           "%{http_code} %{redirect_url}", *args], capture_output=True, text=True, timeout=30)


@needs_curl
def test_curl_is_redirected_and_challenges_are_served(proxy, upstream, tmp_path):
    """curl gets 301 for GET (and follows it to the https port's address, here refused), 308 for
    POST with its body, the listener's response_headers on the redirect, and a challenge file's
    content at /.well-known/acme-challenge/TOKEN while an [acme:NAME] section exists."""
    port, https_port = free_port(), free_port()
    text = (f"[chatproxy]\naccess_log = off\nstate_directory = {tmp_path}/state\n\n"
            f"[listen:http]\nendpoint = tcp:{port}:interface=127.0.0.1\nredirect_to_https = yes\n"
            f"https_port = {https_port}\nresponse_headers =\n    X-Test: yes\n\n"
            f"[acme:ca]\ndirectory = https://127.0.0.1:9/dir\n\n"
            f"[upstream:app]\nservers = {upstream.url}\n\n[route:all]\nupstream = app\n")
    proxy.start(text, port=port)
    assert _curl(f"http://127.0.0.1:{port}/chat/x?y=1", "-H", "Host: chat.example.test:80").stdout == \
        f"301 https://chat.example.test:{https_port}/chat/x?y=1"
    assert _curl("-X", "POST", "--data", "a=1", f"http://127.0.0.1:{port}/api",
                 "-H", "Host: chat.example.test").stdout == f"308 https://chat.example.test:{https_port}/api"
    headers = subprocess.run([CURL, "-sS", "-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{port}/"],
                             capture_output=True, text=True, timeout=30).stdout
    assert "X-Test: yes" in headers and "Location: https://127.0.0.1:" in headers, headers
    challenges = tmp_path / "state/acme/challenges"
    challenges.mkdir(parents=True)
    (challenges / "abc_DEF-123").write_bytes(b"abc_DEF-123.key-authorization")
    served = subprocess.run([CURL, "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/.well-known/acme-challenge/abc_DEF-123"],
                            capture_output=True, text=True, timeout=30)
    assert served.stdout == "abc_DEF-123.key-authorization"
    assert _curl(f"http://127.0.0.1:{port}/.well-known/acme-challenge/nope").stdout.startswith("404")
    assert upstream.requests == []


def test_http10_without_host_gets_400(proxy, upstream, tmp_path):
    """An HTTP/1.0 request without Host cannot be redirected: 400."""
    port = free_port()
    proxy.start(f"[chatproxy]\naccess_log = off\n\n[listen:http]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
                f"redirect_to_https = yes\n\n[upstream:app]\nservers = {upstream.url}\n\n"
                "[route:all]\nupstream = app\n", port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer
