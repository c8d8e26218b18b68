"""The ``rate_limit`` filter's token buckets in Redis (``store = redis://…``).

One Lua script (:data:`TOKEN_BUCKET`) takes a token from one bucket
atomically; it is called by its SHA1 (``EVALSHA``) and sent whole
(``EVAL``, which also caches it on the server) only when the server answers
``NOSCRIPT`` (after a restart or ``SCRIPT FLUSH``).  It reads the time with
Redis's own ``TIME``, so proxies whose clocks disagree still refill a
shared bucket at one pace, and it sets the bucket to expire when it would be
full again (a missing bucket is a full one), so ever new keys cannot grow
Redis without bound.

The client is txredisapi: Twisted-native (the reactor never waits; one
pipelined connection carries every filter's requests), TLS through
Twisted's own, and reconnection with exponential backoff and jitter (one
to ten seconds).  :func:`shared_buckets` gives every filter section with
the same address, CA and password the same connection, made on the first
request (``check`` and a reload that keeps the store never connect anew), and
closed when no filter uses it any more or the reactor stops.  What a request
does when the store fails is the filter's decision
(:mod:`chatproxy.filters.rate_limit`); this module says why it failed
(:class:`StoreError`) and logs once when the store goes down and once when it
is back.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

from twisted.internet import defer, error
from twisted.logger import Logger

from chatproxy.filters.rate_limit_store import StoreAddress, StoreHealth, StoreSettings

__all__ = ["SCRIPT_SHA", "TOKEN_BUCKET", "RedisBuckets", "StoreError", "shared_buckets"]

log = Logger()

#: Take one token from the bucket KEYS[1] (ARGV: rate per second, burst).
#: Returns 0 when there was one, otherwise the microseconds until there is
#: one (nothing is spent).  The bucket is a hash: t = tokens, s = the time of
#: the last take in microseconds (Redis's clock); it expires when it would be
#: full again.  A clock that stepped back adds nothing.  Needs Redis 5 or
#: later (scripts replicated by their effects, so TIME may precede a write).
TOKEN_BUCKET = """\
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local bucket = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = burst
if bucket[1] and bucket[2] then
  local elapsed = math.max(0, now - tonumber(bucket[2]))
  tokens = math.min(burst, tonumber(bucket[1]) + elapsed * rate / 1000000)
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((burst - tokens) * 1000 / rate)))
return wait
"""

SCRIPT_SHA = hashlib.sha1(TOKEN_BUCKET.encode()).hexdigest()

POOL_SIZE = 1  # one connection: requests are pipelined on it
CONNECT_TIMEOUT = 5.0  # seconds for one connection attempt (requests never wait that long)
#: Seconds before a client that gave up (its password or database refused)
#: is replaced by a new one: a slow retry instead of none, and no storm.
RETRY_GIVEN_UP = 30.0


class StoreError(Exception):
    """The store did not answer: ``kind`` is ``timeout`` (not within
    ``store_timeout``), ``connection`` (not connected, connection lost or
    refused) or ``script`` (Redis answered with an error)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def _trust_root(settings: StoreSettings) -> Any:
    from cryptography import x509
    from OpenSSL import crypto
    from twisted.internet import ssl

    if settings.ca is None:
        return ssl.platformTrust()
    certificates = x509.load_pem_x509_certificates(settings.ca.read_bytes())
    return ssl.trustRootFromCertificates([ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates])


def _endpoint(reactor: Any, settings: StoreSettings) -> Any:
    from twisted.internet import endpoints, ssl

    address = settings.address
    endpoint = endpoints.HostnameEndpoint(reactor, address.host, address.port, timeout=CONNECT_TIMEOUT)
    if not address.tls:
        return endpoint
    return endpoints.wrapClientTLS(ssl.optionsForClientTLS(address.host, trustRoot=_trust_root(settings)), endpoint)


def _classify(failure: Any) -> StoreError:
    import txredisapi

    if failure.check(defer.TimeoutError, defer.CancelledError):
        return StoreError("timeout", "no answer in time")
    if failure.check(txredisapi.ResponseError):
        message = str(failure.value)
        if message.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):  # not allowed in: the connection is unusable
            return StoreError("connection", message)
        return StoreError("script", message)
    if failure.check(txredisapi.ConnectionError, error.ConnectError, error.ConnectionLost, error.ConnectionDone):
        return StoreError("connection", str(failure.value) or failure.type.__name__)
    return StoreError("connection", repr(failure.value))


