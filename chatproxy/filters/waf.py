"""The ``waf`` filter kind: a web application firewall with OWASP CRS semantics.

::

    [filter:waf]
    use = waf
    paranoia = 1
    threshold = 5
    inspect_body_bytes = 64k
    disable_rules = 920350

Every rule of :mod:`chatproxy.filters.waf_rules` that the paranoia level
enables inspects the request's targets: the decoded path, query argument
names and values, header values (except the credential and negotiation
headers listed in :data:`EXCLUDED_HEADERS`), cookie names and values, and
WebSocket text messages from the client (JSON messages by their keys and
string values). A match adds the rule's severity to the anomaly score
(critical 5, error 4, warning 3, notice 2); a request whose score reaches
``threshold`` is refused with 403, a WebSocket session is closed with 1008.
Every request or message with a score above zero gets one log line listing
the matched rule ids, their messages, the targets and (at most 100
characters of) the values.

SQL injection and XSS detection also use libinjection (CRS rules 942100 and
941100) when the optional ``libinjection-python`` package is installed; the
pattern rules always run.

Request bodies: the filter has the proxy's body hook (``inspect_body_bytes``
and ``request_body``): the proxy holds a request until the first
``inspect_body_bytes`` of its body have arrived, and
:meth:`WebApplicationFirewall.inspect_body` parses them (url-encoded, JSON,
multipart; other text as one value) before anything is forwarded.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from typing import Any
from urllib.parse import unquote_to_bytes

from attrs import frozen
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.filters import CloseSession, Filter, FilterOptionError, FilterOptions, IFilterFactory, IRequestFilter, Refuse
from chatproxy.filters import waf_rules
from chatproxy.filters.waf_rules import (
    ALLOWED_CHARSETS,
    ARGUMENTS_ONLY,
    CONTENT_TYPE_RE,
    LIBINJECTION_RULES,
    MAX_ARGS,
    RESTRICTED_EXTENSIONS,
    RESTRICTED_HEADERS,
    RULES,
    RULES_BY_ID,
    Rule,
    Value,
    decode_bytes,
)

log = Logger()

_OPTIONS = ("paranoia", "threshold", "inspect_body_bytes", "disable_rules")
_CACHED_KINDS = frozenset({"path", "name", "header", "ua", "cookie"})
_CACHED_VALUE_CHARS = 1024
_CACHE_ENTRIES = 4096
BLOCKED = "request blocked by the web application firewall"
MAX_INSPECT_BODY_BYTES = 16 * 1024 * 1024
EXCERPT_CHARS = 100

# Header values no attack rule inspects: credentials (also never logged),
# Cookie (inspected cookie by cookie), and the fields of HTTP and browser
# negotiation whose syntax (";q=0.9", quoted brand lists) only causes false
# positives. The protocol rules still look at the ones they are about.
EXCLUDED_HEADERS = frozenset({
    b"authorization", b"proxy-authorization", b"cookie", b"host", b"content-length", b"content-type",
    b"transfer-encoding", b"connection", b"upgrade", b"keep-alive", b"te", b"expect", b"accept",
    b"accept-encoding", b"accept-language", b"accept-charset", b"cache-control", b"pragma", b"if-none-match",
    b"if-match", b"if-modified-since", b"if-unmodified-since", b"if-range", b"range", b"dnt", b"priority",
    b"upgrade-insecure-requests", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-accept",
})
EXCLUDED_PREFIXES = (b"sec-fetch-", b"sec-ch-")
# Inspected with their own target kind ("ua"): at paranoia 1 by the XSS rules
# and the header-borne attacks (Shellshock, Log4Shell, code injection, control
# characters), from paranoia 2 by every attack rule.
UA_HEADERS = frozenset({b"user-agent", b"referer"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2}|[uU][0-9a-fA-F]{4})")
_PARAM = re.compile(r"""([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))""")


@frozen
class Match:
    """One rule that matched: where, and what."""

    rule: Rule
    target: str
    value: str
    detail: str = ""

    def describe(self) -> str:
        """``942100 SQL Injection ... at ARGS:q='...'`` for the log line."""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.rule.id} {self.rule.message}{detail} at {self.target}={excerpt(self.value)}"


class Inspection:
    """The outcome of inspecting a request or message: the matches and their score.

    A rule counts once, at its first match, however many targets it matches.
    """

    def __init__(self) -> None:
        self.matches: list[Match] = []
        self.matched: set[int] = set()
        self.score = 0
        self.arguments = 0

    def add(self, rule: Rule, target: str, value: str, detail: str = "") -> None:
        """Record a match of ``rule`` (ignored if it already matched)."""
        if rule.id in self.matched:
            return
        self.matched.add(rule.id)
        self.matches.append(Match(rule, target, value, detail))
        self.score += rule.score

    @property
    def rule_ids(self) -> list[int]:
        """The ids of the matched rules, in the order they matched."""
        return [m.rule.id for m in self.matches]

    def categories(self) -> set[str]:
        """The categories of the matched rules."""
        return {m.rule.category for m in self.matches}


def excerpt(value: str, limit: int = EXCERPT_CHARS) -> str:
    """A value for a log line: quoted, control characters escaped, at most
    ``limit`` characters of it."""
    cut = value[:limit]
    text = repr(cut)
    return text + "..." if len(value) > limit else text


# ---------------------------------------------------------------------------
# Parsing targets


Target = tuple[str, str, str]  # (kind, name, value)


def parse_form(data: bytes) -> list[tuple[str, str]]:
    """``application/x-www-form-urlencoded`` (and query string) pairs, decoded
    once as the application will see them."""
    pairs: list[tuple[str, str]] = []
    for piece in data.split(b"&"):
        if not piece:
            continue
        name, _, value = piece.partition(b"=")
        pairs.append((decode_bytes(unquote_to_bytes(name.replace(b"+", b" "))),
                      decode_bytes(unquote_to_bytes(value.replace(b"+", b" ")))))
    return pairs


def parse_cookies(value: str) -> list[tuple[str, str]]:
    """The name/value pairs of a Cookie header."""
    pairs = []
    for piece in value.split(";"):
        name, sep, cookie = piece.partition("=")
        name = name.strip()
        if name or cookie:
            pairs.append((name, cookie.strip()))
    return pairs


def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """The media type (lower-case) and its parameters (names lower-case)."""
    if not value:
        return "", {}
    media, _, rest = value.partition(";")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _PARAM.finditer(rest)}
    return media.strip().lower(), params


def json_targets(document: Any, prefix: str) -> Iterator[Target]:
    """The keys ("name") and string values ("arg") of a parsed JSON document,
    named ``prefix:$.a.b[0]``; numbers, booleans and nulls are not inspected."""
    stack: list[tuple[str, Any]] = [("$", document)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                key = str(key)
                yield ("name", f"{prefix}:{path}.{key}", key)
                stack.append((f"{path}.{key}", child))
        elif isinstance(item, list):
            for index in range(len(item) - 1, -1, -1):
                stack.append((f"{path}[{index}]", item[index]))
        elif isinstance(item, str):
            yield ("arg", f"{prefix}:{path}", item)


_TEXT_TYPES = ("application/xml", "application/soap+xml")


class BodyError(Exception):
    """A body that does not parse as its content type says."""


def multipart_targets(body: bytes, boundary: str, truncated: bool) -> list[Target]:
    """The field names and values of a ``multipart/form-data`` body; for file
    parts the file name, not the content. Raises :class:`BodyError`."""
    delimiter = b"--" + boundary.encode("latin-1")
    parts = body.split(delimiter)
    if len(parts) < 2:
        raise BodyError("no multipart boundary in the body")
    targets: list[Target] = []
    for part in parts[1:]:
        if part.startswith(b"--"):
            break
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            if truncated:
                break
            raise BodyError("a multipart part without a header section")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        name = filename = None
        for line in head.split(b"\r\n"):
            field, _, raw = line.partition(b":")
            if field.strip().lower() == b"content-disposition":
                params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
                          for m in _PARAM.finditer(decode_bytes(raw))}
                name, filename = params.get("name"), params.get("filename")
        if name is None:
            raise BodyError("a multipart part without a field name")
        targets.append(("name", f"ARGS_POST_NAMES:{name}", name))
        if filename is not None:
            targets.append(("arg", f"FILES:{name}", filename))
        else:
            targets.append(("arg", f"ARGS_POST:{name}", decode_bytes(content)))
    return targets


def _header_targets(head: Any) -> Iterator[Target]:
    for name, raw in head.headers:
        lower = name.lower()
        value = decode_bytes(raw)
        if lower == b"cookie":
            for cookie, cookie_value in parse_cookies(value):
                yield ("name", f"REQUEST_COOKIES_NAMES:{cookie}", cookie)
                yield ("cookie", f"REQUEST_COOKIES:{cookie}", cookie_value)
        elif lower in UA_HEADERS:
            yield ("ua", f"REQUEST_HEADERS:{name.decode('latin-1')}", value)
        elif lower not in EXCLUDED_HEADERS and not lower.startswith(EXCLUDED_PREFIXES):
            yield ("header", f"REQUEST_HEADERS:{name.decode('latin-1')}", value)


def _raw_path(head: Any) -> str:
    target = str(head.target)
    if target.startswith(("http://", "https://")):
        slash = target.find("/", target.index("//") + 2)
        target = target[slash:] if slash >= 0 else "/"
    return target.split("?", 1)[0]


# ---------------------------------------------------------------------------
# The filter


class _Plan:
    """How to run a set of rules on a value cheaply: for each transformation,
    one combined regex of all the rules' patterns (the gate), searched first;
    only when it matches are the rules run one by one. Check functions and
    patterns with back-references (which cannot be combined) run on their own."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        grouped: dict[str, list[Rule]] = {}
        self.others: list[Rule] = []
        for r in rules:
            if r.pattern is None or r.check is not None or re.search(r"\\\d", r.pattern.pattern):
                if r.pattern is not None or r.check is not None:
                    self.others.append(r)
                continue
            for transform in r.transforms:
                grouped.setdefault(transform, []).append(r)
        self.gated = [
            (transform, re.compile("|".join(f"(?:{r.pattern.pattern})" for r in group if r.pattern is not None),
                                   re.X | re.S), tuple(group))
            for transform, group in grouped.items()
        ]


