"""The command line as an operator uses it: ``python -m chatproxy check`` and
``twistd -n chatproxy`` as real subprocesses on loopback.

A configuration mistake must stop the program with a non-zero status and one
line naming file, section and option -- never a Python traceback.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatproxy.config.placeholders import PROFILES
from conftest import PKI, TWISTD, ProxyProcess, basic_config, free_port

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30  # seconds any single command may take


def run_check(*configs: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run ``python -m chatproxy check --config ...`` (bounded)."""
    args = [sys.executable, "-m", "chatproxy", "check"]
    for config in configs:
        args += ["--config", str(config)]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def write(path: Path, text: str) -> Path:
    """Write a dedented config file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def wait_exit(process: ProxyProcess, timeout: float = TIMEOUT) -> int:
    """Wait (bounded) for a proxy that must exit by itself (the test checks its status)."""
    try:
        return process.wait_exit(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process still running after {timeout}s")


def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    """GET through the proxy on 127.0.0.1:port; returns status and the echoed request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


BAD_CONFIG = """\
[listen:main]
endpoint = tcp:{port}:interface=127.0.0.1
allow = 10.0.0.0/33

[upstream:app]
servers = http://127.0.0.1:1

[route:all]
upstream = app
"""


# ---------------------------------------------------------------------------
# python -m chatproxy check


def test_check_quickstart_config():
    """``check`` on the repository's quick-start etc/chatproxy.ini exits 0 and prints
    the listeners, upstreams and routes it would serve, and no warning."""
    result = run_check("etc/chatproxy.ini")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "configuration OK" in out
    assert "listeners:" in out and "[listen:public] tcp:8443:interface=127.0.0.1" in out and "TLS" in out
    assert "[upstream:demo] http://127.0.0.1:8081" in out
    assert "routes" in out and "[route:demo] path /" in out and "-> upstream demo" in out
    assert result.stderr == ""  # no warning: localhost and a self-signed certificate are no examples


def test_check_quickstart_config_absolute_path(tmp_path):
    """``check`` works from any directory given an absolute path to the quick-start file."""
    result = run_check(REPO / "etc" / "chatproxy.ini", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[route:demo]" in result.stdout


def test_check_broken_config_one_line_no_traceback(tmp_path):
    """``check`` on a broken file exits non-zero and prints exactly one line naming
    file, [section] and option, and no traceback."""
    path = write(tmp_path / "broken.ini", BAD_CONFIG.format(port=8080))
    result = run_check(path)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and "[listen:main]" in lines[0] and "allow" in lines[0]
    assert "10.0.0.0/33" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("text", "section", "option"), [
    pytest.param("[listen:main]\nendpoint = tcp:8080\n[bogus]\n", "[bogus]", None, id="unknown-section"),
    pytest.param("[listen:main]\nendpoint = tcp:8080\nport = 1\n", "[listen:main]", "port", id="unknown-option"),
    pytest.param("[listen:main]\nendpoint = nosuch:1\n", "[listen:main]", "endpoint", id="bad-endpoint"),
    pytest.param("[listen:main]\nendpoint = tcp:8080\n[route:r]\nupstream = none\n", "[route:r]", "upstream",
                 id="unknown-upstream"),
    pytest.param("[listen:main]\nendpoint = tcp:8080\ntls = yes\ncertificate = missing.crt\nkey = missing.key\n",
                 "[listen:main]", "certificate", id="missing-certificate"),
])
def test_check_reports_each_mistake_in_one_line(tmp_path, text, section, option):
    """``check`` reports assorted mistakes as one line with file, section and option."""
    path = write(tmp_path / "c.ini", text)
    result = run_check(path)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert str(path) in result.stderr and section in result.stderr
    if option:
        assert option in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_check_key_mismatch(tmp_path, pki):
    """``check`` rejects a certificate that does not match its key, naming the key option."""
    path = write(tmp_path / "c.ini", f"""
        [listen:main]
        endpoint = tcp:8443
        tls = yes
        certificate = {pki.cert}
        key = {pki.other_key}
    """)
    result = run_check(path)
    assert result.returncode != 0
    assert f"{path} [listen:main] key:" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path):
    """``check`` on a file that does not exist exits non-zero naming it."""
    missing = tmp_path / "nope.ini"
    result = run_check(missing)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_layered_files_and_directory(tmp_path, upstream):
    """``check`` accepts several --config (later wins) and directories, printing the merged result."""
    base = write(tmp_path / "conf.d" / "10-base.ini", basic_config(upstream.url, 8080))
    write(tmp_path / "conf.d" / "20-port.ini", "[listen:main]\nendpoint = tcp:8181:interface=127.0.0.1\n")
    local = write(tmp_path / "local.ini", "[listen:main]\nendpoint = tcp:8282:interface=127.0.0.1\n")
    result = run_check(tmp_path / "conf.d")
    assert result.returncode == 0, result.stderr
    assert "[listen:main] tcp:8181:interface=127.0.0.1" in result.stdout
    assert str(base) in result.stdout
    result = run_check(tmp_path / "conf.d", local)
    assert result.returncode == 0, result.stderr
    assert "[listen:main] tcp:8282:interface=127.0.0.1" in result.stdout


