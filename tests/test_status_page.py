"""Unit tests of the status page's parts without I/O: the snapshot window (with a fake
clock), the page builder (facts -> HTML), the merge of workers' facts, password hashes,
the admin access decision and the [admin] options of the configuration loader."""

from __future__ import annotations

import base64
import io
import ipaddress
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from chatproxy.config import ConfigError, load_config
from chatproxy.config.model import Admin
from chatproxy.http.messages import RequestHead
from chatproxy.http.passwords import basic_credentials, hash_password, parse_password_hash
from chatproxy.process.admin_access import AdminAccess, Verify
from chatproxy.process.check import main as cli_main
from chatproxy.process.status_data import merge_process_facts
from chatproxy.process.status_page import render_status
from chatproxy.process.status_window import SnapshotWindow, status_totals
from chatproxy.proxy.stats import RECENT_REFUSALS, Stats

#: A cheap hash for tests (the default parameters cost tens of milliseconds per check).
FAST = {"n": 2 ** 4, "r": 1, "p": 1}


# ---------------------------------------------------------------------------
# The snapshot window


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def test_window_differences_per_span_with_a_fake_clock():
    """Snapshots every 10 s: the figures for 1, 5 and 15 minutes are the totals now minus
    the newest snapshot at least that old; unchanged keys are left out."""
    clock, window = FakeClock(), SnapshotWindow(spans=(60, 300, 900), interval=10)
    totals: Counter[str] = Counter()
    window.record(clock.now, totals)
    for step in range(1, 91):  # 15 minutes, one request a step, a 5xx at steps 15, 45 and 75
        totals["status:2xx"] += 1
        if step % 30 == 15:
            totals["status:5xx"] += 1
        window.record(clock.advance(10), totals)
    figures = window.figures(clock.now, totals)
    assert [(f.span, f.covered) for f in figures] == [(60, 60), (300, 300), (900, 900)]
    assert [f.counts.get("status:2xx") for f in figures] == [6, 30, 90]
    assert [f.counts.get("status:5xx") for f in figures] == [None, 1, 3]


def test_window_is_bounded_and_says_how_much_a_young_process_covers():
    """A window keeps no more snapshots than its longest span needs; before a span has
    passed the figures count from the first snapshot and say how many seconds they cover."""
    clock, window = FakeClock(), SnapshotWindow(spans=(60, 300), interval=10)
    window.record(clock.now, {})
    clock.advance(25)
    figures = window.figures(clock.now, {"close:1000": 2})
    assert [(f.covered, dict(f.counts)) for f in figures] == [(25, {"close:1000": 2}), (25, {"close:1000": 2})]
    for _ in range(1000):
        window.record(clock.advance(10), {})
    assert len(window) == 300 // 10 + 2


def test_window_between_snapshots_uses_the_older_one():
    """Asked between two snapshots, a span is measured from the newest snapshot that is at
    least the span old (so it covers a little more than the span, never less)."""
    clock, window = FakeClock(), SnapshotWindow(spans=(60,), interval=10)
    for value in range(10):
        window.record(clock.now, {"status:2xx": value})
        clock.advance(10)
    now = clock.advance(-5)  # 95 s after the first: the snapshot of 30 s (value 3) is the newest >= 60 s old
    [figures] = window.figures(now, {"status:2xx": 100})
    assert (figures.covered, figures.counts) == (65, {"status:2xx": 97})


def test_status_totals_flatten_requests_closes_and_refusals():
    """The running totals the window keeps: requests by status class (all routes and
    protocols), WebSocket closes by code, and refusals by filter."""
    stats = Stats()
    stats.request("a", 200, 0.01, 1, 0)
    stats.request("b", 204, 0.01, 1, 0, protocol="h2")
    stats.request("a", 403, 0.01, 1, 0)
    stats.websocket_session("ws", (1, 1), (1, 1), 1000)
    stats.websocket_session("ws", (1, 1), (1, 1), None)
    stats.filter_outcomes.update({"auth:refused": 2, "auth:passed": 5, "waf:refused": 1})
    assert status_totals(stats) == {"status:2xx": 2, "status:4xx": 1, "close:1000": 1, "close:1006": 1,
                                    "refused:auth": 2, "refused:waf": 1}


def _head(**changes: Any) -> RequestHead:
    values: dict[str, Any] = dict(method="GET", target="/chat?token=secret", path="/chat", query="token=secret",
                                  version="1.1", headers=((b"authorization", b"Bearer secret"),), host="h",
                                  authority="h", client="127.0.0.1", peer="127.0.0.1", tls=False, listener="main",
                                  route="chat")
    values.update(changes)
    return RequestHead(**values)


