"""What a ``waf`` filter gives the engine and makes of its answer (no I/O).

:func:`request_transaction`, :func:`response_transaction` and
:func:`message_transaction` turn a request head (and the start of its body),
a response to it, or a WebSocket text message into the
:class:`~chatproxy.filters.modsecurity.Transaction` the engine runs;
:func:`verdict` turns the engine's :class:`~chatproxy.filters.modsecurity.Outcome`
into a :class:`Verdict`: the refusal status, the inbound anomaly score and
the rules that matched (id, message, target, data), parsed from
ModSecurity's log messages.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote_from_bytes

from attrs import evolve, frozen

from chatproxy.filters.modsecurity import Outcome, Response, Transaction
from chatproxy.filters.waf_setup import OUTBOUND_SCORE_RULE, SCORE_RULE
from chatproxy.http.messages import RequestHead

__all__ = ["RuleMatch", "Verdict", "announces_body", "message_transaction", "parse_message", "request_transaction",
           "response_transaction", "verdict"]

_FIELD = re.compile(r'\[(id|msg|data|severity) "(.*?)"\](?= \[|$)', re.S)
_TARGET = re.compile(r" found within ([^\s:]+(?::[^\s]*?)?): ", re.S)
_SCORE = re.compile(r"(\d+)")
_MESSAGE_HEADERS = (b"host", b"user-agent", b"accept", b"origin")


@frozen
class RuleMatch:
    """One rule that matched: its id, message, the target it matched in (when
    its log data names one) and its log data."""

    id: int
    message: str
    target: str = ""
    data: str = ""

    def describe(self, limit: int = 100) -> str:
        """``942100 SQL Injection Attack ... at ARGS:q`` (with at most ``limit``
        characters of the data) for a log line."""
        where = f" at {self.target}" if self.target else ""
        data = self.data if len(self.data) <= limit else self.data[:limit] + "..."
        return f"{self.id} {self.message}{where}" + (f" [{data!r}]" if data else "")


@frozen
class Verdict:
    """What the engine decided: ``status`` is the refusal's (403 for the
    anomaly threshold, 400 for a body that does not parse; None: pass);
    ``score`` is the inbound anomaly score (the outbound one for a response)."""

    status: int | None
    score: int
    matches: tuple[RuleMatch, ...]

    @property
    def rule_ids(self) -> tuple[int, ...]:
        """The ids of the matched rules, in order."""
        return tuple(m.id for m in self.matches)


def parse_message(text: str) -> RuleMatch | None:
    """A ModSecurity log message (``ModSecurity: Warning. ... [id "942100"]
    [msg "..."] [data "..."] ...``) as a RuleMatch; None without an id."""
    fields: dict[str, str] = {}
    for name, value in _FIELD.findall(text):
        fields.setdefault(name, value)
    if not fields.get("id", "").isdigit():
        return None
    data = fields.get("data", "")
    found = _TARGET.search(data)
    return RuleMatch(int(fields["id"]), fields.get("msg", ""), found.group(1) if found else "", data)


def verdict(outcome: Outcome) -> Verdict:
    """The verdict of an engine outcome: chatproxy's score rules give the
    score (and are not listed among the matches); a rule listed twice is
    listed once."""
    score = 0
    matches: list[RuleMatch] = []
    seen: set[int] = set()
    for text in outcome.messages:
        match = parse_message(text)
        if match is None:
            continue
        if match.id in (SCORE_RULE, OUTBOUND_SCORE_RULE):
            found = _SCORE.search(match.data)
            score = int(found.group(1)) if found else 0
        elif match.id not in seen:
            seen.add(match.id)
            matches.append(match)
    return Verdict(outcome.status, score, tuple(matches))


def announces_body(head: RequestHead) -> bool:
    """Whether the request's body hook will follow: its head announces a body
    (``Content-Length`` above 0 or ``Transfer-Encoding``) and it asks for no
    protocol switch (a WebSocket handshake's body is never read)."""
    if head.header("upgrade") is not None:
        return False
    if head.header("transfer-encoding") is not None:
        return True
    length = (head.header("content-length") or "").strip()
    return length.isdigit() and int(length) > 0


def _client(head: RequestHead) -> str:
    return head.client if head.client and head.client != "-" else "0.0.0.0"


def request_transaction(head: RequestHead, body: bytes | None = None) -> Transaction:
    """The request as the client sent it (target, headers as the filters
    before left them), with the start of its body when given."""
    return Transaction(head.method, head.target.encode("latin-1", "replace"), head.version, head.headers, body,
                       client=_client(head))


def response_transaction(head: RequestHead, status: int, headers: list[tuple[bytes, bytes]],
                         body: bytes) -> Transaction:
    """A response (its status, headers and the start of its body) with the
    head of the request it answers (no request body: the request rule set
    inspected it)."""
    request = request_transaction(head)
    protocol = "HTTP 2.0" if head.version == "2" else "HTTP 1.1"
    return evolve(request, response=Response(status, tuple(headers), body, protocol))


def message_transaction(head: RequestHead, payload: bytes, truncated: bool) -> Transaction:
    """A WebSocket text message as a request of its own: ``POST`` to the
    session's path with the handshake's Host, User-Agent, Accept and Origin;
    a JSON object or array (not cut short) as an ``application/json`` body, any
    other text as the one field ``message`` of an url-encoded form, so CRS's
    ARGS rules see its keys and values (``ARGS:json.text``) or the text
    (``ARGS:message``)."""
    body, content_type = _message_body(payload, truncated)
    headers = [(name, value) for name, value in head.headers if name.lower() in _MESSAGE_HEADERS]
    headers += [(b"Content-Type", content_type), (b"Content-Length", str(len(body)).encode())]
    return Transaction("POST", head.path.encode("latin-1", "replace"), "1.1", tuple(headers), body,
                       client=_client(head))


def _message_body(payload: bytes, truncated: bool) -> tuple[bytes, bytes]:
    stripped = payload.strip()
    if not truncated and stripped[:1] in (b"{", b"["):
        try:
            json.loads(stripped)
        except (ValueError, RecursionError):
            pass
        else:
            return stripped, b"application/json"
    return b"message=" + quote_from_bytes(payload, safe=b"").encode("ascii"), b"application/x-www-form-urlencoded"
