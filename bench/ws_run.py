"""chatproxy WebSocket benchmark: one command, loopback only, everything cleaned up.

    /work/venv/bin/python bench/ws_run.py [--duration 10] [--sessions 100] [--message-size 100]
                                          [--idle-sessions 5000] [--idle-rounds 2] [--rounds 1]
                                          [--only NAME,...] [--chatproxy-at REV | --chatproxy-src DIR]

Starts a WebSocket echo upstream (Node, the ``ws`` package), then one target
at a time in front of it -- nginx (one worker) proxying WebSockets, chatproxy
in bridge mode (``websocket = yes``) and in tunnel mode (``websocket =
tunnel``) -- and runs two measurements:

relay
    The load generator (Node, ``ws``) opens --sessions sessions and keeps one
    chat-sized text message in flight in each: send, wait for the echo, check
    it, send the next.  After a warm-up it measures for --duration seconds:
    round trips/s, relayed messages/s (each round trip is two messages through
    the proxy: one up, its echo down), round-trip latency p50/p99, and the CPU
    each process used.  Also run against the upstream directly.
idle
    The load generator opens --idle-sessions wss sessions through each proxy
    (TLS listener, a self-signed certificate made for the run) and sends
    nothing.  The proxy's resident memory (VmRSS of its process group) is read
    before and after, once it has settled: (after - before) / sessions is the
    memory per idle session.  Then the sessions are closed and the memory read
    again; and all that once more (--idle-rounds), to show memory that is not
    reused.

Prints the tables, the issue's three targets as PASS/MISS lines, and the
notable lines of the servers' logs; writes the results as JSON (and the
logs) to bench/results/.  Exit status: 0 if every run was clean, 1 if any run
had problems (lost or wrong echoes, failed sessions, a server that died,
other processes using the CPUs), 2 if the benchmark could not run, 130 if
interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatproxy.compiled import describe as describe_build
from processes import (BenchError, Server, Supervisor, bench_main, free_ports, group_pids,
                       select_targets, wait_until_serving)
from run import BACKGROUND_LIMIT, _find_nginx, _git, _ms, _ratio, _version_of, _x, log_notes, wait_for_quiet
from sources import chatproxy_pythonpath, export_chatproxy
from targets import BENCH_DIR, BODY, Context, make_certificate
from ws_targets import LOAD, WS_DIR, WS_PATH, WS_TARGETS, WsContext, WsTarget, find_node, start_echo_upstream

RESULTS_DIR = BENCH_DIR / "results"
WARMUP_SECONDS = 2.0
#: Seconds the messages still in flight at the end of a run get to come back (and the closes to finish).
DRAIN_SECONDS = 5.0
#: Pause between the end of a run and stopping the server (it deals with the closed sessions first).
SETTLE_SECONDS = 1.0
#: Sessions opened and closed through a proxy before its "before" memory is read (imports, TLS set-up).
IDLE_WARMUP_SESSIONS = 50
#: The longest the memory of an idle proxy may take to settle before it is read anyway.
RSS_SETTLE_LIMIT = 20.0

#: (numerator, denominator, minimum ratio of relayed messages/s): the issue's targets.
RELAY_CHECKS: tuple[tuple[str, str, float], ...] = (
    ("chatproxy-bridge", "nginx", 0.3),
    ("chatproxy-tunnel", "nginx", 0.8),
)
#: (target, the most KiB one idle wss session may cost): the issue's memory target.
IDLE_CHECKS: tuple[tuple[str, float], ...] = (("chatproxy-bridge", 64.0),)


# -- what one run found


@dataclass
class RelayOutcome:
    """One target's relay run: the load generator's figures and what the processes did meanwhile."""

    target: WsTarget
    url: str
    result: dict[str, Any] | None = None
    server_alive: bool = True
    load_status: int | None = None
    log_notes: list[str] = field(default_factory=list)
    error: str | None = None
    round_mps: list[float | None] = field(default_factory=list)
    other_rounds_problems: list[str] = field(default_factory=list)

    @property
    def mps(self) -> float | None:
        """Relayed messages/s (two per round trip), or None if the run produced nothing usable."""
        if self.result is None or not self.result.get("round_trips"):
            return None
        return float(self.result["relayed_messages_per_second"])

    @property
    def cpu(self) -> dict[str, float]:
        """Cores used during the measured run, by name."""
        cores: dict[str, float] = (self.result or {}).get("cpu_cores", {})
        return cores

    def disturbed(self) -> bool:
        """Whether processes the benchmark did not start used the CPUs during the measured run."""
        return self.cpu.get("other", 0.0) > BACKGROUND_LIMIT

    def problems(self) -> list[str]:
        """Everything that makes this run's figures suspect (log notes are reported apart)."""
        found = [self.error] if self.error else []
        r = self.result
        if self.load_status not in (None, 0):
            found.append(f"the load generator exited with status {self.load_status}")
        if r is not None:
            if r["opened"] < r["sessions"]:
                found.append(f"{r['sessions'] - r['opened']} of {r['sessions']} sessions failed to open "
                             f"({'; '.join(r['connect_errors'][:2])})")
            if r["lost"]:
                found.append(f"{r['lost']} messages lost (no echo within {DRAIN_SECONDS:g}s)")
            if r["mismatched"]:
                found.append(f"{r['mismatched']} echoes differ from the message sent")
            if r["unexpected_closes"]:
                found.append(f"{r['unexpected_closes']} sessions closed early: {r['problems']}")
            unclean = {code: n for code, n in r["close_codes"].items() if code != "1000"}
            if unclean or r["not_closed"]:
                found.append(f"closing: codes {r['close_codes']}, {r['not_closed']} not closed")
            if not r["round_trips"]:
                found.append("no round trips measured")
        if not self.server_alive:
            found.append("the server died during the run")
        if self.disturbed():
            found.append(f"other processes used {self.cpu['other']:.2f} cores meanwhile")
        return found + self.other_rounds_problems


