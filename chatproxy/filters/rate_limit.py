"""The ``rate_limit`` filter kind: token buckets per client, route or header value.

    [filter:per-client]
    use = rate_limit
    rate = 5            ; requests per second (also 300/min, 0.5, 10/s)
    burst = 20          ; bucket size: requests allowed at once
    key = client        ; client | route | header:NAME
    max_keys = 100000   ; buckets kept at most (least recently used dropped)

Each key has a bucket of ``burst`` tokens refilled at ``rate`` per second; a
request takes one token, or is refused with ``429 Too Many Requests`` and a
``Retry-After`` header (whole seconds until the next token).  Memory is
bounded: a bucket that has refilled completely is the same as no bucket and is
dropped, and at most ``max_keys`` buckets exist (the least recently used is
dropped first), so a flood of distinct addresses cannot exhaust memory.

With ``store = redis://host:port/db`` (or ``rediss://`` for TLS) the request
buckets are kept in Redis instead, shared by every process and instance that
uses the same store and section (see :mod:`chatproxy.filters.rate_limit_store`
for the options and :mod:`chatproxy.filters.redis_buckets` for the script);
the in-process buckets then decide only while the store fails, when
``on_store_error = local`` (the default; ``allow`` passes such requests,
``deny`` refuses them with 503).

On bridge routes the filter also limits each WebSocket session's messages
from the client to ``message_rate`` per second (default: ``rate``, bursts of
``message_burst``, default ``burst``); a session over it is closed with 1008.
Those buckets are always in-process: a session lives in one process.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproxy.filters import CloseSession, Filter, FilterOptionError, FilterOptions, IFilterFactory, IRequestFilter, \
    Metric, Refuse, RequestDecision
from chatproxy.filters.rate_limit_store import STORE_OPTIONS, StoreCounters, StoreSettings, bucket_name, \
    read_store_settings
from chatproxy.filters.redis_buckets import RedisBuckets, StoreError, shared_buckets
from chatproxy.http.messages import FIELD_NAME_RE

log = Logger()

Clock = Callable[[], float]

OPTIONS = ("rate", "burst", "key", "max_keys", "message_rate", "message_burst", *STORE_OPTIONS)
DEFAULT_MAX_KEYS = 100_000
EVICTION_WARNING_INTERVAL = 60.0  # seconds between two "max_keys reached" warnings

_RATE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?")
_RATE_UNITS = {None: 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}


def parse_rate(text: str) -> float:
    """Events per second: ``5``, ``0.5``, ``10/s``, ``300/min``, ``3600/h``."""
    match = _RATE_RE.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"expected a rate per second such as 5, 0.5 or 300/min, got {text!r}")
    rate = float(match.group(1)) / _RATE_UNITS[match.group(2)]
    if rate <= 0:
        raise ValueError("must be greater than zero")
    return rate


def parse_key(text: str) -> str:
    """``key``: ``client``, ``route`` or ``header:NAME`` (NAME as written)."""
    key = text.strip()
    if key.lower() in ("client", "route"):
        return key.lower()
    if key[:7].lower() == "header:":
        name = key[7:].strip()
        if not FIELD_NAME_RE.fullmatch(name):
            raise ValueError(f"header:NAME needs a header name, got {text!r}")
        return "header:" + name
    raise ValueError(f"expected client, route or header:NAME, got {text!r}")


def parse_message_rate(text: str) -> float | None:
    """``message_rate``: a rate (see :func:`parse_rate`), or ``off`` (None)."""
    if text.strip().lower() in ("off", "no", "none"):
        return None
    return parse_rate(text)


class TokenBuckets:
    """Token buckets by key with bounded memory.

    A bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second;
    :meth:`take` spends one.  Buckets are kept in least-recently-used order;
    one that has been idle long enough to be full again is dropped (a missing
    bucket is a full one), and when ``max_keys`` buckets exist the least
    recently used one is dropped to make room.  ``dropped(key)`` is called
    for every bucket removed that way.
    """

    def __init__(self, rate: float, burst: int, max_keys: int, clock: Clock = time.monotonic,
                 dropped: Callable[[Hashable], None] | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self.dropped = dropped
        self.refill_time = burst / rate  # seconds for an empty bucket to become full
        self.evicted = 0  # buckets dropped before they were full (max_keys reached)
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()  # key -> [tokens, stamp]
        self._warned_at: float | None = None

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def take(self, key: Hashable) -> float:
        """Spend a token of ``key``'s bucket: 0.0 when there was one, otherwise
        the seconds until there is one (nothing is spent)."""
        now = self.clock()
        buckets = self._buckets
        self._expire(now)
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                self._evict(now)
            buckets[key] = [self.burst - 1.0, now]
            return 0.0
        buckets.move_to_end(key)
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def forget(self, key: Hashable) -> None:
        """Drop ``key``'s bucket (if any)."""
        if self._buckets.pop(key, None) is not None and self.dropped is not None:
            self.dropped(key)

    def _expire(self, now: float) -> None:
        # In LRU order the stamps only grow, so the first bucket that is not
        # full yet ends the scan: amortised O(1) per call.
        buckets = self._buckets
        deadline = now - self.refill_time
        while buckets:
            key, bucket = next(iter(buckets.items()))
            if bucket[1] > deadline:
                return
            del buckets[key]
            if self.dropped is not None:
                self.dropped(key)

    def _evict(self, now: float) -> None:
        key, _ = self._buckets.popitem(last=False)
        self.evicted += 1
        if self.dropped is not None:
            self.dropped(key)
        if self._warned_at is None or now - self._warned_at >= EVICTION_WARNING_INTERVAL:
            self._warned_at = now
            log.warn("rate_limit: {max_keys} keys in use; dropping the least recently used buckets "
                     "(their keys start again with a full burst; raise max_keys if this is not a flood)",
                     max_keys=self.max_keys)


