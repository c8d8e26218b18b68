"""The ``rate_limit`` filter's shared store, without I/O: its options, the
names of its buckets, its health, its counters and what a request gets when
the store cannot answer.

::

    store = rediss://redis.example.net:6380/2   ; or local (the default)
    store_ca = /etc/chatproxy/redis-ca.pem       ; rediss:// only (default: the system CAs)
    store_password_file = /etc/chatproxy/redis.password   ; or store_password_env = NAME
    store_timeout = 250ms
    on_store_error = local                       ; local | allow | deny
    store_prefix = chatproxy:rl:per-client       ; default: chatproxy:rl:<section>

The I/O (the Redis client and the Lua script) is
:mod:`chatproxy.filters.redis_buckets`; the filter is
:mod:`chatproxy.filters.rate_limit`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections import Counter
from collections.abc import Hashable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from attrs import field, frozen

from chatproxy.filters.options import FilterOptionError, FilterOptions

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "ERROR_KINDS",
    "ON_ERROR",
    "STORE_OPTIONS",
    "StoreAddress",
    "StoreCounters",
    "StoreHealth",
    "StoreSettings",
    "bucket_name",
    "parse_store",
    "read_store_settings",
]

STORE_OPTIONS = ("store", "store_ca", "store_password_file", "store_password_env", "store_timeout",
                 "on_store_error", "store_prefix")
DEFAULT_PORT = 6379
DEFAULT_TIMEOUT = 0.25  # seconds a request waits for the store at most
ON_ERROR = ("local", "allow", "deny")
ERROR_KINDS = ("timeout", "connection", "script")
PREFIX = "chatproxy:rl:"


@frozen
class StoreAddress:
    """Where the shared store is: ``redis://`` or ``rediss://`` (``tls``),
    host, port, database number and the ACL user name (if any)."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    tls: bool = False
    username: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        return f"{'rediss' if self.tls else 'redis'}://{user}{host}:{self.port}/{self.db}"


def parse_store(text: str) -> StoreAddress | None:
    """``store``: ``local`` (None) or ``redis://[user@]host[:port][/db]``,
    ``rediss://…`` for TLS.  A password in the URL is refused: it belongs in
    ``store_password_file`` or ``store_password_env``."""
    value = text.strip()
    if value.lower() == "local":
        return None
    url = urlsplit(value)
    scheme = url.scheme.lower()
    if scheme not in ("redis", "rediss") or not url.netloc:
        raise ValueError(f"expected local, redis://host:port/db or rediss://host:port/db, got {value!r}")
    if url.password is not None:
        raise ValueError("no password in the URL: use store_password_file or store_password_env")
    if url.query or url.fragment:
        raise ValueError(f"expected redis://host:port/db without ?query or #fragment, got {value!r}")
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"expected a port number from 1 to 65535 in {value!r}") from None
    host = url.hostname or ""
    if not host:
        raise ValueError(f"expected a host name in {value!r}")
    path = url.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"expected a database number after the host (redis://host:port/0), got {url.path!r}")
    if host.startswith("[") or ":" in host:
        ipaddress.IPv6Address(host.strip("[]"))  # a ValueError names the bad address
    return StoreAddress(host, port or DEFAULT_PORT, int(path or 0), scheme == "rediss",
                        unquote(url.username) if url.username else None)


@frozen
class StoreSettings:
    """A filter section's shared store: its address, the CA file that signs
    its certificate (``rediss://``; None: the system CAs), the password (never
    shown), the most a request waits for it, what to do when it fails and
    the prefix of its bucket names."""

    address: StoreAddress
    ca: Path | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    on_error: str = "local"
    prefix: str = PREFIX + "rate_limit"

    @property
    def connection(self) -> tuple[StoreAddress, Path | None, str | None]:
        """What one connection pool to the store is shared by: the sections
        with the same address, CA and password share it."""
        return (self.address, self.ca, self.password)


def _password(opts: FilterOptions) -> str | None:
    given = opts.given("store_password_file", "store_password_env")
    if len(given) > 1:
        raise FilterOptionError("store_password_env", "give store_password_file or store_password_env, not both")
    if "store_password_file" in opts:
        raw = opts.file_bytes("store_password_file")
        try:
            password = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise FilterOptionError("store_password_file", "the password file is not UTF-8 text") from None
        if not password:
            raise FilterOptionError("store_password_file", "the password file is empty")
        return password
    if "store_password_env" in opts:
        name = opts.text("store_password_env")
        value = os.environ.get(name)
        if not value:
            raise FilterOptionError("store_password_env", f"the environment variable {name} is not set or empty")
        return value
    return None


