"""Fetching OCSP responses for stapling (in a single process, or in the
master of workers: the workers only read what it stores).

For every certificate of a TLS listener with ``ocsp_stapling = yes`` whose
certificate names an OCSP responder, :class:`Stapler` asks the responder
(an HTTP POST with Twisted's client, in the reactor, never on a client's
connection), verifies the answer (:func:`chatproxy.proxy.ocsp.verify_response`),
stores it (:class:`chatproxy.proxy.staples.StapleStore`: memory and disk) and
calls ``changed`` so that the handshakes staple it.  It asks again halfway
through the response's validity, and after a failure (responder down, a
response that does not verify) after 1 minute, doubling up to an hour; the
response in hand is stapled meanwhile, until it expires.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from io import BytesIO
from typing import Any

from attrs import define
from cryptography import x509
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from chatproxy.config import Config
from chatproxy.proxy.ocsp import (OCSPError, OCSPTarget, Verified, next_fetch, request_der, retry_delay,
                                  target_from_chain, verify_response)
from chatproxy.proxy.staples import StapleStore

__all__ = ["Stapler", "ocsp_targets"]

log = Logger()

#: Largest OCSP response read, and how long one fetch may take.
MAX_RESPONSE_BYTES = 64 * 1024
FETCH_TIMEOUT = 15.0


def ocsp_targets(config: Config) -> dict[str, OCSPTarget]:
    """Every certificate of ``config`` to staple, by fingerprint (files that
    do not exist yet, or that name no responder, are left out)."""
    found: dict[str, OCSPTarget] = {}
    for listener in config.listeners.values():
        if not listener.tls or not listener.ocsp_stapling or listener.certificate is None:
            continue
        for path in [listener.certificate, *(entry.certificate for entry in listener.sni)]:
            try:
                target = target_from_chain(x509.load_pem_x509_certificates(path.read_bytes()))
            except (OSError, ValueError, OCSPError):
                continue  # the data path logs why (proxy.certificates)
            if target is not None:
                found[target.fingerprint] = target
    return found


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class _BoundedBody(Protocol):
    """Collects a response body of at most MAX_RESPONSE_BYTES."""

    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > MAX_RESPONSE_BYTES:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if len(self.data) > MAX_RESPONSE_BYTES:
            self.done.errback(OCSPError(f"the response is larger than {MAX_RESPONSE_BYTES} bytes"))
        else:
            self.done.callback(self.data)


@define
class _Watch:
    """One certificate being stapled: the response in hand, failures in a row, the next fetch."""

    target: OCSPTarget
    verified: Verified | None = None
    failures: int = 0
    call: Any = None


class Stapler:
    """Keeps an OCSP response in the store for every certificate to staple."""

    def __init__(self, reactor: Any, store: StapleStore, changed: Callable[[], None],
                 rng: random.Random | None = None) -> None:
        self.reactor = reactor
        self.store = store
        self.changed = changed
        self.rng = rng or random.Random()
        self.agent = Agent(reactor, connectTimeout=FETCH_TIMEOUT)
        self._watches: dict[str, _Watch] = {}

    def update(self, config: Config) -> None:
        """Staple the certificates ``config`` has (at start and after a reload)."""
        targets = ocsp_targets(config)
        for fingerprint in set(self._watches) - set(targets):
            self._stop_watch(self._watches.pop(fingerprint))
        for fingerprint, target in targets.items():
            if fingerprint not in self._watches:
                watch = self._watches[fingerprint] = _Watch(target, self._stored(target))
                self._schedule(watch, next_fetch(watch.verified, _now(), self.rng))

    def stop(self) -> None:
        """No more fetches."""
        for watch in self._watches.values():
            self._stop_watch(watch)
        self._watches = {}

    @staticmethod
    def _stop_watch(watch: _Watch) -> None:
        if watch.call is not None and watch.call.active():
            watch.call.cancel()

    def _stored(self, target: OCSPTarget) -> Verified | None:
        der = self.store.get(target)
        if der is None:
            return None
        try:
            return verify_response(target, der, _now())
        except OCSPError:
            return None

    def _schedule(self, watch: _Watch, delay: float) -> None:
        watch.call = self.reactor.callLater(delay, self._fetch, watch)

    def _fetch(self, watch: _Watch) -> defer.Deferred[Any]:
        fetching: defer.Deferred[Any] = self._post(watch.target.url, request_der(watch.target))
        fetching.addCallback(self._received, watch)
        fetching.addErrback(self._failed, watch)
        return fetching

    def _post(self, url: str, body: bytes) -> defer.Deferred[Any]:
        """POST an OCSP request; fires with the response's DER."""
        headers = Headers({b"Content-Type": [b"application/ocsp-request"], b"Accept": [b"application/ocsp-response"]})
        requested: defer.Deferred[Any] = self.agent.request(b"POST", url.encode("ascii"), headers,
                                                            FileBodyProducer(BytesIO(body)))

        def read(response: Any) -> defer.Deferred[bytes]:
            if response.code != 200:
                response.deliverBody(Protocol())
                raise OCSPError(f"the responder answered HTTP {response.code}")
            done: defer.Deferred[bytes] = defer.Deferred()
            response.deliverBody(_BoundedBody(done))
            return done

        requested.addCallback(read)
        requested.addTimeout(FETCH_TIMEOUT, self.reactor)
        return requested

    def _received(self, der: bytes, watch: _Watch) -> None:
        verified = verify_response(watch.target, der, _now())  # OCSPError: _failed
        self.store.put(watch.target, der)  # a revoked answer replaces a good one: nothing is stapled then
        if not verified.good:
            watch.verified, watch.failures = None, watch.failures + 1
            delay = retry_delay(watch.failures, None, _now(), self.rng)
            log.error("OCSP: the responder {url} says the certificate {subject} (serial {serial:x}) is {status}: "
                      "no OCSP response is stapled for it; next try in {delay:.0f}s", url=watch.target.url,
                      subject=watch.target.certificate.subject.rfc4514_string(),
                      serial=watch.target.certificate.serial_number, status=verified.status.name.lower(),
                      delay=delay)
            self._notify()
            self._schedule(watch, delay)
            return
        watch.verified, watch.failures = verified, 0
        log.info("OCSP: stapling a good response for {subject} (serial {serial:x}) valid until {until}Z",
                 subject=watch.target.certificate.subject.rfc4514_string(),
                 serial=watch.target.certificate.serial_number,
                 until=f"{verified.valid_until:%Y-%m-%d %H:%M:%S}")
        self._notify()
        self._schedule(watch, next_fetch(verified, _now(), self.rng))

    def _failed(self, failure: Failure, watch: _Watch) -> None:
        watch.failures += 1
        now = _now()
        if watch.verified is not None and watch.verified.valid_until <= now:
            watch.verified = None
        delay = retry_delay(watch.failures, watch.verified, now, self.rng)
        log.warn("OCSP: no new response for {subject} from {url}: {reason}; {still}; next try in {delay:.0f}s",
                 subject=watch.target.certificate.subject.rfc4514_string(), url=watch.target.url,
                 reason=failure.getErrorMessage(), delay=delay,
                 still="the response in hand is stapled until it expires" if watch.verified is not None
                 else "nothing is stapled")
        self._notify()  # a response that expired in the meantime is dropped by the handshakes' refresh
        self._schedule(watch, delay)

    def _notify(self) -> None:
        try:
            self.changed()
        except Exception:
            log.failure("OCSP: applying the new response failed")
