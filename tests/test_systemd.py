"""systemd: the shipped units pass `systemd-analyze verify`, and chatproxy started by
`systemd-socket-activate` serves on the passed socket and reports READY and STOPPING through
$NOTIFY_SOCKET (a datagram socket this test listens on)."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RecordingUpstream, free_port, require_tool

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _require(tool: str) -> str:
    return require_tool(tool, "systemd")


def test_units_pass_systemd_analyze_verify(tmp_path):
    """etc/systemd/chatproxy.service and chatproxy.socket are accepted by systemd-analyze verify
    (with ExecStart pointing at this environment's twistd instead of /opt/chatproxy)."""
    analyze = _require("systemd-analyze")
    for unit in ("chatproxy.service", "chatproxy.socket"):
        text = (ROOT / "etc" / "systemd" / unit).read_text().replace("/opt/chatproxy/bin/", f"{BIN}/")
        (tmp_path / unit).write_text(text)
    result = subprocess.run([analyze, "verify", str(tmp_path / "chatproxy.service"), str(tmp_path / "chatproxy.socket")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "chatproxy." not in result.stderr, result.stderr
    service = (tmp_path / "chatproxy.service").read_text()
    assert "Type=notify" in service and "User=chatproxy" in service and "--nodaemon --pidfile=" in service


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activation_and_sd_notify(tmp_path, workers):
    """Under systemd-socket-activate, a `systemd:` listener serves on the passed socket; chatproxy
    sends READY=1 once serving, RELOADING=1 (with MONOTONIC_USEC) and READY=1 again around a SIGHUP
    reload that keeps the passed socket, and STOPPING=1 when SIGTERM starts the drain, then exits 0;
    with two workers the master speaks for both and both accept on the passed socket.  Logs use
    the unit's journal format (a <priority> prefix on every line, workers named)."""
    activate = _require("systemd-socket-activate")
    upstream = RecordingUpstream()
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(15)
    port = free_port()
    config = tmp_path / "chatproxy.ini"
    config.write_text(
        f"[chatproxy]\naccess_log = off\ndrain_timeout = 5\nworkers = {workers}\n"
        "[listen:public]\nendpoint = systemd:domain=INET:name=https\n"
        f"[upstream:app]\nservers = {upstream.url}\n[route:all]\npath = /\nupstream = app\n")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
    log = (tmp_path / "out.log").open("wb")
    process = subprocess.Popen(
        [activate, "-l", f"127.0.0.1:{port}", "--fdname=https", "-E", "NOTIFY_SOCKET",
         str(BIN / "twistd"), "-n", "--pidfile=", "--logger=chatproxy.process.journal.observer", "chatproxy",
         "--config", str(config)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:  # systemd-socket-activate listens first, then starts chatproxy on the first connection
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
                conn.request("GET", "/echo")
                response = conn.getresponse()
                break
            except (ConnectionRefusedError, ConnectionResetError):
                assert time.monotonic() < deadline, (tmp_path / "out.log").read_text()
                time.sleep(0.1)
        assert response.status == 200 and b'"path": "/echo"' in response.read()
        messages = [notify.recv(4096).decode()]
        assert messages[0].startswith("READY=1"), messages
        assert "systemd:domain=INET:name=https" in messages[0]
        with config.open("a") as more:
            more.write("[route:extra]\npath = /extra\nupstream = app\nrewrite_path = /rewritten\n")
        process.send_signal(signal.SIGHUP)
        messages.append(notify.recv(4096).decode())
        assert messages[1].startswith("RELOADING=1\nMONOTONIC_USEC="), messages
        messages.append(notify.recv(4096).decode())
        assert messages[2].startswith("READY=1"), messages
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.request("GET", "/extra")  # the socket systemd passed still serves, with the new route
        response = conn.getresponse()
        assert response.status == 200 and b'"path": "/rewritten"' in response.read()
        process.send_signal(signal.SIGTERM)
        messages.append(notify.recv(4096).decode())
        assert messages[3].startswith("STOPPING=1"), messages
        assert process.wait(20) == 0
        lines = [line for line in (tmp_path / "out.log").read_text().splitlines()
                 if not line.startswith(("Listening on", "Communication attempt", "Execing"))]  # the activator's
        assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines[:5]
        assert any("reload done" in line for line in lines)
        if workers > 1:
            assert any(line.startswith("<6>worker 2: ") for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()
        notify.close()
        upstream.stop()