def test_check_without_config_is_a_usage_error():
    """``check`` without --config is a usage error (non-zero, usage text, no traceback)."""
    result = run_check()
    assert result.returncode != 0
    assert "--config" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# python -m chatproxy check: values left at a profile's examples

WARNING_RE = re.compile(r"warning: (\S+) \[([^\]]+)\] ([a-z_]+): .+")
SITE_VALUES = {profile.name.removesuffix(".ini"): profile for profile in PROFILES}


def warned(stderr: str) -> list[tuple[str, str, str]]:
    """(file, section, option) of each warning line; every line must be one."""
    found = []
    for line in stderr.splitlines():
        match = WARNING_RE.fullmatch(line)
        assert match is not None, f"not a warning line naming file, section and option: {line!r}"
        found.append((match.group(1), match.group(2), match.group(3)))
    return found


def write_secret(directory: Path) -> Path:
    """A JWT secret file for the Client Channel profile's filters."""
    secret = directory / "jwt.secret"
    secret.write_text("a-test-secret-of-32-bytes-or-so!\n")
    return secret


@pytest.mark.parametrize("name", sorted(SITE_VALUES))
def test_check_warns_about_each_example_value_of_a_profile_alone(tmp_path: Path, pki: PKI, name: str) -> None:
    """``check`` on a shipped profile as it is (a copy, unchanged, with files
    where its relative certificate and key names point, so that it loads)
    exits 0, prints what it serves, and warns on standard error, one line
    each naming file, section and option, about every value the profile
    marks SITE:. The Client Channel profile's secret_file is an absolute path
    that cannot be created here: a second file sets it, and it alone is not
    reported (a value set again by a later file is the site's)."""
    profile = SITE_VALUES[name]
    copy = tmp_path / profile.name
    copy.write_text(REPO.joinpath("etc", profile.name).read_text())
    for site in profile.site_values:
        if site.option in ("certificate", "key"):
            target = tmp_path / site.text
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((pki.cert if site.option == "certificate" else pki.key).read_bytes())
    configs = [copy]
    expected = {(str(copy), site.section, site.option) for site in profile.site_values}
    if name == "pega-client-channel":
        secret = write_secret(tmp_path)
        configs.append(write(tmp_path / "secret.ini", f"""
            [filter:pega-token]
            secret_file = {secret}
            [filter:sign-for-pega]
            secret_file = {secret}
        """))
        expected -= {(str(copy), "filter:pega-token", "secret_file"), (str(copy), "filter:sign-for-pega", "secret_file")}
    result = run_check(*configs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration OK: ")
    found = warned(result.stderr)
    assert len(found) == len(set(found))  # one line per option
    assert set(found) == expected
    assert all(line.endswith(" is the profile's example value (SITE:)") for line in result.stderr.splitlines())
    if name == "pega-chat":
        assert (f"warning: {copy} [upstream:pega] servers: https://mycompany-prod.pegacloud.net "
                "is the profile's example value (SITE:)") in result.stderr.splitlines()


# A site's own values for every option each profile marks SITE: ({cert},
# {key} and {secret} are test files). The endpoints keep the shipped ports:
# set again in the site file, they are the site's decision.
SITE_FILES = {
    "pega-chat": {
        ("listen:public", "endpoint"): "tcp:443",
        ("listen:public", "certificate"): "{cert}",
        ("listen:public", "key"): "{key}",
        ("upstream:pega", "servers"): "https://acme-prod.pegacloud.net",
        ("filter:trusted-origins", "allow"): "https://www.acme-insurance.test, https://chat.acme-insurance.test",
        ("route:pega-chat", "path"): "/prweb/PRChat/app/AcmeSelfService",
        ("route:pega-push", "path"): "/prweb/PRPushServlet/app/AcmeSelfService",
    },
    "pega-client-channel": {
        ("listen:public", "endpoint"): "tcp:443",
        ("listen:public", "certificate"): "{cert}",
        ("listen:public", "key"): "{key}",
        ("listen:integration", "endpoint"): "tcp:8080:interface=127.0.0.1",
        ("listen:integration", "allow"): "127.0.0.1",
        ("upstream:integration", "servers"): "http://10.1.2.3:8080",
        ("upstream:digital-messaging", "servers"): "https://dms.acme-insurance.test",
        ("filter:pega-token", "issuer"): "4f2b8c1e-9d3a-4e7b-a1c5-0d6e8f9a2b3c",
        ("filter:pega-token", "secret_file"): "{secret}",
        ("route:client-webhook", "path"): "/acme/client-channel",
        ("filter:sign-for-pega", "issuer"): "4f2b8c1e-9d3a-4e7b-a1c5-0d6e8f9a2b3c",
        ("filter:sign-for-pega", "secret_file"): "{secret}",
        ("route:to-digital-messaging", "rewrite_path"): "/dms/client-channel/4f2b8c1e-9d3a-4e7b-a1c5-0d6e8f9a2b3c",
    },
    "cobrowse": {
        ("listen:public", "endpoint"): "tcp:443",
        ("listen:public", "certificate"): "{cert}",
        ("listen:public", "key"): "{key}",
        ("listen:agents", "endpoint"): "tcp:8443",
        ("listen:agents", "certificate"): "{cert}",
        ("listen:agents", "key"): "{key}",
        ("listen:agents", "allow"): "10.8.0.0/16, 192.168.40.0/24",
        ("upstream:cobrowse", "servers"): "https://cobrowse.internal.acme-insurance.test",
        ("filter:agent-networks", "allow"): "10.8.0.0/16, 192.168.40.0/24",
    },
}


@pytest.mark.parametrize("name", sorted(SITE_VALUES))
def test_check_profile_with_a_site_file_prints_no_warning(tmp_path: Path, pki: PKI, name: str) -> None:
    """``check`` on the shipped profile in etc/ and a site file, loaded after
    it, that sets every option the profile marks SITE: exits 0 and prints no
    warning (standard output as without the warnings)."""
    values = SITE_FILES[name]
    assert set(values) == {(site.section, site.option) for site in SITE_VALUES[name].site_values}
    files = {"cert": pki.cert, "key": pki.key, "secret": write_secret(tmp_path)}
    sections: dict[str, list[str]] = {}
    for (section, option), text in values.items():
        sections.setdefault(section, []).append(f"{option} = {text.format(**files)}")
    site = tmp_path / "site.ini"
    site.write_text("".join(f"[{section}]\n" + "\n".join(lines) + "\n\n" for section, lines in sections.items()))
    result = run_check(REPO / "etc" / f"{name}.ini", site)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"configuration OK: {REPO / 'etc' / name}.ini, {site}\n")
    assert result.stderr == ""


