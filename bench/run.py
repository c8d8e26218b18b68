"""chatproxy benchmark: one command, loopback only, everything cleaned up.

    /work/venv/bin/python bench/run.py [--duration 10] [--connections 32] [--threads 1]
                                       [--rounds 1] [--wait-for-quiet 60] [--workers N] [--only NAME,...]
                                       [--pin-proxy CPUS] [--baseline REV | --baseline-src DIR]

Starts an upstream (nginx with a fixed small response), then one target at a
time in front of it -- nginx as a reverse proxy (plain and TLS), chatproxy
with one process (``workers = 1``, plain and TLS) and with ``--workers``
worker processes under a master (plain and TLS),
``twisted.web.proxy.ReverseProxyResource``, and with ``--baseline REV``
chatproxy as committed at REV (pure Python), or with ``--baseline-src DIR``
the chatproxy in DIR as it is (an A/B in the same run) -- and drives each with wrk at
the same concurrency: a short warm-up, then the measured run.  Prints
requests/s, p50 and p99 latency, the ratios to the direct connection, to
nginx and (for the several-worker targets) to one worker, and the CPU each
process used; checks the performance targets; writes the results as JSON
(and the servers' logs) to bench/results/.  nginx and wrk are installed with
apt-get if missing.  Every process started (a chatproxy master's workers
too: they are in its process group) is stopped on exit, on Ctrl-C and on
errors.

Exit status: 0 if every run was clean, 1 if any run had problems (errors,
non-2xx responses, a server that died, other processes using the CPUs),
2 if the benchmark could not run, 130 if interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatproxy.compiled import describe as describe_build
from processes import (BenchError, Server, Supervisor, apt_install, background_load, bench_main, free_ports,
                       group_cpu_by_process, select_targets, system_cpu_seconds, wait_for_listeners,
                       wait_until_serving)
from sources import baseline_pythonpath
from targets import BENCH_DIR, BODY, TARGETS, Context, Target, make_certificate, start_upstream
from wrk import WrkResult, run_wrk

RESULTS_DIR = BENCH_DIR / "results"
WARMUP_SECONDS = 2.0
#: Pause between the end of a measured run and stopping the server, so that the server has
#: dealt with the connections wrk closed before it is asked to shut down.
SETTLE_SECONDS = 1.0
#: Cores that processes not started by the benchmark may use before a run counts as disturbed.
BACKGROUND_LIMIT = 0.15

#: (numerator, denominator, minimum ratio, per proxy core): the targets from the issues.  Per
#: proxy core: requests/s divided by the cores the proxy used, so that a proxy that leaves
#: more of the shared cores to wrk and the upstream is not favoured.
CHECKS: tuple[tuple[str, str, float, bool], ...] = (
    ("chatproxy", "nginx", 0.5, True),
    ("chatproxy-tls", "nginx-tls", 0.5, True),
    ("chatproxy", "twisted-rpr", 4.0, False),
)

#: Log lines worth showing: anything that looks like a problem.
_NOTABLE = re.compile(r"traceback|unhandled|error|exception|critical|warn|alert|emerg|fail|refused|reset|"
                      r"timed out|bad gateway|\[crit\]", re.IGNORECASE)


@dataclass
class Outcome:
    """One target's run: the wrk figures and what the processes did meanwhile."""

    target: Target
    url: str
    result: WrkResult | None = None
    server_alive: bool = True
    #: CPU used during the measured run, in cores (1.0 = one core busy throughout).
    cpu: dict[str, float] = field(default_factory=dict)
    #: The proxy's CPU by process, in cores: its first process (a master) and its children
    #: (chatproxy's workers, nginx's worker), children in pid order.
    proxy_processes: dict[str, Any] = field(default_factory=dict)
    #: For a several-worker target: how many workers it should run.
    expected_workers: int | None = None
    #: Notable lines of the target's log (condensed: "N x line").
    log_notes: list[str] = field(default_factory=list)
    error: str | None = None
    #: With --rounds: requests/s of every round, and the other rounds' problems.
    round_rps: list[float | None] = field(default_factory=list)
    other_rounds_problems: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Everything that makes this target's figures suspect (log notes are reported apart)."""
        found = [self.error] if self.error else []
        if self.result is not None:
            found += self.result.problems()
        if not self.server_alive:
            found.append("the server died during the run")
        if self.cpu.get("other", 0.0) > BACKGROUND_LIMIT:
            found.append(f"other processes used {self.cpu['other']:.2f} cores meanwhile")
        children = self.proxy_processes.get("children")
        if self.expected_workers is not None and children is not None and len(children) != self.expected_workers:
            found.append(f"{len(children)} worker processes ran, expected {self.expected_workers}")
        return found + self.other_rounds_problems

    @property
    def rps(self) -> float | None:
        """Requests/s, or None if the run produced nothing usable."""
        if self.result is None or self.result.requests_per_second == 0.0:
            return None
        return self.result.requests_per_second

    @property
    def rps_per_core(self) -> float | None:
        """Requests/s per core the proxy used (None for the upstream itself)."""
        cores = self.cpu.get("proxy")
        if self.rps is None or not cores:
            return None
        return self.rps / cores

    @property
    def cpu_per_request_us(self) -> float | None:
        """The proxy's CPU time per request, in microseconds."""
        per_core = self.rps_per_core
        return None if per_core is None else 1e6 / per_core


