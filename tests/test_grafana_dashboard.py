"""etc/grafana/chatproxy.json, the Grafana dashboard: a valid dashboard whose panels all
query a templated Prometheus data source, whose every metric a real ``twistd chatproxy``
with two workers exposes once it served some traffic, and whose every expression Debian's
``prometheus``, scraping that twistd's admin listener, evaluates to at least one series."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from ctypes.util import find_library
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatproxy.filters.crs import DEFAULT_CRS
from chatproxy.process.steering import worker_for
from conftest import (PKI, ProxyProcess, admin_ready, stop_process, ProxyStarter, RecordingUpstream, free_port, http_get, metric_samples,
                      require_tool, wait_for_port, wait_until)
from ws_peers import WsUpstream

DASHBOARD = Path(__file__).resolve().parents[1] / "etc" / "grafana" / "chatproxy.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

#: What the test gives Grafana's variables when it evaluates the expressions itself.
#: (Windows of an hour: the test's whole traffic, each event before and after a scrape.)
VARIABLES = {"__rate_interval": "1h", "__interval": "1h", "__range": "1h", "instance": ".*", "route": ".*"}

#: Series chatproxy exposes that the dashboard leaves out on purpose, and why.
NOT_ON_DASHBOARD = {
    "chatproxy_request_duration_seconds_count": "the histogram's buckets give the rates and quantiles",
    "chatproxy_request_duration_seconds_sum": "an average latency hides what the quantiles show",
    "chatproxy_websocket_message_bytes_total": "messages per second say enough on an overview",
    "chatproxy_waf_rule_matches_total": "one series per CRS rule id: for Explore, not an overview",
    "chatproxy_config_last_reload_success_timestamp_seconds": "the reloads panel shows when they happened",
}


# ---------------------------------------------------------------------------
# The dashboard


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def _variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable, query) of every query variable."""
    return [(var["name"], var["query"]) for var in dashboard["templating"]["list"] if var["type"] == "query"]


def metric_names(expr: str) -> set[str]:
    """The chatproxy series an expression (or a ``label_values`` query) reads."""
    return set(re.findall(r"\bchatproxy_[A-Za-z0-9_]+", expr))


def substitute(expr: str) -> str:
    """``expr`` with Grafana's variables replaced as :data:`VARIABLES` says (``$1`` of
    ``label_replace`` is left alone); an unknown variable is an error."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise AssertionError(f"unknown template variable ${name} in {expr}")
        return VARIABLES[name]

    return re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", value, expr)


def as_promql(query: str) -> str:
    """A ``label_values(SELECTOR, LABEL)`` variable query as the PromQL Grafana's choices come from."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert match, f"not a label_values() query: {query}"
    return f"count by ({match.group(2)}) ({match.group(1)})"


