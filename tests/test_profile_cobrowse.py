"""etc/cobrowse.ini end to end: a real ``twistd -n chatproxy`` on the shipped
profile, with only test-only values (ports, certificates, the upstream
address, and where the agents' side is reached from) layered over it, in
front of a stand-in Cobrowse deployment that records what reaches it and
speaks WebSocket on /sockets/1/.

Checked against Cobrowse's "L7 firewall configuration" page: the public
listener serves only the SDK routes; the agents' listener serves the whole API,
the proxy, recordings, sockets and the frontend, with every other path served
as /index.html; agent routes are refused from outside the agents' networks;
all headers and query parameters are forwarded.

On loopback the agents' networks (10.20.0.0/16 as shipped) cannot be a real
TCP peer, so the test host plays a load balancer inside the agents' network:
the test file lets 127.0.0.1 connect to the agents' listener and trusts its
X-Forwarded-For; the shipped [filter:agent-networks] then decides by the
forwarded address. The listener's own ``allow`` is shown refusing 127.0.0.1
with the shipped value in a second proxy.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import PKI, ProxyProcess, ProxyStarter, free_port
from profile_peers import (
    WAIT,
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

PROFILE = read_profile("cobrowse")
AGENT_NETWORKS = option_list(PROFILE["filter:agent-networks"]["allow"])
AGENT = str(ipaddress.ip_network(AGENT_NETWORKS[0])[7])  # an agent's address in the shipped networks
OUTSIDER = "203.0.113.9"
HOST = "cobrowse.example.com"
CUSTOM = {"X-Cobrowse-Device": "dev-42", "X-Custom-Anything": "kept as sent", "Authorization": "Bearer sdk-token",
          "Cookie": "session=abc; lb=node-2", "X-Requested-With": "XMLHttpRequest"}


def routes(listener: str) -> dict[str, Any]:
    """The shipped routes of one listener, by name."""
    return {s.split(":", 1)[1]: PROFILE[s] for s in PROFILE.sections()
            if s.startswith("route:") and PROFILE[s]["listeners"] == listener}


@dataclass
class Env:
    """The proxy on the shipped profile and the stand-in Cobrowse behind it."""

    pki: PKI
    port: int
    agents_port: int
    cobrowse: StandIn
    process: ProxyProcess
    overlay: Path

    def public(self) -> Client:
        return Client(self.port, HOST, self.pki.client_context())

    def agents(self) -> Client:
        return Client(self.agents_port, HOST, self.pki.client_context())


def overlay_values(directory: Path, pki: PKI, port: int, agents_port: int, cobrowse_url: str,
                   agents_from_loopback: bool = True) -> Path:
    """The test-only values layered over the shipped profile."""
    agents = """
        # The test host plays a load balancer inside the agents' network.
        allow = 127.0.0.1
        trusted_proxies = 127.0.0.1
        """ if agents_from_loopback else ""
    return write_overlay(directory, "test-values.ini", f"""\
        # Test-only values layered over etc/cobrowse.ini.
        [listen:public]
        endpoint = tcp:{port}:interface=127.0.0.1
        certificate = {pki.cert}
        key = {pki.key}

        [upstream:cobrowse]
        servers = {cobrowse_url}

        [listen:agents]
        endpoint = tcp:{agents_port}:interface=127.0.0.1
        certificate = {pki.cert}
        key = {pki.key}
        """ + agents)


@pytest.fixture(scope="module")
def env(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One proxy on etc/cobrowse.ini for the module, with its stand-in Cobrowse."""
    directory = tmp_path_factory.mktemp("cobrowse")
    cobrowse = StandIn(ws_prefixes=("/sockets/1/",))
    starter = ProxyStarter(directory)
    try:
        port, agents_port = free_port(), free_port()
        overlay = overlay_values(directory, pki, port, agents_port, cobrowse.url)
        process = starter.start(port=port, configs=[profile_path("cobrowse"), overlay])
        yield Env(pki, port, agents_port, cobrowse, process, overlay)
    finally:
        starter.stop_all()
        cobrowse.stop()


