"""``rate_limit`` with a shared store (``store = redis://…``): the store
options, the failure policy, the Lua token bucket against a real
``redis-server`` (Debian's, started by the test on a free loopback port with
its own configuration and directory), two filters and two ``twistd``
processes sharing one limit, expiry of many keys, Redis stopped, frozen and
restarted, a password and ``rediss://``."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from chatproxy.config import ConfigError, load_config
from chatproxy.filters import FilterOptionError, Metric, Refuse
from chatproxy.filters.rate_limit import STORE_UNAVAILABLE, RateLimit, rate_limit
from chatproxy.filters.rate_limit_store import StoreAddress, StoreHealth, StoreSettings, bucket_name, parse_store
from chatproxy.filters.redis_buckets import SCRIPT_SHA, RedisBuckets, StoreError
from chatproxy.proxy.validate import validate
from chatproxy.testing import build_filter, request_head
from conftest import PKI, basic_config, free_port, require_tool, stop_process, wait_for_port, wait_until

# ---------------------------------------------------------------------------
# Helpers


def head(client: str = "192.0.2.1") -> Any:
    """A request head from ``client``."""
    return request_head("/chat", host="chat.example.test", client=client)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FailingStore:
    """A shared store that fails every request with ``kind`` (or answers ``wait``)."""

    def __init__(self, kind: str | None = "connection", wait: float = 0.0) -> None:
        self.kind = kind
        self.wait = wait
        self.names: list[str] = []

    def take(self, name: str, rate: float, burst: int, timeout: float) -> defer.Deferred[float]:
        """Record the bucket's name; fail with the kind, or answer the wait."""
        self.names.append(name)
        if self.kind is None:
            return defer.succeed(self.wait)
        return defer.fail(StoreError(self.kind, "test"))


def settled(result: Any) -> Any:
    """The value of an already fired Deferred (or the value itself)."""
    if not isinstance(result, defer.Deferred):
        return result
    found: list[Any] = []
    result.addBoth(found.append)
    assert found, "the Deferred has not fired"
    if isinstance(found[0], Exception) or hasattr(found[0], "raiseException"):
        found[0].raiseException()
    return found[0]


def metric_values(flt: RateLimit) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The filter's metrics by (name, labels)."""
    return {(m.name, m.labels): m.value for m in flt.metrics()}


# ---------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("text, expected", [
    ("local", None),
    ("LOCAL", None),
    ("redis://127.0.0.1", StoreAddress("127.0.0.1", 6379, 0)),
    ("redis://127.0.0.1:7000/3", StoreAddress("127.0.0.1", 7000, 3)),
    ("redis://redis.example.net:6380/", StoreAddress("redis.example.net", 6380, 0)),
    ("rediss://redis.example.net/2", StoreAddress("redis.example.net", 6379, 2, tls=True)),
    ("redis://[::1]:7001/1", StoreAddress("::1", 7001, 1)),
    ("redis://chatproxy@127.0.0.1:7000/0", StoreAddress("127.0.0.1", 7000, 0, username="chatproxy")),
])
def test_parse_store(text: str, expected: StoreAddress | None) -> None:
    """``store`` is ``local`` or a redis:// / rediss:// URL with host, port (6379)
    and database number (0), and an optional ACL user name."""
    assert parse_store(text) == expected


STORE = {"rate": "1", "burst": "2", "store": "redis://127.0.0.1:6379/0"}

