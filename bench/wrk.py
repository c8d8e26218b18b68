"""Running ``wrk`` and reading its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LATENCY_LINE = re.compile(r"^\s*(50|75|90|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RPS_LINE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL_LINE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass
class WrkResult:
    """What one wrk run measured (latencies in milliseconds)."""

    requests_per_second: float = 0.0
    requests: int = 0
    seconds: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("connect", "read", "write", "timeout"), 0))
    exit_status: int = 0
    output: str = ""

    @property
    def p50_ms(self) -> float | None:
        """The median latency, if wrk reported it."""
        return self.latency_ms.get("50")

    @property
    def p99_ms(self) -> float | None:
        """The 99th-percentile latency, if wrk reported it."""
        return self.latency_ms.get("99")

    def problems(self) -> list[str]:
        """Everything that makes this run's figures suspect (empty when clean)."""
        found: list[str] = []
        if self.exit_status != 0:
            found.append(f"wrk exited with status {self.exit_status}")
        if self.requests == 0 or self.requests_per_second == 0.0:
            found.append("no requests completed")
        if self.non_2xx_3xx:
            found.append(f"{self.non_2xx_3xx} non-2xx/3xx responses")
        errors = {kind: n for kind, n in self.socket_errors.items() if n}
        if errors:
            found.append("socket errors: " + ", ".join(f"{kind} {n}" for kind, n in errors.items()))
        return found

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view, including the derived fields."""
        data = asdict(self)
        data["p50_ms"] = self.p50_ms
        data["p99_ms"] = self.p99_ms
        data["problems"] = self.problems()
        return data


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_wrk_output(output: str, exit_status: int = 0) -> WrkResult:
    """Read a ``wrk --latency`` report into a :class:`WrkResult`."""
    result = WrkResult(exit_status=exit_status, output=output)
    if match := _RPS_LINE.search(output):
        result.requests_per_second = float(match.group(1))
    if match := _TOTAL_LINE.search(output):
        result.requests = int(match.group(1))
        result.seconds = _to_ms(match.group(2), match.group(3)) / 1000.0
    for percentile, value, unit in _LATENCY_LINE.findall(output):
        result.latency_ms[percentile] = _to_ms(value, unit)
    if match := _SOCKET_ERRORS.search(output):
        kinds = ("connect", "read", "write", "timeout")
        result.socket_errors = {kind: int(n) for kind, n in zip(kinds, match.groups())}
    if match := _NON_2XX.search(output):
        result.non_2xx_3xx = int(match.group(1))
    return result


def run_wrk(url: str, *, duration: float, connections: int, threads: int, wrk: str = "wrk",
            cpus: str | None = None) -> WrkResult:
    """Drive ``url`` with wrk for ``duration`` seconds and return what it measured;
    ``cpus``: pin wrk to these CPUs (a ``taskset -c`` list).

    The subprocess is killed if this is interrupted (``subprocess.run`` does
    that on any exception) or if wrk overruns its duration by 30 seconds.
    """
    argv = [wrk, "--latency", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s", url]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30,
                                   stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as e:
        output = e.stdout if isinstance(e.stdout, str) else ""
        return parse_wrk_output(output + "\n(wrk did not finish in time)", exit_status=-1)
    return parse_wrk_output(completed.stdout + completed.stderr, exit_status=completed.returncode)
