"""The ``[admin]`` listener of a master with several workers.

Each worker serves its own admin site on a private UNIX socket; the master's
``/metrics`` asks every worker for its metrics at scrape time and exposes
them together, each series labelled with ``worker="k"`` (sum them in
queries: ``sum without (worker) (rate(chatproxy_requests_total[1m]))``), plus
the master's own (workers running, restarts, reloads).  ``/readyz`` is ready
when every worker is; ``/healthz`` answers while the master runs.
``/status`` (and ``/status.json``) asks every worker for its
``/status.json`` the same way and shows the master's configuration with the
workers' figures merged (:func:`chatproxy.process.status_data.merge_process_facts`)
and the workers themselves.  ``[admin]``'s ``allow`` and basic auth guard
``/status``, ``/status.json`` and ``/metrics``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
import typing
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.util import Redirect

from chatproxy.config import Config
from chatproxy.process.admin import (DRAINING, HEALTHY, Answer, Guarded, TextResource, json_answer, prepare, quiet_site,
                                     readiness_answer, status_answer)
from chatproxy.process.admin_access import AdminAccess
from chatproxy.process.status_data import Facts, config_facts, merge_process_facts

#: How long the master waits for a worker's answer.
WORKER_TIMEOUT = 5.0


class WorkerView(typing.Protocol):
    """What the master's admin site reads of one worker."""

    @property
    def ended(self) -> bool:
        """Whether the worker process has exited (it may be waiting for its restart)."""

    @property
    def pid(self) -> int:
        """Its process id."""

    @property
    def ready(self) -> bool:
        """Whether it serves (said READY=1 since it started or since the last reload began)."""


class MasterView(typing.Protocol):
    """What the master's admin site reads of the master (a
    :class:`chatproxy.process.workers.Master`), at each request."""

    @property
    def reactor(self) -> Any:
        """The reactor, to connect to the workers."""

    @property
    def config(self) -> Config:
        """The configuration in force."""

    @property
    def config_paths(self) -> Sequence[str]:
        """The configuration files (and directories) given at start."""

    @property
    def directory(self) -> str:
        """The master's private directory, holding each worker's ``worker-k.sock``."""

    @property
    def draining(self) -> bool:
        """Whether SIGTERM started the drain."""

    @property
    def workers(self) -> Mapping[int, WorkerView]:
        """The workers by number."""

    @property
    def count(self) -> int:
        """How many workers the configuration in force asks for."""

    @property
    def restarts(self) -> int:
        """How many workers were restarted after they died."""

    @property
    def reloads(self) -> Mapping[str, int]:
        """Reloads by result (``success``, ``failure``)."""


class _OneRequest(Protocol):
    """Sends one HTTP/1.0 GET and collects the answer until the worker closes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(f"GET {self.path} HTTP/1.0\r\n\r\n".encode("ascii"))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.received))


def _parse(index: int, answer: bytes) -> tuple[int, int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return index, 0, b"malformed answer"
    return index, status, body


def _ask(master: MasterView, index: int, path: str) -> defer.Deferred[tuple[int, int, bytes]]:
    """GET ``path`` from worker ``index``: (index, status, body); status 0 when it did not answer."""
    endpoint = UNIXClientEndpoint(master.reactor, f"{master.directory}/worker-{index}.sock", timeout=WORKER_TIMEOUT)
    request = _OneRequest(path)
    d: defer.Deferred[Any] = connectProtocol(endpoint, request)
    d.addCallback(lambda _: request.done)
    d.addTimeout(WORKER_TIMEOUT, master.reactor)

    def failed(failure: Failure) -> tuple[int, int, bytes]:
        if request.transport is not None:
            request.transport.abortConnection()  # type: ignore[attr-defined]
        return index, 0, failure.getErrorMessage().encode("utf-8", "replace")

    d.addCallbacks(lambda answer: _parse(index, answer), failed)
    return d


def _ask_all(master: MasterView, path: str) -> defer.Deferred[list[tuple[int, int, bytes]]]:
    return defer.gatherResults([_ask(master, index, path) for index in sorted(master.workers)])


def merge_metrics(answers: list[tuple[int, int, bytes]]) -> list[Metric]:
    """The workers' metric families as one set, each sample labelled with its worker."""
    merged: dict[str, Metric] = {}
    for index, status, body in answers:
        if status != 200:
            continue
        try:
            families = list(text_string_to_metric_families(body.decode("utf-8")))
        except (ValueError, UnicodeDecodeError):  # a truncated answer: this worker's series are left out
            continue
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = {**sample.labels, "worker": str(index)}
                target.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar))
    return list(merged.values())


