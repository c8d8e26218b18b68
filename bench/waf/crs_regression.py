"""Replay the OWASP CRS's own regression corpus through a ``waf`` route and through ModSecurity directly.

    .venv/bin/python bench/waf/crs_regression.py                  # paranoia 1 and 4
    .venv/bin/python bench/waf/crs_regression.py --paranoia 2 --differences
    .venv/bin/python bench/waf/crs_regression.py --direct-only --json

The corpus is CRS's ``tests/regression/tests`` (the YAML test files of the
ftw / go-ftw test runners: each test has stages, each stage an HTTP request
and what CRS's log must or must not contain).  It is not in this repository:
:func:`fetch` takes it from the Debian *source* package of the installed
``modsecurity-crs`` (``apt-get source --download-only``, the same version as
the rules, checked by apt against the archive's signed index), with
deb-src entries made from the machine's own apt sources in a private apt
state directory, and unpacks only the test files into a cache directory
(``$CHATPROXY_CRS_CORPUS``, default ``~/.cache/chatproxy/crs-regression/VERSION``).
It needs root (apt) the first time, and the Debian archive.

Each stage is sent as the bytes ftw would send (:func:`raw_request`) to
(a) a real ``twistd -n chatproxy`` with one catch-all route whose only filter
is ``waf`` at the paranoia level asked for, in front of a loopback upstream
that answers 200, and (b) ModSecurity itself, through the filter's own rule
set (:func:`direct_verdict`: the same engine settings, chatproxy's crs-setup
and the same CRS files), with the request as the bytes say.  A stage is an
*attack* stage when the test wants a rule id in the log, a *negative* one
when it wants one absent; "blocked" means refused by the waf (403, or 400
for a body that does not parse).  A request the proxy itself refuses before
any filter (a malformed request line, an HTTP/0.9 request, a bad header:
400, 501, ...) is counted apart: the waf never saw it.

Everything listens on 127.0.0.1; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from attrs import frozen

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "bench", ROOT / "bench" / "waf"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from latency import TWISTD, UPSTREAM  # noqa: E402  (the same upstream: 200 "ok" to anything)
from processes import Supervisor, free_ports  # noqa: E402

from chatproxy.filters.modsecurity import Transaction  # noqa: E402
from chatproxy.filters.waf import BLOCKED, WebApplicationFirewall, waf  # noqa: E402

PACKAGE = "modsecurity-crs"
_RULE_ID = re.compile(r'id "?(\d{6})')
_APT_SOURCES = Path("/etc/apt/sources.list.d")


class CorpusUnavailable(Exception):
    """The corpus could not be fetched (the message says why)."""


# ---------------------------------------------------------------------------
# Fetching the corpus


def installed_version(package: str = PACKAGE) -> str:
    """The installed version of the Debian package (its rules are what the waf runs)."""
    try:
        found = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                               check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise CorpusUnavailable(f"Debian's {package} is not installed ({e})") from None
    return found.stdout.strip()


def source_entries() -> str:
    """deb-src entries for the Debian archives this machine installs from (its own
    apt sources, ``deb`` turned into ``deb-src``), in deb822 form."""
    entries = []
    for path in sorted(_APT_SOURCES.glob("*.sources")):
        text = path.read_text()
        if "debian" in text:
            entries.append(re.sub(r"(?m)^Types:\s*deb\s*$", "Types: deb-src", text))
    one_line = Path("/etc/apt/sources.list")
    if one_line.exists():
        lines = [re.sub(r"^deb\s", "deb-src ", line) for line in one_line.read_text().splitlines()
                 if line.startswith("deb ") and "debian" in line]
        if lines:
            entries.append("\n".join(f"Types: deb-src\nURIs: {ln.split()[1]}\nSuites: {ln.split()[2]}\n"
                                     f"Components: {' '.join(ln.split()[3:])}\n" for ln in lines))
    if not entries:
        raise CorpusUnavailable(f"no Debian apt sources found in {_APT_SOURCES} or /etc/apt/sources.list")
    return "\n".join(entries)


def default_cache(version: str) -> Path:
    """Where the corpus of that CRS version is kept between runs."""
    if os.environ.get("CHATPROXY_CRS_CORPUS"):
        return Path(os.environ["CHATPROXY_CRS_CORPUS"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "chatproxy" / "crs-regression" / version


def fetch(cache: Path | None = None) -> Path:
    """The corpus directory (``.../tests/regression/tests``), fetched from the
    Debian source package of the installed CRS on first use."""
    version = installed_version()
    cache = cache or default_cache(version)
    done = cache / "complete"
    if done.exists():
        return cache / "tests"
    with tempfile.TemporaryDirectory() as work:
        orig = _download_source(Path(work), version)
        _unpack_tests(orig, cache)
    done.write_text(f"{PACKAGE} {version}\n")
    return cache / "tests"


def _apt(work: Path, *args: str) -> None:
    options = [f"-oDir::Etc::SourceList={work / 'empty.list'}", f"-oDir::Etc::SourceParts={work / 'parts'}",
               f"-oDir::State::Lists={work / 'lists'}", "-oDir::Cache=" + str(work / "cache"), "-q"]
    try:
        subprocess.run(["apt-get", *options, *args], cwd=work / "download", check=True, capture_output=True,
                       text=True, timeout=600)
    except subprocess.CalledProcessError as e:
        raise CorpusUnavailable(f"apt-get {' '.join(args)} failed: {e.stderr.strip()[-500:]}") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CorpusUnavailable(f"apt-get {' '.join(args)}: {e}") from None


def _download_source(work: Path, version: str) -> Path:
    for name in ("parts", "lists/partial", "cache/archives/partial", "download"):
        (work / name).mkdir(parents=True, exist_ok=True)
    (work / "empty.list").write_text("")
    (work / "parts" / "debian-src.sources").write_text(source_entries())
    _apt(work, "update")
    _apt(work, "source", "--download-only", f"{PACKAGE}={version}")
    found = sorted((work / "download").glob(f"{PACKAGE}_*.orig.tar.*"))
    if not found:
        raise CorpusUnavailable(f"apt-get source {PACKAGE}={version} gave no upstream tarball")
    return found[0]


def _unpack_tests(orig: Path, cache: Path) -> None:
    """Unpack the regression test files (YAML only) of the upstream tarball into ``cache/tests``."""
    target = cache / "tests"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    with tarfile.open(orig) as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")
            if not member.isfile() or not member.name.endswith(".yaml") or "/tests/regression/tests/" not in \
                    member.name or ".." in parts:
                continue
            relative = Path(*parts[parts.index("tests", 1) + 3:])
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            destination.write_bytes(source.read())


# ---------------------------------------------------------------------------
# The stages


@frozen
class Stage:
    """One stage of a CRS regression test: ``kind`` is ``attack`` (a rule id
    must be logged) or ``negative`` (it must not be); ``raw`` the request bytes."""

    title: str
    rule: int
    kind: str
    raw: bytes


def expectation(output: dict[str, Any]) -> tuple[str, int] | None:
    """``(kind, rule id)`` of a stage's expected output; None for stages that
    only check a status or an error (ftw's own checks, not a rule's)."""
    for key, kind in (("log_contains", "attack"), ("no_log_contains", "negative")):
        found = _RULE_ID.search(str(output.get(key) or ""))
        if found:
            return kind, int(found.group(1))
    return None


def _text(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


def raw_request(given: dict[str, Any]) -> bytes:
    """The bytes ftw sends for a stage's input: ``encoded_request`` (base64) or
    ``raw_request`` as they are; otherwise the request line, the headers, and
    ``data`` (a list is joined with CRLF), with -- unless ``stop_magic`` -- a
    Content-Length for data and ``Content-Type:
    application/x-www-form-urlencoded`` when data comes without one, as the
    test runners add them; ``Connection: close`` when the test sets no
    Connection header, so each stage has its own connection."""
    if given.get("encoded_request"):
        return base64.b64decode(given["encoded_request"])
    if given.get("raw_request"):
        return _text(given["raw_request"])
    data = given.get("data")
    body = b"\r\n".join(_text(line) for line in data) if isinstance(data, list) else \
        (_text(data) if data is not None else b"")
    headers = [(str(name), _text(value)) for name, value in (given.get("headers") or {}).items()]
    names = {name.lower() for name, _ in headers}
    if not given.get("stop_magic"):
        if body and "content-length" not in names and "transfer-encoding" not in names:
            headers.append(("Content-Length", str(len(body)).encode()))
        if body and "content-type" not in names:
            headers.append(("Content-Type", b"application/x-www-form-urlencoded"))
    if "connection" not in names:
        headers.append(("Connection", b"close"))
    line = b" ".join((_text(given.get("method", "GET")), _text(given.get("uri", "/")),
                      _text(given.get("version", "HTTP/1.1"))))
    return line + b"\r\n" + b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers) + \
        b"\r\n" + body


def load(corpus: Path) -> tuple[list[Stage], int]:
    """Every attack and negative stage of the corpus's enabled tests, in file
    order, and how many other stages (status or error checks) were left out."""
    import yaml  # a test dependency (PyPI pyyaml)

    stages: list[Stage] = []
    others = 0
    for path in sorted(corpus.rglob("*.yaml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8", errors="surrogateescape"))
        if not document or not document.get("meta", {}).get("enabled", True):
            continue
        for test in document.get("tests") or []:
            for number, item in enumerate(test.get("stages") or [], 1):
                stage = item.get("stage", item)
                expected = expectation(stage.get("output") or {})
                if expected is None:
                    others += 1
                    continue
                title = str(test.get("test_title", path.stem)) + (f"/{number}" if number > 1 else "")
                stages.append(Stage(title, expected[1], expected[0], raw_request(stage.get("input") or {})))
    return stages, others


# ---------------------------------------------------------------------------
# Verdicts


def parse_raw(raw: bytes) -> Transaction | None:
    """The request of a stage's bytes as the engine is given it (method, URI,
    version, headers in order, the body as its Content-Length frames it);
    None when there is no request line."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    if not separator:
        head, separator, body = raw.partition(b"\n\n")
    lines = re.split(rb"\r?\n", head)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return None
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            headers.append((name.strip(), value.strip()))
    length = [value for name, value in headers if name.lower() == b"content-length"]
    if len(length) == 1 and length[0].isdigit():
        body = body[:int(length[0])]  # what follows is the next request on the connection
    return Transaction(parts[0].decode("latin-1"), parts[1], parts[2][5:].decode("latin-1"), tuple(headers),
                       body or None)


