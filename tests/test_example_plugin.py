"""The worked third-party filter plugin in ``examples/chatproxy-example-filter``:
its own tests (written with ``chatproxy.testing``) pass against this checkout,
and installed next to chatproxy in a fresh virtual environment (both as
regular, non-editable installs of wheels), it is found by ``twistd chatproxy``
and by ``python -m chatproxy check`` from configuration alone."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

from conftest import copy_checkout, free_port, stop_proxy, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "chatproxy-example-filter"
# Bounds on each step: creating the venv, building the wheels, installing them
# (dependencies come from the package index) and starting twistd.
VENV_TIMEOUT, BUILD_TIMEOUT, INSTALL_TIMEOUT, RUN_TIMEOUT = 120, 300, 600, 60
#: Left out of the copies besides the usual junk: what the wheels do not need.
NOT_BUILT = ("bench", "examples", "etc")


def base_python() -> str:
    """The interpreter the test's virtualenv was made from (not the venv's own)."""
    return str(getattr(sys, "_base_executable", None) or shutil.which("python3.11") or sys.executable)


def run(args: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command (bounded), failing the test with its output if it fails."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{args} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def clean_env() -> dict[str, str]:
    """The environment without anything that would put the checkout or the
    test's own virtualenv on the new venv's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def get(port: int, user_agent: str | None, path: str) -> tuple[int, bytes]:
    """One GET with that User-Agent (none when None): (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        if user_agent is not None:
            connection.putheader("User-Agent", user_agent)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_example_plugin_own_tests_pass_with_the_test_kit() -> None:
    """The example project's tests (its ``tests/``, written with chatproxy.testing as a
    third party would) pass with this checkout's chatproxy."""
    env = {**clean_env(), "PYTHONPATH": str(EXAMPLE), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=EXAMPLE,
                            env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_example_plugin_installed_in_a_fresh_venv_is_used_by_twistd(tmp_path: Path, upstream: Any) -> None:
    """In a new virtualenv holding only chatproxy and the example project
    (installed from wheels, dependencies from the index), ``python -m
    chatproxy check`` accepts ``use = user_agent_block`` and shows the route
    with its filter, and ``twistd -n chatproxy`` refuses a blocked User-Agent
    with the plugin's 403 while other requests reach the upstream."""
    venv = tmp_path / "venv"
    run([base_python(), "-m", "venv", str(venv)], VENV_TIMEOUT, env=clean_env())
    python, twistd = venv / "bin" / "python", venv / "bin" / "twistd"

    # Build both projects from copies, so that no build/ or *.egg-info is
    # written into (or stale files taken from) the checkout.
    sources = tmp_path / "src"
    copy_checkout(ROOT, sources / "chatproxy", *NOT_BUILT)
    copy_checkout(EXAMPLE, sources / "example", *NOT_BUILT)
    wheels = tmp_path / "wheels"
    run([str(python), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
         str(sources / "chatproxy"), str(sources / "example")], BUILD_TIMEOUT, env=clean_env())
    built = sorted(wheels.glob("*.whl"))
    assert [w.name.split("-")[0] for w in built] == ["chatproxy_example_filter", "chatproxy_gateway"], built
    names = zipfile.ZipFile(built[0]).namelist()
    assert "twisted/plugins/chatproxy_example_user_agent_block.py" in names
    assert "chatproxy_example_filter/user_agent_block.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    run([str(python), "-m", "pip", "install", "-q", *map(str, built)], INSTALL_TIMEOUT, env=clean_env())

    # The venv's chatproxy is the installed one, not the checkout.
    work = tmp_path / "run"
    work.mkdir()
    where = run([str(python), "-c", "import chatproxy, chatproxy_example_filter; print(chatproxy.__file__)"],
                RUN_TIMEOUT, cwd=work, env=clean_env())
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout

    port = free_port()
    config = work / "chat.ini"
    config.write_text(textwrap.dedent(f"""\
        [chatproxy]
        access_log = off

        [listen:main]
        endpoint = tcp:{port}:interface=127.0.0.1

        [upstream:app]
        servers = {upstream.url}

        [filter:no-scanners]
        use = user_agent_block
        patterns = *sqlmap*, python-requests/*

        [route:chat]
        path = /
        upstream = app
        filters = no-scanners
        """))

    check = run([str(python), "-m", "chatproxy", "check", "--config", str(config)], RUN_TIMEOUT, cwd=work,
                env=clean_env())
    assert "configuration OK" in check.stdout
    assert "[route:chat] path /, filters no-scanners -> upstream app" in check.stdout, check.stdout

    log_path = work / "twistd.out"
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(twistd), "-n", "--pidfile=", "chatproxy", "--config", str(config)],
                                   cwd=work, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
        try:
            try:
                wait_for_port(port, timeout=RUN_TIMEOUT, process=process)
            except Exception:
                pytest.fail("chatproxy did not start:\n" + log_path.read_text(errors="replace"))
            assert get(port, "sqlmap/1.7.2#stable (https://sqlmap.org)", "/echo/scanner") == \
                (403, b"user agent not allowed\n")
            assert get(port, "python-requests/2.31.0", "/echo/script")[0] == 403
            assert get(port, "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0", "/echo/browser")[0] == 200
            assert get(port, None, "/echo/none")[0] == 200
        finally:
            stopped = stop_proxy(process)
    assert stopped is None, stopped + ":\n" + log_path.read_text(errors="replace")
    assert [r["path"] for r in upstream.requests] == ["/echo/browser", "/echo/none"]
    assert "filter no-scanners refused GET /echo/scanner" in log_path.read_text(errors="replace")
