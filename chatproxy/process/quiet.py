"""Keep Twisted's start/stop chatter out of chatproxy's log.

Twisted logs, unconditionally, a line for every port it opens or closes
(``SwitchFactory starting on 8443``, ``(TCP Port 8443 Closed)``,
``<class ...NotifyReceiver> starting on '/tmp/...'``) and, for noisy
factories and protocols, ``Starting factory ...``/``Starting protocol ...``.
chatproxy logs one line of its own per listener saying what serves where
(``[listen:public] listening on tcp:8443 with TLS``), so these lines only
repeat it in Twisted's words.  A worker process (``workers = N``) also
repeats twistd's own start and stop lines, which its master already wrote.

twistd installs its log observer (standard output, ``--logfile``, or the
``--logger`` given) before the service starts and offers no hook to filter
it, so :func:`quiet_twisted_chatter` wraps the observers the global log
publisher has at that moment in a :class:`twisted.logger.FilteringLogObserver`
with :func:`is_chatter`; it runs once per process, when the service starts.
A worker's twistd writes its start lines before that: the master starts its
workers with ``--logger`` :func:`worker_observer` (or the master's own
``--logger``, which filters them itself, as :mod:`chatproxy.process.journal`
does).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from twisted.logger import FilteringLogObserver, ILogFilterPredicate, ILogObserver, LogLevel, PredicateResult
from twisted.logger import formatEvent, globalLogPublisher, textFileLogObserver
from zope.interface import implementer

from chatproxy.process.environment import WORKER_ENV

__all__ = ["Quiet", "is_chatter", "quiet_twisted_chatter", "worker_observer"]

_PORT_CHATTER = re.compile(
    r"\S.* starting on \S+"  # tcp/unix/udp Port.startListening
    r"|\((?:TCP |UDP |UNIX )?Port \S+ Closed\)"  # Port.connectionLost
    r"|(?:Starting|Stopping) (?:factory|protocol) .*",  # noisy factories and protocols
    re.S,
)
#: Twisted's new-style factory lines (any factory's namespace).
_FACTORY_FORMATS = ("Starting factory {factory!r}", "Stopping factory {factory!r}")
#: ClientService's reconnection lines (the Redis store of rate_limit reports its
#: store going down and coming back itself, once each).
_CLIENT_SERVICE = "twisted.application._client_service.ClientService"
_TWISTD_LINES = ("twisted.scripts._twistd_unix.UnixAppLogger", "twisted.application.app.AppLogger")


def is_chatter(event: dict[str, Any], worker: bool = False) -> bool:
    """Whether a log event is Twisted's port and factory chatter, or a
    reconnecting client service's retry line (or, in a ``worker``, twistd's
    start/stop lines and the reactor's "Main loop terminated."), which
    chatproxy's log leaves out.  Errors never are."""
    if event.get("log_level", LogLevel.info) not in (LogLevel.info, LogLevel.debug) or "log_failure" in event:
        return False
    namespace = event.get("log_namespace", "")
    if worker and (namespace in _TWISTD_LINES or namespace == "twisted.internet.base"):
        return True
    if event.get("log_format") in _FACTORY_FORMATS or namespace == _CLIENT_SERVICE:
        return True
    if namespace != "log_legacy":
        return False
    text = formatEvent(event)
    return _PORT_CHATTER.fullmatch(text) is not None


@implementer(ILogFilterPredicate)
class Quiet:
    """The log filter predicate that drops :func:`is_chatter` events (in this
    process: a worker's own twistd lines too)."""

    def __init__(self, worker: bool | None = None) -> None:
        self.worker = bool(os.environ.get(WORKER_ENV)) if worker is None else worker

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        chatter = is_chatter(event, self.worker)
        return PredicateResult.no if chatter else PredicateResult.maybe  # type: ignore[no-any-return]


@implementer(ILogObserver)
class _Quieted(FilteringLogObserver):
    """An observer of twistd's, behind the chatter filter (marks it as done)."""


def quiet(observer: ILogObserver) -> ILogObserver:
    """``observer`` behind the chatter filter."""
    return _Quieted(observer, [Quiet()])


def worker_observer() -> ILogObserver:
    """The ``--logger`` of a worker whose master has none: twistd's default
    text lines on standard output (which workers share with their master),
    without the chatter."""
    return quiet(textFileLogObserver(sys.stdout))


_quieted = False


def quiet_twisted_chatter() -> None:
    """Put the chatter filter in front of the observers logging now (those
    twistd installed); once per process."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    # LogPublisher keeps its observers in _observers; it has no public way to
    # list them, only to add and remove one.
    for observer in list(getattr(globalLogPublisher, "_observers", ())):
        if isinstance(observer, _Quieted):
            continue
        globalLogPublisher.removeObserver(observer)
        globalLogPublisher.addObserver(quiet(observer))