@dataclass
class IdleRound:
    """One opening of the idle sessions: the memory with them open and after they closed."""

    open_status: dict[str, Any] | None = None
    rss_open_kib: int | None = None
    final_status: dict[str, Any] | None = None
    rss_closed_kib: int | None = None

    @property
    def opened(self) -> int:
        """How many idle sessions were open when the memory was read."""
        return int((self.open_status or {}).get("opened", 0))

    def problems(self, sessions: int) -> list[str]:
        """Sessions that failed to open, closed while idle, or did not close cleanly."""
        found = []
        status = self.open_status
        if status is not None and status["opened"] < sessions:
            found.append(f"{sessions - status['opened']} of {sessions} sessions failed to open "
                         f"({'; '.join(status['open_errors'][:2])})")
        final = self.final_status
        if final is not None:
            if final["closed_early"]:
                found.append(f"{final['closed_early']} sessions closed while idle: {final['closed_early_codes']}")
            unclean = {code: n for code, n in final.get("close_codes", {}).items() if code != "1000"}
            if unclean or final.get("not_closed"):
                found.append(f"closing: codes {final.get('close_codes')}, {final.get('not_closed')} not closed")
        return found


@dataclass
class IdleOutcome:
    """One proxy's idle run: its memory before, then with the sessions open and after they closed,
    once or more (``--idle-rounds``: memory that keeps growing from round to round would be a leak)."""

    target: WsTarget
    url: str
    sessions: int
    rss_before_kib: int | None = None
    rounds: list[IdleRound] = field(default_factory=list)
    nofile_limit: str | None = None
    server_alive: bool = True
    log_notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def first(self) -> IdleRound:
        """The first round (the memory figure comes from it)."""
        return self.rounds[0] if self.rounds else IdleRound()

    @property
    def kib_per_session(self) -> float | None:
        """(memory with the sessions open - memory before) / sessions open, in KiB, in the first round."""
        first = self.first
        if self.rss_before_kib is None or first.rss_open_kib is None or not first.opened:
            return None
        return (first.rss_open_kib - self.rss_before_kib) / first.opened

    def problems(self) -> list[str]:
        """Everything that makes this run's figures suspect."""
        found = [self.error] if self.error else []
        for number, idle_round in enumerate(self.rounds, 1):
            prefix = f"round {number}: " if len(self.rounds) > 1 else ""
            found += [prefix + problem for problem in idle_round.problems(self.sessions)]
        if not self.server_alive:
            found.append("the server died during the run")
        return found


# -- processes and memory


