"""One periodic sweep for all connection timeouts.

Per-request timers (``callLater`` + ``cancel``) cost heap operations on every
request; a proxy instead records a deadline per connection and one looping
call closes whatever is past its deadline.  Precision is the sweep interval.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.task import LoopingCall


class Expiring(Protocol):
    """Something with a deadline (0 for none) that knows what to do past it."""

    deadline: float

    def timed_out(self, now: float) -> None:
        """Called once the deadline has passed."""


class TimeoutSweeper:
    """Checks the deadlines of registered connections every ``interval`` seconds."""

    def __init__(self, reactor: Any, interval: float) -> None:
        self._reactor = reactor
        self._members: set[Expiring] = set()
        self._loop = LoopingCall(self._sweep)
        self._loop.clock = reactor
        self.interval = interval
        self.now: Callable[[], float] = reactor.seconds  # the clock deadlines are measured on

    def start(self) -> None:
        """Begin sweeping."""
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Stop sweeping."""
        if self._loop.running:
            self._loop.stop()

    def add(self, member: Expiring) -> None:
        """Watch ``member``'s deadline."""
        self._members.add(member)

    def discard(self, member: Expiring) -> None:
        """Stop watching ``member``."""
        self._members.discard(member)

    def _sweep(self) -> None:
        now = self.now()
        expired = [m for m in self._members if m.deadline and m.deadline <= now]
        for member in expired:
            member.timed_out(now)