# -- tools


def ensure_tools() -> tuple[str, str]:
    """The paths of nginx and wrk, installing the Debian packages if missing."""
    nginx, wrk = _find_nginx(), shutil.which("wrk")
    missing = (["nginx-light"] if nginx is None else []) + (["wrk"] if wrk is None else [])
    if missing:
        apt_install(missing)
        nginx, wrk = _find_nginx(), shutil.which("wrk")
    if nginx is None or wrk is None:
        raise BenchError("nginx or wrk is still missing after apt-get install")
    return nginx, wrk


def _find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def _version_of(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as e:
        return f"unknown ({e})"
    lines = (completed.stdout + completed.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _git(*args: str) -> str:
    completed = subprocess.run(["git", "-C", str(BENCH_DIR.parent), *args], capture_output=True, text=True,
                               check=False)
    return completed.stdout


def chatproxy_changes() -> list[str]:
    """The files of chatproxy (and its plugin) that differ from the commit, with their
    modification times: another session may change them while the benchmark runs."""
    changed = []
    for line in _git("status", "--porcelain", "--", "chatproxy", "twisted").splitlines():
        path = BENCH_DIR.parent / line[3:]
        try:
            stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
            changed.append(f"{line[3:]} ({stamp.isoformat(timespec='seconds')})")
        except OSError:
            changed.append(line[3:])
    return changed


def machine_info(nginx: str, wrk: str) -> dict[str, Any]:
    """What the benchmark ran on, for the results."""
    import httptools
    import twisted

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _git("rev-parse", "--short", "HEAD").strip()
    modified = chatproxy_changes()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "httptools": httptools.__version__,
        "nginx": _version_of([nginx, "-v"]),
        "wrk": _version_of([wrk, "-v"]),
        "openssl": _version_of(["openssl", "version"]),
        "chatproxy_commit": commit or "unknown",
        "chatproxy_commit_at_end": None,
        "chatproxy_uncommitted_changes": modified,
        "chatproxy_build": describe_build(),
        "load_average_at_start": os.getloadavg(),
    }


# -- running the targets


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4} ")


def log_notes(text: str, limit: int = 20) -> list[str]:
    """The lines of ``text`` that look like problems, condensed to "N x line" (first ``limit`` kinds).

    twistd's timestamps are dropped so that repeats of one message collapse.
    """
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith((" ", "\t", "Traceback (most recent call last)")):
            continue  # the inside of a Python traceback: its last line names the exception
        if _NOTABLE.search(line):
            key = _TIMESTAMP.sub("", line).strip()
            counts[key] = counts.get(key, 0) + 1
    return [f"{n} x {line}" for line, n in list(counts.items())[:limit]]