STORE_ERRORS = [
    ({"store": "memcached://127.0.0.1"}, "store", "expected local, redis://host:port/db"),
    ({"store": "redis://:secret@127.0.0.1"}, "store", "no password in the URL"),
    ({"store": "redis://u:secret@127.0.0.1"}, "store", "no password in the URL"),
    ({"store": "redis://127.0.0.1:99999"}, "store", "port number"),
    ({"store": "redis://127.0.0.1/db1"}, "store", "database number"),
    ({"store": "redis://127.0.0.1/0?timeout=1"}, "store", "without ?query"),
    ({"store": "redis://127.0.0.1", "store_ca": "/etc/hostname"}, "store_ca", "only with store = rediss://"),
    ({"store": "rediss://127.0.0.1", "store_ca": "/nonexistent/ca.pem"}, "store_ca", "no such file"),
    ({"store": "rediss://127.0.0.1", "store_ca": "ca.pem"}, "store_ca", "absolute path"),
    ({"store": "redis://127.0.0.1", "store_password_file": "/nonexistent/pw"}, "store_password_file",
     "no such file"),
    ({"store": "redis://127.0.0.1", "store_password_env": "CHATPROXY_TEST_UNSET_VARIABLE"}, "store_password_env",
     "is not set or empty"),
    ({"store": "redis://127.0.0.1", "store_password_env": "X", "store_password_file": "/etc/hostname"},
     "store_password_env", "not both"),
    ({"store": "redis://127.0.0.1", "store_timeout": "0"}, "store_timeout", "greater than zero"),
    ({"store": "redis://127.0.0.1", "store_timeout": "1m"}, "store_timeout", "at most 10s"),
    ({"store": "redis://127.0.0.1", "on_store_error": "panic"}, "on_store_error", "local, allow or deny"),
    ({"on_store_error": "allow"}, "on_store_error", "has no effect with store = local"),
    ({"store": "local", "store_timeout": "1s"}, "store_timeout", "has no effect with store = local"),
]


@pytest.mark.parametrize("options, option, fragment", STORE_ERRORS,
                         ids=[f"{e[1]}-{i}" for i, e in enumerate(STORE_ERRORS)])
def test_store_option_errors_name_the_option(options: dict[str, str], option: str, fragment: str) -> None:
    """A bad store option raises FilterOptionError naming that option."""
    with pytest.raises(FilterOptionError) as info:
        rate_limit.build({"rate": "1", **options})
    assert info.value.option == option
    assert fragment in info.value.message, info.value.message


def test_store_settings_defaults_and_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults: 250 ms, on_store_error local; the password comes from a file
    (its final newline dropped) or an environment variable and is never shown."""
    secret = tmp_path / "redis.password"
    secret.write_text("s3cret\n")
    flt = build_filter(rate_limit, {**STORE, "store_password_file": "redis.password"}, directory=tmp_path)
    assert flt.store is not None
    assert (flt.store.timeout, flt.store.on_error, flt.store.password) == (0.25, "local", "s3cret")
    assert "s3cret" not in repr(flt.store)
    monkeypatch.setenv("CHATPROXY_TEST_REDIS_PASSWORD", "from-env")
    flt = rate_limit.build({**STORE, "store_password_env": "CHATPROXY_TEST_REDIS_PASSWORD", "store_timeout": "80ms",
                            "on_store_error": "DENY"})
    assert flt.store is not None
    assert (flt.store.timeout, flt.store.on_error, flt.store.password) == (0.08, "deny", "from-env")
    assert rate_limit.build({"rate": "1"}).store is None


def test_prefix_is_the_section_and_errors_name_file_section_option(tmp_path: Path) -> None:
    """Through the configuration loader the bucket names start with
    ``chatproxy:rl:<section>`` (``store_prefix`` overrides it), and a bad
    store option is reported with the file, the section and the option."""
    path = tmp_path / "chatproxy.ini"
    sections = ("[filter:per-client]\nuse = rate_limit\nrate = 1\nstore = redis://127.0.0.1:9/0\n\n"
                "[filter:other]\nuse = rate_limit\nrate = 1\nstore = redis://127.0.0.1:9/0\n"
                "store_prefix = staging:rl:other\n")
    path.write_text(basic_config("http://127.0.0.1:9", 8080, route="filters = per-client, other", extra=sections))
    filters = validate(load_config([path]), {"rate_limit": rate_limit})
    assert filters["per-client"].store.prefix == "chatproxy:rl:per-client"
    assert filters["other"].store.prefix == "staging:rl:other"
    assert filters["per-client"].shared is filters["other"].shared  # one connection for one server
    path.write_text(basic_config("http://127.0.0.1:9", 8080, route="filters = limit", extra=(
        "[filter:limit]\nuse = rate_limit\nrate = 1\nstore = redis://:pw@127.0.0.1/0\n")))
    with pytest.raises(ConfigError) as info:
        validate(load_config([path]), {"rate_limit": rate_limit})
    assert (info.value.file, info.value.section, info.value.option) == (str(path), "filter:limit", "store")


def test_bucket_names_keep_kinds_apart() -> None:
    """A bucket's name is the prefix and a digest of the key's kind and value:
    the same key names the same bucket, a header value equal to an address
    does not name that address's bucket."""
    one = bucket_name("chatproxy:rl:limit", ("client", "192.0.2.1"))
    assert one == bucket_name("chatproxy:rl:limit", ("client", "192.0.2.1"))
    assert one.startswith("chatproxy:rl:limit:") and len(one.rsplit(":", 1)[1]) == 32
    assert one != bucket_name("chatproxy:rl:limit", ("header", "192.0.2.1"))
    assert one != bucket_name("chatproxy:rl:other", ("client", "192.0.2.1"))


