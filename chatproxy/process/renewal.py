"""ACME certificates that renew themselves (in a single process, or in the
master of workers, which alone talks to the CA).

Every listener with ``acme = NAME`` and every ``sni`` line ending in
``acme:NAME`` wants a certificate for its names in its ``certificate`` and
``key`` files.  :class:`Renewer` orders one (:class:`~chatproxy.process.acme_issuer.AcmeIssuer`,
in a thread) when the files do not exist, when the certificate does not
cover the names asked for, and at two thirds of the certificate's lifetime
(up to 1/30 of the lifetime earlier, at random, so that certificates and
instances do not all renew at once).  The new key is written (mode 0600),
then the certificate, each by a rename; then ``changed`` makes the serving
processes load them (new connections get the new certificate, open ones
keep theirs).  A failed order changes no file: the certificate in place
keeps serving, and the order is tried again after 1 minute, doubling up to
6 hours (10% jitter).
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import define, frozen
from cryptography import x509
from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproxy.config import AcmeAccount, Config
from chatproxy.process.acme_issuer import AcmeIssuer, Issued
from chatproxy.proxy.tls import write_file

__all__ = ["Renewer", "Wanted", "due", "renew_at", "retry_delay", "wanted_certificates"]

log = Logger()

FIRST_RETRY = 60.0
MAX_RETRY = 6 * 3600.0


@frozen
class Wanted:
    """One certificate ACME keeps: which account, for which names, in which files."""

    label: str  # "[listen:NAME]" or "[listen:NAME] sni HOST", for the log
    account: AcmeAccount
    names: tuple[str, ...]
    certificate: Path
    key: Path


def wanted_certificates(config: Config) -> list[Wanted]:
    """Every certificate of ``config`` that ACME issues."""
    wanted = []
    for listener in config.listeners.values():
        if listener.acme is not None and listener.certificate is not None and listener.key is not None:
            wanted.append(Wanted(f"[listen:{listener.name}]", config.acme[listener.acme], listener.acme_names,
                                 listener.certificate, listener.key))
        for entry in listener.sni:
            if entry.acme is not None:
                wanted.append(Wanted(f"[listen:{listener.name}] sni {entry.host}", config.acme[entry.acme],
                                     (entry.host,), entry.certificate, entry.key))
    return wanted


def renew_at(certificate: x509.Certificate, rng: random.Random) -> datetime.datetime:
    """When to renew: at two thirds of the lifetime, up to 1/30 of it earlier at random."""
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    return certificate.not_valid_before_utc + lifetime * 2 / 3 - lifetime * rng.uniform(0, 1 / 30)


def due(wanted: Wanted, now: datetime.datetime, rng: random.Random) -> tuple[str | None, datetime.datetime | None]:
    """Why the certificate must be ordered now (None: it need not) and, if
    not, when it will be: reads the certificate file."""
    try:
        certificate = x509.load_pem_x509_certificate(wanted.certificate.read_bytes())
    except FileNotFoundError:
        return "no certificate yet", None
    except (OSError, ValueError) as e:
        return f"the certificate file cannot be read ({e})", None
    if not wanted.key.exists():
        return "no key file", None
    try:
        covered = set(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                      .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        covered = set()
    if not set(wanted.names) <= covered:
        return f"the certificate does not cover {', '.join(sorted(set(wanted.names) - covered))}", None
    when = renew_at(certificate, rng)
    if when <= now:
        return f"renewal due (expires {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z)", None
    return None, when


def retry_delay(failures: int, rng: random.Random) -> float:
    """Seconds before trying a failed order again (1, 2, ... failures in a row)."""
    return min(MAX_RETRY, FIRST_RETRY * 2.0 ** (failures - 1) * rng.uniform(0.9, 1.1))


@define
class _Watch:
    wanted: Wanted
    failures: int = 0
    call: Any = None
    ordering: bool = False


class Renewer:
    """Keeps every ACME certificate of the configuration issued and fresh."""

    def __init__(self, reactor: Any, state: Path, changed: Callable[[], None],
                 rng: random.Random | None = None) -> None:
        """``state``: the state directory (``acme/ACCOUNT/`` holds each
        account's key, ``acme/challenges/`` the pending HTTP-01 answers)."""
        self.reactor = reactor
        self.state = state
        self.changed = changed
        self.rng = rng or random.Random()
        self._watches: dict[tuple[Path, Path], _Watch] = {}

    @property
    def challenges(self) -> Path:
        """Where the HTTP-01 answers are written."""
        return self.state / "acme" / "challenges"

    def update(self, config: Config) -> None:
        """Look after the certificates ``config`` wants (at start and after a reload)."""
        wanted = {(w.certificate, w.key): w for w in wanted_certificates(config)}
        for files in set(self._watches) - set(wanted):
            self._cancel(self._watches.pop(files))
        for files, w in wanted.items():
            watch = self._watches.get(files)
            if watch is None or watch.wanted != w:
                if watch is not None:
                    self._cancel(watch)
                self._watches[files] = watch = _Watch(w)
                self._schedule(watch, 0)

    def stop(self) -> None:
        """No more orders (one under way finishes in its thread, and is not applied)."""
        for watch in self._watches.values():
            self._cancel(watch)
        self._watches = {}

    @staticmethod
    def _cancel(watch: _Watch) -> None:
        if watch.call is not None and watch.call.active():
            watch.call.cancel()

    def _schedule(self, watch: _Watch, delay: float) -> None:
        # callLater's delay is bounded: a timer more than ~24 days away is re-checked then.
        watch.call = self.reactor.callLater(min(delay, 24 * 86400.0), self._check, watch)

    def _check(self, watch: _Watch) -> None:
        if watch.ordering or self._watches.get((watch.wanted.certificate, watch.wanted.key)) is not watch:
            return
        reason, when = due(watch.wanted, datetime.datetime.now(datetime.timezone.utc), self.rng)
        if reason is None:
            assert when is not None
            log.info("ACME: {label} certificate renews at {when}Z", label=watch.wanted.label,
                     when=f"{when:%Y-%m-%d %H:%M:%S}")
            self._schedule(watch, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
            return
        log.info("ACME: ordering a certificate for {label} ({names}) from {directory}: {reason}",
                 label=watch.wanted.label, names=", ".join(watch.wanted.names),
                 directory=watch.wanted.account.directory, reason=reason)
        watch.ordering = True
        issuer = AcmeIssuer(watch.wanted.account, self.state / "acme" / watch.wanted.account.name, self.challenges)
        ordering = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), issuer.issue,
                                             watch.wanted.names)
        ordering.addCallbacks(self._issued, self._failed, callbackArgs=(watch,), errbackArgs=(watch,))

    def _issued(self, issued: Issued, watch: _Watch) -> None:
        watch.ordering = False
        if self._watches.get((watch.wanted.certificate, watch.wanted.key)) is not watch:
            return  # the configuration no longer wants it
        try:
            write_file(watch.wanted.key, issued.key_pem, 0o600)
            write_file(watch.wanted.certificate, issued.fullchain_pem, 0o644)
        except OSError as e:
            self._failed(Failure(e), watch)
            return
        watch.failures = 0
        certificate = x509.load_pem_x509_certificate(issued.fullchain_pem)
        log.info("ACME: {label} has a new certificate for {names}, valid until {until}Z: {file}",
                 label=watch.wanted.label, names=", ".join(watch.wanted.names),
                 until=f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S}", file=str(watch.wanted.certificate))
        try:
            self.changed()
        except Exception:
            log.failure("ACME: loading the new certificate failed")
        self._schedule(watch, 0)

    def _failed(self, failure: Failure, watch: _Watch) -> None:
        watch.ordering = False
        if self._watches.get((watch.wanted.certificate, watch.wanted.key)) is not watch:
            return
        watch.failures += 1
        delay = retry_delay(watch.failures, self.rng)
        still = "the certificate in place keeps serving" if watch.wanted.certificate.exists() else \
            "a self-signed stand-in serves meanwhile"
        log.error("ACME: ordering a certificate for {label} failed: {reason}; {still}; next try in {delay:.0f}s",
                  label=watch.wanted.label, reason=failure.getErrorMessage() or repr(failure.value), still=still,
                  delay=delay)
        self._schedule(watch, delay)
