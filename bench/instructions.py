"""User-space instructions per proxied request, counted by valgrind: an A/B
that the machine's noise does not move.

On a shared virtual machine the CPU time of a request moves by 10-40% from
one run to the next (bench/README.md), which hides the few per cent a change
to the data path is worth.  This benchmark runs each proxy under
``valgrind --tool=callgrind``, sends it a fixed number of keep-alive requests
over a few connections after a warm-up, and reports the instructions the
proxy's processes executed in user space per request (the kernel's share,
the socket calls, is not counted: it is the same for every proxy, see
bench/README.md).  The same code gives the same count to within about 1%.
Everything runs on 127.0.0.1; the upstream (nginx, as in ``run.py``) runs
normally, only the proxy under valgrind.

    /work/venv/bin/python bench/instructions.py                       # nginx, nginx-tls, chatproxy, chatproxy-tls
    /work/venv/bin/python bench/instructions.py --only chatproxy,chatproxy-baseline --baseline-src /tmp/tree

Under valgrind OpenSSL takes its AVX2 code paths (valgrind has no AVX-512),
for nginx and chatproxy alike.  The figures are for comparing code, not
time: an instruction of the interpreter is not worth an instruction of nginx.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from processes import BenchError, Supervisor, apt_install, bench_main, connect, free_ports, \
    group_pids, select_targets, wait_until_serving
from run import ensure_tools
from sources import baseline_pythonpath
from targets import BODY, TARGETS, Context, Target, make_certificate, start_upstream

#: The targets this benchmark can count: one process (or nginx's master and
#: one worker) in front of the upstream.
COUNTABLE = tuple(t for t in TARGETS if t.start is not None and not t.multi_worker)


def ensure_valgrind() -> str:
    """The path of valgrind, installing the Debian package if missing."""
    if shutil.which("valgrind") is None:
        apt_install(["valgrind"])
    found = shutil.which("valgrind")
    if found is None:
        raise BenchError("valgrind is still missing after apt-get install")
    return found


def drive(clients: list[http.client.HTTPConnection], port: int, requests: int) -> None:
    """Send ``requests`` GETs over the keep-alive ``clients``, a request on
    each in turn and then each one's response, checking every answer."""
    done = 0
    while done < requests:
        batch = clients[:requests - done]
        for client in batch:
            client.request("GET", "/", headers={"Host": f"127.0.0.1:{port}"})
        for client in batch:
            response = client.getresponse()
            body = response.read()
            if response.status != 200 or body != BODY:
                raise BenchError(f"answered {response.status} {body[:100]!r}, expected 200 {BODY!r}")
        done += len(batch)


def _callgrind(command: str, pid: int) -> None:
    completed = subprocess.run(["callgrind_control", command, str(pid)], capture_output=True, text=True,
                               check=False, timeout=120)
    if completed.returncode != 0:
        raise BenchError(f"callgrind_control {command} {pid} failed: {completed.stdout}{completed.stderr}")


def _dumped_total(directory: Path, pid: int, keep: Path | None, name: str) -> int:
    """The instruction total of the newest dump of process ``pid`` (copied to
    ``keep`` as ``<name>.<pid>.callgrind`` when given)."""
    dumps = sorted(directory.glob(f"callgrind.{pid}.*"), key=lambda p: int(p.suffix[1:]))
    if not dumps:
        raise BenchError(f"no callgrind dump of process {pid} in {directory}")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dumps[-1], keep / f"{name}.{pid}.callgrind")
    for line in dumps[-1].read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise BenchError(f"no summary line in {dumps[-1]}")


def _same_hashes() -> None:
    """Python's string hashes fixed, so that a Python proxy runs the same
    instructions each time (dictionary probes depend on them)."""
    os.environ["PYTHONHASHSEED"] = "0"


