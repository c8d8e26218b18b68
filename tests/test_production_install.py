"""README's "Installing for production", run word for word in a temporary root: the
shell blocks between its ``production-install`` and ``production-start`` markers are
executed as written, with only the system paths (/opt/chatproxy, /etc/chatproxy,
/etc/systemd/system) moved under the test's directory and the commands this machine
cannot let a test run (useradd, systemctl, install's owner and group) recorded instead;
then the installed units pass ``systemd-analyze verify`` and the installed service's own
ExecStartPre and ExecStart, run under ``systemd-socket-activate`` with the installed
configuration, serve the profile's routes over TLS on the passed socket and tell systemd
READY=1 and STOPPING=1."""

from __future__ import annotations

import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import RecordingUpstream, copy_checkout, free_port, replace_each, require_tool

ROOT = Path(__file__).resolve().parent.parent
PRELUDE = """set -euo pipefail
useradd() { echo "useradd $*" >> "$RECORD"; }
systemctl() { echo "systemctl $*" >> "$RECORD"; }
install() {
    local args=()
    while [ $# -gt 0 ]; do
        case "$1" in
            -o|-g) echo "install $1 $2" >> "$RECORD"; shift 2 ;;
            *) args+=("$1"); shift ;;
        esac
    done
    command install "${args[@]}"
}
"""