class _CpuMeter:
    """CPU used by the servers, by wrk and by everything else between :meth:`start` and :meth:`stop`.

    A server counts with its whole process group: a chatproxy master with its
    workers, an nginx master with its worker."""

    def __init__(self, servers: dict[str, Server]) -> None:
        self.servers = servers
        self.before: dict[str, float] = {}
        self.before_processes: dict[str, dict[int, float]] = {}
        self.after_processes: dict[str, dict[int, float]] = {}
        self.wall = 0.0

    def _sample(self) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
        processes = {name: group_cpu_by_process(s.process.pid) for name, s in self.servers.items()}
        sample = {name: sum(by_pid.values()) for name, by_pid in processes.items()}
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once waited for
        sample["wrk"] = usage.ru_utime + usage.ru_stime
        sample.update(system_cpu_seconds())
        return sample, processes

    def start(self) -> None:
        """Take the first sample."""
        self.before, self.before_processes = self._sample()
        self.wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Cores used since :meth:`start`: by each server, wrk, "other" processes (not ours),
        interrupts ("irq") and the hypervisor ("steal")."""
        self.wall = time.monotonic() - self.wall
        after, self.after_processes = self._sample()
        cores = {name: (after[name] - self.before[name]) / self.wall for name in after}
        processes = cores.pop("process")
        ours = sum(cores[name] for name in (*self.servers, "wrk"))
        cores["other"] = max(0.0, processes - ours)
        return {name: round(value, 2) for name, value in cores.items()}

    def by_process(self, name: str) -> dict[str, Any]:
        """After :meth:`stop`: server ``name``'s cores by process, as ``{"leader": cores,
        "children": [cores, ...]}`` (children in pid order; a process that started or
        ended during the run counts from its start or up to the last sample it was in)."""
        leader = self.servers[name].process.pid
        before, after = self.before_processes.get(name, {}), self.after_processes.get(name, {})
        cores = {pid: round((after[pid] - before.get(pid, 0.0)) / self.wall, 2) for pid in after}
        return {"leader": cores.pop(leader, 0.0), "children": [cores[pid] for pid in sorted(cores)]}


def measure(target: Target, ctx: Context, upstream: Server, port: int, wrk: str,
            args: argparse.Namespace) -> Outcome:
    """Start ``target``, warm it up, measure it with wrk, stop it."""
    scheme = "https" if target.tls else "http"
    outcome = Outcome(target, f"{scheme}://127.0.0.1:{port}/")
    server: Server | None = None
    try:
        if target.start is not None:
            server = target.start(ctx, port)
            wait_until_serving(server, port, BODY, tls=target.tls)
            if target.multi_worker:  # the first worker answers: wait for the others
                outcome.expected_workers = ctx.workers
                wait_for_listeners(server, port, target.listening_processes(ctx))
        run_wrk(outcome.url, duration=WARMUP_SECONDS, connections=args.connections, threads=args.threads, wrk=wrk,
                cpus=args.load_cpus)
        meter = _CpuMeter({"upstream": upstream} | ({"proxy": server} if server is not None else {}))
        meter.start()
        outcome.result = run_wrk(outcome.url, duration=args.duration, connections=args.connections,
                                 threads=args.threads, wrk=wrk, cpus=args.load_cpus)
        outcome.cpu = meter.stop()
        if server is not None:
            outcome.proxy_processes = meter.by_process("proxy")
        time.sleep(SETTLE_SECONDS)
    except BenchError as e:
        outcome.error = str(e)
    finally:
        if server is not None:
            outcome.server_alive = server.alive
            ctx.supervisor.stop(server)
            outcome.log_notes = log_notes(server.log_text())
    return outcome


# -- reporting


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0.0:
        return None
    return numerator / denominator


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratios(outcomes: list[Outcome]) -> dict[str, dict[str, float | None]]:
    """For each target: requests/s relative to direct and to nginx (same transport), and for
    the several-worker chatproxy targets to chatproxy with one worker (same transport)."""
    by_name = {o.target.name: o.rps for o in outcomes}
    per_core = {o.target.name: o.rps_per_core for o in outcomes}
    found: dict[str, dict[str, float | None]] = {}
    for o in outcomes:
        found[o.target.name] = {
            "vs_direct": _ratio(o.rps, by_name.get("direct")),
            "vs_nginx": _ratio(o.rps, by_name.get(o.target.nginx_reference)),
            "vs_nginx_per_core": _ratio(o.rps_per_core, per_core.get(o.target.nginx_reference)),
        }
        if o.target.one_worker_reference is not None:
            found[o.target.name]["vs_one_worker"] = _ratio(o.rps, by_name.get(o.target.one_worker_reference))
    return found


def worker_lines(outcomes: list[Outcome]) -> list[str]:
    """For each several-worker target: its requests/s against one worker and against nginx,
    and how its CPU was spread over the master and the workers (reported, not checked)."""
    ratio = ratios(outcomes)
    lines = []
    for o in outcomes:
        if not o.target.multi_worker:
            continue
        r = ratio[o.target.name]
        line = (f"{o.target.name} ({o.expected_workers} workers): {_x(r.get('vs_one_worker'))} "
                f"{o.target.one_worker_reference} (1 worker), {_x(r['vs_nginx'])} {o.target.nginx_reference}")
        if o.proxy_processes:
            children = o.proxy_processes["children"]
            line += (f"; CPU: master {o.proxy_processes['leader']:.2f}, workers "
                     + (" / ".join(f"{c:.2f}" for c in children) or "none"))
        lines.append(line)
    return lines


def _cpu(o: Outcome) -> str:
    if not o.cpu:
        return "-"
    return " / ".join(f"{o.cpu[name]:.2f}" if name in o.cpu else "-"
                      for name in ("proxy", "upstream", "wrk", "other"))


def table(outcomes: list[Outcome]) -> str:
    """The results as a Markdown table (readable as plain text too)."""
    ratio = ratios(outcomes)
    rows = ["| target | req/s | p50 | p99 | vs direct | vs nginx | proxy CPU per request | vs nginx per proxy core "
            "| CPU: proxy / upstream / wrk / other | problems |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for o in outcomes:
        r = ratio[o.target.name]
        nginx_ratio = _x(r["vs_nginx"])
        if r["vs_nginx"] is not None and o.target.nginx_reference != "nginx":
            nginx_ratio += f" (vs {o.target.nginx_reference})"
        rps = "-" if o.rps is None else f"{o.rps:,.0f}"
        p50 = _ms(o.result.p50_ms if o.result else None)
        p99 = _ms(o.result.p99_ms if o.result else None)
        cost = "-" if o.cpu_per_request_us is None else f"{o.cpu_per_request_us:.0f} µs"
        problems = "; ".join(problem.splitlines()[0] for problem in o.problems()) or "none"
        rows.append(f"| {o.target.name} | {rps} | {p50} | {p99} | {_x(r['vs_direct'])} | {nginx_ratio} "
                    f"| {cost} | {_x(r['vs_nginx_per_core'])} | {_cpu(o)} | {problems} |")
    return "\n".join(rows)


def check_targets(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """The issue's performance targets, each PASS, MISS or SKIP (not measured)."""
    by_name = {o.target.name: o for o in outcomes}
    checks = []
    for numerator, denominator, minimum, per_core in CHECKS:
        top, bottom = by_name.get(numerator), by_name.get(denominator)
        if per_core:
            value = _ratio(top.rps_per_core if top else None, bottom.rps_per_core if bottom else None)
        else:
            value = _ratio(top.rps if top else None, bottom.rps if bottom else None)
        clean = top is not None and bottom is not None and not top.problems() and not bottom.problems()
        verdict = "SKIP" if value is None else ("PASS" if value >= minimum else "MISS")
        what = f"{numerator}/{denominator}" + (" per proxy core" if per_core else "")
        checks.append({"check": f"{what} >= {minimum:g}", "ratio": value, "verdict": verdict, "clean": clean})
    return checks


