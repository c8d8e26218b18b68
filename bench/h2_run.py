"""HTTP/2 benchmark: chatproxy and nginx (``http2`` on, one worker each) in
front of the same upstream, driven by h2load in the same run.

    .venv/bin/python bench/h2_run.py [--requests 20000] [--clients 4] [--streams 100]
                                          [--rounds 3] [--idle-connections 500]

Starts the upstream (nginx answering a fixed small body), nginx as a TLS
reverse proxy with ``http2`` and upstream keep-alive, and one chatproxy
process (``workers = 1``) with a TLS listener (HTTP/2 on by default).  Each
round drives both with ``h2load -n REQUESTS -c CLIENTS -m STREAMS`` (so
CLIENTS x STREAMS concurrent streams); the median round is reported, with the
CPU seconds each proxy used per thousand requests.  Then it opens
``--idle-connections`` idle HTTP/2 connections (TLS, SETTINGS exchanged, no
stream) to each proxy and reports the memory per connection.  Loopback only;
every process is stopped at the end; results go to
bench/results/h2-<time>.json.  nginx and h2load come from Debian (nginx-light,
nghttp2-client).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection

from processes import (BenchError, Supervisor, exit_on_termination_signals, free_ports, group_cpu_seconds,
                       wait_until_serving)
from targets import BENCH_DIR, BODY, TWISTD, Context, _start_nginx, make_certificate, start_upstream
from ws_run import settled_rss_kib

RESULTS_DIR = BENCH_DIR / "results"


def start_nginx_h2(ctx: Context, port: int) -> Any:
    """nginx (one worker), TLS with http2, keep-alive to the upstream."""
    return _start_nginx(ctx, "nginx-h2", f"""\
        upstream app {{
            server 127.0.0.1:{ctx.upstream_port};
            keepalive 64;
            keepalive_requests 1000000;
        }}
        server {{
            listen 127.0.0.1:{port} ssl http2 backlog=4096;
            ssl_certificate {ctx.certificate};
            ssl_certificate_key {ctx.key};
            http2_max_concurrent_streams 1000;
            location / {{
                proxy_pass http://app;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
        """)


def start_chatproxy_h2(ctx: Context, port: int) -> Any:
    """One chatproxy process with a TLS listener (HTTP/2 on)."""
    directory = ctx.workdir / "chatproxy-h2"
    directory.mkdir(exist_ok=True)
    config = directory / "chatproxy.ini"
    config.write_text(
        "[chatproxy]\naccess_log = off\nworkers = 1\nhttp2_max_streams = 1000\n\n"
        f"[listen:main]\nendpoint = tcp:{port}:interface=127.0.0.1:backlog=4096\ntls = yes\n"
        f"certificate = {ctx.certificate}\nkey = {ctx.key}\n\n"
        f"[upstream:app]\nservers = http://127.0.0.1:{ctx.upstream_port}\nmax_idle_connections = 256\n\n"
        "[route:all]\npath = /\nupstream = app\n")
    return ctx.supervisor.start("chatproxy-h2", [TWISTD, "-n", "--pidfile=", "chatproxy", "--config", str(config)],
                                cwd=directory)


def run_h2load(h2load: str, port: int, requests: int, clients: int, streams: int) -> dict[str, Any]:
    """One h2load run: requests/s, succeeded and failed counts, its output."""
    result = subprocess.run([h2load, "-n", str(requests), "-c", str(clients), "-m", str(streams),
                             f"https://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=600)
    out = result.stdout
    rate = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    if rate is None or done is None:
        raise BenchError(f"h2load failed:\n{out}\n{result.stderr}")
    return {"seconds": float(rate.group(1)), "rps": float(rate.group(2)), "succeeded": int(done.group(1)),
            "failed": int(done.group(2)), "output": out}


def idle_connections(port: int, count: int) -> list[ssl.SSLSocket]:
    """``count`` HTTP/2 connections with the preface and SETTINGS exchanged and no stream."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    sockets = []
    for _ in range(count):
        sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        conn.receive_data(sock.recv(65536))
        sock.sendall(conn.data_to_send())
        sockets.append(sock)
    return sockets


def main() -> int:
    """Run the benchmark; 0 when every request of every run succeeded."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams per client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-connections", type=int, default=500)
    args = parser.parse_args()
    h2load, nginx = shutil.which("h2load"), shutil.which("nginx") or "/usr/sbin/nginx"
    if h2load is None or not Path(nginx).exists():
        print("h2_run: needs h2load (nghttp2-client) and nginx (nginx-light)", file=sys.stderr)
        return 2
    exit_on_termination_signals()
    RESULTS_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chatproxy-h2bench-") as temp:
        workdir = Path(temp)
        supervisor = Supervisor(workdir)
        upstream_port, nginx_port, proxy_port = free_ports(3)
        certificate, key = make_certificate(workdir)
        ctx = Context(supervisor, workdir, nginx, upstream_port, certificate, key)
        try:
            wait_until_serving(start_upstream(ctx), upstream_port, BODY)
            servers = {"nginx-h2": (start_nginx_h2(ctx, nginx_port), nginx_port),
                       "chatproxy-h2": (start_chatproxy_h2(ctx, proxy_port), proxy_port)}
            for server, port in servers.values():
                wait_until_serving(server, port, BODY, tls=True)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
            for number in range(1, args.rounds + 1):
                for name, (server, port) in servers.items():
                    print(f"round {number}/{args.rounds}: {name} ...", flush=True)
                    before = group_cpu_seconds(server.process.pid)
                    run = run_h2load(h2load, port, args.requests, args.clients, args.streams)
                    run["cpu_seconds"] = group_cpu_seconds(server.process.pid) - before
                    runs[name].append(run)
            memory = {}
            for name, (server, port) in servers.items():
                before = settled_rss_kib(server.process.pid)
                sockets = idle_connections(port, args.idle_connections)
                after = settled_rss_kib(server.process.pid)
                memory[name] = (after - before) / len(sockets)
                for sock in sockets:
                    sock.close()
        finally:
            supervisor.stop_all()
    report(args, runs, memory)
    return 0 if all(run["failed"] == 0 for name in runs for run in runs[name]) else 1


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], memory: dict[str, float]) -> None:
    """Print the table and write the JSON results."""
    median = {name: sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2] for name, rounds in runs.items()}
    print(f"\nh2load -n {args.requests} -c {args.clients} -m {args.streams}, median of {args.rounds} rounds; "
          f"{args.idle_connections} idle connections for the memory figure\n")
    print("| target | req/s | CPU ms per 1000 requests | KiB per idle HTTP/2 connection | failed |")
    print("|---|---:|---:|---:|---:|")
    for name, run in median.items():
        cpu = run["cpu_seconds"] / args.requests * 1e6
        print(f"| {name} | {run['rps']:,.0f} | {cpu:.0f} | {memory[name]:.1f} | {run['failed']} |")
    ratio = median["chatproxy-h2"]["rps"] / median["nginx-h2"]["rps"]
    cpu_ratio = (median["nginx-h2"]["cpu_seconds"] / median["chatproxy-h2"]["cpu_seconds"]
                 if median["chatproxy-h2"]["cpu_seconds"] else 0.0)
    print(f"\nchatproxy/nginx: {ratio:.2f}x requests/s, {cpu_ratio:.2f}x per CPU second")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"h2-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "runs": runs, "memory_kib_per_connection": memory,
                                "ratio": ratio, "cpu_ratio": cpu_ratio,
                                "rps_median": {name: run["rps"] for name, run in median.items()},
                                "spread": {name: statistics.pstdev([r["rps"] for r in rounds])
                                           for name, rounds in runs.items()}}, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