def test_check_warns_about_examples_in_any_configuration(tmp_path: Path) -> None:
    """Outside the profiles too, ``check`` warns (exit 0, standard output
    unchanged) about example domains, mycompany hosts, MySelfServiceApp and
    documentation networks, naming the file that set each; the rest of the
    configuration is not reported."""
    base = write(tmp_path / "own.ini", """
        [listen:main]
        endpoint = tcp:8080:interface=127.0.0.1
        trusted_proxies = 203.0.113.0/24

        [upstream:app]
        servers = https://mycompany.pegacloud.net

        [route:chat]
        hosts = chat.example.org
        path = /prweb/PRChat/app/MySelfServiceApp
        upstream = app
    """)
    quiet = run_check(base)
    site = write(tmp_path / "site.ini", "[upstream:app]\nservers = https://pega.acme-insurance.test\n")
    result = run_check(base, site)
    assert result.returncode == 0 and quiet.returncode == 0, quiet.stderr + result.stderr
    assert warned(quiet.stderr) == [(str(base), "listen:main", "trusted_proxies"), (str(base), "upstream:app", "servers"),
                                    (str(base), "route:chat", "hosts"), (str(base), "route:chat", "path")]
    assert warned(result.stderr) == [(str(base), "listen:main", "trusted_proxies"), (str(base), "route:chat", "hosts"),
                                     (str(base), "route:chat", "path")]
    assert quiet.stdout.replace(str(base), "X") == result.stdout.replace(f"{base}, {site}", "X").replace(
        "https://pega.acme-insurance.test", "https://mycompany.pegacloud.net")


# ---------------------------------------------------------------------------
# twistd -n chatproxy


