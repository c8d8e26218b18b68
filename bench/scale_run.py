"""What scaling out costs: chatproxy alone, with its rate limit in Redis, and behind HAProxy.

    .venv/bin/python bench/scale_run.py [--duration 10] [--connections 32]

Starts nginx as the upstream (a small fixed response), Redis and HAProxy from
the reference deployment's files (etc/deploy/redis.conf, haproxy.cfg; addresses
moved to loopback), and chatproxy instances from etc/deploy/chatproxy.ini with
a site file (TLS with a throwaway certificate, ``workers = 1`` each so the
figures are per process, the ``per-client`` rate_limit at a rate no run
reaches).  Each setup is driven by wrk over HTTPS for ``--duration`` seconds
after a warm-up; it prints requests/s, p50/p99 latency and the CPU each part
used (cores, and microseconds per request):

- ``one``: wrk -> chatproxy (``tcp:`` listener), rate limit in the process;
- ``one-redis``: the same, the rate limit in Redis (one script call a request);
- ``haproxy-one``: wrk -> HAProxy -> one instance (``haproxy:`` listener), Redis;
- ``haproxy-two``: wrk -> HAProxy -> two instances, Redis (the reference).

All on this machine's cores, shared by wrk, nginx, Redis, HAProxy and the
proxies: what two instances add here is bounded by the cores, not by
chatproxy; the per-request CPU is what carries over to a larger machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from processes import Server, Supervisor, exit_on_termination_signals, free_ports, group_cpu_seconds  # noqa: E402
from processes import wait_until_serving  # noqa: E402
from targets import BODY, TWISTD, Context, make_certificate, start_upstream  # noqa: E402
from wrk import WrkResult, run_wrk  # noqa: E402

DEPLOY = ROOT / "etc" / "deploy"
WARMUP = 3.0


@dataclass
class Setup:
    """One measured setup: its name and the servers (name -> Server) that make it."""

    name: str
    description: str
    url: str
    servers: dict[str, Server]


def moved(text: str, replacements: dict[str, str]) -> str:
    """A shipped file's text with its site values replaced (each must be there)."""
    for old, new in replacements.items():
        if old not in text:
            raise SystemExit(f"bench: {old!r} is no longer in the shipped file")
        text = text.replace(old, new)
    return text


def start_redis(supervisor: Supervisor, workdir: Path, port: int) -> Server:
    """redis-server on etc/deploy/redis.conf, moved to 127.0.0.1:port."""
    directory = workdir / "redis"
    directory.mkdir()
    conf = directory / "redis.conf"
    conf.write_text(moved((DEPLOY / "redis.conf").read_text(), {
        "bind 10.0.0.30": "bind 127.0.0.1", "port 6379": f"port {port}", "dir /var/lib/redis": f"dir {directory}"}))
    return supervisor.start("redis", ["redis-server", str(conf)])


def start_instance(ctx: Context, name: str, public: int, admin: int, redis_port: int | None,
                   proxied: bool) -> Server:
    """A chatproxy instance on etc/deploy/chatproxy.ini plus a site file."""
    directory = ctx.workdir / name
    directory.mkdir()
    endpoint = f"haproxy:tcp:{public}:interface=127.0.0.1" if proxied else f"tcp:{public}:interface=127.0.0.1"
    if redis_port is not None:
        limit = f"[filter:per-client]\nrate = 1000000\nburst = 1000000\nstore = redis://127.0.0.1:{redis_port}/0\n"
    else:  # the same limit kept in the process (a section of its own: the shipped one names a store)
        limit = ("[filter:in-process]\nuse = rate_limit\nrate = 1000000\nburst = 1000000\nkey = client\n"
                 "[route:chat]\nfilters = in-process\n")
    site = directory / "site.ini"
    site.write_text(
        f"[chatproxy]\naccess_log = off\nworkers = 1\n"
        f"[listen:public]\nendpoint = {endpoint}\nallow = 127.0.0.1/32\ncertificate = {ctx.certificate}\n"
        f"key = {ctx.key}\n"
        f"[admin]\nendpoint = tcp:{admin}:interface=127.0.0.1\nallow = 127.0.0.1/32\n"
        f"[upstream:chat]\nservers = http://127.0.0.1:{ctx.upstream_port}\nmax_idle_connections = 256\n" + limit)
    return ctx.supervisor.start(name, [TWISTD, "-n", "--pidfile=", "chatproxy", "--config",
                                       str(DEPLOY / "chatproxy.ini"), "--config", str(site)], cwd=directory)