def test_dashboard_is_valid_and_every_panel_queries_the_templated_prometheus():
    """The file is JSON Grafana imports: a title and uid, a data source variable DS_PROMETHEUS
    of type prometheus, an instance and a route variable; every panel has an id of its own, a
    place on the grid, the DS_PROMETHEUS data source and at least one target with an expr and
    a refId; every expression uses only known variables and reads some chatproxy series."""
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("instance", "route"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE
        assert variables[name]["allValue"] == ".*"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip() and metric_names(target["expr"]), panel["title"]
            substitute(target["expr"])


# ---------------------------------------------------------------------------
# A real chatproxy with two workers, and a real Prometheus scraping it


@dataclass
class Scene:
    """The running chatproxy (and Prometheus, when installed) after the traffic."""

    admin: int
    process: ProxyProcess
    prometheus: int | None  # its HTTP port
    evaluated_at: float | None  # when Prometheus had scraped all the traffic (Unix time)


def _config(main: int, secure: int, admin: int, pki: PKI, app: str, dead: int, gone: int, ws: int) -> str:
    return (
        "[chatproxy]\naccess_log = off\nworkers = 2\nreload_close_window = 1\ndrain_timeout = 10\n\n"
        f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n\n"
        f"[listen:main]\nendpoint = tcp:{main}:interface=127.0.0.1\n\n"
        f"[listen:secure]\nendpoint = tcp:{secure}:interface=127.0.0.1\ntls = yes\n"
        f"certificate = {pki.cert}\nkey = {pki.key}\n\n"
        # A server that answers and one nothing listens on: connect failures and an unhealthy server.
        f"[upstream:app]\nservers = {app}, http://127.0.0.1:{dead}\nhealth_check_path = /healthz\n"
        "health_check_interval = 1\nhealth_check_timeout = 1\n\n"
        f"[upstream:ws]\nservers = http://127.0.0.1:{ws}\n\n"
        "[filter:only-get]\nuse = request_limits\nmethods = GET\n\n"
        "[filter:firewall]\nuse = waf\n\n"
        "[route:chat]\npath = /chat\nupstream = ws\nwebsocket = yes\n\n"
        "[route:limited]\npath = /limited\nupstream = ws\nwebsocket = yes\nmax_messages_per_second = 1\n\n"
        # Readiness turns 503 once /dead failed three times: it gets requests after the waits for readiness.
        f"[upstream:gone]\nservers = http://127.0.0.1:{gone}\nconnect_timeout = 2\n\n"
        "[route:dead]\npath = /dead\nupstream = gone\n\n"
        "[route:upload]\npath = /upload\nupstream = app\n\n"
        "[route:all]\npath = /\nupstream = app\nfilters = firewall, only-get\n"
    )


def _worker_pids(output: str) -> dict[int, int]:
    """The latest pid of each worker, from the master's log."""
    return {int(index): int(pid) for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", output)}


def _metric(admin: int, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` with these labels (all workers)."""
    return sum(value for found, value in metric_samples(admin, name)
               if all(found.get(key) == wanted for key, wanted in labels.items()))


def _start_prometheus(directory: Path, admin: int) -> tuple[subprocess.Popen[bytes], int]:
    """Debian's prometheus with a config of its own: scrape the admin listener every second."""
    port = free_port()
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: chatproxy\n    scrape_interval: 1s\n    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{admin}']\n")
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    log.close()
    wait_for_port(port, timeout=30, process=process)
    return process, port


_SOURCE_PORTS = itertools.count(20000)  # below the kernel's ephemeral range; each used once


def _to_worker_one() -> tuple[str, int]:
    """A source address and port from which the steering program sends a connection to the
    main listener to worker 1 (of 2): every connection of the rounds reaches one worker, so
    each counter's series exists after round 1 and grows in round 2 (rate() cannot see the
    increment that created a series)."""
    for port in _SOURCE_PORTS:
        if worker_for("127.0.0.1", 2, port) == 0:
            return "127.0.0.1", port
    raise AssertionError("unreachable: the count is endless")


def _get(main: int, path: str) -> int:
    """GET ``path`` on the main listener from a source that reaches worker 1; the status."""
    source, port = _to_worker_one()
    return http_get(main, path, source=source, source_port=port)[0]


def _drive_traffic(main: int, secure: int, admin: int, pki: PKI, round: int) -> None:
    """One round of traffic: requests (200, 405 refused by a filter, 403 refused by the waf,
    503 from the upstream, 502 from a dead one, a POST with a body), an HTTPS request and a
    failed handshake, WebSocket sessions closed with 1000 and 1008; returns once /metrics
    counted the sessions and the failed handshake of ``round`` rounds."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    for n in range(6):  # round robin meets the app's dead server too, until its checks fail
        assert _get(main, f"/hello/{n}") == 200
    assert _get(main, "/status?code=503") == 503
    assert _get(main, "/dead") == 502
    assert _get(main, "/search?q=1%27%20union%20select%20password%20from%20users--") == 403
    for path, status in (("/form", 405), ("/upload", 200)):
        post = http.client.HTTPConnection("127.0.0.1", main, timeout=10, source_address=_to_worker_one())
        with contextlib.closing(post):
            post.request("POST", path, body=b"message=hello")
            assert post.getresponse().status == status
    assert http_get(secure, "/over-tls", tls=pki.client_context())[0] == 200
    with socket.create_connection(("127.0.0.1", secure), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to a TLS listener
        while raw.recv(4096):
            pass
    with connect(f"ws://127.0.0.1:{main}/chat?sid=grafana-{round}", open_timeout=10, close_timeout=10,
                 source_address=_to_worker_one()) as ws:
        for text in ("hello", "anyone there?"):
            ws.send(text)
            assert ws.recv(timeout=10) == text
    with connect(f"ws://127.0.0.1:{main}/limited?sid=limited-{round}", open_timeout=10, close_timeout=10,
                 source_address=_to_worker_one()) as ws:
        with pytest.raises(ConnectionClosed) as closed:  # the close may come while sending
            for n in range(10):  # at once, against 1 message/s (a bucket of 2)
                ws.send(f"message {n}")
            while True:
                ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    wait_until(lambda: (_metric(admin, "chatproxy_websocket_closes_total") == 2 * round
                        and _metric(admin, "chatproxy_tls_handshake_failures_total") == round),
               f"round {round}'s sessions and failed handshake counted")


def _prometheus_scraped_after(port: int, moment: float) -> float:
    """Wait (bounded) until Prometheus holds a scrape of the admin listener that started after
    ``moment`` (Unix time); returns the time then."""
    def newest() -> float:
        answer = _query(port, "max(timestamp(chatproxy_client_connections))")
        result = answer.get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else 0.0

    wait_until(lambda: newest() > moment, "a scrape by Prometheus", timeout=30)
    return time.time()


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[Scene]:
    """twistd with workers = 2, an [admin] listener, a plain and a TLS listener, an HTTP route
    with a filter that refuses POST and the waf, WebSocket bridge routes (one rate-limited),
    an upstream with health_check_path and a dead server; Prometheus (when installed)
    scrapes it from the start. Worker 1 is killed and restarted, the master reloaded
    (SIGHUP), then traffic makes every series exist."""
    if find_library("modsecurity") is None or not Path(DEFAULT_CRS, "rules").is_dir():
        if os.environ.get("CI"):
            pytest.fail("the waf needs Debian's libmodsecurity3 and modsecurity-crs (.ci/run installs them)")
        pytest.skip("Debian's libmodsecurity3 and modsecurity-crs are not installed")
    directory = tmp_path_factory.mktemp("grafana")
    main, secure, admin, dead, gone = (free_port() for _ in range(5))
    with contextlib.ExitStack() as stack:
        upstream = RecordingUpstream()
        stack.callback(upstream.stop)
        ws_upstream = WsUpstream()
        stack.callback(ws_upstream.stop)
        prometheus_port = None
        if os.environ.get("CI") or shutil.which("prometheus"):
            require_tool("prometheus", "prometheus")  # fails under CI without it
            prometheus, prometheus_port = _start_prometheus(directory, admin)

            stack.callback(stop_process, prometheus)
        starter = ProxyStarter(directory)
        stack.callback(starter.stop_all)
        process = starter.start(_config(main, secure, admin, pki, upstream.url, dead, gone, ws_upstream.port),
                                port=main, workers=None)
        wait_for_port(admin)
        wait_until(lambda: admin_ready(admin), "both workers ready")
        if prometheus_port is not None:  # it saw the counters before they count anything
            _prometheus_scraped_after(prometheus_port, time.time())
        pids = _worker_pids(process.output())
        assert set(pids) == {1, 2}
        os.kill(pids[1], signal.SIGKILL)
        wait_until(lambda: _worker_pids(process.output())[1] != pids[1], "worker 1 restarted")
        wait_until(lambda: admin_ready(admin), "the restarted worker ready")
        process.process.send_signal(signal.SIGHUP)
        wait_until(lambda: _metric(admin, "chatproxy_master_reloads_total", result="success") == 1,
                   "the reload counted by the master")
        wait_until(lambda: admin_ready(admin), "both workers ready after the reload")
        # Round 1 makes the series exist; Prometheus sees them, and round 2 makes them grow
        # (rate() cannot see the increment that created a series).
        evaluated_at = None
        for round in (1, 2):
            _drive_traffic(main, secure, admin, pki, round)
            if prometheus_port is not None:
                evaluated_at = _prometheus_scraped_after(prometheus_port, time.time())
        yield Scene(admin, process, prometheus_port, evaluated_at)


def _scrape(admin: int) -> dict[str, list[dict[str, str]]]:
    """The labels of every sample on /metrics, by sample name (prometheus_client's parser)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


def test_every_metric_the_dashboard_queries_is_exposed(scene):
    """Every chatproxy series an expression or variable of the dashboard reads has at least one
    sample on the master's /metrics once the traffic ran (each worker's series labelled with
    its worker); and every series chatproxy exposed is on the dashboard or left out on purpose
    (:data:`NOT_ON_DASHBOARD`), so a name the dashboard misspells or a new metric is noticed."""
    dashboard = _dashboard()
    wanted = set()
    for _, expr in _expressions(dashboard) + _variable_queries(dashboard):
        wanted |= metric_names(expr)

    def missing() -> set[str]:
        return wanted - set(_scrape(scene.admin))

    with contextlib.suppress(AssertionError):
        wait_until(lambda: not missing(), "every series", timeout=20)
    assert not missing(), f"/metrics lacks {sorted(missing())}"
    exposed = _scrape(scene.admin)
    assert {labels.get("worker") for labels in exposed["chatproxy_requests_total"]} <= {"1", "2"}
    assert not (set(exposed) - wanted - set(NOT_ON_DASHBOARD)), "exposed but neither on the dashboard " \
        f"nor in NOT_ON_DASHBOARD: {sorted(set(exposed) - wanted - set(NOT_ON_DASHBOARD))}"


def _query(port: int, promql: str, at: float | None = None) -> dict[str, Any]:
    """Prometheus' answer to an instant query (evaluated ``at`` that Unix time, or now)."""
    parameters = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(parameters)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:  # 400 for a query that does not parse, with the reason
        return dict(json.loads(error.read()))


def test_prometheus_evaluates_every_dashboard_expression_to_series(scene):
    """Debian's prometheus, scraping the admin listener every second, evaluates every panel's
    expression and every variable's label_values() query (variables substituted: routes and
    instances ``.*``, ``$__rate_interval`` and ``$__range`` 1h), at a moment it had scraped all
    the traffic, successfully to at least one series, none of them still split by ``worker``;
    a rate() or increase() has a series above 0 (the panel shows the traffic), a quantile a
    finite one; the status class panel has 2xx, 4xx and 5xx, the close code panel 1000 and 1008,
    the health panel a healthy and an unhealthy server."""
    require_tool("prometheus", "prometheus")
    assert scene.prometheus is not None and scene.evaluated_at is not None
    dashboard = _dashboard()
    queries = [(title, substitute(expr)) for title, expr in _expressions(dashboard)]
    queries += [(f"${name}", as_promql(substitute(query))) for name, query in _variable_queries(dashboard)]
    by_title: dict[str, list[dict[str, Any]]] = {}
    for title, promql in queries:
        answer = _query(scene.prometheus, promql, at=scene.evaluated_at)
        assert answer["status"] == "success", f"[{title}] {promql}: {answer.get('error')}"
        result = list(answer["data"]["result"])
        assert result, f"[{title}] {promql}: no series"
        for found in result:
            assert "worker" not in found["metric"], f"[{title}] {promql} is split by worker: {found['metric']}"
        values = [float(found["value"][1]) for found in result]
        if "histogram_quantile" in promql:
            assert any(math.isfinite(value) for value in values), f"[{title}] {promql}: {result}"
        elif "rate(" in promql or "increase(" in promql:
            assert any(value > 0 for value in values), f"[{title}] {promql}: {result}"
        by_title.setdefault(title, []).extend(result)
    classes = {found["metric"].get("class") for found in by_title["Requests per second by status class"]}
    assert {"2", "4", "5"} <= classes
    codes = {found["metric"].get("code") for found in by_title["WebSocket close codes"]}
    assert {"1000", "1008"} <= codes
    health = {float(found["value"][1]) for found in by_title["Upstream server health"]}
    assert health == {0.0, 1.0}
