"""The status page of a real ``twistd -n chatproxy`` with live traffic (HTTP requests, a
filter's refusal, an open WebSocket session through a bridge route), one process and a
master with two workers; seen with http.client and with headless Chromium; its
protection ([admin] allow, basic auth with a hash from ``python -m chatproxy
hash-password``).  Loopback only; every wait is bounded."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import free_port, wait_for_port, wait_until
from test_browser import Browsers, browsers  # noqa: F401  (the fixture, reused)
from test_filters_basic import WsUpstream

SECRET = "s3cr3t-t0ken-value"


@pytest.fixture
def ws_upstream() -> Iterator[WsUpstream]:
    """A WebSocket echo upstream on 127.0.0.1."""
    server = WsUpstream()
    yield server
    server.stop()


def _config(port: int, admin: int, app_url: str, ws_port: int, dead: int, admin_extra: str = "",
            tls: str = "") -> str:
    return (
        "[chatproxy]\naccess_log = off\n"
        f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n{tls}"
        f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n{admin_extra}"
        f"[upstream:app]\nservers = {app_url}\nhealth_check_path = /echo/health\nhealth_check_interval = 1\n"
        f"health_check_timeout = 1\n"
        f"[upstream:ws]\nservers = http://127.0.0.1:{ws_port}\n"
        f"[upstream:dead]\nservers = http://127.0.0.1:{dead}\nhealth_check_path = /h\nhealth_check_interval = 1\n"
        "health_check_timeout = 1\nunhealthy_threshold = 1\nconnect_timeout = 1\n"
        "[filter:only-get]\nuse = request_limits\nmethods = GET\n"
        "[route:api-route]\npath = /api\nupstream = app\nfilters = only-get\n"
        "[route:chat-route]\npath = /chat\nupstream = ws\nwebsocket = yes\n"
        "[route:dead-route]\npath = /dead\nupstream = dead\n"
    )


def _get(port: int, path: str, headers: dict[str, str] | None = None,
         source: str | None = None) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        conn.close()


def _traffic(port: int) -> None:
    """Two proxied GETs, and a POST the only-get filter refuses, carrying a token in its
    query string and an Authorization header."""
    for _ in range(2):
        assert _get(port, "/api/items")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", f"/api/login?token={SECRET}", body=b"x",
                 headers={"Authorization": f"Bearer {SECRET}", "Cookie": f"session={SECRET}"})
    assert conn.getresponse().status == 405
    conn.close()


def _facts(admin: int, **headers: str) -> dict[str, Any]:
    status, _, body = _get(admin, "/status.json", headers)
    assert status == 200, body
    facts: dict[str, Any] = json.loads(body)
    return facts


def _settled(admin: int, workers: int) -> dict[str, Any]:
    """Wait until the status shows the open session, the refusal, and both upstreams' health."""
    def ready() -> dict[str, Any] | None:
        facts = _facts(admin)
        servers = facts["servers"]
        ok = (facts["processes"] == workers and facts["sessions"].get("chat-route") == 1 and facts["refusals"]
              and all(s["healthy"] == workers for s in servers["app"].values())
              and all(s["failing_checks"] == workers for s in servers["dead"].values()))
        return facts if ok else None
    return wait_until(ready, "the status to show the session, the refusal and the upstreams' health")


def _check_page(page: str, facts: dict[str, Any], dead: int, workers: int) -> None:
    assert '<meta http-equiv="refresh"' in page and "<script" not in page
    for fact in ("api-route", "chat-route", "dead-route", "only-get", "bridge", "chatproxy.ini",
                 "passing /echo/health", "failing /h", f"http://127.0.0.1:{dead}", "unhealthy",
                 "method POST not allowed here", "/api/login", "405"):
        assert fact in page, fact
    assert SECRET not in page and "token=" not in page and "Bearer" not in page
    assert SECRET not in json.dumps(facts)
    [refusal] = facts["refusals"]
    assert (refusal["route"], refusal["filter"], refusal["method"], refusal["path"], refusal["status"],
            refusal["client"]) == ("api-route", "only-get", "POST", "/api/login", 405, "127.0.0.1")
    assert facts["windows"][0]["counts"]["status:2xx"] >= 2
    assert facts["totals"]["refused:only-get"] == 1
    # The route's row: one open WebSocket session.
    assert '<td>chat-route</td><td>path /chat</td><td>-</td><td>ws</td><td>bridge</td><td class="n">1</td>' in page
    if workers > 1:
        assert facts["workers"]["configured"] == workers and facts["workers"]["answering"] == workers
        assert f"a master and {workers} workers" in page
    else:
        assert facts["workers"] is None and "one process" in page


