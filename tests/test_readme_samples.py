"""README.md's sample outputs are what the program prints today: each ``$ COMMAND``
sample of ``check`` is run as written (from a copy of the checkout, after the quick
start made its certificate) and its output compared line by line, with only the
machine's facts substituted (the checkout's path, the CPU count, a temporary directory
for ``/path/to/``); the ``/whoami`` headers and the access-log lines of the quick start
are compared with what a real quick start prints, fields that vary between runs (time,
duration, byte counts, curl's version, ports) aside."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import copy_checkout, free_port, wait_for_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def samples(command_start: str) -> list[tuple[str, list[str]]]:
    """The README's fenced samples whose first line is ``$ `` + a command starting
    with ``command_start``: (command, output lines), one per ``$`` line."""
    found = []
    for block in re.findall(r"```\n(\$ .*?)```", README, re.S):
        command, output = "", []
        for line in block.splitlines():
            if line.startswith("$ "):
                if command.startswith(command_start):
                    found.append((command, output))
                command, output = line[2:], []
            else:
                output.append(line)
        if command.startswith(command_start):
            found.append((command, output))
    return found


def checkout_copy(tmp_path: Path) -> Path:
    """A copy of the checkout at ``tmp_path/chatproxy`` whose ``.venv`` is this test's
    environment, with the quick start's self-signed certificate made."""
    copy = tmp_path / "chatproxy"
    copy_checkout(ROOT, copy, "tls", "state", "bench")
    (copy / ".venv").symlink_to(Path(sys.executable).parent.parent)
    code = ("from chatproxy.config import load_config; from chatproxy.process.lifecycle import ensure_certificate; "
            "ensure_certificate(load_config(['etc/chatproxy.ini']).listeners['public'])")
    subprocess.run([sys.executable, "-c", code], cwd=copy, check=True, timeout=60)
    return copy


def run_sample(command: str, cwd: Path) -> list[str]:
    """Run a README command as written (a shell line) and return its output lines
    (standard output, then standard error, as a terminal shows them in that order here)."""
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")})
    return (result.stdout + result.stderr).splitlines()


def test_check_samples_are_what_check_prints(tmp_path):
    """Each `check` sample of "Checking a configuration" -- the quick start, broken.ini as
    the text describes it, the Pega chat profile with a site file as described -- prints
    exactly the README's lines."""
    copy = checkout_copy(tmp_path)
    quick = (copy / "etc" / "chatproxy.ini").read_text()
    broken = quick.replace("[route:demo]", "[route:chat]").replace("path = /\n", "path = /prweb//PRChat\n")
    assert broken != quick and "[route:chat]" in broken
    (copy / "broken.ini").write_text(broken)
    site_dir = tmp_path / "site"
    (site_dir / "tls").mkdir(parents=True)
    shutil.copy(copy / "etc" / "tls" / "localhost.crt", site_dir / "tls" / "chat.crt")
    shutil.copy(copy / "etc" / "tls" / "localhost.key", site_dir / "tls" / "chat.key")
    (copy / "site.ini").write_text(
        f"[listen:public]\ncertificate = {site_dir}/tls/chat.crt\nkey = {site_dir}/tls/chat.key\n"
        "[upstream:pega]\nservers = https://acme-prod.pegacloud.net\n"
        "[filter:trusted-origins]\nallow = https://www.acme.test, https://chat.acme.test\n")
    checked = samples(".venv/bin/python -m chatproxy check")
    assert len(checked) == 3, checked
    cpus = os.cpu_count() or 1
    for command, expected in checked:
        wanted = [line.replace("/path/to/chatproxy/", f"{copy}/").replace("/path/to/", f"{site_dir}/")
                  .replace("a master and 2 workers", f"a master and {cpus} workers" if cpus > 1 else "")
                  for line in expected]
        assert run_sample(command, copy) == wanted, command