# ---------------------------------------------------------------------------
# The failure policy (a store that fails at once)


def store_filter(on_error: str, store: Any, clock: FakeClock | None = None, **options: str) -> RateLimit:
    """A rate_limit filter with a shared store (``store`` stands in for it)."""
    settings = StoreSettings(StoreAddress("127.0.0.1"), on_error=on_error, prefix="chatproxy:rl:test")
    return RateLimit(float(options.get("rate", 1)), int(options.get("burst", 2)), clock=clock or FakeClock(),
                     store=settings, shared=store)


def test_store_error_local_falls_back_to_the_process_bucket() -> None:
    """``on_store_error = local``: while the store fails, the in-process bucket
    decides (burst 2 then 429), counted by kind and by fallback decision."""
    flt = store_filter("local", FailingStore("timeout"))
    results = [settled(flt.request(head())) for _ in range(3)]
    assert results[:2] == [None, None]
    assert isinstance(results[2], Refuse) and results[2].status == 429
    values = metric_values(flt)
    assert values[("chatproxy_rate_limit_store_errors", (("kind", "timeout"),))] == 3
    assert values[("chatproxy_rate_limit_store_errors", (("kind", "connection"),))] == 0
    assert values[("chatproxy_rate_limit_fallback_decisions", (("policy", "local"), ("outcome", "passed")))] == 2
    assert values[("chatproxy_rate_limit_fallback_decisions", (("policy", "local"), ("outcome", "refused")))] == 1


def test_store_error_allow_and_deny() -> None:
    """``allow`` passes every request while the store fails; ``deny`` refuses
    each with 503 and ``Retry-After: 1`` (the limit cannot be checked)."""
    allow = store_filter("allow", FailingStore("connection"))
    assert [settled(allow.request(head())) for _ in range(5)] == [None] * 5
    deny = store_filter("deny", FailingStore("script"))
    assert settled(deny.request(head())) == STORE_UNAVAILABLE
    assert STORE_UNAVAILABLE.status == 503 and STORE_UNAVAILABLE.headers == ((b"Retry-After", b"1"),)
    assert metric_values(deny)[("chatproxy_rate_limit_fallback_decisions",
                                (("policy", "deny"), ("outcome", "refused")))] == 1


def test_store_answers_decide_and_are_timed() -> None:
    """When the store answers, its wait decides (0: pass; else 429 with the
    wait rounded up) and the latency is counted; the local buckets stay empty."""
    clock = FakeClock()
    store = FailingStore(None, wait=2.2)
    flt = store_filter("local", store, clock)
    refusal = settled(flt.request(head()))
    assert refusal == Refuse(429, "rate limit exceeded", ((b"Retry-After", b"3"),))
    store.wait = 0.0
    assert settled(flt.request(head())) is None
    assert store.names[0] == bucket_name("chatproxy:rl:test", ("client", "192.0.2.1"))
    assert len(flt.buckets) == 0
    assert metric_values(flt)[("chatproxy_rate_limit_store_requests", ())] == 2


def test_store_health_changes_once() -> None:
    """Health reports only its changes: the first failure, then the first answer."""
    health = StoreHealth()
    assert [health.failed("timeout"), health.failed("connection"), health.answered(), health.answered(),
            health.failed("script")] == [True, False, True, False, True]


def test_local_store_has_no_store_metrics() -> None:
    """With ``store = local`` the filter reports no store metrics."""
    assert list(rate_limit.build({"rate": "1"}).metrics()) == []
    assert all(isinstance(m, Metric) for m in store_filter("local", FailingStore()).metrics())


# ---------------------------------------------------------------------------
# A real redis-server


