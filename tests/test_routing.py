"""Fast unit tests of chatproxy.proxy.routing: path normalisation and route matching."""

from __future__ import annotations

import re

import pytest

from chatproxy.config import QueryRequirement, Route
from chatproxy.http.paths import PathError, normalize_path
from chatproxy.proxy.routing import RequestFacts, RouteTable, path_has_prefix

# ---------------------------------------------------------------------------
# normalize_path


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/app", "/app"),
        ("/app/", "/app/"),
        ("/app//x/./y", "/app/x/y"),
        ("//app///x", "/app/x"),
        ("/app/%7Efoo", "/app/~foo"),
        ("/app/%7efoo", "/app/~foo"),
        ("/app/%41%62%2D%5F", "/app/Ab-_"),
        ("/app/x/../y", "/app/y"),
        ("/app/x/..", "/app/"),
        ("/app/.", "/app/"),
        ("/app/./", "/app/"),
        ("/app/../secret", "/secret"),
        ("/app/%2e%2e/secret", "/secret"),
        ("/app/%2E%2E/secret", "/secret"),
        ("/app/.%2e/secret", "/secret"),
        ("/app/%2e/x", "/app/x"),
        ("/app/.../x", "/app/.../x"),
        ("/app/..x/y", "/app/..x/y"),
        ("/app/%e2%82%ac", "/app/%E2%82%AC"),
        ("/app/%20x", "/app/%20x"),
        ("/app/%2541", "/app/%2541"),
        ("/app;jsessionid=1/x", "/app;jsessionid=1/x"),
        ("/a/b/c/../../d", "/a/d"),
        ("/app/x:y@z!$&'()*+,;=", "/app/x:y@z!$&'()*+,;="),
    ],
)
def test_normalize_path_normal_forms(raw, normal):
    """normalize_path decodes unreserved escapes, upper-cases the others, resolves
    dot-segments and merges repeated slashes."""
    assert normalize_path(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "app/x",  # not starting with /
        "",
        "/app/%2fsecret",  # encoded slash
        "/app/%2Fsecret",
        "/app/%5csecret",  # encoded backslash
        "/app/%00",  # encoded NUL
        "/app\\..\\secret",  # literal backslash
        "/app/..;/secret",  # ..; path parameter
        "/app/.;x/secret",
        "/app/..;jsessionid=1/secret",
        "/app/%252e%252e/secret",  # double encoding
        "/app/%252F",
        "/app/%255c",
        "/app/%2500",
        "/..",  # climbing above the root
        "/app/../../etc",
        "/%2e%2e/etc",
        "/app/%zz",  # malformed escapes
        "/app/%4",
        "/app/%",
        "/app/x y",  # characters that must be encoded
        "/app/x\"y",
        "/app/<x>",
        "/app/\x00",
        "/app/caf\xe9",
        "/app/x#frag",
        "/app/x?y",
    ],
)
def test_normalize_path_refusals(raw):
    """Forms whose meaning differs between servers are refused with PathError."""
    with pytest.raises(PathError):
        normalize_path(raw)


@pytest.mark.parametrize(
    "raw",
    ["/", "/app/x/y", "/app//x/./y", "/app/%7Efoo/%2e%2e/bar", "/a/b/../c/./d//e/", "/app/%e2%82%ac/x"],
)
def test_normalize_path_is_idempotent(raw):
    """Normalising a normal form changes nothing (matching and forwarding agree)."""
    once = normalize_path(raw)
    assert normalize_path(once) == once


@pytest.mark.parametrize(
    ("path", "prefix", "expected"),
    [
        ("/app", "/app", True),
        ("/app/x", "/app", True),
        ("/apple", "/app", False),
        ("/app-x", "/app", False),
        ("/ap", "/app", False),
        ("/app/", "/app/", True),
        ("/app", "/app/", False),
        ("/app/x", "/app/", True),
        ("/anything", "/", True),
        ("/", "/", True),
        ("/app/Chat", "/app/Chat", True),
        ("/app/ChatX", "/app/Chat", False),
    ],
)
def test_path_has_prefix_segment_boundaries(path, prefix, expected):
    """A prefix covers itself and what lies below it, never a longer segment name."""
    assert path_has_prefix(path, prefix) is expected