@pytest.mark.parametrize("workers", [1, 2])
def test_status_page_shows_live_traffic(proxy, upstream, ws_upstream, pki, workers):
    """Through twistd (workers = 1, and a master with 2 workers): after GETs, a refused POST
    carrying a secret token (query string, Authorization, Cookie) and with a WebSocket session
    open through the bridge route, /status shows the routes, the filter, the upstreams' health
    (active checks passing and failing), the one open session, and the refusal with its reason
    and path but none of the secret, and the TLS listener's certificate with its expiry;
    / redirects to /status."""
    from websockets.sync.client import connect

    port, admin, dead, secure = free_port(), free_port(), free_port(), free_port()
    tls = f"[listen:secure]\nendpoint = tcp:{secure}:interface=127.0.0.1\ntls = yes\ncertificate = {pki.cert}\n" \
          f"key = {pki.key}\n"
    proxy.start(_config(port, admin, upstream.url, ws_upstream.port, dead, tls=tls), port=port, workers=workers)
    wait_for_port(admin)
    _traffic(port)
    with connect(f"ws://127.0.0.1:{port}/chat", open_timeout=10, close_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        facts = _settled(admin, workers)
        status, headers, page = _get(admin, "/status")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in headers["content-security-policy"]
        _check_page(page, facts, dead, workers)
        [certificate] = facts["certificates"]
        assert (certificate["listener"], certificate["name"], certificate["file"]) == ("secure", "default",
                                                                                      str(pki.cert))
        assert str(pki.cert) in page and "days" in page and "<td>TLS</td>" in page
    status, headers, _ = _get(admin, "/")
    assert status in (301, 302) and headers["location"].endswith("/status")


def test_status_page_in_headless_chromium(proxy, upstream, ws_upstream, browsers, tmp_path):  # noqa: F811
    """Headless Chromium loads /status of a master with 2 workers: the page's text as the
    browser renders it names the routes and the filter, and its screenshot is a real PNG
    of a page with content (saved under the test's tmp dir)."""
    port, admin, dead = free_port(), free_port(), free_port()
    proxy.start(_config(port, admin, upstream.url, ws_upstream.port, dead), port=port, workers=2)
    wait_for_port(admin)
    _traffic(port)
    driver = browsers.open("ops", None)
    with browsers.screenshots_on_failure():
        driver.get(f"http://127.0.0.1:{admin}/status")
        assert driver.title == "chatproxy status"
        from selenium.webdriver.common.by import By

        text = driver.find_element(By.TAG_NAME, "body").text
        for name in ("api-route", "chat-route", "dead-route", "only-get", "method POST not allowed here"):
            assert name in text, name
        assert SECRET not in text
        png = driver.get_screenshot_as_png()
    path = tmp_path / "status.png"
    path.write_bytes(png)
    width, height, pixels = _png_pixels(png)
    assert width >= 800 and height >= 600
    assert len(set(pixels)) > 16, "the screenshot is (nearly) blank"


def _png_pixels(png: bytes) -> tuple[int, int, bytes]:
    """Width, height and the decompressed image data of a PNG (checking its signature)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    data, offset = b"", 8
    while offset < len(png):
        length, kind = struct.unpack(">I4s", png[offset:offset + 8])
        if kind == b"IDAT":
            data += png[offset + 8:offset + 8 + length]
        offset += 12 + length
    return width, height, zlib.decompress(data)


def _hash(password: str) -> str:
    """The hash ``python -m chatproxy hash-password`` prints for ``password`` given on stdin."""
    done = subprocess.run([sys.executable, "-m", "chatproxy", "hash-password"], input=password + "\n",
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("workers", [1, 2])
def test_basic_auth_guards_status_and_metrics(proxy, upstream, ws_upstream, workers):
    """With [admin] user and a password_hash made by the hash-password command: /status,
    /status.json and /metrics answer 401 with WWW-Authenticate: Basic realm="chatproxy"
    without or with wrong credentials, 200 with the right ones; /healthz and /readyz stay open."""
    port, admin, dead = free_port(), free_port(), free_port()
    made = _hash("correct horse battery")
    assert made.startswith("scrypt$")
    proxy.start(_config(port, admin, upstream.url, ws_upstream.port, dead,
                        f"user = ops\npassword_hash = {made}\n"), port=port, workers=workers)
    wait_for_port(admin)
    for path in ("/status", "/status.json", "/metrics"):
        for headers in ({}, {"Authorization": _basic("ops", "wrong")},
                        {"Authorization": _basic("root", "correct horse battery")}):
            status, answer_headers, _ = _get(admin, path, headers)
            assert status == 401, (path, headers)
            assert answer_headers["www-authenticate"].startswith('Basic realm="chatproxy"')
        status, _, body = _get(admin, path, {"Authorization": _basic("ops", "correct horse battery")})
        assert status == 200, (path, body)
    assert _get(admin, "/healthz")[0] == 200
    assert _get(admin, "/readyz")[0] in (200, 503)  # open: the dead upstream may make it 503


def test_allow_refuses_other_addresses(proxy, upstream, ws_upstream):
    """[admin] allow = 127.0.0.2/32: a client connecting from 127.0.0.1 gets 403 on /status
    and /metrics but /healthz answers; from 127.0.0.2 /status answers."""
    port, admin, dead = free_port(), free_port(), free_port()
    proxy.start(_config(port, admin, upstream.url, ws_upstream.port, dead, "allow = 127.0.0.2/32\n"), port=port)
    wait_for_port(admin)
    assert _get(admin, "/status", source="127.0.0.1")[0] == 403
    assert _get(admin, "/metrics", source="127.0.0.1")[0] == 403
    assert _get(admin, "/healthz", source="127.0.0.1")[0] == 200
    assert _get(admin, "/status", source="127.0.0.2")[0] == 200