def check_lines(checks: list[dict[str, Any]]) -> list[str]:
    """One line per check: verdict, what, measured ratio (and a warning if a run had problems)."""
    lines = []
    for check in checks:
        note = "" if check["clean"] or check["verdict"] == "SKIP" else "  (a run had problems: figures suspect)"
        lines.append(f"{check['verdict']}: {check['check']}: {_x(check['ratio'])}{note}")
    return lines


def machine_line(machine: dict[str, Any]) -> str:
    """The machine and software versions in one line."""
    changes = machine["chatproxy_uncommitted_changes"]
    dirty = f" + uncommitted changes to {', '.join(changes)}" if changes else ""
    line = (f"{machine['cpus']} x {machine['cpu_model']}, {machine['kernel']}; Python {machine['python']}, "
            f"Twisted {machine['twisted']}, httptools {machine['httptools']}; {machine['nginx']}; "
            f"{machine['wrk'].split(' Copyright')[0]}; chatproxy {machine['chatproxy_commit']}{dirty}"
            + (f" ({machine['chatproxy_build']})" if machine.get("chatproxy_build") else "")
            + (f"; *-baseline: chatproxy at {machine['baseline_commit']} (pure Python)"
               if machine.get("baseline_commit") else "")
            + (f"; *-baseline: chatproxy from {machine['baseline_source']}" if machine.get("baseline_source") else ""))
    end = (machine.get("chatproxy_commit_at_end"), machine.get("chatproxy_uncommitted_changes_at_end"))
    if end[0] is not None and end != (machine["chatproxy_commit"], changes):
        line += (f"\nwarning: chatproxy changed during the run (at the end: {end[0]}"
                 + (f" + uncommitted changes to {', '.join(end[1] or [])}" if end[1] else "")
                 + "): later targets may have run other code")
    return line