@implementer(IRequestFilter)
class WebApplicationFirewall(Filter):
    """Anomaly-scoring inspection of requests and WebSocket messages.

    ``use_libinjection``: None uses libinjection when it is installed; False
    never (the measurement script compares both); True requires it.
    """

    def __init__(self, paranoia: int = 1, threshold: int = 5, inspect_body_bytes: int = 64 * 1024,
                 disable_rules: Iterable[int] = (), use_libinjection: bool | None = None) -> None:
        self.paranoia = paranoia
        self.threshold = threshold
        self.inspect_body_bytes = inspect_body_bytes
        self.disabled = frozenset(disable_rules)
        available = waf_rules.libinjection() is not None
        if use_libinjection and not available:
            raise RuntimeError("libinjection-python is not installed")
        self.libinjection = available if use_libinjection is None else use_libinjection
        active = [r for r in RULES if r.paranoia <= paranoia and r.id not in self.disabled
                  and (self.libinjection or r.id not in LIBINJECTION_RULES)]
        self.active = frozenset(r.id for r in active)
        by_kind: dict[str, list[Rule]] = {}
        for r in active:
            kinds = set(r.targets)
            if paranoia >= 2 and r.category != "protocol" and "arg" in kinds and r.id not in ARGUMENTS_ONLY:
                kinds |= {"header", "ua"}
            for kind in kinds:
                by_kind.setdefault(kind, []).append(r)
        self._plans = {kind: _Plan(rules) for kind, rules in by_kind.items()}
        # Paths, names, header and cookie values repeat across requests: their
        # results are kept (bounded; emptied when full).
        self._cache: dict[tuple[str, str], tuple[tuple[Rule, str], ...]] = {}

    # -- inspection

    def evaluate(self, targets: Iterable[Target], inspection: Inspection | None = None) -> Inspection:
        """Run the active rules on ``targets`` ((kind, name, value) triples)."""
        inspection = inspection if inspection is not None else Inspection()
        for kind, name, raw in targets:
            if kind in ("arg", "cookie"):
                inspection.arguments += 1
            plan = self._plans.get(kind)
            if not raw or plan is None:
                continue
            if kind in _CACHED_KINDS and len(raw) <= _CACHED_VALUE_CHARS:
                key = (kind, raw)
                found = self._cache.get(key)
                if found is None:
                    if len(self._cache) >= _CACHE_ENTRIES:
                        self._cache.clear()
                    found = self._cache[key] = tuple(self._run(plan, Value(raw), frozenset()))
            else:
                found = tuple(self._run(plan, Value(raw), inspection.matched))
            for r, detail in found:
                inspection.add(r, name, raw, detail)
        return inspection

    @staticmethod
    def _run(plan: _Plan, value: Value, skip: Set[int]) -> Iterator[tuple[Rule, str]]:
        """The rules of ``plan`` that match ``value`` (those in ``skip`` are not run)."""
        for transform, gate, rules in plan.gated:
            text = value.get(transform)
            if gate.search(text) is None:
                continue
            for r in rules:
                if r.id not in skip and r.pattern is not None and r.pattern.search(text) is not None:
                    yield r, ""
        for r in plan.others:
            if r.id not in skip:
                found = r.match(value)
                if found is not None:
                    yield r, (found if r.id in LIBINJECTION_RULES else "")

    def _protocol(self, inspection: Inspection, rule_id: int, target: str, value: str) -> None:
        if rule_id in self.active:
            inspection.add(RULES_BY_ID[rule_id], target, value)

    def inspect_request(self, head: Any, body: bytes | None = None, complete: bool = True) -> Inspection:
        """Inspect a request head (and, when given, the start of its body:
        ``complete`` says whether it is all of it)."""
        inspection = Inspection()
        path = _raw_path(head)
        query = head.query
        targets: list[Target] = [("path", "REQUEST_FILENAME", decode_bytes(unquote_to_bytes(path)))]
        for name, value in parse_form(query.encode("latin-1", "replace")) if query else ():
            targets.append(("name", f"ARGS_NAMES:{name}", name))
            targets.append(("arg", f"ARGS:{name}", value))
        targets.extend(_header_targets(head))
        self.evaluate(targets, inspection)
        if body is not None:
            self.inspect_body(head.header("content-type"), body, inspection, complete)
        self._check_head(head, path, query, inspection)
        return inspection

    def _check_head(self, head: Any, path: str, query: str, inspection: Inspection) -> None:
        """The request-level protocol rules (920xxx), in the order of their ids'
        groups: method, framing, percent-encoding, negotiation headers, host
        and names, content type, argument count."""
        method = head.method
        if not method.isascii() or not _TOKEN.fullmatch(method):
            self._protocol(inspection, 920100, "REQUEST_METHOD", method)
        has_body = self._check_framing(head, inspection)
        for name, raw in (("REQUEST_FILENAME", path), ("QUERY_STRING", query)):
            if "%" in raw and _BAD_PERCENT.search(raw):
                self._protocol(inspection, 920220, name, raw)
        content_type = head.header("content-type")
        self._check_negotiation(head, has_body, content_type, inspection)
        self._check_names(head, inspection)
        if content_type is not None:
            self._check_content_type(content_type, inspection)
        if inspection.arguments > MAX_ARGS:
            self._protocol(inspection, 920380, "ARGS", f"{inspection.arguments} arguments")

    def _check_framing(self, head: Any, inspection: Inspection) -> bool:
        """Content-Length and Transfer-Encoding (920160, 920161, 920170);
        whether the request has a body."""
        lengths = [decode_bytes(v) for n, v in head.headers if n.lower() == b"content-length"]
        chunked = any(n.lower() == b"transfer-encoding" for n, _ in head.headers)
        for length in lengths:
            if not length.strip().isdigit() or not length.strip().isascii():
                self._protocol(inspection, 920160, "REQUEST_HEADERS:Content-Length", length)
        if len(lengths) > 1 or (lengths and chunked):
            self._protocol(inspection, 920161, "REQUEST_HEADERS:Content-Length", ", ".join(lengths))
        has_body = chunked or any(v.strip().isdigit() and int(v.strip()) > 0 for v in lengths)
        if head.method in ("GET", "HEAD") and has_body:
            self._protocol(inspection, 920170, "REQUEST_HEADERS:Content-Length", ", ".join(lengths) or "chunked")
        return has_body

    def _check_negotiation(self, head: Any, has_body: bool, content_type: str | None,
                           inspection: Inspection) -> None:
        """Accept, User-Agent and a body's Content-Type present and not empty
        (920300, 920311, 920320, 920330, 920340)."""
        for name, missing, empty in (("Accept", 920300, 920311), ("User-Agent", 920320, 920330)):
            value = head.header(name)
            if value is None:
                self._protocol(inspection, missing, f"REQUEST_HEADERS:{name}", "")
            elif not value.strip():
                self._protocol(inspection, empty, f"REQUEST_HEADERS:{name}", value)
        if has_body and content_type is None:
            self._protocol(inspection, 920340, "REQUEST_HEADERS:Content-Type", "")

    def _check_names(self, head: Any, inspection: Inspection) -> None:
        """A numeric Host, a restricted file extension, restricted header
        names (920350, 920440, 920450)."""
        host = head.host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            self._protocol(inspection, 920350, "REQUEST_HEADERS:Host", head.authority)
        basename = head.path.rsplit("/", 1)[-1]
        if "." in basename and basename.rsplit(".", 1)[-1].lower() in RESTRICTED_EXTENSIONS:
            self._protocol(inspection, 920440, "REQUEST_BASENAME", basename)
        for name, _ in head.headers:
            if name.lower() in RESTRICTED_HEADERS:
                self._protocol(inspection, 920450, f"REQUEST_HEADERS_NAMES:{name.decode('latin-1')}",
                               name.decode("latin-1"))

    def _check_content_type(self, content_type: str, inspection: Inspection) -> None:
        """A Content-Type of the allowed form and charset (920470, 920480)."""
        if not CONTENT_TYPE_RE.match(content_type):
            self._protocol(inspection, 920470, "REQUEST_HEADERS:Content-Type", content_type)
        charset = parse_content_type(content_type)[1].get("charset")
        if charset is not None and charset.strip("'\"").lower() not in ALLOWED_CHARSETS:
            self._protocol(inspection, 920480, "REQUEST_HEADERS:Content-Type", content_type)

    def inspect_body(self, content_type: str | None, body: bytes, inspection: Inspection | None = None,
                     complete: bool = True) -> Inspection:
        """Inspect a request body of ``content_type``: url-encoded fields, JSON keys
        and string values, multipart field names and values (and file names);
        other ``text/*`` and XML bodies as one value (``REQUEST_BODY``). Only the
        first ``inspect_body_bytes`` are inspected (``complete`` False: ``body`` is
        only the start of the body); a body that does not parse is rule 200002
        (unless it was cut short)."""
        inspection = inspection if inspection is not None else Inspection()
        if not body or self.inspect_body_bytes == 0:
            return inspection
        truncated = not complete or len(body) > self.inspect_body_bytes
        body = body[: self.inspect_body_bytes]
        media, params = parse_content_type(content_type)
        targets: list[Target] = []
        try:
            if media == "application/x-www-form-urlencoded":
                for name, value in parse_form(body):
                    targets.append(("name", f"ARGS_POST_NAMES:{name}", name))
                    targets.append(("arg", f"ARGS_POST:{name}", value))
            elif media == "application/json" or media.endswith("+json"):
                text = decode_bytes(body)
                try:
                    document = json.loads(text)
                except (ValueError, RecursionError):
                    if not truncated:
                        raise BodyError("the body is not JSON") from None
                    targets.append(("arg", "REQUEST_BODY", text))
                else:
                    targets.extend(json_targets(document, "JSON"))
            elif media.startswith("multipart/"):
                boundary = params.get("boundary")
                if not boundary:
                    raise BodyError("multipart body without a boundary")
                targets.extend(multipart_targets(body, boundary, truncated))
            elif media.startswith("text/") or media in _TEXT_TYPES or media.endswith("+xml"):
                targets.append(("arg", "REQUEST_BODY", decode_bytes(body)))
        except BodyError as e:
            self._protocol(inspection, 200002, "REQBODY_ERROR", str(e))
            return inspection
        return self.evaluate(targets, inspection)

    def inspect_message(self, text: str) -> Inspection:
        """Inspect a WebSocket text message: a JSON object or array by its keys
        and string values, any other text as one value (``MESSAGE``)."""
        targets: list[Target] = []
        stripped = text.strip()
        if stripped[:1] in ("{", "["):
            try:
                targets.extend(json_targets(json.loads(stripped), "MESSAGE"))
            except (ValueError, RecursionError):
                targets.append(("arg", "MESSAGE", text))
        else:
            targets.append(("arg", "MESSAGE", text))
        return self.evaluate(targets)

    # -- hooks

    def request(self, head: Any) -> Refuse | None:
        """Refuse with 403 when the request's anomaly score reaches the threshold."""
        return self._decide(head, self.inspect_request(head), "")

    def request_body(self, head: Any, body: bytes, complete: bool = True) -> Refuse | None:
        """The body hook: the proxy holds the request until the first
        ``inspect_body_bytes`` of its body are here. Refuses with 403 when the
        head's and the body's scores together reach the threshold; a body that
        matches nothing changes nothing (and logs nothing)."""
        body_only = self.inspect_body(head.header("content-type"), body, complete=complete)
        if not body_only.matches:
            return None
        return self._decide(head, self.inspect_request(head, body, complete), "the body of ")

    def message(self, head: Any, payload: bytes, binary: bool, upward: bool) -> CloseSession | None:
        """Inspect client-to-upstream text messages; over the threshold the
        session is closed with 1008."""
        if binary or not upward or self.inspect_body_bytes == 0:
            return None
        data = payload[: self.inspect_body_bytes]
        text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else str(data)
        inspection = self.inspect_message(text)
        if not inspection.matches:
            return None
        over = self._log(head, inspection, "a WebSocket message on ")
        return CloseSession(1008, BLOCKED) if over else None

    def _decide(self, head: Any, inspection: Inspection, what: str) -> Refuse | None:
        if not inspection.matches:
            return None
        return Refuse(403, BLOCKED) if self._log(head, inspection, what) else None

    def _log(self, head: Any, inspection: Inspection, what: str) -> bool:
        """One log line for an inspection with matches; whether it is over the threshold."""
        over = inspection.score >= self.threshold
        log.info("waf: anomaly score {score} {verdict} {threshold} (paranoia {paranoia}) for {what}{method} "
                 "{target} from {client}: {matches}",
                 score=inspection.score, verdict="reaches threshold" if over else "is below threshold",
                 threshold=self.threshold, paranoia=self.paranoia, what=what, method=getattr(head, "method", "-"),
                 target=excerpt(getattr(head, "target", "-")).strip("'\""), client=getattr(head, "client", "-"),
                 matches="; ".join(m.describe() for m in inspection.matches))
        return over