class RedisBuckets:
    """Token buckets in one Redis server, through one lazily made,
    automatically re-made connection (see the module's docstring)."""

    def __init__(self, settings: StoreSettings, reactor: Any = None) -> None:
        self.address: StoreAddress = settings.address
        self.settings = settings
        self.health = StoreHealth()
        self._reactor = reactor
        self._factory: Any = None
        self._trigger: Any = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._given_up_at: float | None = None

    @property
    def connected(self) -> bool:
        """Whether a connection to the store is open and ready now."""
        return self._factory is not None and self._factory.size > 0

    def take(self, name: str, rate: float, burst: int, timeout: float) -> defer.Deferred[float]:
        """Take a token from the bucket ``name``: a Deferred firing with 0.0
        when there was one, else the seconds until there is one, or failing
        with :class:`StoreError` (within ``timeout`` seconds).  While the store
        is known to be down and not connected again, it fails at once."""
        factory = self._connect()
        if factory.size == 0 and factory.stopped:
            factory = self._retry_given_up(factory)
        if factory.size == 0 and (not self.health.up or factory.stopped):
            return self._failed(StoreError("connection", "not connected"))
        handler = factory.handler
        args = (repr(float(rate)), str(int(burst)))

        def missing(failure: Any) -> Any:
            import txredisapi

            failure.trap(txredisapi.ScriptDoesNotExist)
            return handler.eval(TOKEN_BUCKET, [name], args)

        d: defer.Deferred[Any] = handler.evalsha(SCRIPT_SHA, [name], args)
        d.addErrback(missing)
        d.addTimeout(timeout, self._reactor)
        d.addCallbacks(self._answered, self._error)
        return d

    def close(self) -> defer.Deferred[None]:
        """Close the connection (if any) and stop reconnecting."""
        factory = self._factory
        if factory is None:
            return defer.succeed(None)
        self._release()
        done: defer.Deferred[None] = factory.disconnect().addCallback(lambda _: None)
        return done

    def _retry_given_up(self, factory: Any) -> Any:
        # txredisapi stops for good when the server refuses the password or the
        # database, or the connection is lost while it sends them.
        now = self._reactor.seconds()
        if self._given_up_at is None:
            self._given_up_at = now
        if now - self._given_up_at < RETRY_GIVEN_UP:
            return factory
        self._given_up_at = None
        self._release()
        factory.disconnect()
        return self._connect()

    def _release(self) -> None:
        self._factory = None
        if self._finalizer is not None:
            self._finalizer()  # removes the shutdown trigger
            self._finalizer = None

    def _connect(self) -> Any:
        if self._factory is not None:
            return self._factory
        import txredisapi

        if self._reactor is None:
            # Imported here: twisted.internet.reactor installs the default
            # reactor, and plugins are imported before twistd installs its own.
            from twisted.internet import reactor

            self._reactor = reactor
        settings = self.settings
        factory = txredisapi.RedisFactory(str(self.address), self.address.db or None, POOL_SIZE, isLazy=True,
                                          password=settings.password, username=self.address.username)
        # Told when the first connection is refused (password, database): the
        # reason is logged here, the requests fail as not connected.
        factory.deferred.addErrback(_refused, str(self.address))
        factory.startConnecting(_endpoint(self._reactor, settings))
        self._factory = factory
        # Neither of these refers to self, so a store no filter uses any more is
        # collected, and its connection closed, as is one still open at shutdown.
        trigger = self._reactor.addSystemEventTrigger("before", "shutdown", factory.disconnect)
        self._finalizer = weakref.finalize(self, _forget, self._reactor, trigger, factory)
        return factory

    def _answered(self, wait: Any) -> float:
        if self.health.answered():
            log.info("rate_limit: the shared store {address} answers again", address=str(self.address))
        return max(0.0, int(wait) / 1_000_000)

    def _error(self, failure: Any) -> defer.Deferred[float]:
        problem = failure.value if failure.check(StoreError) else _classify(failure)
        if problem.kind == "timeout" and self._factory is not None:
            # A connection that does not answer may never do: drop it, and
            # txredisapi makes a new one after its backoff delay.
            for connection in list(self._factory.pool):
                connection.transport.abortConnection()
        return self._failed(problem)

    def _failed(self, problem: StoreError) -> defer.Deferred[float]:
        if self.health.failed(problem.kind):
            log.warn("rate_limit: the shared store {address} is not answering ({kind}: {detail}); requests are "
                     "decided by on_store_error until it is back", address=str(self.address), kind=problem.kind,
                     detail=problem.detail)
        return defer.fail(problem)


def _refused(failure: Any, address: str) -> None:
    log.error("rate_limit: the shared store {address} refused the connection ({reason}); trying again in "
              "{delay:g}s", address=address, reason=failure.getErrorMessage(), delay=RETRY_GIVEN_UP)


def _forget(reactor: Any, trigger: Any, factory: Any) -> None:
    try:
        reactor.removeSystemEventTrigger(trigger)
    except (ValueError, KeyError):
        pass  # already run (the reactor is stopping)
    if not factory.stopped:
        factory.disconnect()


_shared: weakref.WeakValueDictionary[tuple[Any, ...], RedisBuckets] = weakref.WeakValueDictionary()


def shared_buckets(settings: StoreSettings) -> RedisBuckets:
    """The store of ``settings``, shared with every filter section (and every
    plan, across reloads) that uses the same address, CA and password."""
    key = settings.connection
    store = _shared.get(key)
    if store is None:
        store = _shared[key] = RedisBuckets(settings)
    return store