def print_report(outcomes: list[Outcome], checks: list[dict[str, Any]], upstream_notes: list[str],
                 machine: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the table, the checks, and the notable lines of the servers' logs."""
    print(f"\n{machine['date']}: {machine_line(machine)}")
    rounds = f"; median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"\nwrk: {args.threads} thread(s), {args.connections} connections, {args.duration:g}s per target "
          f"(after {WARMUP_SECONDS:g}s warm-up){rounds}; upstream body {len(BODY)} bytes; "
          "CPU in cores during the measured run"
          + (f"; each proxy pinned to CPU {args.pin_proxy}, wrk and the upstream to CPU {args.load_cpus}"
             if args.pin_proxy is not None else "") + "\n")
    print(table(outcomes))
    print()
    print("\n".join(check_lines(checks)))
    if workers := worker_lines(outcomes):
        print("\nseveral workers (no target; reported only):")
        print("\n".join(workers))
    for o in outcomes:
        if o.error:
            print(f"\n{o.target.name} failed: {o.error}")
    notes = [(o.target.name, o.log_notes) for o in outcomes] + [("upstream", upstream_notes)]
    for name, lines in notes:
        if lines:
            print(f"\nnotable lines in the {name} log:")
            print("\n".join(f"    {line}" for line in lines))