def direct_verdict(firewall: WebApplicationFirewall, raw: bytes) -> bool | None:
    """Whether ModSecurity, with the filter's rule set, refuses the request
    (None: the bytes are no request)."""
    transaction = parse_raw(raw)
    if transaction is None:
        return None
    return firewall.engine.run(firewall.rules, transaction).status is not None


def read_answer(connection: socket.socket) -> bytes:
    """One answer: up to the end of its head and its Content-Length body (or
    until the proxy closes the connection or stays silent)."""
    answer = b""
    try:
        while chunk := connection.recv(65536):
            answer += chunk
            head, separator, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            if separator and length and len(body) >= int(length.group(1)):
                break
    except (TimeoutError, ConnectionResetError):
        pass
    return answer


def proxy_verdict(port: int, raw: bytes, timeout: float = 5.0) -> str:
    """What the proxy on ``port`` did with the bytes: ``blocked`` (the waf's
    refusal), ``passed`` (an answer from the upstream), or ``proxy NNN`` (the
    proxy refused the request itself, or gave no answer: ``proxy none``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(raw)
        answer = read_answer(connection)
    status_line = answer.split(b"\r\n", 1)[0].split(b" ")
    if len(status_line) < 2 or not status_line[1].isdigit():
        return "proxy none"
    status = int(status_line[1])
    if status in (400, 403) and (BLOCKED.encode() in answer or raw.startswith(b"HEAD ")):
        return "blocked"  # (an answer to HEAD has no body to tell the waf's by)
    if status == 200 and (answer.endswith(b"\r\n\r\nok") or raw.startswith(b"HEAD ")):
        return "passed"
    return f"proxy {status}"


# ---------------------------------------------------------------------------
# The proxy


def config(port: int, upstream: int, paranoia: int) -> str:
    """One catch-all route with the waf at ``paranoia`` (and nothing else)."""
    return (f"[chatproxy]\naccess_log = off\nworkers = 1\n\n[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n\n"
            f"[upstream:app]\nservers = http://127.0.0.1:{upstream}\n\n"
            "[route:all]\npath = /\nupstream = app\nfilters = waf\n\n"
            f"[filter:waf]\nuse = waf\nparanoia = {paranoia}\n")


def wait_for(port: int, timeout: float = 30.0) -> None:
    """Until something accepts connections on ``port`` (bounded)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Proxies:
    """An upstream and one chatproxy per paranoia level (started on demand),
    stopped on leaving."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.supervisor = Supervisor(directory)
        self.upstream = free_ports(1)[0]
        self.supervisor.start("upstream", [sys.executable, "-c", UPSTREAM, str(self.upstream)])
        self.ports: dict[int, int] = {}

    def port(self, paranoia: int) -> int:
        """The listening port of the proxy at ``paranoia`` (started the first time)."""
        if paranoia not in self.ports:
            port = free_ports(1)[0]
            path = self.directory / f"paranoia-{paranoia}.ini"
            path.write_text(config(port, self.upstream, paranoia))
            self.supervisor.start(f"chatproxy-{paranoia}", [TWISTD, "-n", "--pidfile=", "chatproxy", "--config",
                                                             str(path)], cwd=self.directory)
            wait_for(port)
            self.ports[paranoia] = port
        return self.ports[paranoia]

    def __enter__(self) -> Proxies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.supervisor.stop_all()


# ---------------------------------------------------------------------------
# Replaying


@frozen
class Result:
    """One stage at one paranoia level: the direct verdict and the proxy's."""

    stage: Stage
    paranoia: int
    direct: bool | None
    proxy: str | None  # None: not sent through the proxy

    @property
    def differs(self) -> bool:
        """The waf route and ModSecurity disagree on a stage that reached the waf."""
        if self.proxy is None or self.proxy.startswith("proxy") or self.direct is None:
            return False
        return (self.proxy == "blocked") != self.direct