# ---------------------------------------------------------------------------
# The shipped file


def test_shipped_profile_lists_the_vendor_prefixes_per_audience() -> None:
    """The public listener has exactly the SDK prefixes; the agents' listener
    exactly the agent-side prefixes and the frontend, plus the catch-all
    rewritten to /index.html; WebSocket on /sockets/1/ on both; every agent
    route checks the agents' networks, which are the same at the listener."""
    public, agents = routes("public"), routes("agents")
    assert sorted(r["path"] for r in public.values()) == ["/api/1/devices", "/api/1/sessions", "/sdk-js/",
                                                          "/sockets/1/"]
    assert sorted(r["path"] for r in agents.values()) == ["/", "/api/1/", "/apps/", "/favicon.png",
                                                          "/index.html", "/proxy/1/", "/recording/1/",
                                                          "/sockets/1/", "/static/"]
    for group in (public, agents):
        assert [r["path"] for r in group.values() if r.get("websocket") == "yes"] == ["/sockets/1/"]
    assert all("filters" not in r for r in public.values())
    assert all(option_list(r["filters"]) == ["agent-networks"] for r in agents.values())
    assert [r.get("rewrite_path") for r in agents.values() if r["path"] == "/"] == ["/index.html"]
    assert option_list(PROFILE["listen:agents"]["allow"]) == AGENT_NETWORKS
    assert "allow" not in PROFILE["listen:public"]
    assert len(PROFILE.sections()) - len(public) - len(agents) == 5  # chatproxy, 2 listeners, upstream, filter


