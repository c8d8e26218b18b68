"""End-to-end routing tests through a real ``twistd -n chatproxy`` process: route
matching sees the normalised path, refused paths never reach the upstream, and the
most specific route wins."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ProxyStarter, RecordingUpstream, free_port
from test_http_proxy import RawClient, request_bytes, wait_for_log_line


class Running:
    """A proxy started for a whole module, its upstream and its access log."""

    def __init__(self, port: int, upstream: RecordingUpstream, log_path: Path) -> None:
        self.port = port
        self.upstream = upstream
        self.log_path = log_path

    def send(self, target: str, method: str = "GET", host: str = "proxy.test",
             headers: dict[str, str] | None = None) -> Any:
        """One request on a fresh raw connection; returns the response."""
        client = RawClient(self.port)
        try:
            client.send(request_bytes(method, target, headers=headers, host=host))
            return client.read_response(method)
        finally:
            client.close()


def _start(tmp_path_factory: pytest.TempPathFactory, name: str, routes: str) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp(name)
    upstream = RecordingUpstream()
    starter = ProxyStarter(directory)
    port = free_port()
    log_path = directory / "access.log"
    config = (
        f"[chatproxy]\naccess_log = {log_path}\naccess_log_format = json\n\n"
        f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n\n"
        f"[upstream:app]\nservers = {upstream.url}\n\n"
        f"{routes}"
    )
    try:
        starter.start(config, port=port)
        yield Running(port, upstream, log_path)
    finally:
        starter.stop_all()
        upstream.stop()


NO_CATCH_ALL_ROUTES = """
[route:app]
path = /app/
upstream = app

[route:prweb]
path = /prweb
query = pyActivity=pzIncludeMashupScripts
upstream = app