def test_refusals_keep_the_newest_without_query_or_headers():
    """Stats keeps the last RECENT_REFUSALS refusals, each with the normalised path only:
    nothing of the query string or of the headers."""
    stats = Stats()
    for i in range(RECENT_REFUSALS + 5):
        stats.filter_refused("auth", _head(path=f"/p{i}"), 401, "no token")
    kept = list(stats.refusals)
    assert len(kept) == RECENT_REFUSALS and kept[-1].path == f"/p{RECENT_REFUSALS + 4}"
    assert "secret" not in repr(kept)


# ---------------------------------------------------------------------------
# The page builder


def _facts(**changes: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "version": "9.8.7",
        "config_files": [{"path": "/etc/chatproxy/chatproxy.ini", "modified": 1_700_000_000.0, "sha256": "abcdef012345"}],
        "listeners": [{"name": "public", "endpoint": "tcp:8443", "tls": True, "allow": None}],
        "routes": [{"name": "chat-ws", "match": "path /chat", "filters": ["origin-check"], "upstream": "pega",
                    "websocket": "bridge"}],
        "upstreams": [{"name": "pega", "health_check": "/healthz", "servers": ["http://a:1", "http://b:2"]}],
        "processes": 1, "now": 1_700_000_100.0,
        "open_listeners": {"public": 1}, "connections": {"public": 3}, "sessions": {"chat-ws": 1},
        "servers": {"pega": {"http://a:1": {"healthy": 1, "failing_checks": 0, "ejected": 0, "failures_in_a_row": 0,
                                            "connect_failures": 0, "idle": 2, "last_check": "200"},
                             "http://b:2": {"healthy": 0, "failing_checks": 1, "ejected": 1, "failures_in_a_row": 3,
                                            "connect_failures": 7, "idle": 0, "last_check": "connection refused"}}},
        "totals": {"status:2xx": 40, "status:4xx": 2, "close:1000": 5, "refused:origin-check": 2},
        "windows": [{"span": 60, "covered": 60, "counts": {"status:2xx": 4}},
                    {"span": 300, "covered": 300, "counts": {"status:2xx": 20, "refused:origin-check": 1}},
                    {"span": 900, "covered": 100, "counts": {"status:2xx": 40}}],
        "refusals": [{"time": 1_700_000_090.0, "filter": "origin-check", "route": "chat-ws", "client": "10.0.0.9",
                      "method": "GET", "path": "/chat", "status": 403, "reason": "origin not allowed"}],
        "certificates": [{"listener": "public", "name": "default", "file": "/tls/a.crt",
                          "not_after": 1_700_000_100.0 + 40 * 86400}],
        "workers": None,
    }
    facts.update(changes)
    return facts


def test_page_shows_every_section_and_refreshes_itself_without_script():
    """The page has a meta refresh and no script, and shows the version, the files, the
    listener, the route with its filters and sessions, both servers' health (active and
    passive), the windowed counts, the refusal and the certificate's days left."""
    page = render_status(_facts())
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "<script" not in page.lower()
    for fact in ("9.8.7", "/etc/chatproxy/chatproxy.ini", "abcdef012345", "2023-11-14 22:13:20 UTC", "tcp:8443",
                 "chat-ws", "origin-check", "bridge", "passing /healthz (200)", "failing /healthz (connection refused)",
                 "ejected", "origin not allowed", "10.0.0.9", "40.0 days", "one process (workers = 1)",
                 "only 100 s so far"):
        assert fact in page, fact
    assert '<td class="ok">healthy</td>' in page and '<td class="bad">unhealthy</td>' in page
    # the requests table: 2xx over 1, 5 and 15 minutes and since start
    assert '<td>2xx</td><td class="n">4</td><td class="n">20</td><td class="n">40</td><td class="n">40</td>' in page


def test_page_escapes_every_value():
    """Names, paths, reasons and addresses are escaped: markup in any of them shows as text."""
    evil = '<script>alert("x")</script>'
    facts = _facts()
    facts["routes"][0]["name"] = evil
    facts["refusals"][0].update(reason=evil, path="/a&b<c>", client='"><img src=x>')
    facts["config_files"][0]["path"] = evil
    page = render_status(facts)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "/a&amp;b&lt;c&gt;" in page