def start_haproxy(supervisor: Supervisor, workdir: Path, port: int, instances: list[tuple[int, int]]) -> Server:
    """HAProxy on etc/deploy/haproxy.cfg, bound to 127.0.0.1:port, in front of ``instances``
    (public port, admin port); a second server line is dropped when there is one instance."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    replacements = {"bind :443": f"bind 127.0.0.1:{port}"}
    lines = ["server chatproxy-a 10.0.0.21:8443 check port 9180", "server chatproxy-b 10.0.0.22:8443 check port 9180"]
    for index, line in enumerate(lines):
        if index < len(instances):
            public, admin = instances[index]
            replacements[line] = line.replace(f"10.0.0.2{index + 1}:8443", f"127.0.0.1:{public}").replace(
                "port 9180", f"port {admin}")
        else:
            replacements["    " + line + "\n"] = ""
    config = workdir / f"haproxy-{len(instances)}.cfg"
    config.write_text(moved(text, replacements).replace("log stdout format raw local0 info", "log stdout format raw "
                                                                                             "local0 warning"))
    return supervisor.start(f"haproxy-{len(instances)}", ["haproxy", "-db", "-f", str(config)])


def measure(setup: Setup, args: argparse.Namespace) -> tuple[WrkResult, dict[str, float]]:
    """Warm up, then wrk for ``args.duration``; the result and each server's CPU seconds."""
    run_wrk(setup.url, duration=WARMUP, connections=args.connections, threads=1)
    before = {name: group_cpu_seconds(server.process.pid) for name, server in setup.servers.items()}
    started = time.monotonic()
    result = run_wrk(setup.url, duration=args.duration, connections=args.connections, threads=1)
    wall = time.monotonic() - started
    cores = {name: (group_cpu_seconds(server.process.pid) - before[name]) / wall
             for name, server in setup.servers.items()}
    return result, cores


def main(argv: list[str] | None = None) -> int:
    """Run every setup and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    exit_on_termination_signals()
    workdir = Path(tempfile.mkdtemp(prefix="chatproxy-scale-"))
    supervisor = Supervisor(workdir)
    try:
        certificate, key = make_certificate(workdir)
        upstream_port, redis_port, one, one_admin, a, a_admin, b, b_admin, hp1, hp2 = free_ports(10)
        ctx = Context(supervisor, workdir, "nginx", upstream_port, certificate, key)
        upstream = start_upstream(ctx)
        wait_until_serving(upstream, upstream_port, BODY)
        redis = start_redis(supervisor, workdir, redis_port)
        rows = []
        alone = start_instance(ctx, "one", one, one_admin, None, proxied=False)
        wait_until_serving(alone, one, BODY, tls=True)
        setups = [Setup("one", "wrk -> chatproxy, limit in the process", f"https://127.0.0.1:{one}/",
                        {"chatproxy": alone, "upstream": upstream})]
        rows.append(run_one(setups[0], args))
        supervisor.stop(alone)
        with_redis = start_instance(ctx, "one-redis", one, one_admin, redis_port, proxied=False)
        wait_until_serving(with_redis, one, BODY, tls=True)
        rows.append(run_one(Setup("one-redis", "wrk -> chatproxy, limit in Redis", f"https://127.0.0.1:{one}/",
                                  {"chatproxy": with_redis, "redis": redis, "upstream": upstream}), args))
        supervisor.stop(with_redis)
        first = start_instance(ctx, "a", a, a_admin, redis_port, proxied=True)
        haproxy1 = start_haproxy(supervisor, workdir, hp1, [(a, a_admin)])
        wait_until_serving(haproxy1, hp1, BODY, tls=True, timeout=30)
        rows.append(run_one(Setup("haproxy-one", "wrk -> HAProxy -> 1 instance, Redis", f"https://127.0.0.1:{hp1}/",
                                  {"chatproxy": first, "haproxy": haproxy1, "redis": redis, "upstream": upstream}),
                            args))
        supervisor.stop(haproxy1)
        second = start_instance(ctx, "b", b, b_admin, redis_port, proxied=True)
        haproxy2 = start_haproxy(supervisor, workdir, hp2, [(a, a_admin), (b, b_admin)])
        wait_until_serving(haproxy2, hp2, BODY, tls=True, timeout=30)
        time.sleep(12)  # both instances past HAProxy's slowstart before measuring
        rows.append(run_one(Setup("haproxy-two", "wrk -> HAProxy -> 2 instances, Redis", f"https://127.0.0.1:{hp2}/",
                                  {"chatproxy": first, "chatproxy-b": second, "haproxy": haproxy2, "redis": redis,
                                   "upstream": upstream}), args))
        print_table(rows, args)
        return 0
    finally:
        supervisor.stop_all()


def run_one(setup: Setup, args: argparse.Namespace) -> tuple[Setup, WrkResult, dict[str, float]]:
    """Measure one setup (printing a progress line)."""
    print(f"# {setup.name}: {setup.description} ...", flush=True)
    result, cores = measure(setup, args)
    return setup, result, cores


def print_table(rows: list[tuple[Setup, WrkResult, dict[str, float]]], args: argparse.Namespace) -> None:
    """The results, one line per setup."""
    print(f"# wrk -t1 -c{args.connections} -d{args.duration:g}s over HTTPS (after {WARMUP:g}s warm-up); "
          "CPU in cores, and microseconds per request")
    print(f"{'setup':12} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}  {'chatproxy':>16} {'haproxy':>14} "
          f"{'redis':>14} {'upstream':>14}  problems")
    for setup, result, cores in rows:
        rps = result.requests_per_second or 0.0

        def cell(*names: str) -> str:
            used = sum(cores.get(name, 0.0) for name in names)
            if not any(name in cores for name in names):
                return "-"
            return f"{used:.2f} ({used / rps * 1e6:.0f} us)" if rps else f"{used:.2f}"

        print(f"{setup.name:12} {rps:8.0f} {result.p50_ms or 0:7.2f} {result.p99_ms or 0:7.2f}  "
              f"{cell('chatproxy', 'chatproxy-b'):>16} {cell('haproxy'):>14} {cell('redis'):>14} "
              f"{cell('upstream'):>14}  {'; '.join(result.problems()) or '-'}")


if __name__ == "__main__":
    sys.exit(main())