def count(target: Target, ctx: Context, port: int, args: argparse.Namespace) -> float:
    """Instructions per request of ``target``: its processes' counters are
    zeroed after the warm-up and dumped after the measured requests, which
    take the warm-up's connections (no connection is made or closed while
    counting)."""
    server = target.start(ctx, port)  # type: ignore[misc]
    try:
        wait_until_serving(server, port, BODY, tls=target.tls, timeout=args.start_timeout)
        clients = [connect(port, tls=target.tls, timeout=120) for _ in range(args.connections)]
        try:
            drive(clients, port, args.warmup)  # connections (and TLS sessions) made before the counting
            pids = group_pids(server.process.pid)
            for pid in pids:
                _callgrind("--zero", pid)
            drive(clients, port, args.requests)
            for pid in pids:
                _callgrind("--dump", pid)
        finally:
            for client in clients:
                client.close()
        total = sum(_dumped_total(ctx.workdir / "callgrind", pid, args.keep_dumps, target.name) for pid in pids)
    finally:
        ctx.supervisor.stop(server, grace=60.0)
    requests: int = args.requests
    return total / requests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="nginx,nginx-tls,chatproxy,chatproxy-tls",
                        help="comma-separated targets: " + ", ".join(t.name for t in COUNTABLE))
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per target")
    parser.add_argument("--warmup", type=int, default=500,
                        help="requests (at least one per connection) before the counters are zeroed")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections the requests take turns on")
    parser.add_argument("--start-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long a proxy may take to start under valgrind")
    parser.add_argument("--keep-dumps", metavar="DIR", type=Path,
                        help="copy the measured callgrind dumps to DIR (for callgrind_annotate)")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", metavar="REV", help="the *-baseline targets run chatproxy as committed at REV")
    baseline.add_argument("--baseline-src", metavar="DIR", type=Path,
                          help="the *-baseline targets run chatproxy from DIR as it is (a compiled tree too)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.connections < 1 or args.warmup < args.connections:
        parser.error("--requests and --connections must be at least 1, --warmup at least --connections")
    return args


def run(args: argparse.Namespace) -> list[tuple[Target, float]]:
    """Count each selected target in turn; (target, instructions per request)."""
    targets = select_targets(COUNTABLE, args.only)
    _same_hashes()
    if any(t.baseline for t in targets) and not (args.baseline or args.baseline_src):
        raise BenchError("the *-baseline targets need --baseline REV or --baseline-src DIR")
    nginx, _wrk = ensure_tools()
    valgrind = ensure_valgrind()
    with tempfile.TemporaryDirectory(prefix="chatproxy-instructions-") as temp:
        workdir = Path(temp)
        os.chmod(workdir, 0o755)  # nginx workers may run as another user
        (workdir / "logs").mkdir()
        dumps = workdir / "callgrind"
        dumps.mkdir(mode=0o777)
        supervisor = Supervisor(workdir / "logs")
        supervisor.wrapper = lambda name: () if name == "upstream" else (
            valgrind, "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={dumps}/callgrind.%p")
        results = []
        try:
            baseline_path, baseline_facts = baseline_pythonpath(args.baseline, args.baseline_src, workdir)
            for fact, value in baseline_facts.items():
                print(f"{fact.replace('_', ' ')}: {value}", flush=True)
            certificate, key = make_certificate(workdir)
            # nginx's worker as root: valgrind's control pipes of a worker that
            # switched to another user are out of callgrind_control's reach.
            ctx = Context(supervisor, workdir, nginx, free_ports(1)[0], certificate, key, 1, baseline_path,
                          nginx_directives="user root;")
            upstream = start_upstream(ctx)
            wait_until_serving(upstream, ctx.upstream_port, BODY)
            for target in targets:
                started = time.monotonic()
                print(f"{target.name}: {target.description} ...", flush=True)
                results.append((target, count(target, ctx, free_ports(1)[0], args)))
                print(f"  {results[-1][1]:,.0f} instructions per request ({time.monotonic() - started:.0f} s)",
                      flush=True)
        finally:
            supervisor.stop_all()
    return results


def report(results: list[tuple[Target, float]], args: argparse.Namespace) -> None:
    """The table: instructions per request, and each target against its nginx."""
    counted = {target.name: value for target, value in results}
    print(f"\n{args.requests} requests after {args.warmup} of warm-up, {args.connections} keep-alive connections; "
          f"user-space instructions of the proxy's processes (valgrind --tool=callgrind)\n")
    print("| target | instructions per request | vs nginx (same transport) |")
    print("|---|---:|---:|")
    for target, value in results:
        reference = counted.get(target.nginx_reference)
        ratio = f"{value / reference:.1f}x" if reference and target.name != target.nginx_reference else "-"
        print(f"| {target.name} | {value:,.0f} | {ratio} |")


def measure(args: argparse.Namespace) -> int:
    """Run and report (status 0)."""
    report(run(args), args)
    return 0


def main() -> None:
    """Entry point (see :func:`processes.bench_main`)."""
    bench_main(parse_args, measure)


if __name__ == "__main__":
    main()
