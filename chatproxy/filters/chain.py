"""Running a route's request filters in order.

Each filter's ``request(head)`` returns ``None`` (pass on), an
:class:`Answer` or a :class:`Refuse`, or a Deferred firing with one of them.
A filter that raises refuses the request with 500; the error is logged with
the filter's name and nothing else is affected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from attrs import frozen
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproxy.http.messages import Header

log = Logger()


@frozen
class Refuse:
    """Refuse the request with ``status``; ``reason`` is sent as the plain-text body."""

    status: int
    reason: str = ""
    headers: tuple[Header, ...] = ()


@frozen
class Answer:
    """Answer the request with this response instead of forwarding it."""

    status: int
    body: bytes = b""
    headers: tuple[Header, ...] = ()


Decision = Refuse | Answer | None


def run_request_filters(filters: Sequence[tuple[str, Any]], head: Any, done: Callable[[Decision], None]) -> None:
    """Run ``filters`` (name, filter) on ``head`` and call ``done`` with the first
    decision that is not a pass, or with None when all passed."""

    def step(index: int) -> None:
        while index < len(filters):
            name, flt = filters[index]
            try:
                result = flt.request(head)
            except Exception:
                log.failure("filter {name} raised; request refused with 500", name=name)
                done(Refuse(500, "internal filter error"))
                return
            if isinstance(result, defer.Deferred):
                def fired(value: Any, index: int = index) -> None:
                    if value is None:
                        step(index + 1)
                    else:
                        done(value)

                def failed(failure: Failure, name: str = name) -> None:
                    log.failure("filter {name} failed; request refused with 500", failure, name=name)
                    done(Refuse(500, "internal filter error"))

                result.addCallbacks(fired, failed)
                return
            if result is not None:
                done(result)
                return
            index += 1
        done(None)

    step(0)