def save(outcomes: list[Outcome], checks: list[dict[str, Any]], upstream_notes: list[str],
         machine: dict[str, Any], args: argparse.Namespace, log_dir: Path) -> Path:
    """Write the results as JSON to bench/results/, with the servers' logs beside it."""
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS_DIR / f"run-{stamp}-logs"
    shutil.copytree(log_dir, logs)
    ratio = ratios(outcomes)
    data = {
        "machine": machine,
        "settings": {"duration": args.duration, "connections": args.connections, "threads": args.threads,
                     "rounds": args.rounds, "warmup": WARMUP_SECONDS, "body_bytes": len(BODY),
                     "workers": args.workers, "proxy_cpus": args.pin_proxy, "load_cpus": args.load_cpus},
        "results": [
            {"target": o.target.name, "description": o.target.description, "url": o.url,
             "wrk": o.result.as_dict() if o.result else None, "cpu_cores": o.cpu,
             "proxy_cpu_cores_by_process": o.proxy_processes, "workers": o.expected_workers,
             "server_alive": o.server_alive,
             "rps_per_proxy_core": o.rps_per_core, "proxy_cpu_per_request_us": o.cpu_per_request_us,
             "error": o.error, "problems": o.problems(), "log_notes": o.log_notes, "round_rps": o.round_rps,
             **ratio[o.target.name]}
            for o in outcomes
        ],
        "upstream_log_notes": upstream_notes,
        "checks": checks,
        "table": table(outcomes),
        "check_lines": check_lines(checks),
        "worker_lines": worker_lines(outcomes),
        "logs": str(logs.relative_to(BENCH_DIR.parent)),
    }
    path = RESULTS_DIR / f"run-{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# -- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of measurement per target")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (same for every target)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every target this many times, interleaved, and report the median round")
    parser.add_argument("--wait-for-quiet", type=float, default=60.0, metavar="SECONDS",
                        help="wait up to this long for other processes to stop using the CPUs before starting")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="chatproxy's workers for the chatproxy-workers and chatproxy-tls-workers targets "
                             "(default: one per CPU, as workers = auto; here %(default)s)")
    parser.add_argument("--only", help="comma-separated targets to run: " + ", ".join(t.name for t in TARGETS))
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", metavar="REV",
                          help="also run chatproxy-baseline and chatproxy-tls-baseline: chatproxy as committed at "
                               "this git revision (exported with git archive, so pure Python), for an A/B in the "
                               "same run")
    baseline.add_argument("--baseline-src", metavar="DIR", type=Path,
                          help="the same with chatproxy from DIR as it is (holding chatproxy/ and "
                               "twisted/plugins/; e.g. a checkout of another revision built with "
                               "CHATPROXY_COMPILE=1, for an A/B of two compiled builds)")
    parser.add_argument("--pin-proxy", metavar="CPUS",
                        help="run each proxy on these CPUs (a taskset -c list, e.g. 1) and wrk and the upstream "
                             "on the others, as on a production box where the proxy has cores to itself")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.connections < 1 or args.threads < 1 or args.threads > args.connections:
        parser.error("need --duration > 0 and 1 <= --threads <= --connections")
    if args.rounds < 1:
        parser.error("need --rounds >= 1")
    if args.baseline_src is not None and not (args.baseline_src / "chatproxy" / "__init__.py").exists():
        parser.error(f"--baseline-src: no chatproxy package in {args.baseline_src}")
    if not 1 <= args.workers <= 256:
        parser.error("need 1 <= --workers <= 256")
    args.load_cpus = None
    if args.pin_proxy is not None:
        proxy = cpu_list(args.pin_proxy)
        rest = sorted(os.sched_getaffinity(0) - proxy)
        if not proxy or not proxy <= os.sched_getaffinity(0) or not rest:
            parser.error("--pin-proxy needs CPUs of this machine, and leaves at least one for wrk and the upstream")
        args.load_cpus = ",".join(map(str, rest))
    return args


