"""``workers = N``: a master and N worker processes of a real twistd share the listeners,
a dead worker is restarted, reload and drain reach every worker, the admin listener speaks
for all of them, and configurations the workers cannot serve stop the start cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
from typing import Any, Callable

import pytest

from conftest import admin_ready, free_port, http_get, metric_samples, wait_for_port
from ws_peers import WsUpstream


@pytest.fixture
def ws_upstream():
    """An echoing WebSocket upstream."""
    server = WsUpstream()
    yield server
    server.stop()


def _config(main: int, admin: int, app: str, ws: int, workers: int = 2, chat: bool = True) -> str:
    text = (
        f"[chatproxy]\naccess_log = off\nworkers = {workers}\nreload_close_window = 1\ndrain_timeout = 10\n\n"
        f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\n\n"
        f"[listen:main]\nendpoint = tcp:{main}:interface=127.0.0.1\n\n"
        f"[upstream:app]\nservers = {app}\n\n[upstream:ws]\nservers = http://127.0.0.1:{ws}\n\n"
    )
    if chat:
        text += "[route:chat]\npath = /chat\nupstream = ws\nwebsocket = yes\n\n"
    return text + "[route:all]\npath = /\nupstream = app\n"


def _worker_pids(output: str) -> dict[int, int]:
    """The latest pid of each worker, from the master's log."""
    return {int(index): int(pid) for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", output)}


def _wait(predicate: Any, message: str | Callable[[], str], timeout: float = 20) -> None:
    """Poll ``predicate`` until it holds; fail with ``message`` (or what it returns) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, message() if callable(message) else message
        time.sleep(0.05)


def test_two_workers_share_the_listener_and_the_admin_listener_speaks_for_both(proxy, upstream, ws_upstream):
    """With workers = 2 two worker processes accept on the same port (new connections from
    different client addresses reach both), /readyz is ready when both are, and /metrics carries each worker's series with a
    worker label plus the master's worker gauges."""
    main, admin = free_port(), free_port()
    process = proxy.start(_config(main, admin, upstream.url, ws_upstream.port), port=main, workers=None)
    wait_for_port(admin)
    _wait(lambda: admin_ready(admin), "the master never became ready")
    assert len(_worker_pids(process.output())) == 2

    def per_worker() -> dict[str, float]:
        counts: dict[str, float] = {}
        for labels, value in metric_samples(admin, "chatproxy_requests_total"):
            counts[labels["worker"]] = counts.get(labels["worker"], 0) + value
        return counts

    sent = 0
    while len(per_worker()) < 2 and sent < 2000:  # workers take clients by address
        for _ in range(20):
            assert http_get(main, f"/spread/{sent}", source=f"127.0.0.{2 + sent % 250}")[0] == 200
            sent += 1
    counts = per_worker()
    assert set(counts) == {"1", "2"}, counts
    assert sum(counts.values()) == sent
    gauges = {labels["state"]: value for labels, value in metric_samples(admin, "chatproxy_workers")}
    assert gauges == {"running": 2, "configured": 2, "answering": 2}


def test_a_worker_that_dies_is_restarted_and_serving_goes_on(proxy, upstream, ws_upstream):
    """A worker killed with SIGKILL is restarted by the master (counted and logged); the other
    worker serves meanwhile, and the new worker serves once ready."""
    main, admin = free_port(), free_port()
    process = proxy.start(_config(main, admin, upstream.url, ws_upstream.port), port=main, workers=None)
    wait_for_port(admin)
    _wait(lambda: admin_ready(admin), "the master never became ready")
    pids = _worker_pids(process.output())
    os.kill(pids[1], signal.SIGKILL)
    _wait(lambda: "worker 1 (pid" in process.output() and "died" in process.output(), "the death was not noticed")
    for n in range(50):
        assert http_get(main, f"/meanwhile/{n}")[0] == 200
    _wait(lambda: _worker_pids(process.output())[1] != pids[1], "worker 1 was not restarted")
    _wait(lambda: admin_ready(admin), "the restarted worker never became ready")
    assert metric_samples(admin, "chatproxy_worker_restarts_total") == [({}, 1.0)]
    assert _worker_pids(process.output())[2] == pids[2]


def test_reload_and_drain_reach_every_worker(proxy, upstream, ws_upstream):
    """SIGHUP to the master reloads every worker: sessions on a removed route get 1012 whichever
    worker holds them; a request in flight at SIGTERM completes, every worker exits, and the
    master exits 0."""
    from websockets.sync.client import connect

    main, admin = free_port(), free_port()
    config = proxy.write(_config(main, admin, upstream.url, ws_upstream.port))
    process = proxy.start(configs=[config], port=main, workers=None)
    wait_for_port(admin)
    _wait(lambda: admin_ready(admin), "the master never became ready")
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(connect(f"ws://127.0.0.1:{main}/chat?sid=s{i}", open_timeout=10))
                    for i in range(8)]
        for session in sessions:
            session.send("hi")
            assert session.recv(timeout=10) == "hi"
        open_per_worker = {labels["worker"]: value for labels, value in metric_samples(admin, "chatproxy_websocket_sessions")}
        config.write_text(_config(main, admin, upstream.url, ws_upstream.port, chat=False))
        process.process.send_signal(signal.SIGHUP)
        for session in sessions:
            with pytest.raises(Exception):
                while True:
                    session.recv(timeout=15)
            assert session.close_code == 1012
    _wait(lambda: "reload done in all 2 workers" in process.output(), "the master did not see both reloads")
    reloads = {labels["worker"]: value for labels, value in metric_samples(admin, "chatproxy_config_reloads_total")
               if labels["result"] == "success"}
    assert reloads == {"1": 1, "2": 1}
    assert sum(open_per_worker.values()) == 8
    result: dict[str, Any] = {}

    def slow() -> None:
        result["answer"] = http_get(main, "/slow?delay=2")

    thread = threading.Thread(target=slow)
    thread.start()
    _wait(lambda: any(r["path"].startswith("/slow") for r in upstream.requests), "the slow request never arrived")
    pids = _worker_pids(process.output())
    process.process.send_signal(signal.SIGTERM)
    thread.join(20)
    assert result["answer"][0] == 200 and b"/slow?delay=2" in result["answer"][1]
    assert process.process.wait(30) == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_port_in_use_stops_the_master_with_status_1(proxy, upstream, ws_upstream):
    """When a listener's port belongs to another program, the master says so and exits 1 before
    starting any worker (as one process would), rather than sharing the port with it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        process = proxy.start(_config(busy, free_port(), upstream.url, ws_upstream.port), port=None, workers=None)
        assert process.wait_exit(30) == 1
    output = process.output()
    assert "[listen:main]: cannot listen on" in output and "Address already in use" in output
    assert "worker 1 started" not in output


def test_a_second_instance_on_the_same_port_is_refused_not_mixed_in(proxy, upstream, ws_upstream, tmp_path):
    """A second chatproxy started by mistake on the port of a running one (same user) fails
    with 'address in use' instead of quietly taking part of the connections."""
    main, admin = free_port(), free_port()
    first = proxy.start(_config(main, admin, upstream.url, ws_upstream.port), port=main, workers=None)
    _wait(lambda: admin_ready(admin), "the first instance never became ready")
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    from conftest import ProxyStarter

    second = ProxyStarter(second_dir)
    try:
        process = second.start(_config(main, free_port(), upstream.url, ws_upstream.port), port=None, workers=None)
        assert process.wait_exit(30) == 1
        assert "Address already in use" in process.output()
    finally:
        second.stop_all()
    for n in range(20):
        assert http_get(main, f"/still-first/{n}")[0] == 200
    assert first.process.poll() is None


def test_an_endpoint_workers_cannot_share_is_a_configuration_error(proxy, upstream, tmp_path):
    """A unix: listener with workers = 2 is refused at start with status 2 and a message naming
    the listener and the way out (workers = 1)."""
    text = (f"[chatproxy]\nworkers = 2\n\n[listen:local]\nendpoint = unix:{tmp_path}/proxy.sock\n\n"
            f"[upstream:app]\nservers = {upstream.url}\n\n[route:all]\npath = /\nupstream = app\n")
    process = proxy.start(text, port=None, workers=None)
    assert process.wait_exit(30) == 2
    assert "[listen:local] endpoint" in process.output() and "workers = 1" in process.output()


def test_workers_do_not_outlive_a_master_that_is_killed(proxy, upstream, ws_upstream):
    """If the master is killed outright (SIGKILL, no chance to clean up), its workers stop too
    and free the port, instead of serving on as orphans."""
    main, admin = free_port(), free_port()
    process = proxy.start(_config(main, admin, upstream.url, ws_upstream.port), port=main, workers=None)
    _wait(lambda: len(_worker_pids(process.output())) == 2, "the workers did not start")
    pids = _worker_pids(process.output())
    process.kill()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie that init has not reaped yet counts as gone
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    _wait(lambda: all(gone(pid) for pid in pids.values()), "a worker outlived its master", timeout=30)
    refused = False
    try:
        socket.create_connection(("127.0.0.1", main), timeout=5).close()
    except OSError:
        refused = True
    assert refused


def test_a_reload_that_changes_workers_starts_or_stops_workers(proxy, upstream, ws_upstream):
    """Raising workers from 2 to 3 in the file and reloading starts a third worker; lowering it
    back to 2 stops that one (it drains); serving never stops."""
    main, admin = free_port(), free_port()
    config = proxy.write(_config(main, admin, upstream.url, ws_upstream.port))
    process = proxy.start(configs=[config], port=main, workers=None)
    _wait(lambda: admin_ready(admin), "the master never became ready")

    def gauges() -> dict[str, float]:
        return {labels["state"]: value for labels, value in metric_samples(admin, "chatproxy_workers")}

    config.write_text(_config(main, admin, upstream.url, ws_upstream.port, workers=3))
    process.process.send_signal(signal.SIGHUP)
    _wait(lambda: gauges() == {"running": 3, "configured": 3, "answering": 3}, "no third worker")
    third = _worker_pids(process.output())[3]
    assert http_get(main, "/with-three")[0] == 200
    config.write_text(_config(main, admin, upstream.url, ws_upstream.port, workers=2))
    process.process.send_signal(signal.SIGHUP)
    _wait(lambda: gauges() == {"running": 2, "configured": 2, "answering": 2}, "the third worker stayed")

    def gone() -> bool:
        try:
            os.kill(third, 0)
        except ProcessLookupError:
            return True
        return False

    _wait(gone, "the third worker did not exit")
    assert http_get(main, "/with-two")[0] == 200


def test_a_reload_while_workers_are_still_starting_does_not_stop_the_service(proxy, upstream, ws_upstream):
    """SIGHUP arriving before the workers are ready neither kills them (SIGHUP's default action)
    nor takes the master down: they reload once ready and the service serves."""
    main, admin = free_port(), free_port()
    process = proxy.start(_config(main, admin, upstream.url, ws_upstream.port), port=None, workers=None)
    _wait(lambda: "worker 2 started" in process.output(), "the workers were not started")
    process.process.send_signal(signal.SIGHUP)
    _wait(lambda: "reload done in all 2 workers" in process.output(), "the reload never completed")
    assert process.process.poll() is None
    assert "before it could serve" not in process.output()
    assert http_get(main, "/after-early-reload")[0] == 200


def test_sigterm_right_after_a_worker_died_still_ends_the_master(proxy, upstream, ws_upstream):
    """A worker killed just before SIGTERM (dead, waiting to be restarted) does not keep the
    master waiting: it drains the other worker and exits 0."""
    main, admin = free_port(), free_port()
    process = proxy.start(_config(main, admin, upstream.url, ws_upstream.port), port=main, workers=None)
    _wait(lambda: admin_ready(admin), "the master never became ready")
    pids = _worker_pids(process.output())
    os.kill(pids[1], signal.SIGKILL)
    _wait(lambda: "died" in process.output(), "the death was not noticed")
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(30) == 0


def test_a_sighup_during_a_reload_is_applied_after_it(proxy, upstream, ws_upstream):
    """Two SIGHUPs in quick succession, the file changed in between: both reloads are counted
    and every worker ends up with the last version of the file."""
    main, admin = free_port(), free_port()
    config = proxy.write(_config(main, admin, upstream.url, ws_upstream.port))
    process = proxy.start(configs=[config], port=main, workers=None)
    _wait(lambda: admin_ready(admin), "the master never became ready")
    base = _config(main, admin, upstream.url, ws_upstream.port)
    config.write_text(base + "\n[route:new]\npath = /new\nupstream = app\nrewrite_path = /first\n")
    process.process.send_signal(signal.SIGHUP)
    # Once the master has taken the first SIGHUP (two signals sent at once may arrive as one),
    # the second comes while that reload runs or right after it.
    _wait(lambda: "SIGHUP: reloading 2 workers" in process.output(), "the first SIGHUP was not taken")
    # The workers of the first reload may be reading the file right now: replace it whole, as
    # an editor that saves atomically does (rewriting it in place could let a worker read half
    # a file and refuse the first reload, which is right, but is not what this test checks).
    second = config.with_suffix(".next")
    second.write_text(base + "\n[route:new]\npath = /new\nupstream = app\nrewrite_path = /second\n")
    os.replace(second, config)
    process.process.send_signal(signal.SIGHUP)

    def reloads() -> dict[str, float]:
        return {labels["result"]: value for labels, value in metric_samples(admin, "chatproxy_master_reloads_total")}

    _wait(lambda: reloads().get("success") == 2,
          lambda: f"the second reload was not applied after the first: {reloads()}\n{process.output()[-3000:]}")
    for n in range(20):  # new connections: both workers answer
        status, body = http_get(main, f"/new/{n}")
        assert status == 200 and b'"path": "/second"' in body