def test_page_with_workers_counts_health_per_worker():
    """With a master: the workers table, and a server healthy in one worker of two says so."""
    facts = _facts(processes=2, workers={"configured": 2, "running": 2, "answering": 2, "restarts": 1, "list": [
        {"index": 1, "pid": 101, "answering": True, "ready": True},
        {"index": 2, "pid": 102, "answering": True, "ready": True}]})
    facts["servers"]["pega"]["http://a:1"]["healthy"] = 1
    facts["refusals"][0]["worker"] = 2
    page = render_status(facts)
    assert "a master and 2 workers" in page and "restarts <b>1</b>" in page
    assert "healthy in 1 of 2 workers" in page
    assert '<td class="n">101</td>' in page and '<th>worker</th>' in page


def test_merge_sums_figures_and_interleaves_refusals():
    """Two workers' process facts: connections, sessions, totals and window counts summed,
    health counted, the window covering what both cover, refusals newest first with
    their worker, each certificate once."""
    one, two = _facts(), _facts()
    two["refusals"] = [dict(one["refusals"][0], time=1_700_000_095.0, client="10.0.0.10")]
    two["windows"][2]["covered"] = 50
    merged = merge_process_facts({2: two, 1: one})
    assert merged["processes"] == 2
    assert merged["connections"] == {"public": 6} and merged["sessions"] == {"chat-ws": 2}
    assert merged["totals"]["status:2xx"] == 80
    assert [w["counts"]["status:2xx"] for w in merged["windows"]] == [8, 40, 80]
    assert merged["windows"][2]["covered"] == 50
    assert merged["servers"]["pega"]["http://b:2"]["ejected"] == 2
    assert merged["servers"]["pega"]["http://a:1"]["healthy"] == 2
    assert [(r["worker"], r["client"]) for r in merged["refusals"]] == [(2, "10.0.0.10"), (1, "10.0.0.9")]
    assert len(merged["certificates"]) == 1
    assert merge_process_facts({})["processes"] == 0
    assert "<table>" in render_status({**_facts(), **merge_process_facts({}), "workers": None})


# ---------------------------------------------------------------------------
# Passwords and access


