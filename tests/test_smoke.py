"""End-to-end smoke tests: a real twistd process between real clients and a real upstream."""

from __future__ import annotations

import http.client
import json

from conftest import basic_config, free_port


def test_plain_request_reaches_upstream_with_forwarding_headers(proxy, upstream):
    """A GET through chatproxy reaches the upstream with X-Forwarded-* and Via, and the
    response comes back without the upstream's hop-by-hop headers."""
    port = free_port()
    proxy.start(basic_config(upstream.url, port), port=port)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/echo?a=1&b=%20x", headers={"X-Custom": "kept"})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 200
    assert response.getheader("X-Upstream") == "recording"
    assert response.getheader("X-Hop") is None
    assert response.getheader("Keep-Alive") is None
    headers = {k.lower(): v for k, v in body["headers"]}
    assert body["path"] == "/echo?a=1&b=%20x"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-port"] == str(port)
    assert headers["x-custom"] == "kept"
    assert headers["via"] == "1.1 chatproxy"


def test_https_listener_sends_forwarded_proto_https(proxy, upstream, pki):
    """TLS ends at chatproxy: the upstream sees X-Forwarded-Proto: https."""
    port = free_port()
    proxy.start(basic_config(upstream.url, port, tls=pki), port=port)
    conn = http.client.HTTPSConnection("localhost", port, timeout=10, context=pki.client_context())
    conn.request("GET", "/echo")
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 200
    assert dict((k.lower(), v) for k, v in body["headers"])["x-forwarded-proto"] == "https"


def test_haproxy_endpoint_uses_the_address_from_the_proxy_header(proxy, upstream):
    """Behind a load balancer speaking the PROXY protocol (a `haproxy:` endpoint), the client
    address forwarded upstream is the one from the PROXY header, not the balancer's."""
    import socket

    port = free_port()
    text = basic_config(upstream.url, port).replace(f"endpoint = tcp:{port}", f"endpoint = haproxy:tcp:{port}")
    proxy.start(text, port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"PROXY TCP4 203.0.113.9 127.0.0.1 40000 {port}\r\n".encode()
                     + b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert headers["x-forwarded-for"] == "203.0.113.9"