def group_rss_kib(pgid: int) -> int:
    """The resident memory (VmRSS) of the processes of group ``pgid`` together, in KiB."""
    total = 0
    for pid in group_pids(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


def settled_rss_kib(pgid: int, minimum: float = 2.0, limit: float = RSS_SETTLE_LIMIT) -> int:
    """The group's resident memory once it has stopped changing (by under 0.5% over 2 s), or after ``limit`` s."""
    start = time.monotonic()
    samples: list[int] = []
    while True:
        samples.append(group_rss_kib(pgid))
        elapsed = time.monotonic() - start
        recent = samples[-5:]
        if elapsed >= minimum and len(recent) == 5 and max(recent) - min(recent) <= 0.005 * max(recent):
            return recent[-1]
        if elapsed >= limit:
            return samples[-1]
        time.sleep(0.5)


def open_files_limit(pid: int) -> str:
    """The "Max open files" line of /proc/PID/limits (soft and hard)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
    except OSError:
        pass
    return "unknown"


def raise_open_files_limit(needed: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE (inherited by every process started) to at least ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))  # root may raise the hard limit
        except (ValueError, OSError):
            raise BenchError(f"the open files limit is {hard} and cannot be raised to {needed}: "
                             "use fewer --idle-sessions or raise it (ulimit -Hn)") from None
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _load_argv(ctx: WsContext, mode: str, url: str, out: Path, *extra: str) -> list[str]:
    return [ctx.node, str(LOAD), mode, "--url", url, "--out", str(out), *extra]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def _finish(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


# -- relay


def measure_relay(target: WsTarget, ctx: WsContext, upstream: Server, port: int,
                  args: argparse.Namespace) -> RelayOutcome:
    """Start ``target``, run the load generator through it, stop it."""
    tls = args.tls and target.start is not None
    outcome = RelayOutcome(target, f"{'wss' if tls else 'ws'}://127.0.0.1:{port}{WS_PATH}")
    supervisor = ctx.base.supervisor
    server: Server | None = None
    try:
        if target.start is not None:
            server = target.start(ctx, port, tls)
            wait_until_serving(server, port, BODY, tls=tls)
        watch = {"upstream": group_pids(upstream.process.pid)}
        if server is not None:
            watch["proxy"] = group_pids(server.process.pid)
        out = ctx.base.workdir / f"relay-{target.name}-{time.monotonic_ns()}.json"
        load = supervisor.start(f"load-{target.name}", _load_argv(
            ctx, "relay", outcome.url, out, "--sessions", str(args.sessions), "--size", str(args.message_size),
            "--warmup", str(WARMUP_SECONDS), "--duration", str(args.duration), "--drain", str(DRAIN_SECONDS),
            "--connect-timeout", "60",
            "--watch", ",".join(f"{name}={'+'.join(map(str, pids))}" for name, pids in watch.items()),
            "--clock-ticks", str(os.sysconf("SC_CLK_TCK"))), cwd=WS_DIR)
        limit = 60 + WARMUP_SECONDS + args.duration + 3 * DRAIN_SECONDS + 30
        outcome.load_status = _finish(load.process, limit)
        if outcome.load_status is None:
            supervisor.stop(load)
            raise BenchError(f"the load generator did not finish within {limit:g}s:\n{load.log_tail()}")
        supervisor.stop(load)
        outcome.result = _read_json(out)
        if outcome.result is None:
            raise BenchError(f"the load generator wrote no result:\n{load.log_tail()}")
        time.sleep(SETTLE_SECONDS)
    except BenchError as e:
        outcome.error = str(e)
    finally:
        if server is not None:
            outcome.server_alive = server.alive
            supervisor.stop(server)
            outcome.log_notes = log_notes(server.log_text())
    return outcome


def median_round(rounds: list[RelayOutcome]) -> RelayOutcome:
    """One target's rounds as one outcome: the round with the median messages/s (the lower of the
    middle two for an even count), carrying every round's figure and the other rounds' problems and notes."""
    ranked = sorted(rounds, key=lambda o: o.mps or 0.0)
    chosen = ranked[(len(ranked) - 1) // 2]
    chosen.round_mps = [o.mps for o in rounds]
    if len(rounds) > 1:
        for number, other in enumerate(rounds, 1):
            if other is not chosen:
                chosen.other_rounds_problems += [f"round {number}: {p}" for p in other.problems()]
                chosen.log_notes += [f"round {number}: {note}" for note in other.log_notes]
    return chosen


# -- idle


class IdleClient:
    """The load generator in idle mode: opens sessions, holds them, closes them on request."""

    def __init__(self, ctx: WsContext, name: str, url: str, sessions: int) -> None:
        self.supervisor = ctx.base.supervisor
        self.status_path = ctx.base.workdir / f"{name}-{time.monotonic_ns()}.json"
        self.load = self.supervisor.start(name, _load_argv(
            ctx, "idle", url, self.status_path, "--sessions", str(sessions), "--open-concurrency", "100",
            "--connect-timeout", str(self.open_limit(sessions)), "--drain", "30", "--hold", "900"), cwd=WS_DIR)

    @staticmethod
    def open_limit(sessions: int) -> float:
        """The longest opening ``sessions`` sessions may take: generous (a TLS handshake in
        Python costs a few ms of CPU)."""
        return 60.0 + sessions / 50.0

    def wait_open(self, limit: float) -> dict[str, Any]:
        """Wait until every session was attempted; the status then."""
        deadline = time.monotonic() + limit + 10
        while time.monotonic() < deadline:
            status = _read_json(self.status_path)
            if status is not None:
                return status
            if not self.load.alive:
                raise BenchError(f"the idle load generator exited with status {self.load.process.returncode}:\n"
                                 f"{self.load.log_tail()}")
            time.sleep(0.2)
        raise BenchError(f"the idle sessions were not open within {limit:g}s:\n{self.load.log_tail()}")

    def close(self) -> dict[str, Any] | None:
        """Close every session (SIGUSR2), wait for the load generator to exit; its last status."""
        if self.load.alive:
            os.kill(self.load.process.pid, signal.SIGUSR2)
            _finish(self.load.process, 60)
        self.supervisor.stop(self.load)
        status = _read_json(self.status_path)
        return status if status is not None and status.get("phase") == "closed" else None


def measure_idle(target: WsTarget, ctx: WsContext, port: int, args: argparse.Namespace) -> IdleOutcome:
    """Start ``target`` with TLS (unless --idle-plain); read its memory before, then with
    ``--idle-sessions`` sessions open and after they closed, ``--idle-rounds`` times."""
    assert target.start is not None
    tls = not args.idle_plain
    outcome = IdleOutcome(target, f"{'wss' if tls else 'ws'}://127.0.0.1:{port}{WS_PATH}", args.idle_sessions)
    supervisor = ctx.base.supervisor
    server: Server | None = None
    try:
        server = target.start(ctx, port, tls)
        wait_until_serving(server, port, BODY, tls=tls)
        pgid = server.process.pid
        outcome.nofile_limit = ", ".join(open_files_limit(pid) for pid in group_pids(pgid))
        warm = IdleClient(ctx, f"idle-warmup-{target.name}", outcome.url, IDLE_WARMUP_SESSIONS)
        try:
            warm.wait_open(IdleClient.open_limit(IDLE_WARMUP_SESSIONS))
        finally:
            warm.close()
        outcome.rss_before_kib = settled_rss_kib(pgid)
        print(f"  {outcome.rss_before_kib / 1024:.1f} MiB before", flush=True)
        for number in range(1, args.idle_rounds + 1):
            idle_round = IdleRound()
            outcome.rounds.append(idle_round)
            client = IdleClient(ctx, f"idle-{target.name}", outcome.url, args.idle_sessions)
            try:
                idle_round.open_status = client.wait_open(IdleClient.open_limit(args.idle_sessions))
                idle_round.rss_open_kib = settled_rss_kib(pgid, minimum=3.0)
            finally:
                idle_round.final_status = client.close()
            if idle_round.final_status is None:
                raise BenchError(f"the idle sessions were not closed in time:\n{client.load.log_tail()}")
            idle_round.rss_closed_kib = settled_rss_kib(pgid)
            print(f"  round {number}: {idle_round.opened} open in {idle_round.open_status['open_seconds']:.1f}s: "
                  f"{idle_round.rss_open_kib / 1024:.1f} MiB; after closing them "
                  f"{idle_round.rss_closed_kib / 1024:.1f} MiB", flush=True)
        time.sleep(SETTLE_SECONDS)
    except BenchError as e:
        outcome.error = str(e)
    finally:
        if server is not None:
            outcome.server_alive = server.alive
            supervisor.stop(server)
            outcome.log_notes = log_notes(server.log_text())
    return outcome


# -- running everything


def measure_all(targets: list[WsTarget], ctx: WsContext, args: argparse.Namespace) -> tuple[
        list[RelayOutcome], list[IdleOutcome], list[str]]:
    """Start the upstream; run the relay rounds, then the idle runs; stop the upstream."""
    ports = free_ports(len(targets))
    upstream = start_echo_upstream(ctx)
    wait_until_serving(upstream, ctx.base.upstream_port, BODY)
    relays: list[RelayOutcome] = []
    if args.sessions:
        rounds: dict[str, list[RelayOutcome]] = {target.name: [] for target in targets}
        for number in range(1, args.rounds + 1):
            for target, port in zip(targets, ports):
                counter = f"round {number}/{args.rounds}: " if args.rounds > 1 else ""
                print(f"{counter}relay: {target.name}: {target.description} ...", flush=True)
                port = ctx.base.upstream_port if target.start is None else port
                outcome = measure_relay(target, ctx, upstream, port, args)
                for retry in range(1, args.retries + 1):
                    # Only a run whose one problem is the disturbance is measured again.
                    if not outcome.disturbed() or len(outcome.problems()) > 1:
                        break
                    print(f"  disturbed: other processes used {outcome.cpu['other']:.2f} cores; waiting for "
                          f"quiet, then again ({retry}/{args.retries}) ...", flush=True)
                    wait_for_quiet(args.wait_for_quiet)
                    discarded = outcome
                    outcome = measure_relay(target, ctx, upstream, port, args)
                    outcome.log_notes += [f"(discarded disturbed run) {note}" for note in discarded.log_notes]
                rounds[target.name].append(outcome)
                if outcome.mps is not None:
                    print(f"  {outcome.mps:,.0f} messages/s", flush=True)
                if not upstream.alive:
                    raise BenchError(f"the upstream died:\n{upstream.log_tail()}")
        relays = [median_round(rounds[target.name]) for target in targets]
    idles: list[IdleOutcome] = []
    if args.idle_sessions:
        for target, port in zip(targets, ports):
            if target.start is None:
                continue
            print(f"idle: {target.name}: {args.idle_sessions} wss sessions ...", flush=True)
            idles.append(measure_idle(target, ctx, port, args))
            if not upstream.alive:
                raise BenchError(f"the upstream died:\n{upstream.log_tail()}")
    ctx.base.supervisor.stop(upstream)
    return relays, idles, log_notes(upstream.log_text())


# -- reporting


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def relay_ratios(outcomes: list[RelayOutcome]) -> dict[str, dict[str, float | None]]:
    """For each target: relayed messages/s relative to direct and to nginx."""
    by_name = {o.target.name: o.mps for o in outcomes}
    return {o.target.name: {"vs_direct": _ratio(o.mps, by_name.get("direct")),
                            "vs_nginx": _ratio(o.mps, by_name.get("nginx"))} for o in outcomes}


def relay_table(outcomes: list[RelayOutcome]) -> str:
    """The relay results as a Markdown table."""
    ratio = relay_ratios(outcomes)
    rows = ["| target | round trips/s | relayed msg/s | p50 | p99 | vs direct | vs nginx "
            "| CPU: proxy / upstream / load / other | problems |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for o in outcomes:
        r, result = ratio[o.target.name], o.result or {}
        latency = result.get("latency", {})
        rtps = "-" if o.mps is None else f"{result['round_trips_per_second']:,.0f}"
        mps = "-" if o.mps is None else f"{o.mps:,.0f}"
        cpu = " / ".join(f"{o.cpu[name]:.2f}" if name in o.cpu else "-"
                         for name in ("proxy", "upstream", "load", "other")) if o.cpu else "-"
        problems = "; ".join(p.splitlines()[0] for p in o.problems()) or "none"
        rows.append(f"| {o.target.name} | {rtps} | {mps} | {_ms(latency.get('p50_ms'))} "
                    f"| {_ms(latency.get('p99_ms'))} | {_x(r['vs_direct'])} | {_x(r['vs_nginx'])} | {cpu} "
                    f"| {problems} |")
    return "\n".join(rows)


def rounds_table(outcomes: list[RelayOutcome]) -> str:
    """Relayed messages/s of every round (and, for the proxies, the ratio to nginx in the same round)."""
    count = max((len(o.round_mps) for o in outcomes), default=0)
    nginx = next((o.round_mps for o in outcomes if o.target.name == "nginx"), [])
    rows = ["| target |" + "".join(f" round {n} |" for n in range(1, count + 1)),
            "|---|" + "---:|" * count]
    for o in outcomes:
        cells = []
        for n, mps in enumerate(o.round_mps):
            ratio = _ratio(mps, nginx[n] if n < len(nginx) else None)
            shown = "-" if mps is None else f"{mps:,.0f}"
            if ratio is not None and o.target.name not in ("nginx", "direct"):
                shown += f" ({ratio:.2f}x)"
            cells.append(f" {shown} |")
        rows.append(f"| {o.target.name} |" + "".join(cells))
    return "\n".join(rows)


def idle_table(outcomes: list[IdleOutcome]) -> str:
    """The idle results as a Markdown table (the RSS columns of rounds after the first: "open / closed")."""
    rounds = max((len(o.rounds) for o in outcomes), default=1)
    later = "".join(f" RSS round {n}: open / closed |" for n in range(2, rounds + 1))
    rows = ["| target | sessions open | RSS before | RSS with sessions open | per session | "
            f"RSS after closing |{later} time to open | problems |",
            "|---|---:|---:|---:|---:|---:|" + "---:|" * (rounds - 1) + "---:|---|"]
    for o in outcomes:
        first, per = o.first, o.kib_per_session
        opened = f"{first.opened:,}" if first.open_status else "-"
        seconds = f"{first.open_status['open_seconds']:.1f} s" if first.open_status else "-"
        extra = "".join(
            f" {_mib(r.rss_open_kib)} / {_mib(r.rss_closed_kib)} |" if r is not None else " - |"
            for r in [o.rounds[n] if n < len(o.rounds) else None for n in range(1, rounds)])
        problems = "; ".join(p.splitlines()[0] for p in o.problems()) or "none"
        rows.append(f"| {o.target.name} | {opened} | {_mib(o.rss_before_kib)} | {_mib(first.rss_open_kib)} "
                    f"| {'-' if per is None else f'{per:.1f} KiB'} | {_mib(first.rss_closed_kib)} |{extra} "
                    f"{seconds} | {problems} |")
    return "\n".join(rows)


def check_targets(relays: list[RelayOutcome], idles: list[IdleOutcome]) -> list[dict[str, Any]]:
    """The issue's targets, each PASS, MISS or SKIP (not measured)."""
    checks = []
    by_name = {o.target.name: o for o in relays}
    for numerator, denominator, minimum in RELAY_CHECKS:
        top, bottom = by_name.get(numerator), by_name.get(denominator)
        value = _ratio(top.mps if top else None, bottom.mps if bottom else None)
        clean = top is not None and bottom is not None and not top.problems() and not bottom.problems()
        verdict = "SKIP" if value is None else ("PASS" if value >= minimum else "MISS")
        checks.append({"check": f"{numerator}/{denominator} relayed messages/s >= {minimum:g}", "value": value,
                       "shown": "-" if value is None else f"{value:.3f}x", "verdict": verdict, "clean": clean})
    idle_by_name = {o.target.name: o for o in idles}
    for name, maximum in IDLE_CHECKS:
        o = idle_by_name.get(name)
        value = o.kib_per_session if o else None
        verdict = "SKIP" if value is None else ("PASS" if value <= maximum else "MISS")
        checks.append({"check": f"{name}: memory per idle wss session <= {maximum:g} KiB", "value": value,
                       "shown": "-" if value is None else f"{value:.1f} KiB", "verdict": verdict,
                       "clean": o is not None and not o.problems()})
    return checks