# ---------------------------------------------------------------------------
# RouteTable.match


def route(name: str, order: int, *, path: str = "/", path_regex: str | None = None, hosts: tuple[str, ...] | None = None,
          query: dict[str, str | None] | None = None, methods: tuple[str, ...] | None = None,
          listeners: tuple[str, ...] | None = None) -> Route:
    return Route(
        name=name,
        upstream="app",
        order=order,
        listeners=listeners,
        hosts=hosts,
        path=path,
        path_regex=re.compile(path_regex) if path_regex else None,
        query=tuple(QueryRequirement(k, v) for k, v in (query or {}).items()),
        methods=frozenset(methods) if methods else None,
    )


TABLE = RouteTable([
    route("any", 0),
    route("app", 1, path="/app"),
    route("app-x", 2, path="/app/x"),
    route("wild", 3, hosts=("*.example.test",)),
    route("exact", 4, hosts=("chat.example.test",)),
    route("regex", 5, path_regex=r"/app/[0-9]+"),
    route("query", 6, path="/app", query={"pyActivity": "pzIncludeMashupScripts"}),
    route("query-any", 7, path="/q", query={"token": None}),
    route("m-any", 8, path="/m"),
    route("m-get", 9, path="/m", methods=("GET",)),
    route("first", 10, path="/dup"),
    route("second", 11, path="/dup"),
    route("admin-only", 12, path="/admin", listeners=("admin",)),
    route("ip", 13, hosts=("10.1.2.3",), path="/ip"),
])


@pytest.mark.parametrize(
    ("host", "method", "path", "query", "expected"),
    [
        ("other.test", "GET", "/", "", "any"),
        ("other.test", "GET", "/elsewhere", "", "any"),
        ("other.test", "GET", "/app", "", "app"),
        ("other.test", "GET", "/app/y", "", "app"),
        ("other.test", "GET", "/apple", "", "any"),  # segment boundary
        ("other.test", "GET", "/app/x/z", "", "app-x"),  # longer prefix wins
        ("other.test", "GET", "/app/xz", "", "app"),
        ("other.test", "GET", "/app/123", "", "regex"),  # regex over prefix
        ("other.test", "GET", "/app/123/more", "", "app"),  # regex must match all of the path
        ("a.example.test", "GET", "/app/x/z", "", "wild"),  # wildcard host over any host
        ("deep.a.example.test", "GET", "/", "", "wild"),
        ("example.test", "GET", "/", "", "any"),  # *.x does not cover x itself
        ("badexample.test", "GET", "/", "", "any"),
        ("chat.example.test", "GET", "/app/123", "", "exact"),  # exact host over everything
        ("10.1.2.3", "GET", "/ip/x", "", "ip"),
        ("10.1.2.3", "GET", "/other", "", "any"),
        ("other.test", "GET", "/app", "pyActivity=pzIncludeMashupScripts", "query"),
        ("other.test", "GET", "/app/y", "a=1&pyActivity=pzIncludeMashupScripts&b=2", "query"),
        ("other.test", "GET", "/app/y", "pyActivity=pzIncludeMashupScripts&pyActivity=pzIncludeMashupScripts",
         "query"),
        ("other.test", "GET", "/app/y", "pyActivity=pzIncludeMashupScripts&pyActivity=other", "app"),
        ("other.test", "GET", "/app/y", "pyActivity=other&pyActivity=pzIncludeMashupScripts", "app"),
        ("other.test", "GET", "/app/y", "py%41ctivity=other&pyActivity=pzIncludeMashupScripts", "app"),
        ("other.test", "GET", "/app/y", "pyActivity=pzIncludeMashupScripts&pyActivity", "app"),
        ("other.test", "GET", "/app/y", "pyActivity=pzIncludeMashupScripts;pyActivity=x", "app"),
        ("other.test", "GET", "/app/y", "pyActivity=pzIncludeMashupScriptsX", "app"),
        ("other.test", "GET", "/app/y", "pyactivity=pzIncludeMashupScripts", "app"),
        ("other.test", "GET", "/app/y", "pyActivity=pz%49ncludeMashupScripts", "query"),  # decoded value
        ("other.test", "GET", "/q", "token=", "query-any"),
        ("other.test", "GET", "/q", "token=abc", "query-any"),
        ("other.test", "GET", "/q", "tokens=abc", "any"),
        ("other.test", "GET", "/m", "", "m-get"),  # methods-restricted route over unrestricted
        ("other.test", "HEAD", "/m", "", "m-get"),  # GET implies HEAD
        ("other.test", "POST", "/m", "", "m-any"),
        ("other.test", "DELETE", "/m/x", "", "m-any"),
        ("other.test", "GET", "/dup", "", "first"),  # tie: defined first wins
        ("other.test", "GET", "/admin", "", "any"),  # route limited to another listener
    ],
)
def test_route_table_most_specific_wins(host, method, path, query, expected):
    """RouteTable.match picks the most specific route: host rank, then regex over prefix and
    longer prefixes, then query requirements, then method restrictions, then definition order."""
    found = TABLE.match(RequestFacts("main", host, method, path, query))
    assert found is not None
    assert found.name == expected