def test_twistd_bad_config_exits_with_one_line(proxy):
    """``twistd -n chatproxy --config BAD`` exits non-zero promptly, printing the one-line
    error naming file, section and option, and no traceback; nothing listens."""
    port = free_port()
    path = proxy.write(BAD_CONFIG.format(port=port), "bad.ini")
    process = proxy.start(configs=[path], port=None)
    assert wait_exit(process) != 0
    output = process.output()
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "configuration error" in line]
    assert len(lines) == 1, output
    assert str(path) in lines[0] and "[listen:main]" in lines[0] and "allow" in lines[0]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_twistd_tls_mismatch_exits_cleanly(proxy, pki):
    """A listener certificate that does not match its key stops twistd with the one-line error."""
    path = proxy.write(basic_config("http://127.0.0.1:1", free_port(), tls=pki).replace(str(pki.key),
                                                                                        str(pki.other_key)))
    process = proxy.start(configs=[path], port=None)
    assert wait_exit(process) != 0
    output = process.output()
    assert "Traceback" not in output
    assert f"{path} [listen:main] key:" in output


def test_twistd_upstream_client_key_mismatch_exits_cleanly(proxy, pki):
    """An upstream client certificate with a key that does not match stops twistd with the
    one-line error instead of a traceback when the upstream connections are set up."""
    # basic_config already has [upstream:app]; the client options come in a second layer.
    path = proxy.write(basic_config("https://127.0.0.1:1", free_port()))
    layer = proxy.write(f"[upstream:app]\nclient_certificate = {pki.client_cert}\nclient_key = {pki.other_key}\n",
                        "client.ini")
    process = proxy.start(configs=[path, layer], port=None)
    assert wait_exit(process) != 0
    output = process.output()
    assert "Traceback" not in output
    assert f"{layer} [upstream:app] client_key:" in output


def test_twistd_without_config_is_a_usage_error(tmp_path):
    """``twistd -n chatproxy`` without --config prints a usage error and exits non-zero."""
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "chatproxy"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "--config" in output
    assert "give at least one --config FILE" in output
    assert "Traceback" not in output


def test_twistd_two_configs_second_overrides_port(proxy, upstream):
    """With two --config files the second's endpoint wins: the proxy listens on the
    overriding port (not the first one) and forwards a request to the upstream."""
    first_port, second_port = free_port(), free_port()
    first = proxy.write(basic_config(upstream.url, first_port), "base.ini")
    second = proxy.write(f"[listen:main]\nendpoint = tcp:{second_port}:interface=127.0.0.1\n", "override.ini")
    process = proxy.start(configs=[first, second], port=second_port)
    status, echoed = get(second_port, "/echo/layered")
    assert status == 200
    assert echoed["path"] == "/echo/layered"
    assert [r["path"] for r in upstream.requests] == ["/echo/layered"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", first_port), timeout=1).close()
    assert "Traceback" not in process.output()


def test_twistd_config_directory(proxy, upstream, tmp_path):
    """``--config DIRECTORY`` reads the directory's *.ini files in sorted order and serves."""
    port = free_port()
    conf = tmp_path / "conf.d"
    write(conf / "10-base.ini", basic_config(upstream.url, free_port()))
    write(conf / "20-listen.ini", f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n")
    write(conf / "README", "not a config file")
    process = proxy.start(configs=[conf], port=port)
    status, echoed = get(port, "/echo/dir")
    assert status == 200 and echoed["path"] == "/echo/dir"
    assert "Traceback" not in process.output()


def test_twistd_port_in_use(proxy, upstream):
    """A listener port already in use makes twistd exit non-zero with a clear message
    naming the listener and the address, and no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        path = proxy.write(basic_config(upstream.url, port))
        process = proxy.start(configs=[path], port=None)
        assert wait_exit(process) != 0
    output = process.output()
    assert "Traceback" not in output
    assert "[listen:main]" in output
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in output
    assert "in use" in output


def test_check_says_how_many_processes_will_run(tmp_path):
    """``check`` says whether a master with workers or one process will serve, and refuses
    (status 2, as twistd would) a unix: listener with several workers."""
    base = ("[listen:main]\nendpoint = tcp:8080:interface=127.0.0.1\n\n"
            "[upstream:app]\nservers = http://127.0.0.1:9\n\n[route:all]\npath = /\nupstream = app\n")
    one = tmp_path / "one.ini"
    one.write_text("[chatproxy]\nworkers = 1\n\n" + base)
    result = run_check(one)
    assert result.returncode == 0 and "processes: one (workers = 1)" in result.stdout
    four = tmp_path / "four.ini"
    four.write_text("[chatproxy]\nworkers = 4\n\n" + base)
    assert "processes: a master and 4 workers (workers = 4)" in run_check(four).stdout
    local = tmp_path / "local.ini"
    local.write_text("[chatproxy]\nworkers = 2\n\n" + base.replace("tcp:8080:interface=127.0.0.1",
                                                                    f"unix:{tmp_path}/p.sock"))
    refused = run_check(local)
    assert refused.returncode == 2
    assert "[listen:main] endpoint" in refused.stderr and "workers = 1" in refused.stderr