def check_lines(checks: list[dict[str, Any]]) -> list[str]:
    """One line per check: verdict, what, measured value (and a warning if a run had problems)."""
    lines = []
    for check in checks:
        note = "" if check["clean"] or check["verdict"] == "SKIP" else "  (a run had problems: figures suspect)"
        lines.append(f"{check['verdict']}: {check['check']}: {check['shown']}{note}")
    return lines


def machine_info(nginx: str, node: str) -> dict[str, Any]:
    """What the benchmark ran on, for the results."""
    from importlib.metadata import version

    import twisted

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ws_version = json.loads((WS_DIR / "node_modules" / "ws" / "package.json").read_text())["version"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "autobahn": version("autobahn"),
        "nginx": _version_of([nginx, "-v"]),
        "node": _version_of([node, "--version"]),
        "ws": ws_version,
        "openssl": _version_of(["openssl", "version"]),
        "chatproxy_commit": _git("rev-parse", "--short", "HEAD").strip() or "unknown",
        "load_average_at_start": os.getloadavg(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """The machine and software versions in one line."""
    source = machine["chatproxy_source"]
    return (f"{machine['cpus']} x {machine['cpu_model']}, {machine['kernel']}; Python {machine['python']}, "
            f"Twisted {machine['twisted']}, Autobahn {machine['autobahn']}; {machine['nginx']}; "
            f"node {machine['node']}, ws {machine['ws']}; chatproxy: {source}")


def print_report(relays: list[RelayOutcome], idles: list[IdleOutcome], checks: list[dict[str, Any]],
                 upstream_notes: list[str], machine: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the tables, the checks, and the notable lines of the servers' logs."""
    print(f"\n{machine['date']}: {machine_line(machine)}")
    if relays:
        rounds = f"; median of {args.rounds} rounds" if args.rounds > 1 else ""
        print(f"\nrelay: {args.sessions} sessions, one {args.message_size}-byte text message in flight in each, "
              f"{'wss to the proxies' if args.tls else 'ws'}; {args.duration:g}s per target "
              f"(after {WARMUP_SECONDS:g}s warm-up){rounds}; relayed msg/s = 2 x round trips/s; "
              "CPU in cores during the measured run\n")
        print(relay_table(relays))
        if args.rounds > 1:
            print("\nrelayed messages/s in each round (proxies: ratio to nginx in the same round):\n")
            print(rounds_table(relays))
    if idles:
        kind = "ws sessions (plain listener)" if args.idle_plain else "wss sessions (TLS listener)"
        print(f"\nidle: {args.idle_sessions} {kind} held open without traffic, {args.idle_rounds} round(s); "
              "RSS of the proxy's processes; per session = (with sessions open - before) / sessions open, "
              "in round 1\n")
        print(idle_table(idles))
    print()
    print("\n".join(check_lines(checks)))
    failures = [(o.target.name, o.error) for o in relays] + [(o.target.name, o.error) for o in idles]
    for name, error in failures:
        if error:
            print(f"\n{name} failed: {error}")
    notes = ([(f"{o.target.name} (relay)", o.log_notes) for o in relays]
             + [(f"{o.target.name} (idle)", o.log_notes) for o in idles] + [("upstream", upstream_notes)])
    for name, lines in notes:
        if lines:
            print(f"\nnotable lines in the {name} log:")
            print("\n".join(f"    {line}" for line in lines))


def save(relays: list[RelayOutcome], idles: list[IdleOutcome], checks: list[dict[str, Any]],
         upstream_notes: list[str], machine: dict[str, Any], args: argparse.Namespace, log_dir: Path) -> Path:
    """Write the results as JSON to bench/results/, with the servers' logs beside it."""
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS_DIR / f"ws-run-{stamp}-logs"
    shutil.copytree(log_dir, logs)
    ratio = relay_ratios(relays)
    data = {
        "machine": machine,
        "settings": {"duration": args.duration, "sessions": args.sessions, "message_bytes": args.message_size,
                     "idle_sessions": args.idle_sessions, "idle_rounds": args.idle_rounds,
                     "idle_plain": args.idle_plain, "rounds": args.rounds, "retries": args.retries, "tls": args.tls,
                     "warmup": WARMUP_SECONDS, "drain": DRAIN_SECONDS, "idle_warmup_sessions": IDLE_WARMUP_SESSIONS},
        "relay": [
            {"target": o.target.name, "description": o.target.description, "url": o.url, "load": o.result,
             "server_alive": o.server_alive, "load_status": o.load_status, "error": o.error,
             "problems": o.problems(), "log_notes": o.log_notes, "round_relayed_messages_per_second": o.round_mps,
             **ratio[o.target.name]}
            for o in relays
        ],
        "idle": [
            {"target": o.target.name, "description": o.target.description, "url": o.url, "sessions": o.sessions,
             "rss_before_kib": o.rss_before_kib, "kib_per_session": o.kib_per_session,
             "rounds": [{"rss_open_kib": r.rss_open_kib, "rss_closed_kib": r.rss_closed_kib,
                         "open_status": r.open_status, "final_status": r.final_status} for r in o.rounds],
             "open_files_limit": o.nofile_limit,
             "server_alive": o.server_alive, "error": o.error, "problems": o.problems(), "log_notes": o.log_notes}
            for o in idles
        ],
        "upstream_log_notes": upstream_notes,
        "checks": checks,
        "relay_table": relay_table(relays),
        "rounds_table": rounds_table(relays),
        "idle_table": idle_table(idles),
        "check_lines": check_lines(checks),
        "logs": str(logs.relative_to(BENCH_DIR.parent)),
    }
    path = RESULTS_DIR / f"ws-run-{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# -- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of relay measurement per target")
    parser.add_argument("--sessions", type=int, default=100,
                        help="relay sessions, one message in flight in each (0: no relay runs)")
    parser.add_argument("--message-size", type=int, default=100, help="bytes per relayed text message (>= 40)")
    parser.add_argument("--idle-sessions", type=int, default=5000,
                        help="idle wss sessions held open for the memory figure (0: no idle runs)")
    parser.add_argument("--idle-rounds", type=int, default=2,
                        help="open and close the idle sessions this many times (memory still growing in later "
                             "rounds would be a leak)")
    parser.add_argument("--idle-plain", action="store_true",
                        help="idle sessions over plain ws instead of wss (to tell the cost of TLS apart)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="relay: measure every target this many times, interleaved, and report the median round")
    parser.add_argument("--tls", action="store_true", help="relay: the proxies listen with TLS (wss); "
                        "direct stays plain ws")
    parser.add_argument("--wait-for-quiet", type=float, default=60.0, metavar="SECONDS",
                        help="wait up to this long for other processes to stop using the CPUs before starting")
    parser.add_argument("--retries", type=int, default=2,
                        help="relay: measure a target again (after waiting for quiet) when other processes used "
                             "the CPUs during its run, up to this many times")
    parser.add_argument("--only", help="comma-separated targets to run: " + ", ".join(t.name for t in WS_TARGETS))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--chatproxy-at", metavar="REV",
                        help="run chatproxy as committed at this git revision (exported with git archive) "
                             "instead of the working tree")
    source.add_argument("--chatproxy-src", metavar="DIR", type=Path,
                        help="run chatproxy from DIR (holding chatproxy/ and twisted/plugins/, e.g. a changed "
                             "copy) instead of the working tree")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.sessions < 0 or args.idle_sessions < 0 or args.rounds < 1 or args.idle_rounds < 1:
        parser.error("need --duration > 0, --sessions >= 0, --idle-sessions >= 0, --rounds >= 1, --idle-rounds >= 1")
    if args.chatproxy_src is not None and not (args.chatproxy_src / "chatproxy" / "__init__.py").exists():
        parser.error(f"--chatproxy-src: no chatproxy package in {args.chatproxy_src}")
    if args.message_size < 40:
        parser.error("need --message-size >= 40 (the message carries a session and sequence number)")
    return args


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 if every run was clean, 1 otherwise."""
    targets = select_targets(WS_TARGETS, args.only)
    nginx = _find_nginx()
    if nginx is None and any(t.name == "nginx" for t in targets):
        raise BenchError("nginx is not installed (apt-get install nginx-light, or run bench/run.py once)")
    node = find_node()
    # Every process started inherits this limit: the proxies hold two connections per session.
    limits = raise_open_files_limit(2 * max(args.idle_sessions, args.sessions) + 1024)
    machine = machine_info(nginx or "nginx", node)
    machine["open_files_limit"] = list(limits)
    machine["background_load_at_start"] = round(wait_for_quiet(args.wait_for_quiet), 2)
    with tempfile.TemporaryDirectory(prefix="chatproxy-ws-bench-") as temp:
        workdir = Path(temp)
        os.chmod(workdir, 0o755)  # nginx workers may run as another user
        log_dir = workdir / "logs"
        log_dir.mkdir()
        chatproxy_path: list[Path] | None = None
        if args.chatproxy_at:
            commit = export_chatproxy(args.chatproxy_at, workdir / "chatproxy-src")
            chatproxy_path = chatproxy_pythonpath(workdir / "chatproxy-src", workdir / "shim")
            machine["chatproxy_source"] = f"commit {commit} (exported, pure Python; --chatproxy-at {args.chatproxy_at})"
        elif args.chatproxy_src:
            chatproxy_path = chatproxy_pythonpath(args.chatproxy_src, workdir / "shim")
            machine["chatproxy_source"] = f"{args.chatproxy_src.resolve()} (--chatproxy-src)"
        else:
            modified = [line[3:] for line in _git("status", "--porcelain", "--", "chatproxy", "twisted").splitlines()]
            machine["chatproxy_source"] = (f"working tree at {machine['chatproxy_commit']}"
                                           + (f" + uncommitted changes to {', '.join(modified)}" if modified else "")
                                           + f" ({describe_build()})")
        supervisor = Supervisor(log_dir)
        try:
            certificate, key = make_certificate(workdir)
            base = Context(supervisor, workdir, nginx or "nginx", free_ports(1)[0], certificate, key)
            ctx = WsContext(base, node, 2 * max(args.idle_sessions, args.sessions), chatproxy_path)
            relays, idles, upstream_notes = measure_all(targets, ctx, args)
        finally:
            supervisor.stop_all()
        checks = check_targets(relays, idles)
        print_report(relays, idles, checks, upstream_notes, machine, args)
        path = save(relays, idles, checks, upstream_notes, machine, args, log_dir)
    print(f"\nresults: {path.relative_to(BENCH_DIR.parent)}")
    clean = all(not o.problems() for o in relays) and all(not o.problems() for o in idles)
    return 0 if clean else 1


def main() -> None:
    """Entry point (see :func:`processes.bench_main`)."""
    bench_main(parse_args, run)


if __name__ == "__main__":
    main()
