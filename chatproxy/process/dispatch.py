"""Socket events dispatched without Twisted's per-event log context.

Twisted's epoll reactor runs the handler of every read or write event through
``log.callWithLogger``: it asks the connection for its ``logPrefix``, builds a
context dictionary ``{"system": prefix}`` and runs the handler inside it, three
function layers and a thread-local lookup per event.  That context is only
read by the legacy ``twisted.python.log`` API; chatproxy logs with
``twisted.logger``, which does not look at it.  Under load it is about a
tenth of a proxied request's CPU (bench/README.md, "Where a request's CPU
goes").

:func:`dispatch_directly` makes a proxy process poll with :func:`poll` instead:
the same ``epoll_wait``, the same ``_doReadOrWrite`` for each event (which
already catches what a protocol raises and closes that connection), and
anything that still escapes it is logged, as ``callWithLogger`` does, without
stopping the reactor.  Any other reactor is left as it is.
"""

from __future__ import annotations

import errno
from functools import partial
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

__all__ = ["dispatch_directly", "poll"]

log = Logger()


def poll(reactor: EPollReactor, timeout: float | None) -> None:
    """One iteration of ``reactor``'s loop: wait up to ``timeout`` seconds
    (None: until an event) and handle each event that arrived."""
    try:
        events = reactor._poller.poll(-1 if timeout is None else timeout, len(reactor._selectables))
    except OSError as error:
        if error.errno == errno.EINTR:
            return
        raise  # only a programming error makes epoll_wait fail otherwise
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue  # removed by a handler earlier in this iteration
        try:
            handle(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.failure("while handling an event of {selectable!r}", selectable=selectable)


def dispatch_directly(reactor: Any) -> bool:
    """Make ``reactor`` use :func:`poll` if it is Twisted's epoll reactor;
    return whether it does now."""
    if type(reactor) is not EPollReactor:
        return False
    reactor.doIteration = partial(poll, reactor)  # type: ignore[method-assign]
    return True
