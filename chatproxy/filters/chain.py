"""Running a route's request filters in order.

Each filter's ``request(head)`` returns None (pass on), a :class:`Refuse`, an
:class:`Answer` or a :class:`Rewrite`, or a Deferred firing with one of them.
A filter that raises (or fails, or returns anything else) refuses the request
with 500; the error is logged with the filter's name and nothing else is
affected.  A filter in ``mode = report`` has its refusals and answers logged
and counted as ``reported`` and the request goes on.  Every outcome is counted
per filter: ``passed``, ``answered``, ``refused``, ``reported``, ``error``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Callable

from attrs import evolve, frozen
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproxy.filters import Answer, Refuse, Rewrite

log = Logger()

__all__ = ["Answer", "Decision", "Refuse", "Rewrite", "RouteFilter", "run_body_filters", "run_request_filters"]

Decision = Refuse | Answer | None


@frozen
class RouteFilter:
    """One filter as a route runs it: its section name, the object, its mode, and
    whether a WebSocket message its message hook refuses is dropped
    (``refused_message = drop``) instead of ending the session."""

    name: str
    filter: Any
    report: bool = False
    drop_refused: bool = False


def apply_rewrite(head: Any, rewrite: Rewrite) -> Any:
    """The request head with a Rewrite's header changes applied.

    Names the filter sets are also taken out of the client's ``Connection``
    header, so a client cannot have a filter's header dropped as hop-by-hop.
    """
    replaced = {name.lower() for name, _ in rewrite.set}
    dropped = rewrite.remove | replaced
    headers: list[tuple[bytes, bytes]] = []
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


def run_request_filters(filters: Sequence[RouteFilter], head: Any, done: Callable[[Decision, Any], None],
                        counters: Counter[str]) -> None:
    """Run ``filters`` on ``head``; call ``done(decision, head)`` with the first
    refusal or answer (or None when all passed) and the head as rewritten."""
    _run(filters, lambda flt, head: flt.filter.request(head), head, done, counters)


def run_body_filters(filters: Sequence[RouteFilter], head: Any, body: bytes, complete: bool,
                     done: Callable[[Decision, Any], None], counters: Counter[str]) -> None:
    """Run the body hooks ``request_body(head, body, complete)`` of ``filters``
    on the first bytes of the request body (``complete``: that is all of it)."""
    _run(filters, lambda flt, head: flt.filter.request_body(head, body, complete), head, done, counters)


def _run(filters: Sequence[RouteFilter], call: Callable[[RouteFilter, Any], Any], head: Any,
         done: Callable[[Decision, Any], None], counters: Counter[str]) -> None:

    def outcome(flt: RouteFilter, result: Any, head: Any) -> tuple[bool, Decision, Any]:
        """(stop?, decision, head) for one filter's result."""
        if result is None:
            counters[f"{flt.name}:passed"] += 1
            return False, None, head
        if isinstance(result, Rewrite):
            counters[f"{flt.name}:passed"] += 1
            return False, None, apply_rewrite(head, result)
        if isinstance(result, (Refuse, Answer)):
            kind = "refused" if isinstance(result, Refuse) else "answered"
            if flt.report:
                counters[f"{flt.name}:reported"] += 1
                log.info("filter {name} (report mode) would have {kind} {method} {target} from {client}: "
                         "{status} {reason}", name=flt.name, kind=kind, method=head.method, target=head.target,
                         client=head.client, status=result.status,
                         reason=getattr(result, "reason", ""))
                return False, None, head
            counters[f"{flt.name}:{kind}"] += 1
            if isinstance(result, Refuse):
                log.info("filter {name} refused {method} {target} from {client}: {status} {reason}",
                         name=flt.name, method=head.method, target=head.target, client=head.client,
                         status=result.status, reason=result.reason)
            return True, result, head
        counters[f"{flt.name}:error"] += 1
        log.error("filter {name} returned {result!r}, not None, Refuse, Answer or Rewrite: refused with 500",
                  name=flt.name, result=result)
        return True, Refuse(500, "internal filter error"), head

    def step(index: int, head: Any) -> None:
        while index < len(filters):
            flt = filters[index]
            try:
                result = call(flt, head)
            except Exception:
                counters[f"{flt.name}:error"] += 1
                log.failure("filter {name} raised; request refused with 500", name=flt.name)
                done(Refuse(500, "internal filter error"), head)
                return
            if isinstance(result, defer.Deferred):
                def fired(value: Any, index: int = index, flt: RouteFilter = flt, head: Any = head) -> None:
                    stop, decision, new_head = outcome(flt, value, head)
                    if stop:
                        done(decision, new_head)
                    else:
                        step(index + 1, new_head)

                def failed(failure: Failure, flt: RouteFilter = flt, head: Any = head) -> None:
                    counters[f"{flt.name}:error"] += 1
                    log.failure("filter {name} failed; request refused with 500", failure, name=flt.name)
                    done(Refuse(500, "internal filter error"), head)

                result.addCallbacks(fired, failed)
                return
            stop, decision, head = outcome(flt, result, head)
            if stop:
                done(decision, head)
                return
            index += 1
        done(None, head)

    step(0, head)
