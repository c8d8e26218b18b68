"""The admin listener: /healthz, /readyz and /metrics, scraped from a real twistd process
and parsed with prometheus_client's own parser."""

from __future__ import annotations

import http.client
import urllib.request
from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families

from chatproxy.filters import Filter, Metric
from chatproxy.process.admin import filter_metrics

from conftest import basic_config, free_port, wait_for_port


def _get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.getheader("Content-Type") or "", response.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_count_requests_filters_and_upstreams(proxy, upstream, tmp_path):
    """After a few requests, /metrics (Prometheus text, parseable by prometheus_client) counts
    requests by route and status, their durations and bytes, filter outcomes, and an
    unreachable upstream's connect failures; /healthz answers 200."""
    port, admin, dead = free_port(), free_port(), free_port()
    text = basic_config(upstream.url, port, route="filters = only-get\n", extra=(
        f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n"
        "[filter:only-get]\nuse = request_limits\nmethods = GET\n"
        f"[upstream:dead]\nservers = http://127.0.0.1:{dead}\nconnect_timeout = 2\n"
        "[route:dead]\npath = /dead\nupstream = dead\n"))
    proxy.start(text, port=port)
    wait_for_port(admin)
    for path in ("/echo", "/echo", "/bytes?n=1000"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            response.read()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/echo", body=b"x")
    assert conn.getresponse().status == 405
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/dead")
    assert conn.getresponse().status == 502
    assert _get(admin, "/healthz")[0] == 200
    status, content_type, body = _get(admin, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = _samples(body)
    http1 = ("protocol", "http/1.1")
    assert samples[("chatproxy_requests_total", (http1, ("route", "all"), ("status", "200")))] == 3
    assert samples[("chatproxy_requests_total", (http1, ("route", "all"), ("status", "405")))] == 1
    assert samples[("chatproxy_requests_total", (http1, ("route", "dead"), ("status", "502")))] == 1
    assert samples[("chatproxy_request_duration_seconds_count", (("route", "all"),))] == 4
    assert samples[("chatproxy_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "all")))] == 4
    assert samples[("chatproxy_response_body_bytes_total", (("route", "all"),))] >= 1000
    assert samples[("chatproxy_filter_outcomes_total", (("filter", "only-get"), ("outcome", "passed")))] == 3
    assert samples[("chatproxy_filter_outcomes_total", (("filter", "only-get"), ("outcome", "refused")))] == 1
    dead_labels = (("server", f"http://127.0.0.1:{dead}"), ("upstream", "dead"))
    assert samples[("chatproxy_upstream_connect_failures_total", dead_labels)] == 1
    assert samples[("chatproxy_upstream_idle_connections", (("server", upstream.url), ("upstream", "app")))] >= 1


def test_readyz_turns_503_when_every_server_of_an_upstream_fails(proxy, upstream):
    """/readyz is 200 with listeners open and upstreams reachable, and 503 naming the upstream once
    each of its servers failed its last three connection attempts."""
    port, admin, dead = free_port(), free_port(), free_port()
    text = basic_config(upstream.url, port, extra=(
        f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n"
        f"[upstream:dead]\nservers = http://127.0.0.1:{dead}\n"
        "[route:dead]\npath = /dead\nupstream = dead\n"))
    proxy.start(text, port=port)
    wait_for_port(admin)
    status, _, body = _get(admin, "/readyz")
    assert (status, body) == (200, "ready\n")
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/dead")
        assert conn.getresponse().status == 502
    status, _, body = _get(admin, "/readyz")
    assert status == 503 and "upstream dead" in body


def test_filter_metrics_one_family_per_name_with_the_filter_label():
    """Counters filters report of their own (``metrics()``) are exposed once per family
    name, however many filter sections report it, with the section as the ``filter``
    label; a filter without the hook adds nothing."""

    class Counting(Filter):
        def __init__(self, count: int) -> None:
            self.count = count

        def metrics(self) -> Iterator[Metric]:
            yield Metric("chatproxy_test_things", "Things.", (("route", "r"),), self.count)

    families = list(filter_metrics({"b": Counting(2), "a": Counting(1), "plain": Filter()}))
    assert [family.name for family in families] == ["chatproxy_test_things"]
    assert [(s.labels, s.value) for s in families[0].samples] == [({"filter": "a", "route": "r"}, 1),
                                                                  ({"filter": "b", "route": "r"}, 2)]