def test_plugin_sample_prints_what_the_readme_shows(tmp_path):
    """"Writing a filter plugin": the README's require_header plugin, put on the Python
    path as it says, makes `check` print the README's lines (the ``...`` lines stand for
    lines left out), and a misspelt kind is reported as the README says."""
    source = re.search(r"`twisted/plugins/require_header\.py`, adds a kind.*?```python\n(.*?)```", README, re.S)
    assert source, "the README's plugin source"
    plugins = tmp_path / "myfilters" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "require_header.py").write_text(source.group(1))
    usage = re.search(r"```ini\n(\[filter:need-token\].*?)```", README, re.S)
    assert usage, "the README's configuration of the plugin"
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (work / "chat.ini").write_text("[listen:public]\nendpoint = tcp:8000\n[upstream:pega]\n"
                                   "servers = https://pega.internal\n" + usage.group(1))
    ((command, expected),) = samples("PYTHONPATH=/path/to/myfilters .venv/bin/python")
    printed = run_sample(command.replace("/path/to/myfilters", str(tmp_path / "myfilters")), work)
    position = 0
    for line in expected:
        if line == "...":
            continue
        assert line in printed[position:], (line, printed)
        position = printed.index(line, position) + 1
    (work / "chat.ini").write_text((work / "chat.ini").read_text().replace("use = require_header",
                                                                           "use = require_headers"))
    refused = " ".join(run_sample(command.replace("/path/to/myfilters", str(tmp_path / "myfilters")), work))
    quoted = re.search(r"\(`(unknown filter kind 'require_headers' \(installed kinds:.*?\))`\)", README, re.S)
    assert quoted
    pattern = re.escape(" ".join(quoted.group(1).split())).replace("…", ".*")
    assert re.search(pattern, refused), (pattern, refused)


def test_quick_start_samples_whoami_and_access_log(proxy, tmp_path):
    """The quick start's /whoami shows the README's forwarding headers (ports aside), and its
    access log lines, combined and json, have the README's form and values (time,
    duration, byte counts and curl's version aside)."""
    copy = checkout_copy(tmp_path)
    text = (copy / "etc" / "chatproxy.ini").read_text()
    https_port, demo_port = free_port(), free_port()
    (copy / "etc" / "chatproxy.ini").write_text(text.replace("8443", str(https_port)).replace("8081", str(demo_port)))
    json_log = tmp_path / "access.json"
    layered = copy / "json.ini"
    layered.write_text(f"[chatproxy]\naccess_log = {json_log}\naccess_log_format = json\n")
    printed: list[str] = []
    for configs, referer in (([copy / "etc" / "chatproxy.ini"], []),
                             ([copy / "etc" / "chatproxy.ini", layered], ["-e", "https://www.example.com/"])):
        process = proxy.start(port=https_port, configs=configs, workers=1)
        wait_for_port(demo_port)
        base = f"https://localhost:{https_port}"
        whoami = subprocess.run(["curl", "-sk", "--http1.1", *referer, f"{base}/whoami"],
                                capture_output=True, text=True, timeout=30).stdout
        subprocess.run(["curl", "-sk", "--http1.1", "-o", "/dev/null", "-X", "POST", f"{base}/"], timeout=30)
        assert process.stop() == 0
        printed += process.output().splitlines()
    block = re.search(r'```\n("Host": .*?)```', README, re.S)
    assert block
    for line in block.group(1).splitlines():
        assert line.replace("8081", str(demo_port)).replace("8443", str(https_port)) in whoami, (line, whoami)

    combined = re.findall(r"^(127\.0\.0\.1 - - \[.*)$", README, re.M)
    assert len(combined) == 2
    logged = [line for line in printed if line.startswith("127.0.0.1 - - [")]
    assert [normal_combined(line, https_port, demo_port) for line in logged[:2]] == \
        [normal_combined(line, 8443, 8081) for line in combined]
    (sample,) = [json.loads(line) for line in re.findall(r"^(\{\"time\".*)$", README, re.M)]
    record = json.loads(wait_until(lambda: json_log.exists() and json_log.read_text().splitlines()[0],
                                   "the JSON access log"))
    assert list(record) == list(sample)
    varying = {"time", "bytes", "duration", "user_agent"}
    assert {k: v for k, v in record.items() if k not in varying} == \
        {k: (v.replace("8081", str(demo_port)) if isinstance(v, str) else v)
         for k, v in sample.items() if k not in varying}
    assert record["user_agent"].startswith("curl/")


def normal_combined(line: str, https_port: int, demo_port: int) -> str:
    """A combined access-log line without what varies between runs."""
    line = re.sub(r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]", "[TIME]", line)
    line = re.sub(r'" (\d{3}) \d+ "', r'" \1 BYTES "', line)
    line = re.sub(r'"curl/[0-9.]+"', '"curl"', line)
    line = re.sub(r" \d+\.\d{6} route=", " DURATION route=", line)
    return line.replace(f":{demo_port}", ":DEMO").replace(f":{https_port}", ":HTTPS")