def cpu_list(text: str) -> set[int]:
    """The CPUs of a ``taskset -c`` list (``1``, ``0,2``, ``2-3``)."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        return set()
    return cpus


def wait_for_quiet(limit: float) -> float:
    """Wait up to ``limit`` seconds for other processes to leave the CPUs alone; the last load seen."""
    deadline = time.monotonic() + limit
    load = background_load()
    while load > BACKGROUND_LIMIT and time.monotonic() < deadline:
        print(f"other processes keep {load:.2f} cores busy; waiting for quiet ...", flush=True)
        load = background_load(5.0)
    if load > BACKGROUND_LIMIT:
        print(f"warning: other processes keep {load:.2f} cores busy: the figures will be disturbed", flush=True)
    return load


def median_round(rounds: list[Outcome]) -> Outcome:
    """One target's rounds as one outcome: the round with the median requests/s (the lower
    one of the middle two for an even count), carrying every round's requests/s and the
    other rounds' problems and log notes."""
    ranked = sorted(rounds, key=lambda o: o.rps or 0.0)
    chosen = ranked[(len(ranked) - 1) // 2]
    chosen.round_rps = [o.rps for o in rounds]
    if len(rounds) > 1:
        for number, other in enumerate(rounds, 1):
            if other is not chosen:
                chosen.other_rounds_problems += [f"round {number}: {problem}" for problem in other.problems()]
                chosen.log_notes += [f"round {number}: {note}" for note in other.log_notes]
    return chosen


def measure_all(targets: list[Target], ctx: Context, wrk: str, args: argparse.Namespace) -> tuple[
        list[Outcome], list[str]]:
    """Start the upstream, then measure each target in turn, ``args.rounds`` times over.

    Returns one outcome per target (the median round) and the upstream's log notes.
    """
    ports = free_ports(len(targets))
    upstream = start_upstream(ctx)
    wait_until_serving(upstream, ctx.upstream_port, BODY)
    rounds: dict[str, list[Outcome]] = {target.name: [] for target in targets}
    for number in range(1, args.rounds + 1):
        for target, port in zip(targets, ports):
            counter = f"round {number}/{args.rounds}: " if args.rounds > 1 else ""
            print(f"{counter}{target.name}: {target.description} ...", flush=True)
            port = ctx.upstream_port if target.start is None else port
            rounds[target.name].append(measure(target, ctx, upstream, port, wrk, args))
            if not upstream.alive:
                raise BenchError(f"the upstream died:\n{upstream.log_tail()}")
    ctx.supervisor.stop(upstream)
    return [median_round(rounds[target.name]) for target in targets], log_notes(upstream.log_text())


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 if every run was clean, 1 otherwise."""
    with_baseline = bool(args.baseline or args.baseline_src)
    targets = select_targets([t for t in TARGETS if with_baseline or not t.baseline], args.only)
    nginx, wrk = ensure_tools()
    machine = machine_info(nginx, wrk)
    machine["background_load_at_start"] = round(wait_for_quiet(args.wait_for_quiet), 2)
    with tempfile.TemporaryDirectory(prefix="chatproxy-bench-") as temp:
        workdir = Path(temp)
        os.chmod(workdir, 0o755)  # nginx workers may run as another user
        log_dir = workdir / "logs"
        log_dir.mkdir()
        supervisor = Supervisor(log_dir)
        if args.pin_proxy is not None:
            supervisor.affinity = lambda name: args.load_cpus if name == "upstream" else args.pin_proxy
        try:
            certificate, key = make_certificate(workdir)
            baseline_path, baseline_facts = baseline_pythonpath(args.baseline, args.baseline_src, workdir)
            machine.update(baseline_facts)
            ctx = Context(supervisor, workdir, nginx, free_ports(1)[0], certificate, key, args.workers, baseline_path)
            outcomes, upstream_notes = measure_all(targets, ctx, wrk, args)
        finally:
            supervisor.stop_all()
            for name, pids in supervisor.leftovers():
                print(f"warning: processes of {name} still running after it was stopped: pids "
                      f"{', '.join(map(str, pids))}", flush=True)
        checks = check_targets(outcomes)
        machine["chatproxy_commit_at_end"] = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
        machine["chatproxy_uncommitted_changes_at_end"] = chatproxy_changes()
        print_report(outcomes, checks, upstream_notes, machine, args)
        path = save(outcomes, checks, upstream_notes, machine, args, log_dir)
    print(f"\nresults: {path.relative_to(BENCH_DIR.parent)}")
    return 0 if all(not o.problems() for o in outcomes) else 1


def main() -> None:
    """Entry point (see :func:`processes.bench_main`)."""
    bench_main(parse_args, run)


if __name__ == "__main__":
    main()