def test_route_table_listener_restriction():
    """A route limited to listeners matches only requests that came in on one of them."""
    found = TABLE.match(RequestFacts("admin", "other.test", "GET", "/admin/x", ""))
    assert found is not None and found.name == "admin-only"


NO_CATCH_ALL = RouteTable([
    route("app", 0, path="/app/"),
    route("prweb", 1, path="/prweb", query={"pyActivity": "pzIncludeMashupScripts"}),
    route("get-only", 2, path="/ro", methods=("GET",)),
    route("host", 3, hosts=("chat.example.test",), path="/h"),
])


@pytest.mark.parametrize(
    ("host", "method", "path", "query", "expected"),
    [
        ("x", "GET", "/app/x", "", "app"),
        ("x", "GET", "/app/", "", "app"),
        ("x", "GET", "/app", "", None),  # the route is /app/
        ("x", "GET", "/apple", "", None),
        ("x", "GET", "/", "", None),
        ("x", "GET", "/prweb", "pyActivity=pzIncludeMashupScripts", "prweb"),
        ("x", "GET", "/prweb", "", None),
        ("x", "GET", "/prweb", "pyActivity=pzIncludeMashupScripts&pyActivity=evil", None),
        ("x", "GET", "/prweb", "pyActivity=evil", None),
        ("x", "GET", "/ro", "", "get-only"),
        ("x", "HEAD", "/ro", "", "get-only"),
        ("x", "POST", "/ro", "", None),
        ("x", "PUT", "/ro", "", None),
        ("chat.example.test", "GET", "/h", "", "host"),
        ("other.example.test", "GET", "/h", "", None),
    ],
)
def test_route_table_no_match_gives_none(host, method, path, query, expected):
    """Without a catch-all, requests no route covers match nothing (the proxy answers 404)."""
    found = NO_CATCH_ALL.match(RequestFacts("main", host, method, path, query))
    assert (found.name if found else None) == expected


def test_route_table_order_is_most_specific_first():
    """RouteTable.routes lists regex routes first, then longer prefixes, query, methods, order."""
    names = [r.name for r in RouteTable([
        route("a", 0, path="/"),
        route("b", 1, path="/x/y"),
        route("c", 2, path_regex="/z"),
        route("d", 3, path="/x/y", query={"q": None}),
        route("e", 4, path="/x/y", methods=("GET",)),
    ]).routes]
    assert names == ["c", "d", "e", "b", "a"]
