"""The facts the status page shows, as plain JSON-able data.

Two parts: what the configuration says (:func:`config_facts`: version,
files, listeners, routes, upstreams), which any process can tell, and what
one proxy process sees (:func:`process_facts`: connections, sessions,
upstream server health, figures over the last minutes, recent refusals,
certificates).  A worker answers both as JSON on its private admin socket
(``/status.json``); the master merges the workers' process parts
(:func:`merge_process_facts`: figures summed, health counted per worker,
refusals interleaved by time) under its own configuration part.  The page
itself is :mod:`chatproxy.process.status_page`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import chatproxy
from chatproxy.config import Config, Route
from chatproxy.process.status_window import SnapshotWindow, status_totals
from chatproxy.proxy.core import ProxyCore
from chatproxy.proxy.stats import RECENT_REFUSALS

Facts = dict[str, Any]


def version() -> str:
    """The installed distribution's version (the package's when not installed)."""
    try:
        return importlib.metadata.version("chatproxy")
    except importlib.metadata.PackageNotFoundError:
        return chatproxy.__version__


def _file_facts(path: str) -> Facts:
    """A configuration file: path, modification time and the start of its SHA-256 (None: unreadable)."""
    try:
        with open(path, "rb") as f:
            digest: str | None = hashlib.sha256(f.read()).hexdigest()[:12]
        modified: float | None = os.stat(path).st_mtime
    except OSError:
        digest = modified = None
    return {"path": path, "modified": modified, "sha256": digest}


def describe_match(route: Route) -> str:
    """What a route matches, in a few words."""
    parts = [f"path ~ {route.path_regex.pattern}" if route.path_regex is not None else f"path {route.path}"]
    if route.hosts:
        parts.append("hosts " + ", ".join(route.hosts))
    if route.methods:
        parts.append("methods " + ", ".join(sorted(route.methods)))
    if route.query:
        parts.append("query " + "&".join(q.name if q.value is None else f"{q.name}={q.value}" for q in route.query))
    if route.listeners:
        parts.append("listeners " + ", ".join(route.listeners))
    if route.rewrite_path:
        parts.append(f"rewritten to {route.rewrite_path}")
    return "; ".join(parts)


def config_facts(config: Config, paths: Sequence[str]) -> Facts:
    """What the configuration in force says (``paths``: the files it was read from)."""
    return {
        "version": version(),
        "config_files": [_file_facts(path) for path in (paths or config.sources)],
        "listeners": [{"name": listener.name, "endpoint": listener.endpoint, "tls": listener.tls,
                       "allow": ", ".join(map(str, listener.allow)) if listener.allow is not None else None}
                      for listener in config.listeners.values()],
        "routes": [{"name": route.name, "match": describe_match(route), "filters": list(route.filters),
                    "upstream": route.upstream, "websocket": route.ws.mode if route.websocket else ""}
                   for route in config.routes],
        "upstreams": [{"name": upstream.name, "health_check": upstream.health_check_path,
                       "servers": [server.url for server in upstream.servers]}
                      for upstream in config.upstreams.values()],
    }


def _route_of(session: Any) -> str:
    route = getattr(getattr(session, "exchange", None), "route", None)
    return str(getattr(route, "name", "") or "-")


def process_facts(core: ProxyCore, window: SnapshotWindow, now: float, open_listeners: Iterable[str],
                  certificates: Iterable[tuple[str, str, str, float]]) -> Facts:
    """What one proxy process sees now (``now``: Unix time)."""
    connections: Counter[str] = Counter(str(getattr(getattr(c, "listener", None), "name", "-"))
                                        for c in core.connections)
    sessions: Counter[str] = Counter(_route_of(s) for s in [*core.websocket_sessions, *core.tunnels])
    servers: dict[str, dict[str, Facts]] = {}
    for name, pools in core.pools.items():
        for pool in pools.servers:
            checker = pool.checker
            servers.setdefault(name, {})[pool.server.url] = {
                "healthy": 1 if pool.healthy else 0,
                "failing_checks": 0 if pool.check_healthy else 1,
                "ejected": 1 if pool.ejected_until and pool.sweeper.now() < pool.ejected_until else 0,
                "failures_in_a_row": pool.consecutive_failures,
                "connect_failures": core.stats.connect_failures.get(pool.server.url, 0),
                "idle": pool.idle_count,
                "last_check": checker.last_result if checker is not None else "",
            }
    totals = status_totals(core.stats)
    return {
        "processes": 1,
        "now": now,
        "open_listeners": {name: 1 for name in open_listeners},
        "connections": dict(connections),
        "sessions": dict(sessions),
        "servers": servers,
        "totals": totals,
        "windows": [{"span": f.span, "covered": f.covered, "counts": dict(f.counts)}
                    for f in window.figures(now, totals)],
        "refusals": [{"time": r.time, "filter": r.filter, "route": r.route, "client": r.client,
                      "method": r.method, "path": r.path, "status": r.status, "reason": r.reason}
                     for r in reversed(core.stats.refusals)],
        "certificates": [{"listener": listener, "name": sni, "file": file, "not_after": not_after}
                         for listener, sni, file, not_after in sorted(certificates)],
    }


def _sum(dicts: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in dicts:
        total.update({key: int(value) for key, value in d.items()})
    return dict(total)


def merge_process_facts(parts: Mapping[int, Facts]) -> Facts:
    """The process facts of several workers (by worker number) as one: counts
    summed (``processes`` is how many answered, so "healthy 1 of 2" reads
    against it), the newest refusals of all (each with its ``worker``),
    each certificate once."""
    ordered = [parts[index] for index in sorted(parts)]
    servers: dict[str, dict[str, Facts]] = {}
    for part in ordered:
        for upstream, by_url in part.get("servers", {}).items():
            for url, facts in by_url.items():
                merged = servers.setdefault(upstream, {}).setdefault(url, {"last_check": ""})
                for key, value in facts.items():
                    if key == "last_check":
                        merged[key] = merged[key] or value
                    else:
                        merged[key] = merged.get(key, 0) + int(value)
    windows: list[Facts] = []
    for i, first in enumerate(ordered[0]["windows"] if ordered else []):
        same = [part["windows"][i] for part in ordered if len(part.get("windows", [])) > i]
        windows.append({"span": first["span"], "covered": min(w["covered"] for w in same),
                        "counts": _sum(w["counts"] for w in same)})
    refusals = [dict(refusal, worker=index) for index in sorted(parts) for refusal in parts[index].get("refusals", [])]
    refusals.sort(key=lambda refusal: refusal["time"], reverse=True)
    certificates = {(c["listener"], c["name"], c["file"]): c for part in ordered for c in part.get("certificates", [])}
    return {
        "processes": len(ordered),
        "now": max((part.get("now", 0.0) for part in ordered), default=0.0),
        "open_listeners": _sum(part.get("open_listeners", {}) for part in ordered),
        "connections": _sum(part.get("connections", {}) for part in ordered),
        "sessions": _sum(part.get("sessions", {}) for part in ordered),
        "servers": servers,
        "totals": _sum(part.get("totals", {}) for part in ordered),
        "windows": windows,
        "refusals": refusals[:RECENT_REFUSALS],
        "certificates": [certificates[key] for key in sorted(certificates)],
    }