class _Collected:
    """A prometheus_client collector yielding families gathered beforehand."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        """The families."""
        return iter(self.families)


def _master_families(master: MasterView, answers: list[tuple[int, int, bytes]]) -> list[Metric]:
    running = GaugeMetricFamily("chatproxy_workers", "Worker processes running, and how many are configured.",
                                labels=["state"])
    running.add_metric(["running"], sum(1 for worker in master.workers.values() if not worker.ended))
    running.add_metric(["configured"], master.count)
    running.add_metric(["answering"], sum(1 for _, status, body in answers if status == 200))
    restarts = CounterMetricFamily("chatproxy_worker_restarts", "Workers restarted after they died.")
    restarts.add_metric([], master.restarts)
    reloads = CounterMetricFamily("chatproxy_master_reloads", "Reloads (SIGHUP) across all workers, by result.",
                                  labels=["result"])
    for result, count in sorted(master.reloads.items()):
        reloads.add_metric([result], count)
    return [running, restarts, reloads]


class _Async(Resource):
    """An endpoint answered from every worker's answer to the same path."""

    isLeaf = True

    def __init__(self, master: MasterView, path: str,
                 answer: Callable[[MasterView, list[tuple[int, int, bytes]]], Answer]) -> None:
        super().__init__()
        self.master = master
        self.path = path
        self.answer = answer

    def render_GET(self, request: Any) -> Any:
        """Ask the workers, then answer."""
        def respond(answers: list[tuple[int, int, bytes]]) -> None:
            request.write(prepare(request, self.answer(self.master, answers)))
            request.finish()

        _ask_all(self.master, self.path).addCallback(respond).addErrback(lambda f: request.processingFailed(f))
        return NOT_DONE_YET


def _metrics(master: MasterView, answers: list[tuple[int, int, bytes]]) -> Answer:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(_master_families(master, answers) + merge_metrics(answers)))  # type: ignore[arg-type]
    return 200, CONTENT_TYPE_LATEST.encode("ascii"), generate_latest(registry)


def _readyz(master: MasterView, answers: list[tuple[int, int, bytes]]) -> Answer:
    if master.draining:
        return readiness_answer([DRAINING])
    problems = [f"worker {index}: " + (body.decode("utf-8", "replace").strip() if status else "not answering")
                for index, status, body in answers if status != 200]
    if len(master.workers) < master.count:
        problems.append(f"{master.count - len(master.workers)} worker(s) not running")
    return readiness_answer(problems)


def status_facts(master: MasterView, answers: list[tuple[int, int, bytes]]) -> Facts:
    """The master's configuration, the workers' figures merged, and the workers."""
    parts: dict[int, Facts] = {}
    for index, status, body in answers:
        if status != 200:
            continue
        try:
            part = json.loads(body)
        except ValueError:  # a truncated answer: this worker's figures are left out
            continue
        if isinstance(part, dict) and "windows" in part:
            parts[index] = part
    facts = config_facts(master.config, list(master.config_paths))
    facts.update(merge_process_facts(parts))
    facts["workers"] = {
        "configured": master.count,
        "running": sum(1 for worker in master.workers.values() if not worker.ended),
        "answering": len(parts),
        "restarts": master.restarts,
        "list": [{"index": index, "pid": worker.pid, "answering": index in parts, "ready": worker.ready}
                 for index, worker in sorted(master.workers.items())],
    }
    return facts


def master_admin_site(master: MasterView) -> Site:
    """The master's admin endpoints as a twisted.web Site (guarded by the
    ``[admin]`` section in force when it is made: a reload that changes the
    section makes a new one)."""
    access = AdminAccess(master.config.admin)
    root = Resource()
    root.putChild(b"healthz", TextResource(lambda: HEALTHY))
    root.putChild(b"readyz", _Async(master, "/readyz", _readyz))
    root.putChild(b"metrics", Guarded(_Async(master, "/metrics", _metrics), access))
    root.putChild(b"status", Guarded(_Async(master, "/status.json",
                                            lambda m, answers: status_answer(status_facts(m, answers))), access))
    root.putChild(b"status.json", Guarded(_Async(master, "/status.json",
                                                 lambda m, answers: json_answer(status_facts(m, answers))), access))
    root.putChild(b"", Redirect(b"/status"))
    return quiet_site(root)