def retry_after(wait: float) -> int:
    """Whole seconds for ``Retry-After``: the wait rounded up, at least 1."""
    return max(1, math.ceil(wait - 1e-9))


def over_limit(wait: float) -> Refuse | None:
    """The decision for a bucket's answer: pass (no wait) or 429 with ``Retry-After``."""
    if wait == 0.0:
        return None
    return Refuse(429, "rate limit exceeded", ((b"Retry-After", b"%d" % retry_after(wait)),))


#: ``on_store_error = deny``: the limit cannot be checked, so the request is not served.
STORE_UNAVAILABLE = Refuse(503, "rate limit unavailable", ((b"Retry-After", b"1"),))


@implementer(IRequestFilter)
class RateLimit(Filter):
    """Refuses requests over ``rate`` per second (bursts of ``burst``) per key
    with 429 and ``Retry-After``; closes WebSocket sessions whose client sends
    messages faster than ``message_rate`` with 1008."""

    def __init__(self, rate: float, burst: int, key: str = "client", max_keys: int = DEFAULT_MAX_KEYS,
                 message_rate: float | None = None, message_burst: int | None = None,
                 clock: Clock = time.monotonic, store: StoreSettings | None = None,
                 shared: RedisBuckets | None = None) -> None:
        """``store``: the shared store's settings (None: in-process buckets
        only); ``shared``: its client (default: the one :func:`shared_buckets`
        gives for ``store``)."""
        self.key = key
        self.header_name = key[len("header:"):] if key.startswith("header:") else None
        self.clock = clock
        self.buckets = TokenBuckets(rate, burst, max_keys, clock)
        self.store = store
        self.shared = shared if shared is not None or store is None else shared_buckets(store)
        self.counters = StoreCounters()
        self.sessions: TokenBuckets | None = None
        self._session_refs: dict[Hashable, Any] = {}
        if message_rate is not None:
            self.sessions = TokenBuckets(message_rate, message_burst or max(1, math.ceil(message_rate)), max_keys,
                                         clock, dropped=self._session_dropped)

    def key_of(self, head: Any) -> Hashable:
        """The bucket key of a request head.

        ``client``: the client address.  ``route``: the name of the route the
        request matched (one bucket per route; a head that does not carry its
        route shares one bucket for the whole filter section).
        ``header:NAME``: a digest of the header's first value; a request
        without the header is keyed by its client address instead (the two
        kinds of keys never collide).
        """
        if self.header_name is not None:
            value = head.header(self.header_name)
            if value is not None:
                return ("header", hashlib.blake2b(value.encode("latin-1", "replace"), digest_size=16).digest())
            return ("client", head.client)
        if self.key == "route":
            return ("route", str(getattr(head, "route", "") or ""))
        return ("client", head.client)

    def request(self, head: Any) -> RequestDecision | defer.Deferred[RequestDecision]:
        """Pass the request if its key's bucket has a token, else 429.  With
        a shared store, a Deferred firing with that decision, or with
        ``on_store_error``'s when the store fails or is too slow."""
        key = self.key_of(head)
        if self.store is None or self.shared is None:
            return over_limit(self.buckets.take(key))
        started = self.clock()
        buckets = self.buckets
        taken = self.shared.take(bucket_name(self.store.prefix, key), buckets.rate, buckets.burst, self.store.timeout)
        return taken.addCallbacks(lambda wait: self._answered(wait, started),
                                  lambda failure: self._store_failed(failure, key))

    def _answered(self, wait: float, started: float) -> RequestDecision:
        self.counters.answer(max(0.0, self.clock() - started))
        return over_limit(wait)

    def _store_failed(self, failure: Failure, key: Hashable) -> RequestDecision:
        failure.trap(StoreError)
        assert self.store is not None
        self.counters.error(failure.value.kind)  # type: ignore[union-attr]
        policy = self.store.on_error
        if policy == "allow":
            decision: Refuse | None = None
        elif policy == "deny":
            decision = STORE_UNAVAILABLE
        else:
            decision = over_limit(self.buckets.take(key))
        self.counters.decided(policy, decision is None)
        return decision

    def metrics(self) -> Iterator[Metric]:
        """With a shared store: its latency (count and sum), its errors by
        kind and the decisions ``on_store_error`` made."""
        if self.store is None:
            return
        for name, help_text, labels, value in self.counters.values():
            yield Metric(name, help_text, labels, value)

    def message(self, head: Any, payload: bytes, binary: bool, upward: bool) -> CloseSession | None:
        """Count the client's messages per session (the session's request head
        identifies it); close the session with 1008 past the message rate."""
        if not upward or self.sessions is None:
            return None
        key = id(head)
        if key not in self._session_refs:
            try:
                self._session_refs[key] = weakref.ref(head, functools.partial(self._session_ended, key))
            except TypeError:  # not weak-referenceable: rely on expiry and max_keys alone
                self._session_refs[key] = None
        if self.sessions.take(key) == 0.0:
            return None
        return CloseSession(1008, "rate limit exceeded")

    def _session_ended(self, key: Hashable, ref: object = None) -> None:
        # The session's head is gone, so the id may be reused by another one.
        if self.sessions is not None:
            self.sessions.forget(key)
        self._session_refs.pop(key, None)

    def _session_dropped(self, key: Hashable) -> None:
        self._session_refs.pop(key, None)


@implementer(IPlugin, IFilterFactory)
class RateLimitKind:
    """The filter kind: ``use = rate_limit``."""

    name = "rate_limit"

    def build(self, options: Mapping[str, str], clock: Clock = time.monotonic) -> RateLimit:
        """Validate the options and build the filter (``clock`` is for tests)."""
        opts = FilterOptions(self.name, options, OPTIONS)
        rate = opts.get("rate", parse_rate)
        burst = opts.integer("burst", max(1, math.ceil(rate)))
        key = opts.get("key", parse_key, "client")
        max_keys = opts.integer("max_keys", DEFAULT_MAX_KEYS)
        message_rate = opts.get("message_rate", parse_message_rate, rate)
        # The message burst goes with the message rate: burst when it is rate, none when off.
        message_burst: int | None = burst
        if message_rate is None:
            message_burst = None
        elif "message_rate" in opts:
            message_burst = max(1, math.ceil(message_rate))
        if "message_burst" in opts:
            if message_rate is None:
                raise FilterOptionError("message_burst", "has no effect with message_rate = off")
            message_burst = opts.integer("message_burst")
        return RateLimit(rate, burst, key, max_keys, message_rate, message_burst, clock, read_store_settings(opts))


rate_limit = RateLimitKind()
