"""The quick-start configuration: TLS on a self-signed certificate created on first
start, the bundled demo chat upstream, and chat working through the proxy."""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path

from conftest import for_sync_websockets, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


def _quickstart(proxy, tmp_path):
    """Start twistd on etc/chatproxy.ini with only its two port numbers substituted."""
    text = (ROOT / "etc" / "chatproxy.ini").read_text()
    https_port, demo_port = free_port(), free_port()
    assert "8443" in text and "8081" in text
    text = text.replace("8443", str(https_port)).replace("8081", str(demo_port))
    process = proxy.start(text, port=https_port, workers=None)  # as shipped: one worker per CPU
    wait_for_port(demo_port)
    return process, https_port


def test_quickstart_creates_certificate_and_serves_the_demo_page(proxy, tmp_path):
    """First start creates a self-signed certificate beside the config, says where in the log,
    and serves the demo chat page over https through the proxy."""
    process, port = _quickstart(proxy, tmp_path)
    certificate = tmp_path / "tls" / "localhost.crt"
    key = tmp_path / "tls" / "localhost.key"
    assert certificate.is_file() and key.is_file()
    assert key.stat().st_mode & 0o077 == 0
    assert str(certificate) in process.output()
    context = ssl.create_default_context(cafile=str(certificate))
    with urllib.request.urlopen(f"https://localhost:{port}/", context=context, timeout=10) as response:
        page = response.read().decode()
    assert response.status == 200
    assert "chatproxy demo chat" in page
    with urllib.request.urlopen(f"https://localhost:{port}/whoami", context=context, timeout=10) as response:
        seen = json.loads(response.read())
    assert seen["headers"]["X-Forwarded-Proto"] == "https"


def test_quickstart_chat_messages_flow_over_wss_between_two_clients(proxy, tmp_path):
    """Two WebSocket clients on wss://localhost/chat through the proxy: a message from one
    reaches both (broadcast), unchanged."""
    from websockets.sync.client import connect

    _, port = _quickstart(proxy, tmp_path)
    context = for_sync_websockets(ssl.create_default_context(cafile=str(tmp_path / "tls" / "localhost.crt")))
    url = f"wss://localhost:{port}/chat"
    with connect(url, ssl=context, open_timeout=10) as alice, connect(url, ssl=context, open_timeout=10) as bob:
        message = json.dumps({"name": "alice", "text": "hello through the proxy ✓"})
        alice.send(message)
        assert alice.recv(timeout=10) == message
        assert bob.recv(timeout=10) == message
        bob.send(b"\x00\x01binary")
        assert alice.recv(timeout=10) == b"\x00\x01binary"


def test_quickstart_refuses_what_no_route_allows(proxy, tmp_path):
    """The quick-start route allows GET only: a POST gets 404 from the proxy itself."""
    _, port = _quickstart(proxy, tmp_path)
    context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "localhost.crt"))
    request = urllib.request.Request(f"https://localhost:{port}/", data=b"x", method="POST")
    try:
        urllib.request.urlopen(request, context=context, timeout=10)
    except urllib.error.HTTPError as error:
        assert error.code == 404
    else:
        raise AssertionError("POST was not refused")


def test_quickstart_log_is_one_line_per_listener_without_twisted_chatter(proxy, tmp_path):
    """The quick start's log, from start to stop with a HEAD and a GET served, says once per
    listener what serves where, and has none of Twisted's port/factory/protocol chatter, no
    worker repeating twistd's start lines, no private admin socket announced as [admin], and
    no "returning a message body" warning for HEAD (the demo answers HEAD without a body,
    with the page's Content-Length)."""
    process, port = _quickstart(proxy, tmp_path)
    context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "localhost.crt"))
    head = urllib.request.Request(f"https://localhost:{port}/", method="HEAD")
    with urllib.request.urlopen(head, context=context, timeout=10) as response:
        assert response.status == 200 and response.read() == b""
        assert int(response.headers["Content-Length"]) > 1000
    with urllib.request.urlopen(f"https://localhost:{port}/whoami", context=context, timeout=10) as response:
        assert response.status == 200
    assert process.stop() == 0
    log = process.output()
    assert log.count("listening on") == 2, log  # the TLS listener and the demo upstream
    assert log.count(f"[listen:public] listening on tcp:{port}:interface=127.0.0.1 with TLS") == 1, log
    for chatter in ("starting on", "Port", "Starting protocol", "Stopping protocol", "Starting factory",
                    "[admin]", "I think I'll eat it", "Traceback"):
        assert chatter not in log, (chatter, log)
    assert log.count("starting up.") == 1 and log.count("Server Shut Down.") == 1, log
