"""Log lines for systemd's journal: ``twistd --logger chatproxy.process.journal.observer``.

journald stores one entry per line written to a service's standard output,
with its own timestamp, and reads a syslog priority from a ``<N>`` prefix
(sd-daemon(3)).  So each event becomes lines of the form
``<3>[chatproxy.process.lifecycle#error] reload refused, ...``: no timestamp of our own, the
priority from the event's level (so ``journalctl -p warning`` works), and
the lines of a traceback each carrying the same prefix so that they stay
with their event's priority.  A worker process (``workers = N``) starts its
lines with ``worker K:``.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, LogLevel, eventAsText

from chatproxy.process.environment import WORKER_ENV
from chatproxy.process.quiet import quiet

#: syslog priorities by Twisted log level.
PRIORITIES = {
    LogLevel.critical: 2,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}


def format_for_journal(event: dict[str, Any]) -> str:
    """One event as journal lines: ``<priority>[system] text``, tracebacks included."""
    level = event.get("log_level", LogLevel.info)
    if "log_failure" in event and level in (LogLevel.info, LogLevel.debug):
        level = LogLevel.error
    prefix = f"<{PRIORITIES.get(level, 6)}>"
    worker = os.environ.get(WORKER_ENV)
    if worker:
        prefix += f"worker {worker}: "
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=True)
    return "".join(prefix + line + "\n" for line in text.splitlines() if line.strip())


def observer(stream: IO[str] | None = None) -> ILogObserver:
    """The twistd ``--logger`` factory: journal lines on the real standard
    output (twistd points ``sys.stdout`` itself at the log), without
    Twisted's port chatter (:mod:`chatproxy.process.quiet`)."""
    return quiet(FileLogObserver(stream if stream is not None else sys.__stdout__,  # type: ignore[arg-type]
                                 format_for_journal))
