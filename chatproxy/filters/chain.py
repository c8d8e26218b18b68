"""One route's filters and the one set of rules every hook runs by.

A :class:`FilterChain` is built per route by the plan.  It calls the hooks
of :class:`~chatproxy.filters.IRequestFilter` in the route's order:

=============  ===========================================  =========================
hook           returns                                      a filter that fails [#f]_
=============  ===========================================  =========================
request        None, Rewrite, Refuse, Answer (or Deferred)  refuses with 500
request_body   None, Refuse, Answer (or Deferred) [#r]_     refuses with 500
response_body  None, Refuse, Answer (or Deferred) [#r]_     the answer becomes a 500
response       None, or the new list of headers             the answer becomes a 500
message        None, DROP, CloseSession (or Deferred)       closes the session, 1011
=============  ===========================================  =========================

.. [#r] a Rewrite returned there is ignored: the request hooks decided the head.
.. [#f] raises, fails its Deferred or returns anything else: counted as
   ``error``, logged with a traceback and the filter's name; no other filter,
   request or session is affected.

``response_body`` runs on responses of the media types its filters inspect
(:meth:`FilterChain.inspects_response`), before ``response``.  The first
refusal or answer ends a request, body or response body hook run; the
first DROP or CloseSession ends a message's.  A filter in ``mode = report`` is run the same
way, but what it would have refused, answered, changed or dropped is logged
and counted as ``reported`` and the request, response or message goes on
unchanged.  A Refuse's ``note`` is added to the head's ``notes`` (for the
access log), in both modes.  ``refused_message = drop`` turns a filter's
CloseSession into a DROP.  A message hook's Deferred holds the later messages
of the session in that direction, in order, until it has fired (the
WebSocket bridge keeps them).  Outcomes are counted per filter (``FILTER:outcome``): ``passed``
(request and body hooks), ``refused``, ``answered``, ``reported``,
``error``.  Responses and messages that pass are not counted per filter:
messages are counted per session instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from attrs import evolve, frozen
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproxy.filters import DROP, Answer, CloseSession, Header, Refuse, Rewrite, implements_hook
from chatproxy.http.messages import RequestHead

log = Logger(namespace=__name__)  # (a compiled module has no frame Twisted could name it from)

__all__ = ["Decision", "FilterChain", "MessageVerdict", "RouteFilter", "apply_rewrite"]

Decision = Refuse | Answer | None
"""What a request or body hook run ends with: None passes the request on."""

MessageVerdict = CloseSession | str | None
"""What a message hook run ends with: None relays it, :data:`DROP` drops it,
a :class:`CloseSession` ends the session."""

_FILTER_ERROR = Refuse(500, "internal filter error")
_SESSION_ERROR = CloseSession(1011, "internal filter error")
_DECISIONS = (Refuse, Answer, Rewrite)
_RAISED = object()  # the hook raised (no result)
_T = TypeVar("_T")


@frozen
class RouteFilter:
    """One filter as a route runs it: its section name, the object, its mode, and
    whether a WebSocket message its message hook refuses is dropped
    (``refused_message = drop``) instead of ending the session."""

    name: str
    filter: Any
    report: bool = False
    drop_refused: bool = False

    def has(self, hook: str) -> bool:
        """Whether the filter implements the optional ``hook``."""
        return implements_hook(self.filter, hook)


def apply_rewrite(head: RequestHead, rewrite: Rewrite) -> RequestHead:
    """The request head with a Rewrite's header changes applied.

    Names the filter sets are also taken out of the client's ``Connection``
    header, so a client cannot have a filter's header dropped as hop-by-hop.
    """
    replaced = {name.lower() for name, _ in rewrite.set}
    dropped = rewrite.remove | replaced
    headers: list[Header] = []
    for name, value in head.headers:
        lower = name.lower()
        if lower in dropped:
            continue
        if lower == b"connection" and replaced:
            tokens = [t for t in value.split(b",") if t.strip().lower() not in replaced]
            if not any(t.strip() for t in tokens):
                continue
            value = b",".join(tokens).strip()
        headers.append((name, value))
    return evolve(head, headers=tuple(headers) + tuple(rewrite.set))


def _int_attribute(flt: RouteFilter, name: str) -> int | None:
    value = getattr(flt.filter, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class FilterChain:
    """The filters of one route, in order, with the hooks each implements."""

    def __init__(self, filters: Sequence[RouteFilter], counters: Counter[str],
                 on_refused: Callable[[str, RequestHead, int, str], None] | None = None) -> None:
        """``on_refused(filter, head, status, reason)`` is told of every request a
        filter refuses (request and body hooks, not in report mode)."""
        self.filters = tuple(filters)
        self.counters = counters
        self.on_refused = on_refused
        self._request = self.filters
        self._body = tuple(f for f in self.filters if f.has("request_body") and (_int_attribute(f, "inspect_body_bytes") or 0) > 0)
        self._response = tuple(f for f in self.filters if f.has("response"))
        self._message = tuple(f for f in self.filters if f.has("message"))
        self._response_body = tuple(f for f in self.filters if f.has("response_body")
                                    and (_int_attribute(f, "inspect_response_bytes") or 0) > 0)
        #: How many response body bytes the response body hooks want before the response is sent (0: none).
        self.inspect_response_bytes = max((_int_attribute(f, "inspect_response_bytes") or 0
                                           for f in self._response_body), default=0)
        types = [frozenset(getattr(f.filter, "inspect_response_types", None) or ()) for f in self._response_body]
        #: The response media types the response body hooks see (None: all).
        self.response_types: frozenset[bytes] | None = None if not all(types) else frozenset().union(*types)
        #: How many body bytes the body hooks want before the request is forwarded (0: none).
        self.inspect_body_bytes = max((_int_attribute(f, "inspect_body_bytes") or 0 for f in self._body), default=0)
        limits = [_int_attribute(f, "max_body_bytes") for f in self.filters if not f.report]
        #: The smallest ``max_body_bytes`` of the filters (not in report mode), or None.
        self.max_body_bytes = min((limit for limit in limits if limit is not None), default=None)
        #: Whether a filter has a response hook; a message hook (plain attributes: read on every response).
        self.sees_responses = bool(self._response)
        self.sees_messages = bool(self._message)

    def __bool__(self) -> bool:
        return bool(self.filters)

    # -- request and body hooks

    def request(self, head: RequestHead, done: Callable[[Decision, RequestHead], None]) -> None:
        """Run the request hooks; ``done(decision, head)`` with the first refusal
        or answer (None when all passed) and the head as the filters rewrote it."""
        self._run(self._request, lambda flt, head: flt.filter.request(head), head, done)

    def body(self, head: RequestHead, body: bytes, complete: bool,
             done: Callable[[Decision, RequestHead], None]) -> None:
        """Run the body hooks on the first bytes of the request body
        (``complete``: that is all of it); ``done`` as for :meth:`request`."""
        self._run(self._body, lambda flt, head: flt.filter.request_body(head, body, complete), head, done)

    def _run(self, filters: Sequence[RouteFilter], call: Callable[[RouteFilter, RequestHead], Any],
             head: RequestHead, done: Callable[[Decision, RequestHead], None]) -> None:

        def step(index: int, head: RequestHead) -> None:
            while index < len(filters):
                flt = filters[index]
                try:
                    result = call(flt, head)
                except Exception:
                    done(self._error(flt, None), head)
                    return
                if isinstance(result, defer.Deferred):
                    result.addCallbacks(lambda value, i=index, f=flt, h=head: settle(i, f, h, value),
                                        lambda failure, f=flt, h=head: done(self._error(f, failure), h))
                    return
                stop, decision, head = self._outcome(flt, result, head)
                if stop:
                    done(decision, head)
                    return
                index += 1
            done(None, head)

        def settle(index: int, flt: RouteFilter, head: RequestHead, value: Any) -> None:
            stop, decision, new_head = self._outcome(flt, value, head)
            if stop:
                done(decision, new_head)
            else:
                step(index + 1, new_head)

        step(0, head)

    def _outcome(self, flt: RouteFilter, result: Any, head: RequestHead) -> tuple[bool, Decision, RequestHead]:
        """(stop?, decision, head) for one hook's result."""
        if result is None:
            self.counters[f"{flt.name}:passed"] += 1
            return False, None, head
        if not isinstance(result, _DECISIONS):
            self.counters[f"{flt.name}:error"] += 1
            log.error("filter {name} returned {result!r}, not None, Refuse, Answer or Rewrite: refused with 500",
                      name=flt.name, result=result)
            return True, _FILTER_ERROR, head
        if isinstance(result, Rewrite):
            self.counters[f"{flt.name}:passed"] += 1
            return False, None, apply_rewrite(head, result)
        kind = "refused" if isinstance(result, Refuse) else "answered"
        reason = result.reason if isinstance(result, Refuse) else ""
        if isinstance(result, Refuse) and result.note:
            head = evolve(head, notes=(*head.notes, (flt.name, result.note)))
        if flt.report:
            self.counters[f"{flt.name}:reported"] += 1
            log.info("filter {name} (report mode) would have {kind} {method} {target} from {client}: "
                     "{status} {reason}", name=flt.name, kind=kind, method=head.method, target=head.target,
                     client=head.client, status=result.status, reason=reason)
            return False, None, head
        self.counters[f"{flt.name}:{kind}"] += 1
        if isinstance(result, Refuse):
            log.info("filter {name} refused {method} {target} from {client}: {status} {reason}",
                     name=flt.name, method=head.method, target=head.target, client=head.client,
                     status=result.status, reason=reason)
            if self.on_refused is not None:
                self.on_refused(flt.name, head, result.status, reason)
        return True, result, head

    def _error(self, flt: RouteFilter, failure: Failure | None) -> Refuse:
        self.counters[f"{flt.name}:error"] += 1
        log.failure("filter {name} failed; request refused with 500", failure, name=flt.name)
        return _FILTER_ERROR

    # -- response body hook

    def inspects_response(self, headers: Sequence[Header]) -> bool:
        """Whether a response with these headers goes to the response body
        hooks first (by the media type of its ``Content-Type``)."""
        if not self.inspect_response_bytes:
            return False
        types = self.response_types
        if types is None:
            return True
        for name, value in headers:
            if name.lower() == b"content-type":
                return value.split(b";", 1)[0].strip().lower() in types
        return False

    def response_body(self, head: RequestHead, status: int, headers: list[Header], body: bytes, complete: bool,
                      done: Callable[[Decision, RequestHead], None]) -> None:
        """Run the response body hooks on a response held before it is sent
        (its first bytes; ``complete``: that is all of it); ``done`` as for
        :meth:`request`, with a decision that replaces the response."""
        self._run(self._response_body,
                  lambda flt, head: flt.filter.response_body(head, status, headers, body, complete), head, done)

    # -- response hook

    def response(self, head: RequestHead, status: int, headers: list[Header]) -> list[Header] | Refuse:
        """Run the response hooks on a response head about to be sent (the
        upstream's or the proxy's own): the headers as the filters changed
        them, or a Refuse(500) when one of them failed."""
        for flt in self._response:
            try:
                changed = flt.filter.response(head, status, headers)
            except Exception:
                return self._failed(flt, "response", _FILTER_ERROR)
            if changed is None:
                continue
            if not isinstance(changed, list):
                return self._failed(flt, "response", _FILTER_ERROR, changed)
            if flt.report:
                self.counters[f"{flt.name}:reported"] += 1
                log.info("filter {name} (report mode) would have changed the headers of the {status} answer to "
                         "{method} {target}", name=flt.name, status=status, method=head.method, target=head.target)
                continue
            headers = changed
        return headers

    # -- message hook

    def message(self, head: RequestHead, payload: bytes, binary: bool,
                upward: bool) -> MessageVerdict | defer.Deferred[MessageVerdict]:
        """Run the message hooks on one whole WebSocket message (``upward``:
        from the client): None to relay it, :data:`DROP`, or a CloseSession;
        a Deferred firing with one of them when a hook returned a Deferred
        (the hooks after it run once it has fired)."""
        return self._message_from(0, head, payload, binary, upward)

    def _message_from(self, start: int, head: RequestHead, payload: bytes, binary: bool,
                      upward: bool) -> MessageVerdict | defer.Deferred[MessageVerdict]:
        for index in range(start, len(self._message)):
            flt = self._message[index]
            try:
                verdict = flt.filter.message(head, payload, binary, upward)
            except Exception:
                return self._failed(flt, "message", _SESSION_ERROR)
            if isinstance(verdict, defer.Deferred):
                return verdict.addCallbacks(
                    lambda value, i=index, f=flt: self._message_settled(i, f, value, head, payload, binary, upward),
                    lambda failure, f=flt: self._message_failed(f, failure))
            stop, outcome = self._message_outcome(flt, verdict, head, upward)
            if stop:
                return outcome
        return None

    def _message_settled(self, index: int, flt: RouteFilter, verdict: Any, head: RequestHead, payload: bytes,
                         binary: bool, upward: bool) -> MessageVerdict | defer.Deferred[MessageVerdict]:
        stop, outcome = self._message_outcome(flt, verdict, head, upward)
        if stop:
            return outcome
        return self._message_from(index + 1, head, payload, binary, upward)

    def _message_failed(self, flt: RouteFilter, failure: Failure) -> MessageVerdict:
        self.counters[f"{flt.name}:error"] += 1
        log.failure("message hook of filter {name} failed: session closed with 1011", failure, name=flt.name)
        return _SESSION_ERROR

    def _message_outcome(self, flt: RouteFilter, verdict: Any, head: RequestHead,
                         upward: bool) -> tuple[bool, MessageVerdict]:
        """What one hook's verdict makes of the message: (stop?, the chain's verdict)."""
        if verdict is None:
            return False, None
        if verdict != DROP and not isinstance(verdict, CloseSession):
            return True, self._failed(flt, "message", _SESSION_ERROR, verdict)
        outcome = self._message_refused(flt, verdict, head, upward)
        return outcome is not None, outcome

    def _failed(self, flt: RouteFilter, hook: str, outcome: _T, result: Any = _RAISED) -> _T:
        """A hook raised (called in its ``except``) or returned ``result``, which it
        may not: counted and logged; ``outcome`` is what the chain does instead."""
        self.counters[f"{flt.name}:error"] += 1
        instead = "answered 500 instead" if isinstance(outcome, Refuse) else "session closed with 1011"
        if result is _RAISED:
            log.failure("{hook} hook of filter {name} failed: {instead}", hook=hook, name=flt.name, instead=instead)
        else:
            log.error("{hook} hook of filter {name} returned {result!r}: {instead}", hook=hook, name=flt.name,
                      result=result, instead=instead)
        return outcome

    def _message_refused(self, flt: RouteFilter, verdict: CloseSession | str, head: RequestHead,
                         upward: bool) -> MessageVerdict:
        drop = verdict == DROP or flt.drop_refused
        if isinstance(verdict, CloseSession):
            what = f"refused a message ({verdict.code}) and dropped it" if drop else \
                f"closed the session with {verdict.code}"
        else:
            what = "dropped a message"
        direction = "client to upstream" if upward else "upstream to client"
        if flt.report:
            self.counters[f"{flt.name}:reported"] += 1
            log.info("filter {name} (report mode) would have {what}, {direction}, client {client}",
                     name=flt.name, what=what, direction=direction, client=head.client)
            return None
        self.counters[f"{flt.name}:refused"] += 1
        log.info("filter {name} {what}, {direction}, client {client}", name=flt.name, what=what,
                 direction=direction, client=head.client)
        return DROP if drop else verdict
