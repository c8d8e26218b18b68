"""The status page: facts (:mod:`chatproxy.process.status_data`) -> HTML.

Plain HTML and CSS, no script: the page reloads itself every
:data:`REFRESH` seconds (``<meta http-equiv="refresh">``).  Every value is
escaped (:func:`html.escape`), whatever it is: names, paths, reasons and
client addresses come from configuration files and from clients.  No I/O.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Seconds between the page's reloads.
REFRESH = 5

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#eee}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#176f2c;font-weight:600}.bad{color:#b00020;font-weight:600}.warn{color:#8a5a00;font-weight:600}
.muted{color:#777}code{font-size:.95em}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _utc(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "none") -> str:
    """A table; cells are HTML already (escaped by the caller)."""
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    if not body:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: Any, css: str = "") -> str:
    return f'<td class="{css}">{_e(value)}</td>' if css else f"<td>{_e(value)}</td>"


def _num(value: Any) -> str:
    return _td(value, "n")


def _span_label(span: int) -> str:
    return f"last {span // 60} min" if span % 60 == 0 else f"last {span} s"


def _windowed(facts: Mapping[str, Any], prefix: str, label: str, keys: Iterable[str]) -> str:
    """Counts of the keys ``prefix:KEY`` over each span and since start."""
    windows = facts.get("windows", [])
    totals = facts.get("totals", {})
    headers = [label]
    for window in windows:
        short = window["covered"] < window["span"] - 1
        headers.append(_span_label(window["span"]) + (f" (only {window['covered']:.0f} s so far)" if short else ""))
    headers.append("since start")
    rows = []
    for key in keys:
        full = f"{prefix}:{key}"
        rows.append([_td(key), *(_num(w["counts"].get(full, 0)) for w in windows), _num(totals.get(full, 0))])
    return _table(headers, rows)


def _keys(facts: Mapping[str, Any], prefix: str) -> list[str]:
    return sorted({key.partition(":")[2] for key in facts.get("totals", {}) if key.startswith(prefix + ":")})


def _health(server: Mapping[str, Any], processes: int) -> str:
    healthy = int(server.get("healthy", 0))
    if processes and healthy == processes:
        return _td("healthy", "ok")
    if healthy == 0:
        return _td("unhealthy", "bad")
    return _td(f"healthy in {healthy} of {processes} workers", "warn")


def _active(server: Mapping[str, Any], path: str | None, processes: int) -> str:
    if path is None:
        return _td("no active checks", "muted")
    failing = int(server.get("failing_checks", 0))
    last = server.get("last_check") or ""
    if failing == 0:
        return _td(f"passing {path}" + (f" ({last})" if last else ""), "ok")
    where = "" if processes <= 1 else f" in {failing} of {processes} workers"
    return _td(f"failing {path}{where}" + (f" ({last})" if last else ""), "bad")


def _passive(server: Mapping[str, Any], processes: int) -> str:
    ejected = int(server.get("ejected", 0))
    if ejected:
        where = "" if processes <= 1 else f" in {ejected} of {processes} workers"
        return _td(f"ejected{where}", "bad")
    failures = int(server.get("failures_in_a_row", 0))
    return _td(f"{failures} failed connect(s) in a row" if failures else "in rotation", "warn" if failures else "ok")


def _workers(workers: Mapping[str, Any] | None) -> str:
    if workers is None:
        return '<p class="muted">one process (workers = 1): no master</p>'
    summary = (f"<p>configured <b>{_e(workers['configured'])}</b>, running <b>{_e(workers['running'])}</b>, "
               f"answering <b>{_e(workers['answering'])}</b>, restarts <b>{_e(workers['restarts'])}</b></p>")
    rows = [[_num(w["index"]), _num(w["pid"]),
             _td("answering", "ok") if w["answering"] else _td("not answering", "bad"),
             _td("ready" if w["ready"] else "starting or reloading")] for w in workers.get("list", [])]
    return summary + _table(["worker", "pid", "admin socket", "state"], rows)


def render_status(facts: Mapping[str, Any]) -> str:
    """The whole page for ``facts`` (a :func:`~chatproxy.process.status_data.config_facts`
    dict updated with process facts, and ``workers``: None or the master's view)."""
    processes = int(facts.get("processes", 0))
    now = facts.get("now")
    workers = facts.get("workers")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>chatproxy status</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>chatproxy status</h1><p>version <b>{_e(facts.get('version'))}</b> · {_e(_utc(now))} · "
        + (f"a master and {_e(workers['configured'])} workers" if workers is not None else "one process")
        + f' · <span class="muted">reloads every {REFRESH} s</span></p>',
    ]
    if workers is not None and processes < int(workers.get("running", 0)):
        out.append(f'<p class="bad">only {processes} of {_e(workers["running"])} workers answered: the figures '
                   "below are theirs</p>")

    out.append("<h2>Configuration files</h2>")
    out.append(_table(["file", "modified", "sha256"],
                      [[_td(f["path"]), _td(_utc(f["modified"])), _td(f["sha256"] or "unreadable")]
                       for f in facts.get("config_files", [])]))

    out.append("<h2>Workers</h2>")
    out.append(_workers(workers))

    out.append("<h2>Listeners</h2>")
    open_listeners = facts.get("open_listeners", {})
    connections = facts.get("connections", {})
    rows = []
    for listener in facts.get("listeners", []):
        opened = int(open_listeners.get(listener["name"], 0))
        state = _td("open", "ok") if processes and opened == processes else _td(
            f"open in {opened} of {processes}" if opened else "not open", "bad")
        rows.append([_td(listener["name"]), _td(listener["endpoint"]), _td("TLS" if listener["tls"] else "plain"),
                     _td(listener["allow"] or "any"), state, _num(connections.get(listener["name"], 0))])
    out.append(_table(["listener", "endpoint", "TLS", "allow", "state", "open HTTP connections"], rows))
    out.append('<p class="muted">An HTTP connection belongs to a listener: one keep-alive connection may carry '
               "requests for several routes.</p>")

    out.append("<h2>Routes</h2>")
    sessions = facts.get("sessions", {})
    out.append(_table(["route", "matches", "filters", "upstream", "WebSocket", "open WebSocket sessions"],
                      [[_td(r["name"]), _td(r["match"]), _td(", ".join(r["filters"]) or "-"), _td(r["upstream"]),
                        _td(r["websocket"] or "-"), _num(sessions.get(r["name"], 0))]
                       for r in facts.get("routes", [])]))

    out.append("<h2>Upstream servers</h2>")
    servers = facts.get("servers", {})
    rows = []
    for upstream in facts.get("upstreams", []):
        for url in upstream["servers"]:
            server = servers.get(upstream["name"], {}).get(url, {})
            rows.append([_td(upstream["name"]), _td(url), _health(server, processes),
                         _active(server, upstream["health_check"], processes), _passive(server, processes),
                         _num(server.get("connect_failures", 0)), _num(server.get("idle", 0))])
    out.append(_table(["upstream", "server", "health", "active checks", "passive (connect failures)",
                       "connect failures", "idle connections"], rows))

    out.append("<h2>Requests by status</h2>")
    out.append(_windowed(facts, "status", "status", _keys(facts, "status") or ["2xx"]))
    out.append("<h2>WebSocket sessions by close code</h2>")
    out.append(_windowed(facts, "close", "close code", _keys(facts, "close")))
    out.append("<h2>Filter refusals</h2>")
    filters = sorted({name for r in facts.get("routes", []) for name in r["filters"]} | set(_keys(facts, "refused")))
    out.append(_windowed(facts, "refused", "filter", filters))

    out.append("<h2>Recent refusals</h2>")
    with_worker = workers is not None
    headers = ["time", *(["worker"] if with_worker else []), "route", "filter", "client", "method", "path",
               "status", "reason"]
    out.append(_table(headers, [
        [_td(_utc(r["time"])), *([_num(r.get("worker", ""))] if with_worker else []), _td(r["route"]),
         _td(r["filter"]), _td(r["client"]), _td(r["method"]), _td(r["path"]), _num(r["status"]), _td(r["reason"])]
        for r in facts.get("refusals", [])]))

    out.append("<h2>Certificates</h2>")
    rows = []
    for cert in facts.get("certificates", []):
        days = (cert["not_after"] - now) / 86400 if now is not None else 0.0
        css = "bad" if days < 7 else "warn" if days < 21 else "ok"
        rows.append([_td(cert["listener"]), _td(cert["name"]), _td(cert["file"]), _td(_utc(cert["not_after"])),
                     _td(f"{days:.1f} days" if days >= 0 else "expired", css)])
    out.append(_table(["listener", "SNI name", "file", "expires", "left"], rows, empty="no TLS listener"))
    out.append("</body></html>")
    return "\n".join(out) + "\n"
