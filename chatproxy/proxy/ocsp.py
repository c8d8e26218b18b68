"""OCSP stapling decisions, without I/O: which certificates can be stapled
(a responder URL, an issuer in the chain), the request to send, whether a
response may be stapled (verified, good, current), when to ask again, and
what a handshake gets (:class:`StapleSlot`).  Fetching is
:mod:`chatproxy.process.stapler`'s, the memory and disk cache
:mod:`chatproxy.proxy.staples`'.

A response is stapled only when all of this holds: the responder answered
``successful``; it speaks of this certificate (serial number, issuer name
and key hashes); it is signed by the issuer, or by a responder certificate
the issuer issued for OCSP signing (``id-kp-OCSPSigning``) that is valid
now; its ``thisUpdate`` is not in the future (5 minutes of clock skew
allowed) and its ``nextUpdate`` not in the past; and the status is
``good`` (a ``revoked`` or ``unknown`` answer is verified, logged, and not
stapled, as nginx does).  A response without ``nextUpdate`` counts as
current for :data:`NO_NEXT_UPDATE_VALIDITY` after ``thisUpdate``.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Sequence

from attrs import define, frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from OpenSSL import SSL

__all__ = [
    "OCSPError",
    "OCSPTarget",
    "StapleSlot",
    "Verified",
    "must_staple",
    "next_fetch",
    "request_der",
    "retry_delay",
    "target_from_chain",
    "verify_response",
]

#: Clock skew allowed for ``thisUpdate``.
SKEW = datetime.timedelta(minutes=5)
#: How long a response without ``nextUpdate`` is stapled.
NO_NEXT_UPDATE_VALIDITY = datetime.timedelta(hours=1)
#: Retry after a failed fetch: this, doubled per failure in a row, at most MAX_RETRY.
FIRST_RETRY = 60.0
MAX_RETRY = 3600.0
#: A refresh is never planned sooner than this.
MIN_REFRESH = 60.0


class OCSPError(Exception):
    """A response that must not be stapled, and why."""


@frozen
class OCSPTarget:
    """One certificate that can be stapled: it, its issuer, its responder."""

    certificate: x509.Certificate
    issuer: x509.Certificate
    url: str
    must_staple: bool

    @property
    def fingerprint(self) -> str:
        """The certificate's SHA-256 fingerprint (hex): the cache's name for it."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()


@frozen
class Verified:
    """A response that passed verification: its DER and what it says."""

    der: bytes
    status: ocsp.OCSPCertStatus
    this_update: datetime.datetime
    valid_until: datetime.datetime

    @property
    def good(self) -> bool:
        """Whether it says the certificate is good (only then is it stapled)."""
        return self.status == ocsp.OCSPCertStatus.GOOD


def must_staple(certificate: x509.Certificate) -> bool:
    """Whether the certificate carries the TLS feature ``status_request`` (RFC 7633)."""
    try:
        features = certificate.extensions.get_extension_for_class(x509.TLSFeature).value
    except x509.ExtensionNotFound:
        return False
    return x509.TLSFeatureType.status_request in features


def responder_url(certificate: x509.Certificate) -> str | None:
    """The first ``http(s)://`` OCSP responder URL of the certificate's AIA, or None."""
    try:
        access = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for description in access:
        location = description.access_location
        if description.access_method == AuthorityInformationAccessOID.OCSP and \
                isinstance(location, x509.UniformResourceIdentifier) and \
                location.value.lower().startswith(("http://", "https://")):
            return str(location.value)
    return None


def target_from_chain(chain: Sequence[x509.Certificate]) -> OCSPTarget | None:
    """The OCSP target of a certificate chain (the server certificate first):
    None when the certificate names no responder.  Raises OCSPError when it
    does but the chain lacks its issuer."""
    if not chain:
        return None
    certificate = chain[0]
    url = responder_url(certificate)
    if url is None:
        return None
    issuer = next((c for c in chain[1:] if c.subject == certificate.issuer), None)
    if issuer is None:
        raise OCSPError("the certificate file holds no issuer certificate after the server certificate: "
                        "OCSP needs it (put the intermediate certificate in the file)")
    return OCSPTarget(certificate, issuer, url, must_staple(certificate))


def request_der(target: OCSPTarget) -> bytes:
    """The DER OCSP request for the target (SHA-1 certificate ID, as responders expect)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(target.certificate, target.issuer, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def _check_signature(key: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None) -> None:
    """Raise InvalidSignature (or OCSPError for a key type not handled)."""
    if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        key.verify(signature, data)
    else:
        raise OCSPError(f"cannot check a signature made with a {type(key).__name__}")


def _key_hash(certificate: x509.Certificate) -> bytes:
    """SHA-1 of the certificate's public key bit string: the responder ID ``byKey``."""
    return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest  # type: ignore[arg-type]