[route:ro]
path = /ro
methods = GET
upstream = app
"""


@pytest.fixture(scope="module")
def app_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """chatproxy with routes on /app/, /prweb (query required) and /ro (GET only): no catch-all."""
    yield from _start(tmp_path_factory, "app-only", NO_CATCH_ALL_ROUTES)


SPECIFICITY_ROUTES = "".join(
    f"[route:{name}]\n{body}\nrewrite_path = /r/{name}\nupstream = app\n\n"
    for name, body in [
        ("any", "path = /"),
        ("app", "path = /app"),
        ("app-x", "path = /app/x"),
        ("wild", "hosts = *.example.test"),
        ("exact", "hosts = chat.example.test"),
        ("regex", "path_regex = /app/[0-9]+"),
        ("query", "path = /app\nquery = pyActivity=pzIncludeMashupScripts"),
        ("m-any", "path = /m"),
        ("m-get", "path = /m\nmethods = GET"),
        ("first", "path = /dup"),
        ("second", "path = /dup"),
    ]
)


@pytest.fixture(scope="module")
def specific(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """chatproxy with overlapping routes, each rewriting the path to /r/ROUTE-NAME."""
    yield from _start(tmp_path_factory, "specific", SPECIFICITY_ROUTES)


# ---------------------------------------------------------------------------
# The normalised path


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/app//x/./y", "/app/x/y"),
        ("/app/%7Efoo", "/app/~foo"),
        ("/app/x/../y", "/app/y"),
        ("/app/%2e%2e/app/z", "/app/z"),
        ("//app///x", "/app/x"),
        ("/app/%41%62c", "/app/Abc"),
        ("/app/.", "/app/"),
        ("/app/%e2%82%ac", "/app/%E2%82%AC"),
        ("/app/x?q=%2e%2e/../&r=%2f", "/app/x?q=%2e%2e/../&r=%2f"),
        ("/app/a/./b/../c//d?x=1", "/app/a/c/d?x=1"),
        ("http://proxy.test/app//abs/./form", "/app/abs/form"),
    ],
)
def test_upstream_receives_the_normalised_path(app_only, target, forwarded):
    """Dot-segments, repeated slashes and encoded unreserved characters are resolved before
    routing, and the upstream receives exactly the normal form (query untouched)."""
    before = len(app_only.upstream.requests)
    response = app_only.send(target)
    assert response.status == 200, response
    assert response.json()["path"] == forwarded
    assert [r["path"] for r in app_only.upstream.requests[before:]] == [forwarded]


@pytest.mark.parametrize(
    "target",
    [
        "/app/../secret",
        "/app/%2e%2e/secret",
        "/app/%2E%2E/secret",
        "/app/.%2e/secret",
        "/app/./../secret",
        "/app/x/../../secret",
        "/app",
        "/apple",
        "/apple/x",
        "/secret/app/",
        "/",
        "http://proxy.test/app/../secret",
    ],
)
def test_paths_outside_the_route_get_404_and_never_reach_the_upstream(app_only, target):
    """A path that normalises to somewhere outside /app/ matches no route: 404, nothing
    forwarded, and an access-log line with the 404."""
    before = len(app_only.upstream.requests)
    response = app_only.send(target)
    assert response.status == 404, response
    assert 0 < len(response.body) < 200
    assert len(app_only.upstream.requests) == before
    line = json.loads(wait_for_log_line(app_only.log_path, lambda text: json.loads(text)["target"] == target))
    assert line["status"] == 404 and line["route"] is None


@pytest.mark.parametrize(
    "target",
    [
        "/app/%2fsecret",
        "/app/%2F..%2Fsecret",
        "/app/..%2f..%2fsecret",
        "/app/..;/secret",
        "/app/..;jsessionid=x/secret",
        "/app/.;/x",
        "/app\\..\\secret",
        "/app/%5c..%5csecret",
        "/app/%252e%252e/secret",
        "/app/%252fsecret",
        "/app/%00",
        "/../app/x",
        "/app/../../app/x",
        "/app/%zz",
        "/app/x#/../../secret",
    ],
)
def test_ambiguous_paths_get_400_and_never_reach_the_upstream(app_only, target):
    """Encoded slashes and backslashes, ..; parameters, double encoding, NUL, bad escapes and
    paths climbing above the root are refused with 400 and never forwarded."""
    before = len(app_only.upstream.requests)
    response = app_only.send(target)
    assert response.status == 400, response
    assert 0 < len(response.body) < 200
    assert len(app_only.upstream.requests) == before


def test_upstream_never_receives_a_path_outside_the_route(app_only):
    """Across every test of this module, each path the upstream received lies in a route."""
    app_only.send("/app/%2e%2e%2f%2e%2e/x")
    for record in app_only.upstream.requests:
        path = record["path"].split("?", 1)[0]
        assert path.startswith("/app/") or path in ("/prweb", "/ro"), record["path"]


# ---------------------------------------------------------------------------
# No route, query and method requirements


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/prweb?pyActivity=pzIncludeMashupScripts", 200),
        ("GET", "/prweb?a=1&pyActivity=pzIncludeMashupScripts", 200),
        ("GET", "/prweb?pyActivity=pz%49ncludeMashupScripts", 200),
        ("GET", "/prweb?pyActivity=pzIncludeMashupScripts&pyActivity=pzIncludeMashupScripts", 200),
        ("GET", "/prweb?pyActivity=pzIncludeMashupScripts&pyActivity=evil", 404),
        ("GET", "/prweb?pyActivity=evil&pyActivity=pzIncludeMashupScripts", 404),
        ("GET", "/prweb?py%41ctivity=evil&pyActivity=pzIncludeMashupScripts", 404),
        ("GET", "/prweb?pyActivity=pzIncludeMashupScripts&pyActivity", 404),
        ("GET", "/prweb?pyActivity=other", 404),
        ("GET", "/prweb", 404),
        ("GET", "/prweb/sub?pyActivity=pzIncludeMashupScripts", 200),
        ("GET", "/prwebx?pyActivity=pzIncludeMashupScripts", 404),
        ("GET", "/ro", 200),
        ("HEAD", "/ro", 200),
        ("POST", "/ro", 404),
        ("DELETE", "/ro", 404),
    ],
)
def test_query_and_method_requirements(app_only, method, target, status):
    """A query requirement matches only when every occurrence of the parameter carries the
    value; a methods list admits those methods (GET implies HEAD); anything else has no route
    and never reaches the upstream. What is forwarded keeps the query byte for byte."""
    before = len(app_only.upstream.requests)
    response = app_only.send(target, method)
    assert response.status == status, response
    received = app_only.upstream.requests[before:]
    if status == 404:
        assert received == []
    else:
        assert [(r["method"], r["path"]) for r in received] == [(method, target)]


# ---------------------------------------------------------------------------
# The most specific route wins


@pytest.mark.parametrize(
    ("host", "method", "target", "route"),
    [
        ("other.test", "GET", "/", "any"),
        ("other.test", "GET", "/elsewhere?a=1", "any"),
        ("other.test", "GET", "/app", "app"),
        ("other.test", "GET", "/app/y", "app"),
        ("other.test", "GET", "/apple", "any"),
        ("other.test", "GET", "/app/x/z", "app-x"),
        ("other.test", "GET", "/app/xz", "app"),
        ("other.test", "GET", "/app/123", "regex"),
        ("other.test", "GET", "/app/123/more", "app"),
        ("other.test", "GET", "/app//./123", "regex"),
        ("a.example.test", "GET", "/app/x/z", "wild"),
        ("deep.a.example.test:8080", "GET", "/", "wild"),
        ("example.test", "GET", "/", "any"),
        ("chat.example.test", "GET", "/app/123", "exact"),
        ("CHAT.Example.TEST:8443", "GET", "/app/x", "exact"),
        ("chat.example.test.", "GET", "/", "exact"),
        ("other.test", "GET", "/app/y?pyActivity=pzIncludeMashupScripts", "query"),
        ("other.test", "GET", "/app/y?pyActivity=pzIncludeMashupScripts&pyActivity=x", "app"),
        ("other.test", "GET", "/m", "m-get"),
        ("other.test", "POST", "/m", "m-any"),
        ("other.test", "GET", "/dup", "first"),
    ],
)
def test_most_specific_route_wins(specific, host, method, target, route):
    """Exact host over wildcard over any host, then regex over prefix and longer prefixes,
    then query requirements, then methods, then the first defined; rewrite_path replaces the
    path and keeps the query string."""
    before = len(specific.upstream.requests)
    response = specific.send(target, method, host=host)
    assert response.status == 200, response
    query = target.split("?", 1)[1] if "?" in target else ""
    expected = f"/r/{route}" + (f"?{query}" if query else "")
    assert [r["path"] for r in specific.upstream.requests[before:]] == [expected]
    marker = (host.lower().split(":")[0].rstrip("."), method, target)
    line = json.loads(wait_for_log_line(
        specific.log_path, lambda text: tuple(json.loads(text)[k] for k in ("host", "method", "target")) == marker))
    assert line["route"] == route


def test_head_uses_the_get_only_route(specific):
    """HEAD is admitted by a route limited to GET (and wins over the unrestricted one)."""
    before = len(specific.upstream.requests)
    response = specific.send("/m", "HEAD")
    assert response.status == 200
    received = specific.upstream.requests[before:]
    assert [(r["method"], r["path"]) for r in received] == [("HEAD", "/r/m-get")]