class RedisServer:
    """Debian's ``redis-server`` on a free loopback port, with its own
    configuration and directory (nothing saved), stopped at the end."""

    def __init__(self, directory: Path, *, password: str | None = None, tls: PKI | None = None) -> None:
        self.binary = require_tool("redis-server", "redis-server")
        self.cli = require_tool("redis-cli", "redis-tools")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.tls = tls
        lines = ["bind 127.0.0.1", f"dir {directory}", 'save ""', "appendonly no", "daemonize no",
                 f"logfile {directory / 'redis.log'}", "databases 4"]
        if tls is not None:
            self.plain_port = free_port()  # for redis-cli, which the checks use without TLS
            lines += [f"port {self.plain_port}", f"tls-port {self.port}", f"tls-cert-file {tls.cert}",
                      f"tls-key-file {tls.key}", f"tls-ca-cert-file {tls.ca}", "tls-auth-clients no"]
        else:
            self.plain_port = self.port
            lines.append(f"port {self.port}")
        if password is not None:
            lines.append(f"requirepass {password}")
        self.config = directory / "redis.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (or restart) the server and wait (bounded) until it listens."""
        self.process = subprocess.Popen([self.binary, str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        wait_for_port(self.plain_port, process=self.process)
        wait_for_port(self.port, process=self.process)

    def stop(self) -> None:
        """Stop the server (SIGTERM, bounded wait, then SIGKILL)."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
        stop_process(process)

    def freeze(self, frozen: bool) -> None:
        """SIGSTOP the server (connections stay open, nothing is answered) or SIGCONT it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def call(self, *args: str) -> str:
        """One command through ``redis-cli`` (an independent client): its raw answer."""
        command = [self.cli, "-h", "127.0.0.1", "-p", str(self.plain_port), "--raw"]
        env = dict(os.environ)
        if self.password is not None:
            env["REDISCLI_AUTH"] = self.password
        done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=10, env=env, check=True)
        return done.stdout.strip()

    def url(self, db: int = 0) -> str:
        """The ``store`` value for this server."""
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/{db}"


class ReactorThread:
    """The reactor running in a thread of the test process, for the Twisted
    side of these tests; :meth:`call` runs a function in it and waits for its
    result (a Deferred's too)."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        self.thread.start()

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the reactor thread; its result, once fired."""
        from twisted.internet import threads

        return threads.blockingCallFromThread(self.reactor, function, *args)

    def stop(self) -> None:
        """Stop the reactor (after its shutdown triggers) and wait for the thread (bounded)."""
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(15)


@pytest.fixture(scope="module")
def twisted_reactor() -> Iterator[ReactorThread]:
    """The reactor, run in a thread for this module's tests."""
    from twisted.internet import reactor

    if reactor.running:  # type: ignore[attr-defined]
        pytest.skip("the reactor already runs in this process")
    running = ReactorThread()
    yield running
    running.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, stopped at the end."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def redis_filter(options: dict[str, str], directory: Path | None = None) -> RateLimit:
    """A rate_limit filter with its own client (as another process would have)."""
    flt = build_filter(rate_limit, options, directory=directory)
    flt.shared = RedisBuckets(flt.store)
    return flt


def decide(reactor: ReactorThread, flt: RateLimit, client: str = "192.0.2.1") -> Any:
    """One request through the filter, in the reactor thread: its decision."""
    return reactor.call(lambda: defer.maybeDeferred(flt.request, head(client)))


def close(reactor: ReactorThread, *filters: RateLimit) -> None:
    """Close the filters' store connections."""
    for flt in filters:
        assert flt.shared is not None
        reactor.call(flt.shared.close)


def test_script_burst_then_refusal_then_refill(twisted_reactor: ReactorThread, redis: RedisServer) -> None:
    """Against redis-server: ``burst`` requests pass, the next is refused with
    a Retry-After of the time to one token; after waiting for the refill
    (bounded loop) a request passes again.  The bucket is a hash named with
    the prefix that expires by the time it would be full."""
    flt = redis_filter({"rate": "0.5", "burst": "3", "store": redis.url(2), "store_prefix": "t:rl:limit",
                        "store_timeout": "2s"})
    try:
        assert [decide(twisted_reactor, flt) for _ in range(3)] == [None, None, None]
        refusal = decide(twisted_reactor, flt)
        assert refusal == Refuse(429, "rate limit exceeded", ((b"Retry-After", b"2"),))
        name = bucket_name("t:rl:limit", ("client", "192.0.2.1"))
        assert redis.call("-n", "2", "KEYS", "t:rl:*") == name
        assert 0 < int(redis.call("-n", "2", "PTTL", name)) <= 6000  # full again 3 tokens / 0.5 per s later
        assert float(redis.call("-n", "2", "HGET", name, "t")) < 1
        assert redis.call("-n", "2", "SCRIPT", "EXISTS", SCRIPT_SHA) == "1"
        fast = redis_filter({"rate": "20", "burst": "1", "store": redis.url(2), "store_timeout": "2s"})
        assert decide(twisted_reactor, fast, "192.0.2.9") is None
        assert decide(twisted_reactor, fast, "192.0.2.9") == Refuse(429, "rate limit exceeded",
                                                                     ((b"Retry-After", b"1"),))
        wait_until(lambda: decide(twisted_reactor, fast, "192.0.2.9") is None, "the bucket to refill")
        close(twisted_reactor, fast)
    finally:
        close(twisted_reactor, flt)


def test_script_is_sent_again_after_noscript(twisted_reactor: ReactorThread, redis: RedisServer) -> None:
    """After ``SCRIPT FLUSH`` (or a restart) EVALSHA answers NOSCRIPT; the
    script is sent again and the request is decided by it, not by the fallback."""
    flt = redis_filter({"rate": "1/min", "burst": "1", "store": redis.url(), "store_timeout": "2s"})
    try:
        assert decide(twisted_reactor, flt) is None
        redis.call("SCRIPT", "FLUSH")
        assert redis.call("SCRIPT", "EXISTS", SCRIPT_SHA) == "0"
        assert isinstance(decide(twisted_reactor, flt), Refuse)
        assert redis.call("SCRIPT", "EXISTS", SCRIPT_SHA) == "1"
        values = metric_values(flt)
        assert values[("chatproxy_rate_limit_store_requests", ())] == 2
        assert sum(v for (name, _), v in values.items() if name == "chatproxy_rate_limit_store_errors") == 0
    finally:
        close(twisted_reactor, flt)


def test_two_filters_share_one_bucket(twisted_reactor: ReactorThread, redis: RedisServer) -> None:
    """Two filters with their own connections (two proxies) and the same
    section share each key's bucket: burst 5 across both, the sixth is refused
    by whichever gets it; another client still has its own bucket."""
    options = {"rate": "1/min", "burst": "5", "store": redis.url(), "store_prefix": "chatproxy:rl:shared"}
    first, second = redis_filter(options), redis_filter(options)
    try:
        results = [decide(twisted_reactor, (first, second)[n % 2]) for n in range(6)]
        assert results[:5] == [None] * 5
        assert isinstance(results[5], Refuse) and results[5].status == 429
        assert isinstance(decide(twisted_reactor, first), Refuse)
        assert decide(twisted_reactor, second, "192.0.2.77") is None
        assert len(first.buckets) == len(second.buckets) == 0
    finally:
        close(twisted_reactor, first, second)


def test_ten_thousand_keys_expire_and_stay_out_of_the_proxy(twisted_reactor: ReactorThread,
                                                             redis: RedisServer) -> None:
    """10,000 distinct clients at once: every one passes, Redis holds their
    buckets only until they would be full again (DBSIZE falls to 0, bounded
    wait), and the filter keeps no bucket and no pending request of its own."""
    flt = redis_filter({"rate": "50", "burst": "1", "store": redis.url(3), "store_timeout": "5s"})
    try:
        def flood() -> defer.Deferred[list[Any]]:
            return defer.gatherResults([defer.maybeDeferred(flt.request, head(f"10.0.{n >> 8}.{n & 255}"))
                                        for n in range(10_000)])

        assert twisted_reactor.call(flood) == [None] * 10_000
        assert len(flt.buckets) == 0
        assert metric_values(flt)[("chatproxy_rate_limit_store_requests", ())] == 10_000
        assert flt.shared is not None and flt.shared._factory is not None
        assert all(not conn.replyQueue.waiting for conn in flt.shared._factory.pool)
        wait_until(lambda: redis.call("-n", "3", "DBSIZE") == "0", "the 10,000 buckets to expire", timeout=30)
    finally:
        close(twisted_reactor, flt)


def logged(events: list[dict[str, Any]], fragment: str) -> int:
    """How many captured log events' format strings contain ``fragment``."""
    return sum(1 for event in events if fragment in str(event.get("log_format", "")))


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    """The Twisted log events emitted during the test."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.mark.parametrize("policy", ["local", "allow", "deny"])
def test_redis_stopped_then_restarted(twisted_reactor: ReactorThread, tmp_path: Path, policy: str,
                                      log_events: list[dict[str, Any]]) -> None:
    """Redis stopped mid-test: requests are decided by ``on_store_error``
    (local: the process bucket, burst 2 then 429; allow: passed; deny: 503),
    one log line says the store is down; once Redis is back (bounded wait)
    the shared bucket decides again and one log line says so."""
    server = RedisServer(tmp_path / "redis")
    flt = redis_filter({"rate": "1/min", "burst": "2", "store": server.url(), "store_timeout": "500ms",
                        "on_store_error": policy})
    try:
        assert [decide(twisted_reactor, flt) for _ in range(2)] == [None, None]
        assert isinstance(decide(twisted_reactor, flt), Refuse)  # the shared bucket is empty
        server.stop()
        results = [decide(twisted_reactor, flt) for _ in range(4)]
        if policy == "local":
            assert results[:2] == [None, None] and isinstance(results[2], Refuse) and results[2].status == 429
        elif policy == "allow":
            assert results == [None] * 4
        else:
            assert results == [STORE_UNAVAILABLE] * 4
        values = metric_values(flt)
        assert sum(v for (name, _), v in values.items() if name == "chatproxy_rate_limit_fallback_decisions") == 4
        assert values[("chatproxy_rate_limit_store_errors", (("kind", "connection"),))] >= 1
        assert logged(log_events, "is not answering") == 1
        server.start()  # empty: nothing was saved

        def answered_again() -> bool:
            decide(twisted_reactor, flt)
            return metric_values(flt)[("chatproxy_rate_limit_store_requests", ())] > 3

        wait_until(answered_again, "the store to answer again", timeout=30)
        assert logged(log_events, "answers again") == 1
        assert logged(log_events, "is not answering") == 1
        # the shared bucket (new, full) decides again: burst 2 minus the request that found it back
        assert [decide(twisted_reactor, flt), isinstance(decide(twisted_reactor, flt), Refuse)] == [None, True]
    finally:
        close(twisted_reactor, flt)
        server.stop()


def test_frozen_redis_times_out_within_store_timeout(twisted_reactor: ReactorThread, redis: RedisServer) -> None:
    """A Redis that accepts but does not answer (SIGSTOP): each request is
    decided by the fallback after ``store_timeout``, counted as a timeout;
    after SIGCONT the store answers again (bounded wait)."""
    flt = redis_filter({"rate": "1/min", "burst": "1", "store": redis.url(), "store_timeout": "100ms",
                        "on_store_error": "allow"})
    try:
        assert decide(twisted_reactor, flt) is None
        redis.freeze(True)
        assert decide(twisted_reactor, flt) is None  # allowed by the policy, not by the empty shared bucket
        assert metric_values(flt)[("chatproxy_rate_limit_store_errors", (("kind", "timeout"),))] == 1
        redis.freeze(False)
        wait_until(lambda: isinstance(decide(twisted_reactor, flt), Refuse), "the shared bucket to decide again",
                   timeout=30)
    finally:
        redis.freeze(False)
        close(twisted_reactor, flt)


def test_password_from_a_file(twisted_reactor: ReactorThread, tmp_path: Path) -> None:
    """A Redis with ``requirepass``: the filter authenticates with the password
    from ``store_password_file``; without it the store fails (NOAUTH) and the
    fallback decides."""
    server = RedisServer(tmp_path / "redis", password="pw-for-test")
    (tmp_path / "redis.password").write_text("pw-for-test\n")
    good = redis_filter({"rate": "1/min", "burst": "1", "store": server.url(), "store_timeout": "2s",
                         "store_password_file": "redis.password"}, tmp_path)
    anonymous = redis_filter({"rate": "1/min", "burst": "1", "store": server.url(), "store_timeout": "500ms",
                              "on_store_error": "deny"})
    try:
        assert decide(twisted_reactor, good) is None
        assert isinstance(decide(twisted_reactor, good), Refuse)
        assert server.call("DBSIZE") == "1"
        assert decide(twisted_reactor, anonymous) == STORE_UNAVAILABLE
        assert metric_values(anonymous)[("chatproxy_rate_limit_store_errors", (("kind", "connection"),))] == 1
    finally:
        close(twisted_reactor, good, anonymous)
        server.stop()


def test_refused_password_is_retried_slowly(twisted_reactor: ReactorThread, tmp_path: Path,
                                            log_events: list[dict[str, Any]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A password Redis refuses: the reason is logged once, requests go to the
    fallback at once (no reconnect loop), and after ``RETRY_GIVEN_UP`` (here
    0) a new connection is tried; once Redis takes the password (changed on
    the server) the shared bucket decides (bounded wait)."""
    from chatproxy.filters import redis_buckets

    server = RedisServer(tmp_path / "redis", password="right")
    (tmp_path / "redis.password").write_text("later\n")
    flt = redis_filter({"rate": "1/min", "burst": "1", "store": server.url(1), "store_timeout": "1s",
                        "on_store_error": "allow", "store_password_file": "redis.password"}, tmp_path)
    try:
        assert decide(twisted_reactor, flt) is None  # allowed by the policy
        wait_until(lambda: logged(log_events, "refused the connection") == 1, "the refusal to be logged")
        assert [decide(twisted_reactor, flt) for _ in range(3)] == [None] * 3
        assert metric_values(flt)[("chatproxy_rate_limit_store_requests", ())] == 0
        server.call("CONFIG", "SET", "requirepass", "later")
        server.password = "later"
        monkeypatch.setattr(redis_buckets, "RETRY_GIVEN_UP", 0.0)
        wait_until(lambda: isinstance(decide(twisted_reactor, flt), Refuse), "the shared bucket to decide",
                   timeout=30)
        assert logged(log_events, "answers again") == 1
    finally:
        close(twisted_reactor, flt)
        server.stop()


def test_rediss_with_a_test_ca(twisted_reactor: ReactorThread, tmp_path: Path, pki: PKI) -> None:
    """``rediss://`` to a redis-server with ``tls-port`` and a certificate of a
    test CA: with ``store_ca`` naming that CA the shared bucket decides;
    without it (the system CAs do not trust it) the fallback does."""
    server = RedisServer(tmp_path / "redis", tls=pki)
    trusted = redis_filter({"rate": "1/min", "burst": "1", "store": server.url(), "store_ca": str(pki.ca),
                            "store_timeout": "2s"})
    untrusted = redis_filter({"rate": "1/min", "burst": "1", "store": server.url(), "store_timeout": "500ms",
                              "on_store_error": "deny"})
    try:
        assert decide(twisted_reactor, trusted) is None
        assert isinstance(decide(twisted_reactor, trusted), Refuse)
        assert server.call("DBSIZE") == "1"
        assert decide(twisted_reactor, untrusted) == STORE_UNAVAILABLE
    finally:
        close(twisted_reactor, trusted, untrusted)
        server.stop()


# ---------------------------------------------------------------------------
# Two twistd processes


def test_two_proxies_enforce_one_limit(proxy: Any, upstream: Any, redis: RedisServer) -> None:
    """Two ``twistd -n chatproxy`` processes with the same configuration and
    ``store = redis://…``, burst 5: requests alternating between them, five
    pass and the sixth gets 429 (from either), and the upstream saw five."""
    import http.client

    ports = [free_port(), free_port()]
    section = textwrap.dedent(f"""
        [filter:limit]
        use = rate_limit
        rate = 1/min
        burst = 5
        store = {redis.url()}
        store_timeout = 2s
        on_store_error = deny
        """)
    for port in ports:
        proxy.start(basic_config(upstream.url, port, route="filters = limit", extra=section), port=port)

    def get(port: int, n: int) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", f"/echo/{n}")
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    statuses = [get(ports[n % 2], n) for n in range(7)]
    assert statuses == [200] * 5 + [429, 429]
    assert len(upstream.requests) == 5
    assert redis.call("KEYS", "chatproxy:rl:limit:*").startswith("chatproxy:rl:limit:")