def _is_responder(response: ocsp.OCSPResponse, certificate: x509.Certificate) -> bool:
    if response.responder_key_hash is not None:
        return response.responder_key_hash == _key_hash(certificate)
    return response.responder_name == certificate.subject


def _signer(target: OCSPTarget, response: ocsp.OCSPResponse, now: datetime.datetime) -> x509.Certificate:
    """The certificate whose key signed the response: the issuer, or a
    delegated responder the issuer issued for OCSP signing, valid now."""
    if _is_responder(response, target.issuer):
        return target.issuer
    for candidate in response.certificates:
        if not _is_responder(response, candidate):
            continue
        try:
            candidate.verify_directly_issued_by(target.issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise OCSPError("the responder's certificate was not issued by the certificate's issuer") from None
        try:
            usage = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
            raise OCSPError("the responder's certificate is not for OCSP signing")
        if not candidate.not_valid_before_utc <= now <= candidate.not_valid_after_utc:
            raise OCSPError("the responder's certificate is not valid now")
        return candidate
    raise OCSPError("the response is signed neither by the issuer nor by a responder certificate it carries")


def _single_response(target: OCSPTarget, response: ocsp.OCSPResponse) -> ocsp.OCSPSingleResponse:
    """The response's entry for the target's certificate (its certificate ID
    computed by cryptography with the entry's hash algorithm)."""
    for single in response.responses:
        expected = ocsp.OCSPRequestBuilder().add_certificate(target.certificate, target.issuer,
                                                              single.hash_algorithm).build()
        if (single.serial_number, single.issuer_name_hash, single.issuer_key_hash) == (
                expected.serial_number, expected.issuer_name_hash, expected.issuer_key_hash):
            return single
    raise OCSPError("the response does not speak of this certificate")


def verify_response(target: OCSPTarget, der: bytes, now: datetime.datetime) -> Verified:
    """Check a DER OCSP response for the target at ``now``; raises OCSPError
    saying why it cannot be used.  The result may say ``revoked`` or
    ``unknown``: only a ``good`` one is stapled."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        raise OCSPError(f"not an OCSP response: {e}") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OCSPError(f"the responder answered {response.response_status.name.lower()}")
    single = _single_response(target, response)
    signer = _signer(target, response, now)
    try:
        _check_signature(signer.public_key(), response.signature, response.tbs_response_bytes,
                         response.signature_hash_algorithm)
    except InvalidSignature:
        raise OCSPError("the response's signature does not verify") from None
    this_update = single.this_update_utc
    if this_update > now + SKEW:
        raise OCSPError(f"the response is from the future (thisUpdate {this_update:%Y-%m-%d %H:%M:%S}Z)")
    next_update = single.next_update_utc
    valid_until = next_update if next_update is not None else this_update + NO_NEXT_UPDATE_VALIDITY
    if valid_until <= now:
        raise OCSPError(f"the response expired at {valid_until:%Y-%m-%d %H:%M:%S}Z")
    return Verified(der, single.certificate_status, this_update, valid_until)


def next_fetch(verified: Verified | None, now: datetime.datetime, rng: random.Random) -> float:
    """Seconds from ``now`` until the next fetch: halfway through the
    response's validity (a little earlier, at random, so that processes and
    certificates do not all ask at once), at least MIN_REFRESH; at once
    (0) without a response that can be stapled."""
    if verified is None or not verified.good:
        return 0.0
    window = (verified.valid_until - verified.this_update).total_seconds()
    halfway = verified.this_update + datetime.timedelta(seconds=window / 2 * (1 - rng.uniform(0, 0.1)))
    return max(MIN_REFRESH, (halfway - now).total_seconds())


def retry_delay(failures: int, verified: Verified | None, now: datetime.datetime, rng: random.Random) -> float:
    """Seconds until the next try after ``failures`` failed fetches in a row
    (1, 2, ...): FIRST_RETRY doubled per failure, at most MAX_RETRY, with
    10% jitter; and no later than a little before the response in hand expires."""
    delay: float = min(MAX_RETRY, FIRST_RETRY * 2.0 ** (failures - 1) * rng.uniform(0.9, 1.1))
    if verified is not None:
        left = (verified.valid_until - now).total_seconds()
        delay = min(delay, max(MIN_REFRESH, left / 2))
    return delay


@define
class StapleSlot:
    """What one certificate's handshakes staple: a verified ``good``
    response until it expires, else nothing; a must-staple certificate
    without one refuses the handshake of a client asking for OCSP (the
    client would reject the certificate anyway)."""

    must_staple: bool
    verified: Verified | None = None

    def answer(self, now: datetime.datetime | None = None) -> bytes:
        """The DER response to staple (b"" for none); raises SSL.Error to refuse."""
        current = self.verified
        moment = now or datetime.datetime.now(datetime.timezone.utc)
        if current is not None and current.good and current.valid_until > moment:
            return current.der
        if self.must_staple:
            raise SSL.Error("must-staple certificate without a current good OCSP response")
        return b""
