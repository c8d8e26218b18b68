"""Starting, watching and stopping the benchmark's server processes."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn, Protocol, TypeVar


class _Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=_Named)
A = TypeVar("A")


class BenchError(Exception):
    """The benchmark cannot go on (a server did not start, a tool is missing)."""


@dataclass
class Server:
    """A process started by the benchmark, in its own process group."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = field(default=False)

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the process's output."""
        return "\n".join(self.log_text().splitlines()[-lines:])


class Supervisor:
    """Owns every process the benchmark starts, and stops them all at the end.

    Each process runs in a new session, so it and its children (nginx
    workers) form one process group that is signalled by its own id.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.servers: list[Server] = []
        #: Given a server's name, the CPUs (a ``taskset -c`` list) it is pinned to, or None.
        self.affinity: Callable[[str], str | None] = lambda name: None
        #: Given a server's name, a command line to run it under (``valgrind ...``), or an empty one.
        self.wrapper: Callable[[str], Sequence[str]] = lambda name: ()

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> Server:
        """Start ``argv`` with its output going to ``<log_dir>/<name>.log`` (``<name>-2.log`` ... if taken)."""
        log_path, number = self.log_dir / f"{name}.log", 1
        while log_path.exists():
            number += 1
            log_path = self.log_dir / f"{name}-{number}.log"
        argv = [*self.wrapper(name), *argv]
        cpus = self.affinity(name)
        if cpus is not None:  # pinned: it and every process it starts (a master's workers)
            argv = ["taskset", "-c", cpus, *argv]
        with log_path.open("wb") as log:
            process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=cwd, start_new_session=True)
        server = Server(name, process, log_path)
        self.servers.append(server)
        return server

    def stop(self, server: Server, grace: float = 5.0) -> None:
        """Stop ``server``'s process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if server.stopped:
            return
        server.stopped = True
        pgid = server.process.pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            server.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            server.process.wait(timeout=grace)
        # Anything left in the group (a worker whose master died first).
        _signal_group(pgid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every process started, newest first."""
        for server in reversed(self.servers):
            try:
                self.stop(server)
            except Exception as e:  # keep going: the others must be stopped too
                print(f"warning: could not stop {server.name} (pid {server.process.pid}): {e}")

    def leftovers(self, wait: float = 2.0) -> list[tuple[str, list[int]]]:
        """The stopped servers whose process group still has processes after up to ``wait``
        seconds (SIGKILL takes effect, and the orphans are reaped, asynchronously)."""
        deadline = time.monotonic() + wait
        while True:
            found = [(s.name, group_pids(s.process.pid)) for s in self.servers if s.stopped]
            found = [(name, pids) for name, pids in found if pids]
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def exit_on_termination_signals() -> None:
    """Make SIGINT raise ``KeyboardInterrupt`` (even if it was ignored, as in a
    background job) and SIGTERM and SIGHUP raise ``SystemExit``, so that the
    ``finally`` blocks stop every process started."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def bench_main(parse_args: Callable[[], A], run: Callable[[A], int]) -> NoReturn:
    """The entry point of a benchmark script: parse its arguments, ``run``
    it, and exit with what it returns; a :class:`BenchError` is one line on
    stderr and status 2, Ctrl-C (or SIGTERM, SIGHUP) status 130 (128 + the
    signal), after the ``finally`` blocks have stopped every process started."""
    exit_on_termination_signals()
    args = parse_args()
    try:
        status = run(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("bench: interrupted; every process started has been stopped", file=sys.stderr)
        status = 130
    sys.exit(status)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free right now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def apt_install(packages: Sequence[str]) -> None:
    """Install Debian ``packages`` with apt-get (this needs root)."""
    print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages], check=True, env=env)


def connect(port: int, *, tls: bool, timeout: float) -> http.client.HTTPConnection:
    """An HTTP client connection to 127.0.0.1:``port``; with ``tls``, HTTPS
    without certificate checks (the benchmark's certificates are self-signed)."""
    if not tls:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)


