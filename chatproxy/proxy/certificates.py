"""The server TLS of one process's listeners, kept and refreshed.

:class:`TLSMaterial` builds each TLS listener's :class:`~chatproxy.proxy.tls.ServerTLS`
and keeps it while neither the listener's TLS options nor its certificate
and key files change, so that a reload keeps the session cache (clients
resume across a SIGHUP).  :meth:`TLSMaterial.refresh` reads the files of the
listeners in use again and swaps the contexts of the certificates whose
files changed (a renewed certificate: connections already open keep theirs),
and reloads every certificate's OCSP staple from the
:class:`~chatproxy.proxy.staples.StapleStore`.  A listener whose ACME
certificate does not exist yet serves a self-signed stand-in for its names
until it does.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterator
from pathlib import Path

from attrs import define, frozen
from cryptography import x509
from OpenSSL import SSL
from twisted.logger import Logger

from chatproxy.config import Listener, SniCertificate
from chatproxy.proxy.ocsp import OCSPError, OCSPTarget, StapleSlot, target_from_chain, verify_response
from chatproxy.proxy.staples import StapleStore
from chatproxy.proxy.tls import ServerTLS, TLSMaterialError, memory_context, self_signed, server_context
from chatproxy.proxy.tls_profiles import TLSSettings, listener_settings

__all__ = ["CertificateState", "TLSMaterial"]

log = Logger()


@frozen
class _Source:
    """Where one certificate of a listener comes from."""

    name: str  # "" for the listener's certificate, else the SNI host
    certificate: Path
    key: Path
    options: tuple[str, str]  # the options an error names
    acme_names: tuple[str, ...] = ()  # names of an ACME certificate's stand-in; () without ACME


@define
class CertificateState:
    """One certificate as served: its context, staple slot and expiry."""

    source: _Source
    digest: bytes  # of the files it was built from (b"" for an ACME stand-in)
    context: SSL.Context
    not_after: datetime.datetime | None
    target: OCSPTarget | None = None
    slot: StapleSlot | None = None

    @property
    def stand_in(self) -> bool:
        """Whether this is an ACME listener's self-signed stand-in (no certificate issued yet)."""
        return not self.digest


@define
class _ListenerState:
    listener: Listener
    settings: TLSSettings
    server: ServerTLS
    certificates: list[CertificateState]


def _sources(listener: Listener) -> list[_Source]:
    assert listener.certificate is not None and listener.key is not None
    sources = [_Source("", listener.certificate, listener.key, ("certificate", "key"),
                       listener.acme_names if listener.acme else ())]
    sources += [_Source(entry.host, entry.certificate, entry.key, ("sni", "sni"), _sni_names(entry))
                for entry in listener.sni]
    return sources


def _sni_names(entry: SniCertificate) -> tuple[str, ...]:
    return (entry.host,) if entry.acme else ()


def _tls_identity(listener: Listener) -> tuple[object, ...]:
    """What of a listener its server TLS is built from (not its name, endpoint, headers...)."""
    return (listener.certificate, listener.key, listener.sni, listener_settings(listener), listener.ocsp_stapling,
            listener.acme, listener.acme_names)


def _digest(source: _Source) -> bytes:
    """A digest of the certificate and key files; b"" when an ACME certificate does not exist yet."""
    try:
        return hashlib.sha256(source.certificate.read_bytes() + b"\0" + source.key.read_bytes()).digest()
    except FileNotFoundError:
        if source.acme_names:
            return b""
        raise


class TLSMaterial:
    """Every TLS listener's server TLS in one process; see the module docstring."""

    def __init__(self, staples: StapleStore) -> None:
        self.staples = staples
        self._listeners: dict[str, _ListenerState] = {}

    def server_tls(self, listener: Listener) -> ServerTLS:
        """The server TLS for a listener: the one built before if nothing it is
        made of changed, else a new one.  Raises TLSMaterialError or OSError."""
        known = self._listeners.get(listener.name)
        if known is not None and _tls_identity(known.listener) == _tls_identity(listener) and \
                [c.digest for c in known.certificates] == [_digest(s) for s in _sources(listener)]:
            known.listener = listener
            return known.server
        settings = listener_settings(listener)
        certificates = [self._build(source, settings, listener.ocsp_stapling) for source in _sources(listener)]
        server = ServerTLS(certificates[0].context, {c.source.name: c.context for c in certificates[1:]})
        self._listeners[listener.name] = _ListenerState(listener, settings, server, certificates)
        return server

    def retain(self, names: set[str]) -> None:
        """Forget the listeners not in ``names`` (after a reload removed them)."""
        for name in set(self._listeners) - names:
            del self._listeners[name]

    def _build(self, source: _Source, settings: TLSSettings, stapling: bool) -> CertificateState:
        digest = _digest(source)
        if not digest:
            certificate, key = self_signed(source.acme_names, days=7)
            return CertificateState(source, b"", memory_context(certificate, key, settings), None)
        chain = x509.load_pem_x509_certificates(source.certificate.read_bytes())
        target = _target(source, chain) if stapling else None
        slot = StapleSlot(target.must_staple) if target is not None else None
        context = server_context(source.certificate, source.key, settings, options=source.options,
                                 staple=slot.answer if slot is not None else None)
        state = CertificateState(source, digest, context, chain[0].not_valid_after_utc, target, slot)
        self._load_staple(state)
        return state

    def _load_staple(self, state: CertificateState) -> None:
        """Put the stored response for the certificate in its slot if it verifies, else empty it."""
        if state.target is None or state.slot is None:
            return
        der = self.staples.get(state.target)
        verified = None
        if der is not None:
            try:
                verified = verify_response(state.target, der, datetime.datetime.now(datetime.timezone.utc))
            except OCSPError as e:
                log.debug("OCSP: the stored response for {file} is not used: {reason}",
                          file=str(state.source.certificate), reason=str(e))
        state.slot.verified = verified

    def refresh(self) -> None:
        """Read the certificate files and OCSP staples of every listener in
        use again; swap the contexts whose files changed.  A certificate that
        cannot be loaded any more is logged and keeps serving as it was."""
        for state in self._listeners.values():
            changed = False
            for index, certificate in enumerate(state.certificates):
                try:
                    if _digest(certificate.source) != certificate.digest:
                        state.certificates[index] = certificate = self._build(
                            certificate.source, state.settings, state.listener.ocsp_stapling)
                        changed = True
                        log.info("[listen:{name}] certificate {file} loaded", name=state.listener.name,
                                 file=str(certificate.source.certificate))
                except (TLSMaterialError, OSError, ValueError) as e:
                    log.error("[listen:{name}] cannot load {file}, the certificate loaded before keeps serving: "
                              "{error}", name=state.listener.name, file=str(certificate.source.certificate),
                              error=getattr(e, "message", str(e)))
                self._load_staple(certificate)
            if changed:
                state.server.replace(state.certificates[0].context,
                                     {c.source.name: c.context for c in state.certificates[1:]})

    def certificates(self) -> Iterator[tuple[str, CertificateState]]:
        """Every certificate in use, with its listener's name."""
        for name, state in self._listeners.items():
            for certificate in state.certificates:
                yield name, certificate


def _target(source: _Source, chain: list[x509.Certificate]) -> OCSPTarget | None:
    try:
        return target_from_chain(chain)
    except OCSPError as e:
        log.warn("OCSP stapling off for {file}: {reason}", file=str(source.certificate), reason=str(e))
        return None