def test_check_accepts_the_profile_and_prints_its_routes(env: Env) -> None:
    """``python -m chatproxy check`` accepts the shipped file (with the test's
    certificates layered over it) and prints all 13 routes, the SPA catch-all
    last (the least specific)."""
    result = run_check([profile_path("cobrowse"), env.overlay])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  [route:")]
    assert len(lines) == 13
    assert lines[-1] == ("[route:frontend-spa] path /, methods GET, listeners agents, rewrite to /index.html, "
                         "filters agent-networks -> upstream cobrowse")
    assert "[route:sdk-sockets] path /sockets/1/, listeners public, websocket (bridge) -> upstream cobrowse" in lines


# ---------------------------------------------------------------------------
# The public listener: the SDK routes only


SDK_ALLOWED = [
    ("GET", "/api/1/devices"),
    ("POST", "/api/1/devices?license_key=trial&platform=web"),
    ("GET", "/api/1/devices/dev-42/sessions?state=active&state=pending"),
    ("PUT", "/api/1/devices/dev-42?custom_data%5Buser_id%5D=u1"),
    ("POST", "/api/1/sessions"),
    ("GET", "/api/1/sessions/s-1?token=abc.def"),
    ("GET", "/sdk-js/"),
    ("GET", "/sdk-js/2.31.0/cobrowse.js?v=2.31.0"),
    ("HEAD", "/sdk-js/cobrowse.js"),
    ("GET", "/sockets/1/?token=t&device=dev-42"),
]


@pytest.mark.parametrize("method, target", SDK_ALLOWED, ids=[f"{m} {t}" for m, t in SDK_ALLOWED])
def test_sdk_routes_on_the_public_listener(env: Env, method: str, target: str) -> None:
    """Each SDK route (and what lies below it) reaches Cobrowse with its
    method, path and every query parameter unchanged, every header the device
    sent (custom ones included), and X-Forwarded-Proto https."""
    before = len(env.cobrowse.requests)
    body = json.dumps({"device": {"platform": "web"}}).encode() if method in ("POST", "PUT") else None
    headers = dict(CUSTOM, **({"Content-Type": "application/json"} if body else {}))
    response = env.public().request(method, target, headers, body)
    assert response.status == 200, response.body
    assert len(env.cobrowse.requests) == before + 1
    record = env.cobrowse.requests[-1]
    assert record["method"] == method and record["path"] == target
    for name, value in CUSTOM.items():
        assert header(record, name) == value
    assert header(record, "Host") == HOST
    assert header(record, "X-Forwarded-Proto") == "https"
    assert header(record, "X-Forwarded-For") == "127.0.0.1"


PUBLIC_REFUSED = [
    # Agent-side routes and the frontend
    ("GET", "/api/1/accounts", 404),
    ("GET", "/api/1/", 404),
    ("GET", "/api/1", 404),
    ("GET", "/api/1/agents/me?x=1", 404),
    ("GET", "/proxy/1/https/www.example.com/", 404),
    ("GET", "/recording/1/s-1/video.mp4", 404),
    ("GET", "/index.html", 404),
    ("GET", "/favicon.png", 404),
    ("GET", "/apps/agent/", 404),
    ("GET", "/static/js/main.js", 404),
    ("GET", "/", 404),
    ("GET", "/dashboard/sessions", 404),
    # Near misses of the SDK prefixes
    ("GET", "/api/1/devicesX", 404),
    ("GET", "/api/1/devices-admin", 404),
    ("GET", "/api/1/Devices", 404),
    ("GET", "/API/1/devices", 404),
    ("GET", "/api/2/devices", 404),
    ("GET", "/api/1/session", 404),
    ("GET", "/sdk-js", 404),
    ("GET", "/sockets/1", 404),
    ("GET", "/sockets/2/", 404),
    ("POST", "/sdk-js/cobrowse.js", 404),
    # Traversal and double slashes
    ("GET", "/api/1/devices/../accounts", 404),
    ("GET", "/api/1/devices/%2e%2e/accounts", 404),
    ("GET", "/sdk-js/../api/1/accounts", 404),
    ("GET", "/sdk-js/../../api/1/accounts", 400),
    ("GET", "/api/1/devices/..%2faccounts", 400),
    ("GET", "/api/1/devices/%252e%252e/accounts", 400),
    ("GET", "/api/1/devices/..;/accounts", 400),
    ("GET", "//api/1/accounts", 404),
    ("GET", "/api//1/accounts", 404),
]


@pytest.mark.parametrize("method, target, status", PUBLIC_REFUSED, ids=[f"{m} {t}" for m, t, _ in PUBLIC_REFUSED])
def test_public_listener_refuses_everything_else(env: Env, method: str, target: str, status: int) -> None:
    """On the public listener, the agent routes, the frontend and every near
    miss of the SDK prefixes are refused by chatproxy (404, or 400 for paths
    servers read in different ways) and never reach Cobrowse; the refusal
    carries the listener's HSTS header like every answer."""
    before = len(env.cobrowse.requests)
    body = b"{}" if method == "POST" else None
    response = env.public().request(method, target, {"Content-Type": "application/json"} if body else {}, body)
    assert response.status == status, (response.status, response.body)
    assert response.headers["strict-transport-security"] == "max-age=63072000"
    assert len(env.cobrowse.requests) == before


def test_merged_paths_reach_cobrowse_in_normal_form(env: Env) -> None:
    """A public path that merges into an SDK route is forwarded in its normal
    form, query kept."""
    before = len(env.cobrowse.requests)
    assert env.public().get("/api//1/devices//dev-1/./x?a=1&a=2").status == 200
    assert env.cobrowse.paths()[before:] == ["/api/1/devices/dev-1/x?a=1&a=2"]


# ---------------------------------------------------------------------------
# The agents' listener


AGENT_ROUTES = [
    ("GET", "/api/1/accounts?include=members", "/api/1/accounts?include=members"),
    ("POST", "/api/1/sessions?agent=a-1", "/api/1/sessions?agent=a-1"),
    ("DELETE", "/api/1/sessions/s-1", "/api/1/sessions/s-1"),
    ("GET", "/api/1/devices?filter%5Buser_id%5D=u1", "/api/1/devices?filter%5Buser_id%5D=u1"),
    ("GET", "/proxy/1/https/www.example.com/cart?item=3", "/proxy/1/https/www.example.com/cart?item=3"),
    ("POST", "/proxy/1/https/www.example.com/form", "/proxy/1/https/www.example.com/form"),
    ("GET", "/recording/1/s-1/video.webm?t=30", "/recording/1/s-1/video.webm?t=30"),
    ("GET", "/sockets/1/?token=agent", "/sockets/1/?token=agent"),
]
FRONTEND = [
    ("GET", "/index.html?lang=de", "/index.html?lang=de"),
    ("GET", "/favicon.png", "/favicon.png"),
    ("GET", "/apps/agent/main.8f1c.js", "/apps/agent/main.8f1c.js"),
    ("GET", "/static/css/app.css?v=3", "/static/css/app.css?v=3"),
    ("HEAD", "/static/js/app.js", "/static/js/app.js"),
    # Every other path is a frontend route: /index.html, query kept
    ("GET", "/", "/index.html"),
    ("GET", "/dashboard?filter=active&page=2", "/index.html?filter=active&page=2"),
    ("GET", "/sessions/s-1/replay", "/index.html"),
    ("GET", "/api/1", "/index.html"),
    ("GET", "/api/2/accounts?x=1", "/index.html?x=1"),
    ("GET", "/sdk-js/cobrowse.js", "/index.html"),
    ("GET", "/login/magic?token=abc", "/index.html?token=abc"),
]


@pytest.mark.parametrize("method, target, forwarded", AGENT_ROUTES + FRONTEND,
                         ids=[f"{m} {t}" for m, t, _ in AGENT_ROUTES + FRONTEND])
def test_agent_routes_from_an_agent(env: Env, method: str, target: str, forwarded: str) -> None:
    """From an address in the agents' networks, the agents' listener forwards
    the whole API, /proxy/1/, /recording/1/, /sockets/1/ and the frontend,
    with the query string kept; every other path goes to Cobrowse as
    /index.html. On the non-frontend routes every header arrives, custom ones
    included."""
    before = len(env.cobrowse.requests)
    body = b'{"a": 1}' if method == "POST" else None
    headers = dict(CUSTOM, **{"X-Forwarded-For": AGENT}, **({"Content-Type": "application/json"} if body else {}))
    response = env.agents().request(method, target, headers, body)
    assert response.status == 200, response.body
    assert len(env.cobrowse.requests) == before + 1
    record = env.cobrowse.requests[-1]
    assert record["method"] == method and record["path"] == forwarded
    assert header(record, "X-Forwarded-For") == f"{AGENT}, 127.0.0.1"
    assert header(record, "X-Forwarded-Proto") == "https"
    if (method, target, forwarded) in AGENT_ROUTES:
        for name, value in CUSTOM.items():
            assert header(record, name) == value


@pytest.mark.parametrize("method, target", [("POST", "/dashboard"), ("POST", "/static/x.js"),
                                            ("PUT", "/index.html"), ("DELETE", "/apps/agent/")])
def test_frontend_takes_only_get(env: Env, method: str, target: str) -> None:
    """The frontend is static: other methods than GET and HEAD on it get 404."""
    before = len(env.cobrowse.requests)
    response = env.agents().request(method, target, {"X-Forwarded-For": AGENT, "Content-Type": "text/plain"}, b"x")
    assert response.status == 404
    assert len(env.cobrowse.requests) == before


NON_AGENTS = [
    ("an internet address", {"X-Forwarded-For": OUTSIDER}),
    ("the load balancer itself", {}),
    ("a forged agent address before the real one", {"X-Forwarded-For": f"{AGENT}, {OUTSIDER}"}),
    ("a neighbouring network", {"X-Forwarded-For": str(ipaddress.ip_network(AGENT_NETWORKS[0])[-1] + 1)}),
]


@pytest.mark.parametrize("who, headers", NON_AGENTS, ids=[w for w, _ in NON_AGENTS])
@pytest.mark.parametrize("target", [t for m, t, _ in AGENT_ROUTES + FRONTEND if m == "GET"])
def test_agent_routes_refused_from_a_non_agent_address(env: Env, who: str, headers: dict[str, str],
                                                       target: str) -> None:
    """Every agent route, the frontend and the catch-all answer 403 to a
    client outside the agents' networks (the address a trusted load balancer
    forwarded; an address the client wrote itself does not count), and
    nothing reaches Cobrowse."""
    before = len(env.cobrowse.requests)
    response = env.agents().request("GET", target, headers)
    assert response.status == 403 and b"is not allowed" in response.body, (response.status, response.body)
    assert len(env.cobrowse.requests) == before


def test_agents_listener_closes_connections_from_outside_the_agent_networks(pki: PKI, proxy: ProxyStarter,
                                                                             tmp_path: Path) -> None:
    """With the agents' listener allowlist as shipped (the agents' networks,
    which 127.0.0.1 is not in), a connection from 127.0.0.1 is closed as soon
    as it is accepted: no TLS handshake, no HTTP answer. The public listener
    of the same proxy serves the SDK routes meanwhile."""
    cobrowse = StandIn(ws_prefixes=("/sockets/1/",))
    try:
        port, agents_port = free_port(), free_port()
        overlay = overlay_values(tmp_path, pki, port, agents_port, cobrowse.url, agents_from_loopback=False)
        proxy.start(port=port, configs=[profile_path("cobrowse"), overlay])
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with socket.create_connection(("127.0.0.1", agents_port), timeout=WAIT) as sock:
                with pki.client_context().wrap_socket(sock, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /index.html HTTP/1.1\r\nHost: cobrowse.example.com\r\n\r\n")
                    if not tls.recv(1):
                        raise ConnectionError("closed without an answer")
        assert Client(port, HOST, pki.client_context()).get("/api/1/devices").status == 200
        assert cobrowse.paths() == ["/api/1/devices"]
    finally:
        cobrowse.stop()


# ---------------------------------------------------------------------------
# WebSocket


def test_websocket_between_a_device_and_an_agent(env: Env) -> None:
    """A device on the public listener and an agent on the agents' listener
    open /sockets/1/ with real WebSocket clients and exchange messages through
    Cobrowse (here a room relaying to everyone on the path); the handshakes
    reach Cobrowse with their query strings and custom headers."""
    tls = tls12_context(env.pki.ca)
    device_target = "/sockets/1/?token=device-token&device=dev-42"
    agent_target = "/sockets/1/?token=agent-token&agent=a-1"
    with ws_connect(env.port, HOST, device_target, tls, headers={"X-Cobrowse-Device": "dev-42"}) as device, \
            ws_connect(env.agents_port, HOST, agent_target, tls,
                       headers={"X-Forwarded-For": AGENT, "X-Agent-Custom": "1"}) as agent:
        wait_until(lambda: len(env.cobrowse.rooms.get("/sockets/1/", [])) == 2)
        frame = json.dumps({"event": "frame", "html": "<div id='cart'>3 items</div>", "seq": 1})
        device.send(frame)
        assert agent.recv(timeout=WAIT) == frame
        assert device.recv(timeout=WAIT) == frame
        agent.send(json.dumps({"event": "click", "x": 10, "y": 20}))
        assert json.loads(device.recv(timeout=WAIT)) == {"event": "click", "x": 10, "y": 20}
    sessions = {s.path: s for s in env.cobrowse.sessions}
    assert sessions[device_target].header("X-Cobrowse-Device") == "dev-42"
    assert sessions[agent_target].header("X-Agent-Custom") == "1"
    assert sessions[agent_target].header("X-Forwarded-For") == f"{AGENT}, 127.0.0.1"
    assert sessions[device_target].header("X-Forwarded-Proto") == "https"


def test_agent_websocket_refused_from_a_non_agent_address(env: Env) -> None:
    """The agents' /sockets/1/ refuses a handshake from outside the agents'
    networks with 403; Cobrowse never sees it."""
    before = len(env.cobrowse.requests)
    status = ws_refused(env.agents_port, HOST, "/sockets/1/?token=x", tls12_context(env.pki.ca),
                        headers={"X-Forwarded-For": OUTSIDER})
    assert status == 403
    assert len(env.cobrowse.requests) == before