def replay(stages: Iterable[Stage], paranoia: int, proxies: Proxies | None) -> Iterator[Result]:
    """Every stage's verdicts at ``paranoia``: directly, and through the proxy when given."""
    firewall = waf.build({"paranoia": str(paranoia)})
    port = proxies.port(paranoia) if proxies is not None else None
    for stage in stages:
        yield Result(stage, paranoia, direct_verdict(firewall, stage.raw),
                     proxy_verdict(port, stage.raw) if port is not None else None)


def summary(results: list[Result]) -> dict[str, Any]:
    """The figures of one level: stages, blocked directly and through the
    proxy by kind, the proxy's own refusals, and the disagreements."""
    counts: Counter[str] = Counter()
    for result in results:
        kind = result.stage.kind
        counts[kind] += 1
        counts[f"{kind} direct blocked"] += bool(result.direct)
        if result.proxy is not None:
            counts[f"{kind} proxy blocked"] += result.proxy == "blocked"
            counts[f"{kind} proxy refused"] += result.proxy.startswith("proxy")
    return {"counts": dict(counts), "differ": [r.stage.title for r in results if r.differs],
            "proxy_refused": Counter(r.proxy for r in results if r.proxy and r.proxy.startswith("proxy"))}


def table_row(paranoia: int, found: dict[str, Any], through_proxy: bool) -> str:
    """One line of the printed table."""
    c = Counter(found["counts"])

    def share(kind: str, what: str) -> str:
        return f"{c[f'{kind} {what}']:5} ({c[f'{kind} {what}'] / max(c[kind], 1):4.0%})"

    row = f"{paranoia:8}  {c['attack']:6} {share('attack', 'direct blocked')} {c['negative']:8} " \
          f"{share('negative', 'direct blocked')}"
    if through_proxy:
        row += f"   {share('attack', 'proxy blocked')} {share('negative', 'proxy blocked')} " \
               f"{c['attack proxy refused'] + c['negative proxy refused']:7} {len(found['differ']):7}"
    return row


