"""Figures over the last minutes for the status page, from running totals.

The proxy counts totals since start (:class:`chatproxy.proxy.stats.Stats`);
"the last 5 minutes" is the difference between the totals now and a
snapshot of them taken then.  A :class:`SnapshotWindow` keeps snapshots
taken every ``interval`` seconds (the caller takes them: the service's
timer), as many as the longest span needs and no more.  No I/O and no clock
of its own: times are passed in.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping, Sequence

from attrs import frozen

from chatproxy.proxy.stats import Stats

#: The spans the status page shows, seconds.
SPANS = (60, 300, 900)
#: Seconds between snapshots.
INTERVAL = 10.0


def status_class(status: int) -> str:
    """``2xx`` for 204, and so on."""
    return f"{status // 100}xx"


def status_totals(stats: Stats) -> dict[str, int]:
    """The running totals the status page shows over time, as flat keys:
    ``status:2xx`` (requests by status class), ``close:1000`` (WebSocket
    sessions by close code), ``refused:FILTER`` (requests a filter refused)."""
    totals: Counter[str] = Counter()
    for (_, status, _), count in stats.requests.items():
        totals[f"status:{status_class(status)}"] += count
    for (_, code), count in stats.websocket_closes.items():
        totals[f"close:{code}"] += count
    for key, count in stats.filter_outcomes.items():
        name, _, outcome = key.rpartition(":")
        if outcome == "refused":
            totals[f"refused:{name}"] += count
    return dict(totals)


@frozen
class Figures:
    """What happened over one span: ``counts`` by key (see :func:`status_totals`);
    ``covered`` is the seconds the figures really cover (less than ``span``
    while the process is younger than the span)."""

    span: int
    covered: float
    counts: Mapping[str, int]


class SnapshotWindow:
    """Snapshots of running totals, bounded to the longest span (plus one interval)."""

    def __init__(self, spans: Sequence[int] = SPANS, interval: float = INTERVAL) -> None:
        self.spans = tuple(spans)
        self.interval = interval
        self._snapshots: deque[tuple[float, dict[str, int]]] = deque(
            maxlen=int(max(self.spans) // interval) + 2)

    def __len__(self) -> int:
        return len(self._snapshots)

    def record(self, now: float, totals: Mapping[str, int]) -> None:
        """Keep a snapshot of ``totals`` taken at ``now`` (the oldest goes when full)."""
        self._snapshots.append((now, dict(totals)))

    def figures(self, now: float, totals: Mapping[str, int]) -> list[Figures]:
        """For each span, ``totals`` minus the newest snapshot at least that old
        (or the oldest one, when none is); keys that did not change are left out."""
        result = []
        for span in self.spans:
            base_time, base = self._snapshots[0] if self._snapshots else (now, dict(totals))
            for taken, snapshot in self._snapshots:
                if taken > now - span:
                    break
                base_time, base = taken, snapshot
            counts = {key: value - base.get(key, 0) for key, value in totals.items() if value != base.get(key, 0)}
            result.append(Figures(span, max(0.0, now - base_time), counts))
        return result