def readme_block(marker: str) -> str:
    """The shell commands of the README's fenced block after ``<!-- marker -->``."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {marker} -->\n```sh\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert found, f"README.md has no {marker} block"
    return found.group(1)


def moved(text: str, root: Path) -> str:
    """``text`` with the system paths of the install moved under ``root``."""
    for path in ("/opt/chatproxy", "/etc/chatproxy", "/etc/systemd/system"):
        text = text.replace(path, f"{root}{path}")
    return text


def run_block(block: str, root: Path, cwd: Path, record: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a README block with bash as written (paths moved, the prelude's stand-ins)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["RECORD"] = str(record)
    result = subprocess.run(["bash", "-c", PRELUDE + moved(block, root)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{block}\nexited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_the_production_install_works_word_for_word(tmp_path, pki):
    """The README's production install and start blocks, run as written (paths under a
    temporary root): chatproxy-gateway is installed in its own venv, the user is created
    with the spelling the unit's comment gives and the unit runs as, the profile and the
    site file land in /etc/chatproxy owned by root with the chatproxy group, `check`
    accepts the configuration, the units are installed and enabled; systemd-analyze verify
    accepts the installed units; the installed service (its ExecStartPre, then its
    ExecStart under systemd-socket-activate, on an IPv6 loopback socket named https) serves
    the profile's chat route over TLS, 404 elsewhere, READY=1 then STOPPING=1, exit 0."""
    analyze = require_tool("systemd-analyze", "systemd")
    activate = require_tool("systemd-socket-activate", "systemd")
    source, root, record = tmp_path / "checkout", tmp_path / "root", tmp_path / "record"
    copy_checkout(ROOT, source, "tls", "state")
    for system_dir in ("opt", "etc/systemd/system"):
        (root / system_dir).mkdir(parents=True)
    run_block(readme_block("production-install"), root, source, record, timeout=600)

    venv = root / "opt" / "chatproxy"
    listed = subprocess.run([str(venv / "bin" / "pip"), "show", "chatproxy-gateway"], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and "Name: chatproxy-gateway" in listed.stdout
    unit = (source / "etc" / "systemd" / "chatproxy.service").read_text()
    (useradd,) = [line for line in record.read_text().splitlines() if line.startswith("useradd ")]
    assert f"#   {useradd}\n" in unit  # the unit's comment spells it the same
    assert useradd.endswith(" chatproxy") and "User=chatproxy\n" in unit and "Group=chatproxy\n" in unit
    assert set(re.findall(r"^install -g (\S+)$", record.read_text(), re.M)) == {"chatproxy"}
    etc = root / "etc" / "chatproxy"
    assert sorted(p.name for p in etc.iterdir()) == ["10-pega-chat.ini", "20-site.ini", "tls"]
    assert oct((etc / "20-site.ini").stat().st_mode & 0o777) == "0o640"

    upstream = RecordingUpstream()
    try:
        shutil.copy(pki.cert, etc / "tls" / "chat.crt")
        shutil.copy(pki.key, etc / "tls" / "chat.key")
        site = etc / "20-site.ini"  # what the README asks the operator to edit: each example value
        site.write_text(replace_each(site.read_text(), {
            "tls/chat.mycompany.com.crt": "tls/chat.crt",
            "tls/chat.mycompany.com.key": "tls/chat.key",
            "https://mycompany-prod.pegacloud.net": upstream.url,
            "https://www.mycompany.com, https://chat.mycompany.com": "https://www.test.example",
            "MyCoSelfService": "TestApp",
        }, str(site)))
        started = run_block(readme_block("production-start"), root, source, record, timeout=120)
        assert f"configuration OK: {etc}/" in started.stdout
        assert "[listen:public] systemd:domain=INET6:name=https TLS" in started.stdout
        assert "path /prweb/PRChat/app/TestApp" in started.stdout
        calls = [line for line in record.read_text().splitlines() if line.startswith("systemctl ")]
        assert calls == ["systemctl daemon-reload", "systemctl enable --now chatproxy.socket chatproxy.service"]

        units = root / "etc" / "systemd" / "system"
        for name in ("chatproxy.service", "chatproxy.socket"):
            (units / name).write_text(moved((units / name).read_text(), root))
        verified = subprocess.run([analyze, "verify", str(units / "chatproxy.service"), str(units / "chatproxy.socket")],
                                  capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0 and "chatproxy." not in verified.stderr, verified.stderr
        service = (units / "chatproxy.service").read_text()
        pre = shlex.split(re.search(r"^ExecStartPre=(.*)$", service, re.M).group(1))
        start = shlex.split(re.search(r"^ExecStart=(.*)$", service, re.M).group(1))
        assert subprocess.run(pre, capture_output=True, timeout=120).returncode == 0
        serve_under_socket_activation(activate, start, tmp_path, pki)
    finally:
        upstream.stop()
    assert [r["path"] for r in upstream.requests] == ["/prweb/PRChat/app/TestApp/"]


def serve_under_socket_activation(activate: str, start: list[str], tmp_path: Path, pki) -> None:
    """Run the unit's ExecStart under systemd-socket-activate on [::1]:PORT (fd name
    https): the chat route answers through the proxy, another path gets 404; READY=1,
    then STOPPING=1 on SIGTERM, exit 0."""
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    port = free_port("::1")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([activate, "-l", f"[::1]:{port}", "--fdname=https", "-E", "NOTIFY_SOCKET", *start],
                                   cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        status = {}
        for target in ("/prweb/PRChat/app/TestApp/", "/prweb/PRChat/app/OtherApp/"):
            deadline = time.monotonic() + 30
            while True:  # the activator starts chatproxy on the first connection
                try:
                    conn = http.client.HTTPSConnection("::1", port, context=pki.client_context(), timeout=30)
                    conn.request("GET", target, headers={"Origin": "https://www.test.example"})
                    response = conn.getresponse()
                    response.read()
                    status[target] = response.status
                    break
                except (ConnectionRefusedError, ConnectionResetError):
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.2)
        assert status == {"/prweb/PRChat/app/TestApp/": 200, "/prweb/PRChat/app/OtherApp/": 404}, \
            log_path.read_text()
        assert notify.recv(4096).decode().startswith("READY=1")
        process.send_signal(signal.SIGTERM)
        assert notify.recv(4096).decode().startswith("STOPPING=1")
        assert process.wait(45) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        notify.close()
    lines = [line for line in log_path.read_text().splitlines()
             if not line.startswith(("Listening on", "Communication attempt", "Execing"))  # the activator's
             and " route=" not in line]  # the access log (access_log = -)
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines[:5]
    # README's samples of journal lines: the master's, and a worker's own.
    assert any(line.startswith("<6>[chatproxy.process.workers#info] worker 2 started (pid ") for line in lines)
    assert any(line.startswith("<6>worker 2: [chatproxy.process.service#info] ") for line in lines), lines