def main(argv: list[str] | None = None) -> int:
    """Fetch, replay, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paranoia", type=int, action="append", choices=(1, 2, 3, 4))
    parser.add_argument("--direct-only", action="store_true", help="no proxy: ModSecurity directly only")
    parser.add_argument("--differences", action="store_true", help="list the stages where the verdicts differ")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    levels = args.paranoia or [1, 4]
    corpus = fetch()
    stages, others = load(corpus)
    print(f"# corpus: {corpus} ({len(stages)} stages with a rule expectation, {others} other stages left out)")
    header = "paranoia  attack   direct blocked  negative  direct blocked"
    if not args.direct_only:
        header += "   proxy blocked (attack, negative)  proxy-refused  differ"
    print(header)
    found: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as directory, \
            (Proxies(Path(directory)) if not args.direct_only else nullcontext()) as proxies:
        for level in levels:
            found[level] = summary(list(replay(stages, level, proxies)))
            print(table_row(level, found[level], not args.direct_only))
    for level in levels:
        if found[level]["proxy_refused"]:
            print(f"# paranoia {level}, refused by the proxy itself: {dict(found[level]['proxy_refused'])}")
        if args.differences and found[level]["differ"]:
            print(f"# paranoia {level}, verdicts differ: {', '.join(found[level]['differ'])}")
    if args.json:
        print(json.dumps({str(level): {**value, "proxy_refused": dict(value["proxy_refused"])}
                          for level, value in found.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
