"""The built-in filter kinds ``ip_allowlist``, ``origin``, ``request_limits`` and
``headers``: their decisions on constructed request heads, their build-time
option errors (directly and through the configuration loader), and each of them
in a real ``twistd -n chatproxy`` process with real clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chatproxy.config import ConfigError, load_config
from chatproxy.proxy.validate import validate
from chatproxy.filters import FilterOptionError, IFilterFactory, IRequestFilter, Refuse, Rewrite, installed_filter_kinds
from chatproxy.filters.chain import apply_rewrite
from chatproxy.filters.headers import headers as headers_kind
from chatproxy.filters.ip_allowlist import ip_allowlist as ip_allowlist_kind
from chatproxy.filters.origin import origin as origin_kind
from chatproxy.filters.request_limits import request_limits as request_limits_kind
from chatproxy.http.messages import RequestHead
from chatproxy.testing import request_head
from conftest import free_port, wait_for_port
from test_http_proxy import RawClient, request_bytes, upstream_header_values, upstream_headers

KINDS = {"ip_allowlist": ip_allowlist_kind, "origin": origin_kind, "request_limits": request_limits_kind,
         "headers": headers_kind}


def make_head(method: str = "GET", headers: list[tuple[str, str]] | None = None, client: str = "192.0.2.10",
              path: str = "/chat") -> RequestHead:
    """A request head as the proxy would build it (Host added if not given)."""
    return request_head(path, method=method, headers=headers or [], client=client)


def status(decision: Any) -> int | None:
    """The status of a Refuse, None for a pass."""
    if decision is None:
        return None
    assert isinstance(decision, Refuse), decision
    return decision.status


# ---------------------------------------------------------------------------
# Registration


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kinds_are_installed_plugins(name):
    """Each kind is found by twisted.plugin's getPlugins under its name, provides
    IFilterFactory, and builds objects providing IRequestFilter."""
    kinds = installed_filter_kinds()
    assert name in kinds
    assert IFilterFactory.providedBy(kinds[name])
    options = {"ip_allowlist": {"allow": "10.0.0.0/8"}, "origin": {"allow": "https://a.example"},
               "request_limits": {"methods": "GET"}, "headers": {"request_remove": "X-Debug"}}[name]
    assert IRequestFilter.providedBy(kinds[name].build(options))


# ---------------------------------------------------------------------------
# ip_allowlist


IP_CASES = [
    # (options, client, expected status)
    ({"allow": "10.0.0.0/8"}, "10.1.2.3", None),
    ({"allow": "10.0.0.0/8"}, "11.1.2.3", 403),
    ({"allow": "10.0.0.0/8, 192.0.2.7"}, "192.0.2.7", None),
    ({"allow": "10.0.0.0/8, 192.0.2.7"}, "192.0.2.8", 403),
    ({"allow": "10.0.0.0/8"}, "::ffff:10.9.9.9", None),  # IPv4-mapped IPv6 is the IPv4 address
    ({"allow": "::ffff:10.0.0.0/104"}, "10.9.9.9", None),  # a mapped network is the IPv4 network
    ({"allow": "2001:db8::/32"}, "2001:db8::1", None),
    ({"allow": "2001:db8::/32"}, "2001:db9::1", 403),
    ({"allow": "2001:db8::/32"}, "10.0.0.1", 403),
    ({"deny": "203.0.113.0/24"}, "203.0.113.5", 403),
    ({"deny": "203.0.113.0/24"}, "198.51.100.5", None),  # only deny: everything else passes
    ({"deny": "203.0.113.0/24"}, "2001:db8::1", None),
    ({"allow": "10.0.0.0/8", "deny": "10.66.0.0/16"}, "10.66.1.1", 403),  # deny wins over allow
    ({"allow": "10.0.0.0/8", "deny": "10.66.0.0/16"}, "10.67.1.1", None),
    ({"allow": "10.0.0.0/8", "deny": "10.66.0.0/16"}, "192.0.2.1", 403),
    ({"allow": "10.66.0.0/16", "deny": "10.0.0.0/8"}, "10.66.1.1", 403),  # deny wins even when narrower allow
    ({"allow": "0.0.0.0/0, ::/0"}, "unix", 403),  # not an IP address: in no network
    ({"deny": "0.0.0.0/0"}, "unix", None),
]


@pytest.mark.parametrize("options, client, expected", IP_CASES)
def test_ip_allowlist_decisions(options, client, expected):
    """The client address (RequestHead.client) is checked against deny first, then allow."""
    decision = ip_allowlist_kind.build(options).request(make_head(client=client))
    assert status(decision) == expected
    if expected:
        assert client in decision.reason


def test_ip_allowlist_ignores_forwarding_headers():
    """X-Forwarded-For in the head does not count: only head.client (resolved by the listener) does."""
    flt = ip_allowlist_kind.build({"allow": "10.0.0.0/8"})
    head = make_head(client="192.0.2.1", headers=[("X-Forwarded-For", "10.1.1.1"), ("X-Real-IP", "10.1.1.1")])
    assert status(flt.request(head)) == 403


IP_OPTION_ERRORS = [
    ({}, None, "needs allow, deny or both"),
    ({"allow": "10.0.0.0/33"}, "allow", "not an IP address or network"),
    ({"allow": "example.com"}, "allow", "not an IP address or network"),
    ({"deny": ""}, "deny", "at least one network"),
    ({"allow": "10.0.0.0/8", "allowed": "1.2.3.4"}, "allowed", "unknown option (ip_allowlist takes: allow, deny)"),
]


@pytest.mark.parametrize("options, option, message", IP_OPTION_ERRORS)
def test_ip_allowlist_option_errors(options, option, message):
    """Bad options raise FilterOptionError naming the option (None: the section as a whole)."""
    with pytest.raises(FilterOptionError) as info:
        ip_allowlist_kind.build(options)
    assert info.value.option == option
    assert message in info.value.message


# ---------------------------------------------------------------------------
# origin


ORIGIN_ALLOW = "https://www.example.com, https://*.example.net, http://localhost:8080, https://[2001:db8::1]:8443"

ORIGIN_CASES = [
    # (headers, expected status)
    ([("Origin", "https://www.example.com")], None),
    ([("Origin", "HTTPS://WWW.Example.COM")], None),  # scheme and host compared case-insensitively
    ([("Origin", "https://www.example.com:443")], None),  # the default port is the same origin
    ([("Origin", "https://www.example.com:8443")], 403),  # another port is another origin
    ([("Origin", "http://www.example.com")], 403),  # another scheme too
    ([("Origin", "https://example.com")], 403),
    ([("Origin", "https://www.example.com.evil.test")], 403),
    ([("Origin", "https://evilwww.example.com")], 403),
    ([("Origin", "https://chat.example.net")], None),  # *. matches one label below
    ([("Origin", "https://a.b.example.net")], None),  # and several
    ([("Origin", "https://example.net")], 403),  # but not the bare domain
    ([("Origin", "https://badexample.net")], 403),
    ([("Origin", "https://chat.example.net:444")], 403),  # the wildcard keeps its scheme and port
    ([("Origin", "http://chat.example.net")], 403),
    ([("Origin", "https://*.example.net")], 403),  # a literal '*' is no host
    ([("Origin", "https://.example.net")], 403),
    ([("Origin", "http://localhost:8080")], None),
    ([("Origin", "http://localhost")], 403),
    ([("Origin", "https://[2001:DB8:0::1]:8443")], None),  # IPv6 literals compared in canonical form
    ([("Origin", "https://[2001:db8::2]:8443")], 403),
    ([("Origin", "null")], 403),  # sandboxed frames and files are never trusted
    ([("Origin", "https://www.example.com/chat")], 403),  # not an origin: has a path
    ([("Origin", "https://www.example.com https://evil.test")], 403),  # origin lists are not accepted
    ([("Origin", "https://www.example.com"), ("Origin", "https://evil.test")], 403),
    ([("Origin", "")], 403),
    # No Origin: the Referer's origin counts.
    ([("Referer", "https://www.example.com/prweb/app?x=1")], None),
    ([("Referer", "https://sub.example.net:443/page")], None),
    ([("Referer", "https://evil.test/https://www.example.com/")], 403),
    ([("Referer", "https://www.example.com@evil.test/")], 403),  # userinfo is not the host
    ([("Referer", "/relative/path")], 403),
    ([("Referer", "https://www.example.com:99999/")], 403),
    # An Origin decides; the Referer is not consulted then.
    ([("Origin", "https://evil.test"), ("Referer", "https://www.example.com/")], 403),
    ([("Origin", "https://www.example.com"), ("Referer", "https://evil.test/")], None),
    # Neither: refused by default (missing = deny).
    ([], 403),
]


@pytest.mark.parametrize("headers, expected", ORIGIN_CASES)
def test_origin_decisions(headers, expected):
    """The Origin (or, without one, the Referer's origin) must be in allow after
    normalising case and default ports; *. matches subdomains only; null never."""
    flt = origin_kind.build({"allow": ORIGIN_ALLOW})
    assert status(flt.request(make_head(headers=headers))) == expected


@pytest.mark.parametrize("headers, expected", [
    ([], None),
    ([("Referer", "")], None),
    ([("Origin", "https://evil.test")], 403),
    ([("Referer", "https://evil.test/")], 403),
    ([("Origin", "null")], 403),
])
def test_origin_missing_allow(headers, expected):
    """missing = allow passes requests with neither header, but still checks the ones that have one."""
    flt = origin_kind.build({"allow": "https://www.example.com", "missing": "ALLOW"})
    assert status(flt.request(make_head(headers=headers))) == expected


WS_HANDSHAKE = [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]

MISSING_CASES = [
    # (missing, method, headers, expected status)
    # Neither Origin nor Referer: what `missing` says, by method and handshake.
    ("deny", "GET", [], 403),
    ("deny", "HEAD", [], 403),
    ("deny", "POST", [], 403),
    ("deny", "GET", WS_HANDSHAKE, 403),
    ("allow", "GET", [], None),
    ("allow", "POST", [], None),
    ("allow", "GET", WS_HANDSHAKE, None),
    ("allow-get", "GET", [], None),  # a script or image of a no-referrer page
    ("allow-get", "HEAD", [], None),
    ("allow-get", "GET", [("Referer", "")], None),  # an empty Referer is no Referer
    ("allow-get", "GET", [("Connection", "keep-alive")], None),
    ("allow-get", "GET", WS_HANDSHAKE, 403),  # the WebSocket handshake is checked
    ("allow-get", "GET", [("Upgrade", "WebSocket")], 403),  # any case, with or without Connection
    ("allow-get", "GET", [("Upgrade", "h2c, websocket/13")], 403),  # among several protocols, with a version
    ("allow-get", "GET", [("Upgrade", "h2c"), ("Upgrade", "websocket")], 403),  # in a second Upgrade header
    ("allow-get", "GET", [("Upgrade", "h2c")], None),  # another protocol is not a WebSocket handshake
    ("allow-get", "POST", [], 403),
    ("allow-get", "PUT", [], 403),
    ("allow-get", "DELETE", [], 403),
    ("allow-get", "PATCH", [], 403),
    ("allow-get", "OPTIONS", [], 403),  # a browser's preflight carries Origin; a bare OPTIONS is not a page's
    ("allow-get", "TRACE", [], 403),
    ("allow-get", "get", [], 403),  # methods are case-sensitive: "get" is not GET
    # A header that is present is checked whatever `missing` says.
    ("allow-get", "GET", [("Origin", "https://www.example.com")], None),
    ("allow-get", "GET", [("Referer", "https://www.example.com/help")], None),
    ("allow-get", "POST", [("Origin", "https://www.example.com")], None),
    ("allow-get", "GET", WS_HANDSHAKE + [("Origin", "https://www.example.com")], None),
    ("allow-get", "GET", [("Origin", "https://evil.test")], 403),  # a cross-site fetch
    ("allow-get", "GET", [("Referer", "https://evil.test/page")], 403),  # a script tag on another site
    ("allow-get", "GET", [("Origin", "null")], 403),
    ("allow-get", "HEAD", [("Origin", "https://evil.test")], 403),
    ("allow-get", "OPTIONS", [("Origin", "https://evil.test")], 403),  # an untrusted preflight
    ("allow-get", "OPTIONS", [("Origin", "https://www.example.com")], None),  # a trusted preflight
    ("allow", "GET", [("Origin", "https://evil.test")], 403),
]


@pytest.mark.parametrize("missing, method, headers, expected", MISSING_CASES)
def test_origin_missing_by_method_and_handshake(missing, method, headers, expected):
    """``missing`` decides only for requests with neither Origin nor Referer:
    deny refuses them, allow passes them, allow-get passes plain GET and HEAD
    but refuses WebSocket handshakes (an Upgrade naming websocket) and every
    other method; an Origin or Referer that is present is checked in every mode."""
    flt = origin_kind.build({"allow": "https://www.example.com", "missing": missing})
    assert status(flt.request(make_head(method=method, headers=headers))) == expected


@pytest.mark.parametrize("method, headers, reason", [
    ("GET", WS_HANDSHAKE, "no Origin or Referer header (WebSocket handshakes need one)"),
    ("POST", [], "no Origin or Referer header (POST requests need one)"),
    ("OPTIONS", [], "no Origin or Referer header (OPTIONS requests need one)"),
])
def test_origin_missing_allow_get_refusal_says_why(method, headers, reason):
    """With missing = allow-get the refusal says why a request without either
    header was not let through: a WebSocket handshake, or its method."""
    flt = origin_kind.build({"allow": "https://www.example.com", "missing": "allow-get"})
    assert flt.request(make_head(method=method, headers=headers)).reason == reason


def test_origin_configured_forms_are_normalised():
    """Configured origins may be written in any case, with the default port, a
    trailing slash, or as Unicode host names (compared as IDNA)."""
    flt = origin_kind.build({"allow": "HTTPS://Chat.Example.COM:443/\nhttps://bücher.example"})
    assert status(flt.request(make_head(headers=[("Origin", "https://chat.example.com")]))) is None
    assert status(flt.request(make_head(headers=[("Origin", "https://xn--bcher-kva.example")]))) is None


def test_origin_refusal_names_the_origin():
    """The refusal reason names the untrusted origin (and that it came from the Referer)."""
    flt = origin_kind.build({"allow": "https://www.example.com"})
    assert "https://evil.test" in flt.request(make_head(headers=[("Origin", "https://evil.test")])).reason
    reason = flt.request(make_head(headers=[("Referer", "https://evil.test:8443/x")])).reason
    assert "https://evil.test:8443" in reason and "Referer" in reason


ORIGIN_OPTION_ERRORS = [
    ({}, "allow", "required option is missing"),
    ({"allow": ""}, "allow", "at least one origin"),
    ({"allow": "*"}, "allow", "every origin"),
    ({"allow": "null"}, "allow", "null"),
    ({"allow": "www.example.com"}, "allow", "is not an origin"),
    ({"allow": "https://www.example.com/chat"}, "allow", "without a path"),
    ({"allow": "https://www.example.com:70000"}, "allow", "out of range"),
    ({"allow": "https://a.*.example.com"}, "allow", "first label"),
    ({"allow": "https://*.com"}, "allow", "at least two labels"),
    ({"allow": "https://exa mple.com"}, "allow", "is not an origin"),
    ({"allow": "https://under_score-.example"}, "allow", "not a valid host name"),
    ({"allow": "https://a.example", "missing": "maybe"}, "missing", "expected deny, allow-get or allow"),
    ({"allow": "https://a.example", "missing": "allow-post"}, "missing", "expected deny, allow-get or allow"),
    ({"allow": "https://a.example", "origins": "x"}, "origins", "unknown option (origin takes: allow, missing)"),
]


@pytest.mark.parametrize("options, option, message", ORIGIN_OPTION_ERRORS)
def test_origin_option_errors(options, option, message):
    """Bad options raise FilterOptionError naming the option."""
    with pytest.raises(FilterOptionError) as info:
        origin_kind.build(options)
    assert info.value.option == option
    assert message in info.value.message


# ---------------------------------------------------------------------------
# request_limits


LIMITS = {"methods": "GET, post", "max_body_bytes": "1k", "max_headers": "4", "max_header_bytes": "200",
          "require_headers": "X-Chat-Session"}
SESSION = ("X-Chat-Session", "abc")

LIMIT_CASES = [
    # (method, headers, expected status, text in the reason)
    ("GET", [SESSION], None, ""),
    ("POST", [SESSION, ("Content-Length", "1024")], None, ""),  # at the limit exactly
    ("POST", [SESSION, ("Content-Length", "1025")], 413, "larger than 1024 bytes"),
    ("POST", [SESSION, ("Transfer-Encoding", "chunked")], None, ""),  # left to the proxy's streaming limit
    ("DELETE", [SESSION], 405, "DELETE not allowed"),
    ("get", [SESSION], 405, "get not allowed"),  # methods are case-sensitive
    ("DELETE", [], 405, ""),  # the method is checked first
    ("GET", [SESSION, ("A", "1"), ("B", "2"), ("C", "3")], 431, "more than 4 header fields"),  # Host + 4
    ("GET", [SESSION, ("A", "1"), ("B", "2")], None, ""),  # exactly 4
    ("GET", [SESSION, ("X-Big", "v" * 150)], 431, "larger than 200 bytes"),
    ("GET", [], 400, "missing required header X-Chat-Session"),
    ("GET", [("x-chat-session", "abc")], None, ""),  # names are case-insensitive
    ("GET", [("X-Chat-Session", "")], 400, "X-Chat-Session"),  # an empty value counts as missing
]


@pytest.mark.parametrize("method, headers, expected, reason", LIMIT_CASES)
def test_request_limits_decisions(method, headers, expected, reason):
    """Method 405, declared body 413, header count and size 431, required headers 400."""
    decision = request_limits_kind.build(LIMITS).request(make_head(method=method, headers=headers))
    assert status(decision) == expected
    if expected:
        assert reason in decision.reason


def test_request_limits_405_names_the_allowed_methods():
    """A 405 carries an Allow header listing the configured methods (upper-cased, in order)."""
    decision = request_limits_kind.build({"methods": "get, POST, OPTIONS, get"}).request(make_head(method="PUT"))
    assert decision.headers == ((b"Allow", b"GET, POST, OPTIONS"),)


def test_request_limits_exposes_max_body_bytes():
    """max_body_bytes is an int attribute (what the proxy lowers the route's body limit to); unset it is None."""
    assert request_limits_kind.build({"max_body_bytes": "64k"}).max_body_bytes == 65536
    assert request_limits_kind.build({"max_body_bytes": "0"}).max_body_bytes == 0
    assert request_limits_kind.build({"methods": "GET"}).max_body_bytes is None


def test_request_limits_header_size_counts_the_wire_form():
    """max_header_bytes counts each field as 'Name: value' plus CRLF."""
    head = make_head(headers=[("Host", "h"), ("X", "yz")])  # "Host: h\r\n" 9 + "X: yz\r\n" 7
    assert status(request_limits_kind.build({"max_header_bytes": "16"}).request(head)) is None
    assert status(request_limits_kind.build({"max_header_bytes": "15"}).request(head)) == 431


LIMIT_OPTION_ERRORS = [
    ({}, None, "at least one of"),
    ({"methods": ""}, "methods", "at least one method"),
    ({"methods": "GET POST"}, "methods", "not an HTTP method"),
    ({"max_body_bytes": "lots"}, "max_body_bytes", "expected a size"),
    ({"max_headers": "0"}, "max_headers", "at least 1"),
    ({"max_headers": "ten"}, "max_headers", "whole number"),
    ({"max_header_bytes": "0"}, "max_header_bytes", "at least 1"),
    ({"require_headers": "X Token"}, "require_headers", "not an HTTP header name"),
    ({"max_body": "1k"}, "max_body", "unknown option (request_limits takes: methods, max_body_bytes"),
]


@pytest.mark.parametrize("options, option, message", LIMIT_OPTION_ERRORS)
def test_request_limits_option_errors(options, option, message):
    """Bad options raise FilterOptionError naming the option."""
    with pytest.raises(FilterOptionError) as info:
        request_limits_kind.build(options)
    assert info.value.option == option
    assert message in info.value.message


# ---------------------------------------------------------------------------
# headers


def test_headers_request_rewrite():
    """request_set and request_remove become a Rewrite: removed names dropped, set
    names replaced (several lines of one name give several fields)."""
    flt = headers_kind.build({
        "request_set": "X-Tenant: acme\nX-Tag: a\nX-Tag: b, c",
        "request_remove": "Cookie, x-debug",
    })
    rewrite = flt.request(make_head())
    assert rewrite == Rewrite(set=((b"X-Tenant", b"acme"), (b"X-Tag", b"a"), (b"X-Tag", b"b, c")),
                              remove=frozenset({b"cookie", b"x-debug"}))
    head = make_head(headers=[("X-Tenant", "evil"), ("COOKIE", "s=1"), ("X-Debug", "1"), ("Accept", "*/*")])
    out = apply_rewrite(head, rewrite).headers
    assert out == ((b"Host", b"chat.example.com"), (b"Accept", b"*/*"), (b"X-Tenant", b"acme"), (b"X-Tag", b"a"),
                   (b"X-Tag", b"b, c"))


@pytest.mark.parametrize("connection, expected", [
    (["keep-alive, X-Tenant"], [(b"Connection", b"keep-alive")]),
    (["x-tenant", "close"], [(b"Connection", b"close")]),
    (["X-TENANT"], []),
    (["keep-alive, X-Other"], [(b"Connection", b"keep-alive, X-Other")]),
])
def test_headers_set_names_are_taken_out_of_connection(connection, expected):
    """A client cannot have a header this filter sets dropped by naming it in Connection:
    those names are removed from Connection (other tokens are kept)."""
    flt = headers_kind.build({"request_set": "X-Tenant: acme"})
    head = make_head(headers=[("Connection", value) for value in connection] + [("X-Tenant", "evil")])
    out = apply_rewrite(head, flt.request(head)).headers
    assert [h for h in out if h[0].lower() == b"connection"] == expected
    assert [h for h in out if h[0].lower() == b"x-tenant"] == [(b"X-Tenant", b"acme")]


HSTS = "max-age=31536000; includeSubDomains"

RESPONSE_CASES = [
    # (response headers in, headers out)
    ([(b"Content-Type", b"text/html"), (b"Server", b"Pega"), (b"x-powered-by", b"PHP")],
     [(b"Content-Type", b"text/html"), (b"Strict-Transport-Security", HSTS.encode()),
      (b"X-Content-Type-Options", b"nosniff")]),
    ([(b"strict-transport-security", b"max-age=0"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
     [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Strict-Transport-Security", HSTS.encode()),
      (b"X-Content-Type-Options", b"nosniff")]),
    ([], [(b"Strict-Transport-Security", HSTS.encode()), (b"X-Content-Type-Options", b"nosniff")]),
]


@pytest.mark.parametrize("before, after", RESPONSE_CASES)
def test_headers_response_hook(before, after):
    """response_set replaces headers of the same name, response_remove drops names; other headers keep their order."""
    flt = headers_kind.build({"response_set": f"Strict-Transport-Security: {HSTS}\n\nX-Content-Type-Options: nosniff",
                              "response_remove": "Server\nX-Powered-By"})
    assert flt.response(make_head(), 200, list(before)) == after


def test_headers_sides_are_independent():
    """Without request options request() passes (None); without response options the hook changes nothing (None)."""
    only_response = headers_kind.build({"response_remove": "Server"})
    assert only_response.request(make_head()) is None
    only_request = headers_kind.build({"request_remove": "X-Debug"})
    assert only_request.response(make_head(), 200, [(b"Server", b"x")]) is None


HEADER_OPTION_ERRORS = [
    ({}, None, "at least one of"),
    ({"request_set": "Connection: close"}, "request_set", "Connection is a hop-by-hop or framing header"),
    ({"request_set": "Transfer-Encoding: chunked"}, "request_set", "hop-by-hop or framing"),
    ({"request_remove": "content-length"}, "request_remove", "hop-by-hop or framing"),
    ({"request_set": "Host: other.example"}, "request_set", "Host is a hop-by-hop or framing header"),
    ({"request_remove": "Upgrade"}, "request_remove", "hop-by-hop or framing"),
    ({"response_set": "Keep-Alive: timeout=5"}, "response_set", "hop-by-hop or framing"),
    ({"response_remove": "Transfer-Encoding"}, "response_remove", "hop-by-hop or framing"),
    ({"response_set": "TE: trailers"}, "response_set", "hop-by-hop or framing"),
    ({"request_set": "X-Forwarded-For: 10.0.0.1"}, "request_set", "written by chatproxy itself"),
    ({"request_remove": "Forwarded"}, "request_remove", "written by chatproxy itself"),
    ({"request_set": "X-Missing-Colon"}, "request_set", "expected 'Name: value'"),
    ({"request_set": "Bad Name: x"}, "request_set", "not a header name"),
    ({"response_set": "X-Euro: 5€"}, "response_set", "characters a header value cannot have"),
    ({"response_set": "\n\n"}, "response_set", "at least one"),
    ({"response_remove": ","}, "response_remove", "at least one header name"),
    ({"response_set": "Server: x", "response_remove": "server"}, "response_remove", "server also in response_set"),
    ({"request_add": "X: y"}, "request_add", "unknown option (headers takes: request_set, request_remove"),
]


@pytest.mark.parametrize("options, option, message", HEADER_OPTION_ERRORS)
def test_headers_option_errors(options, option, message):
    """Bad options raise FilterOptionError naming the option; hop-by-hop and framing
    headers (and, in requests, the forwarding headers) cannot be set or removed."""
    with pytest.raises(FilterOptionError) as info:
        headers_kind.build(options)
    assert info.value.option == option
    assert message in info.value.message


def test_headers_forwarding_headers_may_be_edited_in_responses():
    """The request-only restriction on forwarding headers does not apply to responses."""
    flt = headers_kind.build({"response_remove": "Via, X-Forwarded-For"})
    assert flt.response(make_head(), 200, [(b"Via", b"1.1 x"), (b"A", b"b")]) == [(b"A", b"b")]


# ---------------------------------------------------------------------------
# Errors through the configuration loader


@pytest.mark.parametrize("kind, lines, option, message", [
    ("ip_allowlist", "allow = 10.0.0.0/8\ndeny = nonsense", "deny", "not an IP address or network"),
    ("origin", "allow = https://*.com", "allow", "at least two labels"),
    ("request_limits", "methods = GET\nmax_headers = -1", "max_headers", "at least 1"),
    ("headers", "response_set =\n    X-Frame-Options: DENY\n    Connection: close", "response_set",
     "hop-by-hop or framing"),
])
def test_option_errors_name_file_section_and_option(tmp_path, kind, lines, option, message):
    """Loading (load_config, then the data path's validate) reports a kind's
    FilterOptionError with the file, [filter:NAME] and the option."""
    path = tmp_path / "chat.ini"
    path.write_text(f"[listen:main]\nendpoint = tcp:0\n\n[filter:guard]\nuse = {kind}\n{lines}\n")
    with pytest.raises(ConfigError) as info:
        validate(load_config([path]))
    error = info.value
    assert (error.file, error.section, error.option) == (str(path), "filter:guard", option)
    assert str(error).startswith(f"{path} [filter:guard] {option}: ")
    assert message in str(error)


def test_section_wide_error_names_file_and_section(tmp_path):
    """An option-less section error (FilterOptionError(None, ...)) names the file and the section."""
    path = tmp_path / "chat.ini"
    path.write_text("[listen:main]\nendpoint = tcp:0\n\n[filter:guard]\nuse = ip_allowlist\n")
    with pytest.raises(ConfigError) as info:
        validate(load_config([path]))
    assert str(info.value) == f"{path} [filter:guard]: ip_allowlist needs allow, deny or both"


# ---------------------------------------------------------------------------
# Through a real twistd process


def send(port: int, method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
         raw: bytes | None = None) -> Any:
    """One request on a fresh raw connection; returns the RawResponse."""
    client = RawClient(port)
    try:
        client.send(raw if raw is not None else request_bytes(method, target, headers=headers, body=body))
        return client.read_response(method)
    finally:
        client.close()


def log_line(process: Any, text: str, timeout: float = 10.0) -> str:
    """The first line of the twistd output containing ``text`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in process.output().splitlines():
            if text in line:
                return str(line)
        if time.monotonic() > deadline:
            raise AssertionError(f"no line with {text!r} in the twistd output:\n{process.output()}")
        time.sleep(0.05)


def listen(port: int) -> str:
    """A [listen:main] section on 127.0.0.1:port."""
    return f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n"


def config(upstream_url: str, listeners: str, route: str, filters: str, settings: str = "access_log = off") -> str:
    """A config with the given listener sections, one upstream, a catch-all route and filters."""
    return (f"[chatproxy]\n{settings}\n\n{listeners}\n"
            f"[upstream:app]\nservers = {upstream_url}\n\n"
            f"[route:all]\npath = /\nupstream = app\n{route}\n\n{filters}")


def test_ip_allowlist_through_twistd_uses_the_resolved_client(proxy, upstream):
    """Behind a trusted proxy (trusted_proxies = 127.0.0.1/32) the X-Forwarded-For client
    is what the allowlist checks; an address prepended by the client does not get in;
    on a listener without trusted_proxies a spoofed X-Forwarded-For is ignored."""
    trusted_port, direct_port = free_port(), free_port()
    listeners = (f"[listen:behind-lb]\nendpoint = tcp:{trusted_port}:interface=127.0.0.1\n"
                 "trusted_proxies = 127.0.0.1/32\n\n"
                 f"[listen:direct]\nendpoint = tcp:{direct_port}:interface=127.0.0.1\n")
    filters = "[filter:customers]\nuse = ip_allowlist\nallow = 198.51.100.0/24\ndeny = 198.51.100.66\n"
    process = proxy.start(config(upstream.url, listeners, "filters = customers", filters), port=trusted_port)
    wait_for_port(direct_port, process=process.process)

    ok = send(trusted_port, "GET", "/echo/allowed", [("X-Forwarded-For", "198.51.100.7")])
    assert ok.status == 200
    assert ok.json()["path"] == "/echo/allowed"
    # The resolved client is forwarded, with the load balancer appended.
    assert upstream_headers(upstream.requests[-1])["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"

    refused = [
        (trusted_port, "/echo/denied", [("X-Forwarded-For", "198.51.100.66")]),  # deny wins
        (trusted_port, "/echo/outside", [("X-Forwarded-For", "203.0.113.9")]),
        (trusted_port, "/echo/prepended", [("X-Forwarded-For", "198.51.100.7, 203.0.113.9")]),
        (trusted_port, "/echo/no-xff", []),  # the load balancer itself (127.0.0.1) is not a customer
        (direct_port, "/echo/spoofed", [("X-Forwarded-For", "198.51.100.7")]),  # untrusted peer: XFF ignored
    ]
    for port, target, headers in refused:
        response = send(port, "GET", target, headers)
        assert response.status == 403, (target, response)
        assert b"not allowed" in response.body or b"denied" in response.body
    assert [r["path"] for r in upstream.requests] == ["/echo/allowed"]


class WsUpstream:
    """A ``websockets`` (sync API) echo server in a thread, recording handshake headers."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        self.handshakes: list[dict[str, str]] = []

        def process_request(connection: Any, request: Any) -> None:
            self.handshakes.append({k.lower(): v for k, v in request.headers.raw_items()})

        def echo(connection: Any) -> None:
            for message in connection:
                connection.send(message)

        self.server = serve(echo, "127.0.0.1", 0, process_request=process_request, open_timeout=10)
        self.port = int(self.server.socket.getsockname()[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving (bounded)."""
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture
def ws_upstream() -> Iterator[WsUpstream]:
    """A running WebSocket echo upstream on 127.0.0.1."""
    server = WsUpstream()
    yield server
    server.stop()


ORIGIN_FILTER = "[filter:trusted]\nuse = origin\nallow = https://chat.example.com, https://*.agents.example.com\n"


def test_origin_through_twistd_http_and_websocket(proxy, ws_upstream):
    """Through twistd on a websocket = yes route: a WebSocket handshake from a trusted
    origin is bridged and echoes; one from another origin, with Origin null, or with
    neither Origin nor Referer gets 403 and never reaches the upstream, and the
    connection of a refused upgrade is closed."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    port = free_port()
    proxy.start(config(f"http://127.0.0.1:{ws_upstream.port}", listen(port), "websocket = yes\nfilters = trusted",
                       ORIGIN_FILTER), port=port)

    with connect(f"ws://127.0.0.1:{port}/chat", origin="https://eu.agents.example.com", open_timeout=10,
                 close_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
    assert len(ws_upstream.handshakes) == 1
    assert ws_upstream.handshakes[0]["origin"] == "https://eu.agents.example.com"

    for origin in ("https://evil.example", "https://agents.example.com", "null"):
        with pytest.raises(InvalidStatus) as info:
            connect(f"ws://127.0.0.1:{port}/chat", origin=origin, open_timeout=10)
        assert info.value.response.status_code == 403, origin
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{port}/chat", open_timeout=10)  # no Origin, no Referer
    assert info.value.response.status_code == 403
    assert b"no Origin or Referer" in info.value.response.body

    # A raw upgrade request with a bad Origin: 403, connection closed.
    client = RawClient(port)
    try:
        client.send(request_bytes("GET", "/chat", headers=[
            ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Origin", "https://chat.example.com.evil.test")]))
        response = client.read_response()
        assert response.status == 403
        assert b"https://chat.example.com.evil.test is not trusted" in response.body
        assert client.closed_by_peer()
    finally:
        client.close()
    assert len(ws_upstream.handshakes) == 1


def test_origin_through_twistd_plain_requests(proxy, upstream):
    """Plain requests: a trusted Origin or Referer reaches the upstream (Origin unchanged);
    an untrusted one gets 403 with the origin named, and never reaches it."""
    port = free_port()
    proxy.start(config(upstream.url, listen(port),
                       "filters = trusted", ORIGIN_FILTER), port=port)
    assert send(port, "POST", "/echo/1", [("Origin", "https://CHAT.example.com:443")], b"{}").status == 200
    assert send(port, "GET", "/echo/2", [("Referer", "https://chat.example.com/page")]).status == 200
    refused = send(port, "POST", "/echo/3", [("Origin", "https://evil.example")], b"{}")
    assert refused.status == 403 and b"origin https://evil.example is not trusted" in refused.body
    assert [r["path"] for r in upstream.requests] == ["/echo/1", "/echo/2"]
    assert upstream_header_values(upstream.requests[0], "Origin") == ["https://CHAT.example.com:443"]


def test_origin_report_mode_through_twistd(proxy, upstream):
    """mode = report: a request from an untrusted origin passes to the upstream and the
    twistd log says the filter would have refused it."""
    port = free_port()
    proxy.start(config(upstream.url, listen(port),
                       "filters = trusted", ORIGIN_FILTER + "mode = report\n"), port=port)
    response = send(port, "GET", "/echo/reported", [("Origin", "https://evil.example")])
    assert response.status == 200
    assert [r["path"] for r in upstream.requests] == ["/echo/reported"]
    line = log_line(proxy.processes[0], "would have refused")
    assert "filter trusted (report mode) would have refused GET /echo/reported" in line
    assert "403 origin https://evil.example is not trusted" in line


def test_request_limits_through_twistd(proxy, upstream):
    """Through twistd: a method not listed gets 405 with Allow; a declared body over
    max_body_bytes 413; a chunked body growing past it 413 (enforced by the proxy while
    streaming); too many headers 431; a missing required header 400 naming it; a
    request within the limits reaches the upstream whole."""
    port = free_port()
    filters = ("[filter:limits]\nuse = request_limits\nmethods = GET, POST\nmax_body_bytes = 1000\n"
               "max_headers = 8\nrequire_headers = X-Chat-Session\n")
    proxy.start(config(upstream.url, listen(port),
                       "filters = limits", filters), port=port)
    session = [("X-Chat-Session", "s1")]

    ok = send(port, "POST", "/echo/ok", session, b"x" * 1000)
    assert ok.status == 200 and ok.json()["body_length"] == 1000

    deleted = send(port, "DELETE", "/echo/delete", session)
    assert deleted.status == 405 and deleted.header("Allow") == "GET, POST"

    big = send(port, "POST", "/echo/big", session + [("Content-Length", "1001")])
    assert big.status == 413

    chunks = b"".join(b"258\r\n" + b"z" * 600 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    chunked = send(port, "POST", "/echo/chunked",
                   raw=request_bytes("POST", "/echo/chunked", headers=session + [("Transfer-Encoding", "chunked")])
                   + chunks)
    assert chunked.status == 413

    many = send(port, "GET", "/echo/many", session + [(f"X-H{i}", "v") for i in range(8)])
    assert many.status == 431

    missing = send(port, "GET", "/echo/missing")
    assert missing.status == 400 and b"missing required header X-Chat-Session" in missing.body

    complete = [r for r in upstream.requests if r["path"] != "/echo/chunked"]
    assert [r["path"] for r in complete] == ["/echo/ok"]
    assert all(r["body_length"] <= 1000 for r in upstream.requests)


def test_headers_through_twistd(proxy, upstream):
    """Through twistd: request_set/request_remove change what the upstream receives (a
    set header arrives even when the client names it in Connection); response_set/
    response_remove change what the client receives; framing stays intact."""
    port = free_port()
    filters = ("[filter:hdrs]\nuse = headers\n"
               "request_set =\n    X-Tenant: acme\n    User-Agent: chatproxy-test\n"
               "request_remove = X-Debug\n"
               "response_set =\n    Strict-Transport-Security: max-age=31536000; includeSubDomains\n"
               "    X-Content-Type-Options: nosniff\n    Content-Security-Policy: default-src 'self'\n"
               "response_remove = X-Upstream\n")
    proxy.start(config(upstream.url, listen(port),
                       "filters = hdrs", filters), port=port)
    response = send(port, "POST", "/echo/h", [("X-Debug", "1"), ("X-Tenant", "evil"), ("User-Agent", "curl"),
                                              ("Connection", "keep-alive, X-Tenant")], b"body")
    assert response.status == 200
    seen = upstream.requests[-1]
    assert upstream_header_values(seen, "X-Tenant") == ["acme"]
    assert upstream_header_values(seen, "User-Agent") == ["chatproxy-test"]
    assert upstream_header_values(seen, "X-Debug") == []
    assert seen["body_length"] == 4
    assert response.header("Strict-Transport-Security") == "max-age=31536000; includeSubDomains"
    assert response.header("X-Content-Type-Options") == "nosniff"
    assert response.header("Content-Security-Policy") == "default-src 'self'"
    assert response.header("X-Upstream") is None
    assert response.json()["path"] == "/echo/h"  # the body arrived whole (Content-Length kept)
    # A chunked upstream response keeps its framing too.
    chunked = send(port, "GET", "/chunked?n=3000&parts=3")
    assert chunked.status == 200 and len(chunked.body) == 3000
    assert chunked.header("X-Content-Type-Options") == "nosniff"


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"Content-Type": "application/json", "Content-Length": "2"}, None),
        ({"Content-Type": "Application/JSON; charset=utf-8", "Content-Length": "2"}, None),
        ({"Content-Type": "text/plain", "Content-Length": "2"}, 415),
        ({"Content-Length": "2"}, 415),
        ({"Content-Type": "application/json", "Content-Length": "0"}, 400),
        ({"Content-Type": "application/json"}, 400),
        ({"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, None),
    ],
)
def test_request_limits_content_types_and_require_body(headers, expected):
    """content_types allows only the listed media types (415 otherwise, parameters ignored);
    require_body refuses a request without a body (400): an empty webhook call never passes."""
    from chatproxy.filters.request_limits import request_limits as kind

    flt = kind.build({"content_types": "application/json", "require_body": "yes"})
    head = request_head("/hook", method="POST", headers=list(headers.items()), host="h", client="192.0.2.1")
    decision = flt.request(head)
    assert (decision.status if decision else None) == expected


@pytest.mark.parametrize("options, option", [({"content_types": "json"}, "content_types"),
                                             ({"content_types": ","}, "content_types"),
                                             ({"require_body": "maybe"}, "require_body")])
def test_request_limits_new_option_errors(options, option):
    """Bad content_types or require_body values are errors naming the option."""
    from chatproxy.filters import FilterOptionError
    from chatproxy.filters.request_limits import request_limits as kind

    with pytest.raises(FilterOptionError) as error:
        kind.build(options)
    assert error.value.option == option