# ---------------------------------------------------------------------------
# The kind


def parse_rule_ids(items: Sequence[str]) -> tuple[int, ...]:
    """``disable_rules``: rule ids, each one the table has."""
    ids = []
    for item in items:
        if not item.isdigit():
            raise FilterOptionError("disable_rules", f"{item!r} is not a rule id (ids are numbers such as 942100)")
        if int(item) not in RULES_BY_ID:
            raise FilterOptionError("disable_rules", f"unknown rule id {item} (the rules are listed in "
                                                     "docs/filters/waf.md)")
        ids.append(int(item))
    return tuple(dict.fromkeys(ids))


@implementer(IPlugin, IFilterFactory)
class WafKind:
    """The filter kind ``use = waf``."""

    name = "waf"

    def build(self, options: Mapping[str, str]) -> WebApplicationFirewall:
        """Parse the options; all are optional."""
        opts = FilterOptions(self.name, options, _OPTIONS)
        paranoia = opts.integer("paranoia", 1, maximum=4, expected="a paranoia level from 1 to 4")
        threshold = opts.integer("threshold", 5, expected="a whole number of at least 1")
        inspect_body_bytes = opts.size("inspect_body_bytes", 64 * 1024)
        if inspect_body_bytes > MAX_INSPECT_BODY_BYTES:
            raise FilterOptionError("inspect_body_bytes", "must be at most 16m")
        disabled = parse_rule_ids(opts.items("disable_rules", (), allow_empty=True))
        return WebApplicationFirewall(paranoia, threshold, inspect_body_bytes, disabled)


waf = WafKind()
