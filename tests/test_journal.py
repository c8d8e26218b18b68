"""The journal log format (twistd --logger chatproxy.process.journal.observer): a syslog priority
prefix on every line, tracebacks included, and the worker's number in workers."""

from __future__ import annotations

import io

from twisted.logger import Logger, LogLevel, globalLogPublisher

from chatproxy.process.journal import format_for_journal, observer


def _event(level: LogLevel, text: str, **extra: object) -> dict[str, object]:
    return {"log_level": level, "log_format": text, "log_namespace": "chatproxy.test", "log_time": 0.0, **extra}


def test_levels_become_syslog_priorities_without_timestamps():
    """info -> <6>, warn -> <4>, error -> <3>, critical -> <2>, debug -> <7>; the line carries
    the namespace and the message but no timestamp of its own (journald adds one)."""
    cases = {LogLevel.info: "<6>", LogLevel.warn: "<4>", LogLevel.error: "<3>", LogLevel.critical: "<2>",
             LogLevel.debug: "<7>"}
    for level, prefix in cases.items():
        line = format_for_journal(_event(level, "reload refused: {why}", why="bad"))
        assert line == f"{prefix}[chatproxy.test#{level.name}] reload refused: bad\n"


def test_every_traceback_line_keeps_the_event_priority():
    """A logged failure is several lines; each starts with the error priority, so journalctl -p
    err shows the whole traceback, not just its first line."""
    stream = io.StringIO()
    journal = observer(stream)
    globalLogPublisher.addObserver(journal)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            Logger(namespace="chatproxy.test").failure("filter {name} raised", level=LogLevel.error, name="waf")
    finally:
        globalLogPublisher.removeObserver(journal)
    lines = stream.getvalue().splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines), lines
    assert "filter waf raised" in lines[0] and any("ValueError: boom" in line for line in lines)


def test_a_worker_names_itself(monkeypatch):
    """In a worker process (CHATPROXY_WORKER=k) every line says which worker wrote it."""
    monkeypatch.setenv("CHATPROXY_WORKER", "3")
    assert format_for_journal(_event(LogLevel.info, "hello")) == "<6>worker 3: [chatproxy.test#info] hello\n"