def read_store_settings(opts: FilterOptions) -> StoreSettings | None:
    """The shared store options of a ``rate_limit`` section: None for
    ``store = local`` (the default), where the other store options are
    refused, as options that would have no effect."""
    address = opts.get("store", parse_store, None)
    if address is None:
        for option in STORE_OPTIONS[1:]:
            if option in opts:
                raise FilterOptionError(option, "has no effect with store = local (set store = redis://host:port/db)")
        return None
    ca = opts.path("store_ca", None)
    if ca is not None:
        if not address.tls:
            raise FilterOptionError("store_ca", "only with store = rediss://… (TLS)")
        if not ca.is_file():
            raise FilterOptionError("store_ca", f"no such file: {ca}")
    prefix = opts.text("store_prefix", None)
    if prefix is None:
        section = getattr(opts.options.get("store"), "section", None)
        prefix = PREFIX + (section or "rate_limit")
    timeout = opts.duration("store_timeout", DEFAULT_TIMEOUT)
    if timeout > 10:
        raise FilterOptionError("store_timeout", "must be at most 10s (a request waits that long at most)")
    return StoreSettings(address, ca, _password(opts), timeout, opts.choice("on_store_error", ON_ERROR, "local"),
                         prefix)


def bucket_name(prefix: str, key: Hashable) -> str:
    """The store's name for a bucket: ``<prefix>:<hash>``, where the hash
    (16 bytes, hex) covers the key's kind and value so that a header value
    never names a client's bucket.  The key is as the local store keys it:
    ``(kind, value)`` with a text or bytes value."""
    kind, value = key if isinstance(key, tuple) and len(key) == 2 else ("key", key)
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(str(kind).encode() + b"\0" + raw, digest_size=16).hexdigest()
    return f"{prefix}:{digest}"


class StoreHealth:
    """Whether the store answers, told of each outcome: :meth:`failed` and
    :meth:`answered` return True only when that changes it (down, back), so
    the caller logs the change once, not once per request.  A store is taken
    to be up until its first failure."""

    def __init__(self) -> None:
        self.up = True
        self.last_error: str | None = None

    def failed(self, kind: str) -> bool:
        """A request failed (``kind``: one of :data:`ERROR_KINDS`): True if the store was up until now."""
        self.last_error = kind
        changed, self.up = self.up, False
        return changed

    def answered(self) -> bool:
        """A request was answered: True if the store was down until now."""
        changed, self.up = not self.up, True
        return changed


class StoreCounters:
    """A filter's counts about its store: requests answered and their total
    latency, errors by kind, and the decisions the ``on_store_error`` policy
    made (by policy and outcome)."""

    def __init__(self) -> None:
        self.answered = 0
        self.seconds = 0.0
        self.errors: Counter[str] = Counter({kind: 0 for kind in ERROR_KINDS})
        self.fallback: Counter[tuple[str, str]] = Counter()

    def answer(self, seconds: float) -> None:
        """The store answered a request after ``seconds``."""
        self.answered += 1
        self.seconds += seconds

    def error(self, kind: str) -> None:
        """The store did not answer a request (``kind``: timeout, connection, script)."""
        self.errors[kind] += 1

    def decided(self, policy: str, passed: bool) -> None:
        """The ``on_store_error`` policy passed or refused a request."""
        self.fallback[(policy, "passed" if passed else "refused")] += 1

    def values(self) -> Iterator[tuple[str, str, tuple[tuple[str, str], ...], float]]:
        """(name, help, labels, value) of every count, for the filter's ``metrics()``."""
        yield ("chatproxy_rate_limit_store_requests", "Requests the shared store answered.", (), self.answered)
        yield ("chatproxy_rate_limit_store_request_seconds",
               "Total seconds the shared store took to answer (divide by the requests for the mean).",
               (), self.seconds)
        for kind, count in sorted(self.errors.items()):
            yield ("chatproxy_rate_limit_store_errors",
                   "Requests the shared store did not answer, by kind (timeout, connection, script).",
                   (("kind", kind),), count)
        for (policy, outcome), count in sorted(self.fallback.items()):
            yield ("chatproxy_rate_limit_fallback_decisions",
                   "Requests decided by on_store_error while the shared store failed, by policy and outcome.",
                   (("policy", policy), ("outcome", outcome)), count)