def fetch(port: int, *, tls: bool = False, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``path`` from 127.0.0.1:``port`` and return (status, body)."""
    connection = connect(port, tls=tls, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Host": f"localhost:{port}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_until_serving(server: Server, port: int, expected_body: bytes, *, tls: bool = False,
                       timeout: float = 20.0) -> None:
    """Wait until ``server`` answers a GET on ``port`` with 200 and ``expected_body``.

    Raises :class:`BenchError` (with the process's log) if it exits, answers
    something else, or is not serving within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if not server.alive:
            raise BenchError(f"{server.name} exited with status {server.process.returncode}:\n{server.log_tail()}")
        try:
            status, body = fetch(port, tls=tls)
        except (OSError, http.client.HTTPException) as e:
            last_error = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
            continue
        if status == 200 and body == expected_body:
            return
        raise BenchError(f"{server.name} answered {status} {body[:200]!r}, expected 200 {expected_body!r}")
    raise BenchError(f"{server.name} not serving on port {port} after {timeout:g}s ({last_error}):\n"
                     f"{server.log_tail()}")


def _group_stats(pgid: int) -> dict[int, list[str]]:
    """The /proc/PID/stat fields (from field 3 on) of each live process of group ``pgid``, by pid."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces: split after its ")".
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:  # field 5, pgrp
            found[int(entry.name)] = fields
    return found


def group_pids(pgid: int) -> list[int]:
    """The live processes of group ``pgid`` (a server and its children: nginx's or chatproxy's workers)."""
    return sorted(_group_stats(pgid))


def group_cpu_by_process(pgid: int) -> dict[int, float]:
    """CPU time (user + system) used so far by each live process of group ``pgid``, by pid.

    Read from /proc; processes that already exited are not counted.  A
    chatproxy master's workers (started with Twisted's ``spawnProcess``,
    which keeps the process group) are in their master's group.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    # fields 14, 15: utime, stime
    return {pid: (int(fields[11]) + int(fields[12])) / ticks for pid, fields in _group_stats(pgid).items()}


def select_targets(targets: Sequence[T], only: str | None) -> list[T]:
    """The ``targets`` named in ``--only`` (all of them if not given), in their standard order."""
    if not only:
        return list(targets)
    names = {name.strip() for name in only.split(",") if name.strip()}
    known = {target.name for target in targets}
    unknown = names - known
    if unknown:
        raise BenchError(f"unknown target(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return [target for target in targets if target.name in names]


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by the live processes of group ``pgid`` (all of them)."""
    return sum(group_cpu_by_process(pgid).values())


def listening_holders(port: int, pgid: int) -> int:
    """How many processes of group ``pgid`` hold a socket listening on ``port``
    (a chatproxy master and each of its workers hold the same socket)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    holders = 0
    for pid in group_pids(pgid):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if links & inodes:
            holders += 1
    return holders


def wait_for_listeners(server: Server, port: int, count: int, timeout: float = 20.0) -> None:
    """Wait until ``count`` processes of the server's group hold its listening
    socket (a master and every one of its workers)."""
    deadline = time.monotonic() + timeout
    while (found := listening_holders(port, server.process.pid)) < count:
        if not server.alive:
            raise BenchError(f"{server.name} exited with status {server.process.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name}: {found} of {count} processes listen on port {port} after {timeout:g}s:\n"
                             f"{server.log_tail()}")
        time.sleep(0.1)


def system_cpu_seconds() -> dict[str, float]:
    """CPU time of all CPUs since boot, from /proc/stat: "process" (user, nice, system),
    "irq" (hard and soft interrupts: mostly loopback networking here) and "steal" (taken by the hypervisor)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(n) for n in stat.readline().split()[1:9])
    ticks = os.sysconf("SC_CLK_TCK")
    return {"process": (user + nice + system) / ticks, "irq": (irq + softirq) / ticks, "steal": steal / ticks}


def background_load(seconds: float = 1.0) -> float:
    """How many cores processes kept busy during the next ``seconds`` (call it when nothing of ours runs)."""
    before = system_cpu_seconds()["process"]
    time.sleep(seconds)
    return (system_cpu_seconds()["process"] - before) / seconds
