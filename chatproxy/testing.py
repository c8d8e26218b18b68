"""Helpers for testing filters and filter kinds, for chatproxy's own tests and
a plugin's.

Nothing here listens or starts a reactor: a test builds what the proxy would
hand a filter and calls the hooks as the proxy's
:class:`~chatproxy.filters.chain.FilterChain` calls them.

- :func:`request_head`: a :class:`~chatproxy.http.messages.RequestHead` with
  sensible defaults, any field overridden, headers given as a list of
  ``(name, value)`` pairs of text or bytes;
- :func:`websocket_head`: the head of a WebSocket handshake (a session's head);
- :func:`build_filter`: a kind's ``build`` with options as the configuration
  loader gives them (relative file names resolved against a directory);
- :func:`send_message`: one WebSocket message through a filter's message hook;
- :class:`ChainRunner`: a route's filter chain, built from filter objects or
  from a kind and its options, whose hooks run synchronously: a decision
  returned as a Deferred is resolved when it has fired.

::

    from chatproxy.testing import ChainRunner, build_filter, request_head

    def test_scanners_are_refused():
        flt = build_filter(user_agent_block, {"patterns": "*sqlmap*"})
        assert flt.request(request_head(headers=[("User-Agent", "sqlmap/1.7")])).status == 403

    def test_report_mode_lets_it_through():
        runner = ChainRunner.of_kind(user_agent_block, {"patterns": "*sqlmap*"}, mode="report")
        outcome = runner.request(request_head(headers=[("User-Agent", "sqlmap/1.7")]))
        assert outcome.passed and runner.counters["user_agent_block:reported"] == 1
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from chatproxy.config.values import OptionText
from chatproxy.filters import Answer, MessageVerdict, Refuse
from chatproxy.filters.chain import Decision, FilterChain, RouteFilter
from chatproxy.http.messages import Header, RequestHead

__all__ = [
    "ChainRunner",
    "Outcome",
    "PendingDecision",
    "build_filter",
    "request_head",
    "send_message",
    "websocket_head",
]

HeaderItem = tuple[str | bytes, str | bytes]


def _encode(text: str | bytes, encoding: str) -> bytes:
    return text if isinstance(text, bytes) else text.encode(encoding)


def request_head(target: str | None = None, *, method: str = "GET", path: str | None = None,
                 query: str | None = None, headers: Iterable[HeaderItem] = (), host: str = "chat.example.com",
                 authority: str | None = None, client: str = "192.0.2.10", peer: str | None = None,
                 tls: bool = True, listener: str = "main", route: str = "", version: str = "1.1") -> RequestHead:
    """A request head as the proxy hands it to filters.

    ``target`` is the request target (default ``path`` and ``query`` joined,
    else ``/``); ``path`` and ``query`` default to its parts, as written (give
    ``path`` to set the normalised path the proxy would have made of an
    unusual target).  ``headers`` are ``(name, value)`` pairs in order;
    text names are encoded as Latin-1, text values as UTF-8 (bytes are taken
    as they are).  A ``Host`` header with ``authority`` (default ``host``) is
    put first unless ``headers`` have one.  ``peer`` (the TCP peer) defaults
    to ``client`` (the client address after ``trusted_proxies``).
    """
    if target is None:
        target = (path or "/") + (f"?{query}" if query else "")
    parts = urlsplit(target)
    authority = host if authority is None else authority
    raw = [(_encode(name, "latin-1"), _encode(value, "utf-8")) for name, value in headers]
    if not any(name.lower() == b"host" for name, _ in raw):
        raw.insert(0, (b"Host", _encode(authority, "utf-8")))
    return RequestHead(
        method=method,
        target=target,
        path=(parts.path or "/") if path is None else path,
        query=parts.query if query is None else query,
        version=version,
        headers=tuple(raw),
        host=host,
        authority=authority,
        client=client,
        peer=client if peer is None else peer,
        tls=tls,
        listener=listener,
        route=route,
    )


_HANDSHAKE: tuple[HeaderItem, ...] = (
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
)


def websocket_head(target: str = "/", *, headers: Iterable[HeaderItem] = (), **fields: Any) -> RequestHead:
    """The head of a WebSocket handshake (``GET`` with ``Upgrade: websocket``
    and ``headers`` after the handshake's own): what a message hook sees as
    its session's head.  ``fields`` as for :func:`request_head`."""
    return request_head(target, headers=(*_HANDSHAKE, *headers), **fields)


def build_filter(kind: Any, options: Mapping[str, str] | None = None, *, directory: Path | None = None) -> Any:
    """``kind.build(options)`` with the options as the configuration loader
    gives them: :class:`~chatproxy.config.OptionText` values whose relative
    file names are resolved against ``directory`` (without one, they are
    refused, as for an option set by no file).  Raises the kind's
    :class:`~chatproxy.filters.FilterOptionError`."""
    return kind.build({name: OptionText(value, directory) for name, value in (options or {}).items()})


def _payload(payload: str | bytes, binary: bool | None) -> tuple[bytes, bool]:
    """Text is sent UTF-8 encoded as a text message, bytes as a binary one
    (unless ``binary`` says otherwise)."""
    if isinstance(payload, str):
        return payload.encode("utf-8"), bool(binary)
    return payload, True if binary is None else binary


def send_message(flt: Any, payload: str | bytes, *, upward: bool = True, binary: bool | None = None,
                 head: RequestHead | None = None) -> MessageVerdict:
    """One WebSocket message through ``flt``'s message hook: text as a text
    message, bytes as a binary one (``binary`` overrides), from the client
    (``upward``) or to it, in the session of ``head`` (default: a
    :func:`websocket_head`; give the same head for messages of one session).
    Returns the hook's verdict: None, ``DROP`` or a ``CloseSession``."""
    data, is_binary = _payload(payload, binary)
    return _resolved(flt.message(head if head is not None else websocket_head(), data, is_binary, upward))


class PendingDecision(Exception):
    """A hook returned a Deferred that has not fired: its decision is not known
    yet (fire it from the test, then run the hook again, or return an
    already-fired Deferred)."""


def _resolved(verdict: MessageVerdict | Deferred[MessageVerdict]) -> MessageVerdict:
    """A message verdict, or what its already-fired Deferred holds (a failure is raised)."""
    if not isinstance(verdict, Deferred):
        return verdict
    settled: list[Any] = []
    verdict.addBoth(settled.append)
    if not settled:
        raise PendingDecision("a message hook returned a Deferred that has not fired")
    if isinstance(settled[0], Failure):
        settled[0].raiseException()
    result: MessageVerdict = settled[0]
    return result


@frozen
class Outcome:
    """What a run of the request (or body) hooks ended with: the decision
    (None: the request passes) and the head as the filters rewrote it."""

    decision: Decision
    head: RequestHead

    @property
    def passed(self) -> bool:
        """Whether the request goes on to the upstream."""
        return self.decision is None

    @property
    def status(self) -> int | None:
        """The status of a refusal or answer (None when it passed)."""
        return None if self.decision is None else self.decision.status

    @property
    def refused(self) -> bool:
        """Whether a filter refused the request."""
        return isinstance(self.decision, Refuse)

    @property
    def answered(self) -> bool:
        """Whether a filter answered the request itself."""
        return isinstance(self.decision, Answer)


class ChainRunner:
    """A route's :class:`~chatproxy.filters.chain.FilterChain`, built as the
    proxy builds it, whose hooks a test calls synchronously.

    ``filters`` are filter objects (named after their class, ``-2``, ``-3``
    … added for repeats) or :class:`~chatproxy.filters.chain.RouteFilter` s
    (a name, and ``report`` / ``drop_refused`` for ``mode = report`` and
    ``refused_message = drop``).  :attr:`counters` holds the outcomes per
    filter (``NAME:passed``, ``NAME:refused``, …) as the proxy counts them.
    """

    def __init__(self, *filters: Any) -> None:
        self.counters: Counter[str] = Counter()
        named: list[RouteFilter] = []
        for flt in filters:
            if not isinstance(flt, RouteFilter):
                flt = RouteFilter(self._unique(type(flt).__name__, named), flt)
            named.append(flt)
        self.chain = FilterChain(named, self.counters)

    @staticmethod
    def _unique(name: str, taken: list[RouteFilter]) -> str:
        names = {flt.name for flt in taken}
        candidate, number = name, 1
        while candidate in names:
            number += 1
            candidate = f"{name}-{number}"
        return candidate

    @classmethod
    def of_kind(cls, kind: Any, options: Mapping[str, str] | None = None, *, name: str | None = None,
                mode: str = "enforce", refused_message: str = "close", directory: Path | None = None) -> ChainRunner:
        """A chain of one filter built by ``kind`` from ``options`` (see
        :func:`build_filter`), named ``name`` (default: the kind's name), with
        the generic options ``mode`` and ``refused_message`` of its section."""
        flt = build_filter(kind, options, directory=directory)
        return cls(RouteFilter(name or str(kind.name), flt, mode == "report", refused_message == "drop"))

    @property
    def filters(self) -> tuple[RouteFilter, ...]:
        """The chain's filters, in order."""
        return self.chain.filters

    def request(self, head: RequestHead | None = None) -> Outcome:
        """Run the request hooks on ``head`` (default: :func:`request_head`)."""
        return self._settle(lambda done: self.chain.request(head or request_head(), done))

    def body(self, body: bytes, head: RequestHead | None = None, complete: bool = True) -> Outcome:
        """Run the body hooks as the proxy does: on the first
        ``inspect_body_bytes`` the chain wants (``complete`` only when that is
        the whole body)."""
        wanted = self.chain.inspect_body_bytes
        start = body[:wanted]
        return self._settle(lambda done: self.chain.body(head or request_head(method="POST"), start,
                                                         complete and len(body) <= wanted, done))

    def response(self, status: int = 200, headers: Iterable[Header] = (),
                 head: RequestHead | None = None) -> list[Header] | Refuse:
        """Run the response hooks on a response head: the headers as the
        filters left them, or ``Refuse(500)`` when one failed."""
        return self.chain.response(head or request_head(), status, list(headers))

    def message(self, payload: str | bytes, *, upward: bool = True, binary: bool | None = None,
                head: RequestHead | None = None) -> MessageVerdict:
        """Run the message hooks on one message (see :func:`send_message` for
        ``payload``, ``binary`` and ``head``): None to relay it, ``DROP``, or a
        ``CloseSession``."""
        data, is_binary = _payload(payload, binary)
        return _resolved(self.chain.message(head if head is not None else websocket_head(), data, is_binary, upward))

    @staticmethod
    def _settle(run: Any) -> Outcome:
        """Run ``run(done)`` and return what ``done`` got; a Deferred a hook
        returned must have fired by then."""
        settled: list[Outcome] = []
        run(lambda decision, head: settled.append(Outcome(decision, head)))
        if not settled:
            raise PendingDecision("a filter returned a Deferred that has not fired")
        return settled[0]

