"""The access log: one line per request, in combined or JSON format.

Lines produced in one reactor turn are written together, so a busy proxy makes
one write per turn rather than one per request, and nothing waits for long.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from attrs import frozen


@frozen
class AccessRecord:
    """What one request did, for the access log."""

    client: str
    method: str
    target: str
    version: str
    status: int
    bytes_sent: int
    duration: float
    route: str
    upstream: str
    referer: str
    user_agent: str
    host: str
    started: float
    websocket: str = ""  # for a WebSocket session: messages, bytes each way, close code
    notes: tuple[tuple[str, str], ...] = ()  # (filter section, note): what filters noted (e.g. the waf's score)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def format_combined(record: AccessRecord) -> str:
    """Apache/nginx combined format plus duration, route and upstream (then a
    WebSocket session's counts, and ``filter.NAME="note"`` per filter note)."""
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(record.started))
    request = _quote(f"{record.method} {record.target} HTTP/{record.version}")
    return (
        f'{record.client} - - [{stamp}] "{request}" {record.status} {record.bytes_sent} '
        f'"{_quote(record.referer or "-")}" "{_quote(record.user_agent or "-")}" '
        f'{record.duration:.6f} route={record.route or "-"} upstream={record.upstream or "-"}'
        + (f" {record.websocket}" if record.websocket else "")
        + "".join(f' filter.{name}="{_quote(note)}"' for name, note in record.notes)
    )


def format_json(record: AccessRecord) -> str:
    """One JSON object per line."""
    return json.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.started)),
            "client": record.client,
            "method": record.method,
            "target": record.target,
            "version": record.version,
            "host": record.host,
            "status": record.status,
            "bytes": record.bytes_sent,
            "duration": round(record.duration, 6),
            "route": record.route or None,
            "upstream": record.upstream or None,
            "referer": record.referer or None,
            "user_agent": record.user_agent or None,
            **({"websocket": dict(item.split("=", 1) for item in record.websocket.split())} if record.websocket else {}),
            **({"filters": dict(record.notes)} if record.notes else {}),
        },
        separators=(",", ":"),
    )


class AccessLog:
    """Writes access records to stdout or a file, batching per reactor turn."""

    def __init__(self, reactor: Any, destination: str | None, fmt: str) -> None:
        self._reactor = reactor
        self._format = format_json if fmt == "json" else format_combined
        self._stream: IO[str] | None
        self._owned = False
        if destination is None:
            self._stream = None
        elif destination == "-":
            self._stream = sys.__stdout__
        else:
            self._stream = open(destination, "a", encoding="utf-8")
            self._owned = True
        self._pending: list[str] = []
        self._flush_call: Any = None
        self.enabled = self._stream is not None  # whether records are written at all

    def log(self, record: AccessRecord) -> None:
        """Queue one record for writing at the end of this reactor turn."""
        if self._stream is None:
            return
        self._pending.append(self._format(record))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Write the queued lines now."""
        self._flush_call = None
        if not self._pending or self._stream is None:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Flush and close a file destination."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self.flush()
        if self._owned and self._stream is not None:
            self._stream.close()
        self._stream = None
        self.enabled = False