def test_password_hash_round_trip_and_format():
    """A hash prints as scrypt$N$r$p$SALT$HASH, parses back to itself, accepts its password
    only; malformed hashes are refused with a reason."""
    made = hash_password("correct horse", **FAST)
    text = str(made)
    assert text.startswith("scrypt$16$1$1$") and text.count("$") == 5
    parsed = parse_password_hash(text)
    assert parsed == made
    assert parsed.matches(b"correct horse") and not parsed.matches(b"correct horse ")
    for bad, fragment in (("md5$x", "expected scrypt$"), ("scrypt$3$8$1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "power of two"),
                          ("scrypt$16$99$1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "r must be"),
                          ("scrypt$16$8$1$!!$AAAA", "base64"), ("scrypt$16$8$1$AAAA$AAAA", "too short")):
        with pytest.raises(ValueError, match=fragment.replace("$", r"\$")):
            parse_password_hash(bad)


def _basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_basic_credentials_parsing():
    """Only a well-formed Basic header yields credentials; the password may hold colons."""
    assert basic_credentials(_basic("ops", "a:b")) == (b"ops", b"a:b")
    for value in (None, b"Bearer x", b"Basic !!!", b"Basic " + base64.b64encode(b"nocolon")):
        assert basic_credentials(value) is None


def test_admin_access_allow_then_basic_auth():
    """allow refuses other addresses with 403 (a UNIX-socket client has no address and is
    not refused by it); with a user, missing or wrong credentials get 401 with
    WWW-Authenticate: Basic realm="chatproxy", the right ones pass (again from memory)."""
    admin = Admin(allow=(ipaddress.ip_network("127.0.0.2/32"),), user="ops",
                  password_hash=str(hash_password("s3cret", **FAST)))
    access = AdminAccess(admin)
    denial = access.check("127.0.0.1", _basic("ops", "s3cret"))
    assert denial is not None and denial.status == 403
    pending = access.check("::ffff:127.0.0.2", _basic("ops", "s3cret"))
    assert isinstance(pending, Verify) and access.verify(pending) is None
    for authorization in (None, _basic("ops", "wrong"), _basic("root", "s3cret"), b"Bearer s3cret"):
        denial = access.check("127.0.0.2", authorization)
        if isinstance(denial, Verify):  # a password to check (in a thread, by the site)
            denial = access.verify(denial)
        assert denial is not None and denial.status == 401
        assert dict(denial.headers)[b"www-authenticate"].startswith(b'Basic realm="chatproxy"')
    assert access.check("127.0.0.2", _basic("ops", "s3cret")) is None  # remembered: no second scrypt
    assert AdminAccess(None).check("203.0.113.1", None) is None
    assert AdminAccess(Admin(allow=admin.allow)).check(None, None) is None


def test_hash_password_command_reads_stdin_and_prints_a_hash_that_verifies():
    """python -m chatproxy hash-password: the first line of standard input (its newline not
    part of the password) becomes a hash that verifies that password; an empty one is refused."""
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["hash-password"], out=out, err=err, stdin=io.StringIO("pa ss\n")) == 0
    assert parse_password_hash(out.getvalue().strip()).matches(b"pa ss")
    assert cli_main(["hash-password"], out=io.StringIO(), err=err, stdin=io.StringIO("\n")) == 2
    assert "empty password" in err.getvalue()


# ---------------------------------------------------------------------------
# [admin] in the configuration files

BASE = """
[listen:main]
endpoint = tcp:8080:interface=127.0.0.1
[upstream:app]
servers = http://127.0.0.1:9000
[route:all]
upstream = app
"""


def _write(tmp_path: Path, admin: str) -> Path:
    path = tmp_path / "chatproxy.ini"
    path.write_text(textwrap.dedent(BASE) + "[admin]\n" + admin)
    return path


def test_admin_options_load_into_the_model(tmp_path):
    """[admin] allow, user and password_hash load into the model; the endpoint default is loopback."""
    made = str(hash_password("x", **FAST))
    config = load_config([_write(tmp_path, f"allow = 127.0.0.2, 10.0.0.0/8\nuser = ops\npassword_hash = {made}\n")])
    assert config.admin is not None
    assert config.admin.endpoint == "tcp:9180:interface=127.0.0.1"
    assert [str(n) for n in config.admin.allow or ()] == ["127.0.0.2/32", "10.0.0.0/8"]
    assert (config.admin.user, config.admin.password_hash) == ("ops", made)


@pytest.mark.parametrize("text, option, fragment", [
    ("allow = 10.0.0.0/33\n", "allow", "'10.0.0.0/33' is not an IP"),
    ("user = ops\n", "password_hash", "required with user"),
    ("password_hash = {hash}\n", "user", "required with password_hash"),
    ("user = ops\npassword_hash = md5$abc\n", "password_hash", "expected scrypt$N$r$p$SALT$HASH"),
    ("user = a:b\npassword_hash = {hash}\n", "user", "without ':'"),
    ("realm = x\n", "realm", "unknown option (a [admin] section takes: allow, endpoint, password_hash, user)"),
])
def test_admin_option_errors_name_file_section_and_option(tmp_path, text, option, fragment):
    """Each mistake in [admin] is a one-line ConfigError naming the file, [admin] and the option."""
    path = _write(tmp_path, text.format(hash=hash_password("x", **FAST)))
    with pytest.raises(ConfigError) as info:
        load_config([path])
    error = info.value
    assert (error.file, error.section, error.option) == (str(path), "admin", option), str(error)
    assert f"{path} [admin] {option}: " in str(error) and fragment in str(error)


def test_a_password_is_checked_off_the_reactor_thread(monkeypatch):
    """The admin site never runs an scrypt while rendering: a request whose password must be
    checked gets NOT_DONE_YET and the check goes to a thread (deferToThread), after which
    the answer is written; remembered credentials are answered at once."""
    from twisted.internet import defer
    from twisted.web.server import NOT_DONE_YET
    from twisted.web.test.requesthelper import DummyRequest

    import chatproxy.process.admin as admin_module
    from chatproxy.process.admin import Guarded, TextResource

    threaded: list[Any] = []
    monkeypatch.setattr(admin_module, "deferToThread",
                        lambda work, *args: threaded.append((work, args)) or defer.succeed(work(*args)))
    access = AdminAccess(Admin(user="ops", password_hash=str(hash_password("s3cret", **FAST))))
    guarded = Guarded(TextResource(lambda: (200, b"text/plain", b"the status\n")), access)
    request = DummyRequest([b"status"])
    request.requestHeaders.setRawHeaders(b"authorization", [_basic("ops", "s3cret")])
    assert guarded.render(request) is NOT_DONE_YET
    assert [work for work, _ in threaded] == [access.verify]
    assert request.finished and b"".join(request.written) == b"the status\n"
    again = DummyRequest([b"status"])
    again.requestHeaders.setRawHeaders(b"authorization", [_basic("ops", "s3cret")])
    assert guarded.render(again) == b"the status\n" and len(threaded) == 1
