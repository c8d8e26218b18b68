"""The ``jwt`` filter kind: verify ``Authorization: Bearer`` JSON Web Tokens.

    [filter:pega-webhook]
    use = jwt
    secret_file = /etc/chatproxy/pega-jwt-secret
    issuer = 5f0c3e2a-connection-id
    max_age = 5m

The token is verified with PyJWT against exactly one key source: a shared
secret (``secret_file`` or ``secret_env``, for HS256/384/512) or a public key
(``public_key_file``: a PEM public key or certificate; ``jwks_file``: a JWK
set, the key chosen by the token's ``kid``) for RS*, PS*, ES* and EdDSA.  The
algorithms a token may name are fixed by the configuration and must fit the
key, so a public key can never be used as an HMAC secret (algorithm
confusion) and ``none`` is never accepted.

Lifetime: a token must carry ``exp`` unless ``max_age`` is set; with
``max_age`` it must carry ``iat`` and is refused once it is older than
``max_age`` (``exp`` is then optional but still checked when present).
``exp``, ``nbf`` and ``iat`` are checked with ``leeway`` (default 30 seconds).

A refused request gets ``401`` with a ``WWW-Authenticate: Bearer`` challenge
that names only the category (expired, not yet valid, malformed, not
accepted); the log line has the detail.  Tokens and secrets are never logged.

The shared-secret helpers (:func:`read_secret`, :func:`warn_short_secret`,
:func:`parse_algorithms`) are shared with the ``jwt_sign`` kind.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import jwt
from attrs import frozen
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWKError,
    PyJWTError,
)
import jwt.warnings
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.filters import Filter, FilterOptionError, FilterOptions, IFilterFactory, IRequestFilter, Refuse

log = Logger()

# Recent PyJWT versions warn about HMAC secrets shorter than RFC 7518 asks at every
# use; chatproxy warns once at build time instead.
KEY_LENGTH_WARNING: type[Warning] = getattr(jwt.warnings, "InsecureKeyLengthWarning", UserWarning)

REALM = "chatproxy"
DEFAULT_LEEWAY = 30.0

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1", "ES256K": "secp256k1"}
OKP_ALGORITHMS = ("EdDSA",)
PUBLIC_KEY_ALGORITHMS = (*RSA_ALGORITHMS, *EC_ALGORITHMS, *OKP_ALGORITHMS)
ALL_ALGORITHMS = (*HMAC_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS)
_BY_LOWER = {name.lower(): name for name in ALL_ALGORITHMS}
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MIN_RSA_BITS = 2048

KEY_SOURCES = ("secret_file", "secret_env", "public_key_file", "jwks_file")
OPTIONS = (*KEY_SOURCES, "algorithms", "issuer", "audience", "max_age", "leeway")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
Header = tuple[bytes, bytes]


# ---------------------------------------------------------------------------
# The shared secret, shared with jwt_sign


def read_secret(opts: FilterOptions) -> tuple[str, bytes]:
    """The shared secret from ``secret_file`` or ``secret_env``: (option, secret).

    The caller has checked that exactly one of them is given.  A file's single
    trailing newline (``\\n`` or ``\\r\\n``) is removed; an environment
    variable is taken as it is.  An empty secret, or one that looks like a PEM
    key (a public key is not a shared secret), is refused.
    """
    if "secret_file" in opts:
        option = "secret_file"
        secret = opts.file_bytes(option)
        if secret.endswith(b"\n"):
            secret = secret[:-1]
            if secret.endswith(b"\r"):
                secret = secret[:-1]
        if not secret:
            raise FilterOptionError(option, f"the secret in {opts.options[option].strip()} is empty")
    else:
        option = "secret_env"
        name = opts.text(option)
        value = os.environ.get(name)
        if value is None:
            raise FilterOptionError(option, f"environment variable {name} is not set")
        if not value:
            raise FilterOptionError(option, f"environment variable {name} is empty")
        secret = value.encode("utf-8")
    if secret.lstrip().startswith(b"-----BEGIN"):
        raise FilterOptionError(option, "holds a PEM key, not a shared secret "
                                        "(public keys go in public_key_file, for RS*/PS*/ES* algorithms)")
    return option, secret


def warn_short_secret(kind: str, option: str, secret: bytes, algorithms: Iterable[str]) -> None:
    """Log (once, at build time) when the secret is shorter than RFC 7518 3.2 asks."""
    for algorithm in algorithms:
        minimum = _HMAC_MIN_BYTES.get(algorithm, 0)
        if len(secret) < minimum:
            log.warn("{kind}: the secret from {option} is {length} bytes, shorter than the {minimum} bytes "
                     "RFC 7518 recommends for {algorithm}", kind=kind, option=option, length=len(secret),
                     minimum=minimum, algorithm=algorithm)
            return


# ---------------------------------------------------------------------------
# Keys and algorithms


def parse_algorithms(items: Sequence[str], option: str = "algorithms") -> tuple[str, ...]:
    """JOSE algorithm names (any case) as the list option ``option`` gives
    them, duplicates dropped; ``none`` is refused."""
    names: list[str] = []
    for item in items:
        if item.lower() == "none":
            raise FilterOptionError(option, "the 'none' algorithm is never accepted")
        if item.lower() not in _BY_LOWER:
            raise FilterOptionError(option, f"unknown algorithm {item!r} (known: {', '.join(ALL_ALGORITHMS)})")
        name = _BY_LOWER[item.lower()]
        if name not in names:
            names.append(name)
    if not names:
        raise FilterOptionError(option, "must not be empty")
    return tuple(names)


def key_description(key: PublicKey) -> str:
    """``RSA 2048-bit``, ``EC secp256r1``, ``Ed25519`` …"""
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}-bit key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} key"
    return "Ed25519 key" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448 key"


def fits(algorithm: str, key: PublicKey) -> bool:
    """Whether ``algorithm`` verifies with ``key``'s type (and curve)."""
    if isinstance(key, rsa.RSAPublicKey):
        return algorithm in RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return EC_ALGORITHMS.get(algorithm) == key.curve.name
    return algorithm in OKP_ALGORITHMS


def natural_algorithm(key: PublicKey) -> str | None:
    """The default algorithm for a key: RS256 for RSA, ES* by curve, EdDSA."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        for algorithm, curve in EC_ALGORITHMS.items():
            if curve == key.curve.name:
                return algorithm
        return None
    return "EdDSA"


def check_public_key(option: str, key: Any, where: str = "") -> PublicKey:
    """``key`` if it is a public key type the filter can verify with."""
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                            ed448.Ed448PublicKey)):
        raise FilterOptionError(option, f"{where}unsupported key type {type(key).__name__} "
                                        "(RSA, EC P-256/P-384/P-521/secp256k1, Ed25519 or Ed448)")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        raise FilterOptionError(option, f"{where}the RSA key has {key.key_size} bits, "
                                        f"fewer than the {_MIN_RSA_BITS} required")
    if isinstance(key, ec.EllipticCurvePublicKey) and natural_algorithm(key) is None:
        raise FilterOptionError(option, f"{where}unsupported EC curve {key.curve.name}")
    return key


def load_public_key(option: str, data: bytes) -> PublicKey:
    """A PEM public key (SubjectPublicKeyInfo or PKCS#1 RSA) or the key of a
    PEM certificate, from the file option ``option`` names."""
    if b"PRIVATE KEY" in data:
        raise FilterOptionError(option, "holds a private key; give only the public key (the filter only verifies)")
    key: Any
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise FilterOptionError(option, f"not a PEM public key or certificate: {e}") from None
    return check_public_key(option, key)


@frozen
class JWKSKey:
    """One verification key of a JWK set: its ``kid``, key and usable algorithms."""

    kid: str | None
    key: PublicKey
    algorithms: tuple[str, ...]
    declared: str | None  # the JWK's own "alg", if it has one


def load_jwks(option: str, data: bytes) -> list[JWKSKey]:
    """The signature keys of a JWK set file (``{"keys": [...]}`` or a single
    JWK) that option ``option`` names.

    Keys whose ``use`` is not ``sig``, or whose ``alg`` is not a signature
    algorithm, are skipped; symmetric (``oct``) and private keys are refused;
    ``kid`` values must be distinct.  ``algorithms`` is filled in later.
    """
    keys: list[JWKSKey] = []
    seen: set[str] = set()
    for index, entry in enumerate(_jwks_entries(option, data)):
        key = _jwks_key(option, index, entry)
        if key is None:
            continue
        if key.kid is not None:
            if key.kid in seen:
                raise FilterOptionError(option, f"key {key.kid!r}: the same kid appears twice")
            seen.add(key.kid)
        keys.append(key)
    if not keys:
        raise FilterOptionError(option, "holds no public signature key")
    return keys


def _jwks_entries(option: str, data: bytes) -> list[Any]:
    """The JWKs of a JWK set document (or the one JWK it is)."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FilterOptionError(option, f"not valid JSON: {e}") from None
    if isinstance(document, dict) and "keys" in document:
        entries = document["keys"]
    elif isinstance(document, dict) and "kty" in document:
        entries = [document]
    else:
        raise FilterOptionError(option, 'expected a JWK set ({"keys": [...]}) or a single JWK')
    if not isinstance(entries, list):
        raise FilterOptionError(option, '"keys" must be a list')
    return entries


_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def _jwks_key(option: str, index: int, entry: Any) -> JWKSKey | None:
    """One JWK of a set as a verification key; None for a key not meant for
    signatures (``use`` other than ``sig``, an encryption ``alg``)."""
    if not isinstance(entry, dict):
        raise FilterOptionError(option, f"key #{index + 1} is not a JSON object")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise FilterOptionError(option, f"key #{index + 1}: kid must be a string")
    where = f"key {kid!r}: " if kid is not None else f"key #{index + 1}: "
    if entry.get("kty") == "oct":
        raise FilterOptionError(option, f"{where}symmetric (oct) keys are not accepted; "
                                        "HS* secrets come from secret_file or secret_env")
    if any(private in entry for private in _PRIVATE_JWK_MEMBERS):
        raise FilterOptionError(option, f"{where}holds private key material; give only public keys")
    declared = entry.get("alg")
    if entry.get("use", "sig") != "sig" or not _signature_alg(option, where, declared):
        return None
    try:
        loaded = jwt.PyJWK(entry).key
    except (PyJWKError, PyJWTError, ValueError, TypeError, KeyError) as e:
        raise FilterOptionError(option, f"{where}not a usable public JWK: {e}") from None
    key = check_public_key(option, loaded, where)
    if declared is not None and not fits(declared, key):
        raise FilterOptionError(option, f"{where}alg {declared} does not fit its {key_description(key)}")
    return JWKSKey(kid, key, (), declared)


def _signature_alg(option: str, where: str, declared: Any) -> bool:
    """Whether a JWK's ``alg`` (None: not given) lets it verify signatures here;
    ``none`` is refused."""
    if declared is None or declared in PUBLIC_KEY_ALGORITHMS:
        return True
    if isinstance(declared, str) and declared.lower() == "none":
        raise FilterOptionError(option, f"{where}the 'none' algorithm is never accepted")
    return False  # an encryption key (RSA-OAEP, ECDH-ES …) or an algorithm not verified here


# ---------------------------------------------------------------------------
# The filter


_MISSING = "bearer token required"
_CATEGORIES = {
    "expired": "token expired",
    "immature": "token not yet valid",
    "malformed": "malformed token",
    "rejected": "token not accepted",
}


def _challenge(description: str | None) -> tuple[Header, ...]:
    value = f'Bearer realm="{REALM}"'
    if description is not None:
        value += f', error="invalid_token", error_description="{description}"'
    return ((b"WWW-Authenticate", value.encode("ascii")),)


def _short(value: Any) -> str:
    """A value from an unverified token, safe and short enough for a log line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Refused(Exception):
    """A token was not accepted: ``category`` for the client, ``detail`` for the log."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(detail)
        self.category = category
        self.detail = detail


@implementer(IRequestFilter)
class JWTVerify(Filter):
    """Passes requests whose ``Authorization: Bearer`` token verifies; refuses the others with 401.

    Either ``key`` (a secret or a public key, used with ``algorithms``) or
    ``jwks`` (JWK set keys chosen by ``kid``, each with its own algorithms)
    is given.  ``clock`` is only used for ``max_age``; PyJWT checks ``exp``,
    ``nbf`` and ``iat`` against the system time.
    """

    def __init__(self, *, key: bytes | PublicKey | None, jwks: list[JWKSKey] | None,
                 algorithms: tuple[str, ...], issuer: tuple[str, ...] | None,
                 audience: tuple[str, ...] | None, max_age: float | None, leeway: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.jwks = jwks
        self.algorithms = algorithms
        self.issuer = issuer
        self.audience = audience
        self.max_age = max_age
        self.leeway = leeway
        self.clock = clock
        required = ["iat"] if max_age is not None else ["exp"]
        self.options: Any = {"require": required, "verify_signature": True, "verify_exp": True,
                             "verify_nbf": True, "verify_iat": True, "verify_iss": True, "verify_aud": True}

    def request(self, head: Any) -> Refuse | None:
        """Verify the request's bearer token; None when it is good."""
        values = [value for name, value in head.headers if name.lower() == b"authorization"]
        if not values:
            return self._refuse(head, None, "no Authorization header")
        if len(values) > 1:
            return self._refuse(head, None, f"{len(values)} Authorization headers")
        scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer":
            return self._refuse(head, None, f"Authorization scheme {_short(scheme[:20])} is not Bearer")
        token = token.strip()
        if not token:
            return self._refuse(head, None, "Authorization: Bearer without a token")
        try:
            self.verify(token)
        except _Refused as refused:
            return self._refuse(head, refused.category, refused.detail)
        return None

    def _refuse(self, head: Any, category: str | None, detail: str) -> Refuse:
        log.info("jwt: token from {client} for {method} {path} not accepted: {detail}", client=head.client,
                 method=head.method, path=head.path, detail=detail)
        description = _CATEGORIES[category] if category is not None else None
        return Refuse(401, description or _MISSING, _challenge(description))

    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``, or raise :class:`_Refused`."""
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError as e:
            raise _Refused("malformed", f"undecodable token: {e}") from None
        alg = header.get("alg")
        context = f" (alg {_short(alg)}" + (f", kid {_short(header['kid'])})" if "kid" in header else ")")
        key, algorithms = self._key_for(header, context)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", KEY_LENGTH_WARNING)
                claims: dict[str, Any] = jwt.decode(
                    token, key=key, algorithms=list(algorithms), options=self.options,
                    issuer=self.issuer, audience=self.audience, leeway=self.leeway)
        except ExpiredSignatureError:
            raise _Refused("expired", f"exp is past, beyond the leeway of {self.leeway:g}s{context}") \
                from None
        except ImmatureSignatureError as e:
            raise _Refused("immature", f"{e}, beyond the leeway of {self.leeway:g}s{context}") from None
        except InvalidSignatureError:
            raise _Refused("rejected", f"signature does not verify{context}") from None
        except InvalidAlgorithmError:
            raise _Refused("rejected", f"algorithm {_short(alg)} is not allowed here "
                                       f"(algorithms: {', '.join(algorithms) or 'none fit this key'})") from None
        except InvalidIssuerError as e:
            raise _Refused("rejected", f"{e}: iss {_short(self._unverified(token).get('iss'))} is not "
                                       f"{' or '.join(self.issuer or ())}{context}") from None
        except InvalidAudienceError as e:
            wanted = " or ".join(self.audience) if self.audience else "absent (no audience configured)"
            raise _Refused("rejected", f"{e}: aud {_short(self._unverified(token).get('aud'))}, "
                                       f"expected {wanted}{context}") from None
        except MissingRequiredClaimError as e:
            raise _Refused("rejected", f"{e}{context}") from None
        except DecodeError as e:
            raise _Refused("malformed", f"{e}{context}") from None
        except PyJWTError as e:
            raise _Refused("rejected", f"{type(e).__name__}: {e}{context}") from None
        for claim in ("exp", "nbf", "iat"):
            if claim in claims and not _numeric_date(claims[claim]):
                raise _Refused("rejected", f"{claim} is not a NumericDate{context}")
        if self.max_age is not None:
            age = self.clock() - float(claims["iat"])
            if age > self.max_age + self.leeway:
                raise _Refused("expired", f"issued {age:.0f}s ago, more than max_age {self.max_age:g}s "
                                          f"+ leeway {self.leeway:g}s{context}")
        return claims

    def _key_for(self, header: dict[str, Any], context: str) -> tuple[Any, tuple[str, ...]]:
        """The key to verify a token with this header, and the algorithms allowed with it."""
        if self.jwks is None:
            return self.key, self.algorithms
        kid = header.get("kid")
        if kid is None:
            if len(self.jwks) > 1:
                raise _Refused("rejected", f"token has no kid and jwks_file has {len(self.jwks)} keys{context}")
            if not self.jwks[0].algorithms:
                raise _Refused("rejected", f"the key in jwks_file fits none of the algorithms{context}")
            return self.jwks[0].key, self.jwks[0].algorithms
        for candidate in self.jwks:
            if candidate.kid == kid:
                if not candidate.algorithms:
                    raise _Refused("rejected", f"the key with this kid fits none of the algorithms{context}")
                return candidate.key, candidate.algorithms
        raise _Refused("rejected", f"no key in jwks_file has this kid{context}")

    @staticmethod
    def _unverified(token: str) -> dict[str, Any]:
        """The token's claims without verification, only to name them in a log line."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except PyJWTError:
            return {}
        return claims if isinstance(claims, dict) else {}


def _numeric_date(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fitting(option: str, algorithms: Collection[str], keys: list[JWKSKey] | None,
             key: PublicKey | None) -> None:
    """Refuse algorithms that do not fit a public key source."""
    for algorithm in algorithms:
        if algorithm in HMAC_ALGORITHMS:
            raise FilterOptionError("algorithms", f"{algorithm} needs a shared secret (secret_file or secret_env); "
                                                  f"it is refused with {option} to prevent algorithm confusion")
        if key is not None and not fits(algorithm, key):
            raise FilterOptionError("algorithms", f"{algorithm} does not fit the {key_description(key)} "
                                                  f"in {option}")
        if keys is not None and not any(fits(algorithm, k.key) and k.declared in (None, algorithm)
                                        for k in keys):
            raise FilterOptionError("algorithms", f"no key in {option} fits {algorithm}")


_KeySource = tuple[bytes | PublicKey | None, list[JWKSKey] | None, tuple[str, ...]]


def _secret_source(opts: FilterOptions, source: str, given: tuple[str, ...] | None) -> _KeySource:
    """``secret_file`` / ``secret_env``: the secret, for HS* algorithms only."""
    option, secret = read_secret(opts)
    algorithms = given or ("HS256",)
    for algorithm in algorithms:
        if algorithm not in HMAC_ALGORITHMS:
            raise FilterOptionError("algorithms", f"{algorithm} needs a public key (public_key_file or "
                                                  f"jwks_file); with {option} only HS256, HS384, HS512")
    warn_short_secret(opts.kind, option, secret, algorithms)
    return secret, None, algorithms


def _public_key_source(opts: FilterOptions, source: str, given: tuple[str, ...] | None) -> _KeySource:
    """``public_key_file``: one public key, its natural algorithm by default."""
    public = load_public_key(source, opts.file_bytes(source))
    algorithms = given or (natural_algorithm(public) or "RS256",)
    _fitting(source, algorithms, None, public)
    return public, None, algorithms


def _jwks_source(opts: FilterOptions, source: str, given: tuple[str, ...] | None) -> _KeySource:
    """``jwks_file``: keys chosen by ``kid``, each with the algorithms that fit
    it (by default each key's declared or natural algorithm)."""
    loaded = load_jwks(source, opts.file_bytes(source))
    algorithms = given or tuple(dict.fromkeys(entry.declared or natural_algorithm(entry.key) or "RS256"
                                              for entry in loaded))
    _fitting(source, algorithms, loaded, None)
    jwks = [JWKSKey(entry.kid, entry.key,
                    tuple(a for a in algorithms if fits(a, entry.key) and entry.declared in (None, a)),
                    entry.declared)
            for entry in loaded]
    return None, jwks, algorithms


_KEY_SOURCES: dict[str, Callable[[FilterOptions, str, tuple[str, ...] | None], _KeySource]] = {
    "secret_file": _secret_source,
    "secret_env": _secret_source,
    "public_key_file": _public_key_source,
    "jwks_file": _jwks_source,
}


@implementer(IPlugin, IFilterFactory)
class JWTKind:
    """The filter kind ``use = jwt``."""

    name = "jwt"

    def build(self, options: Mapping[str, str]) -> JWTVerify:
        """Validate the options and load the key; see the module docstring."""
        opts = FilterOptions(self.name, options, OPTIONS)
        sources = opts.given(*KEY_SOURCES)
        if not sources:
            raise FilterOptionError(None, "needs a key source: one of secret_file, secret_env, "
                                          "public_key_file or jwks_file")
        if len(sources) > 1:
            raise FilterOptionError(sources[1], f"only one key source may be given (also given: {sources[0]})")
        given = parse_algorithms(opts.items("algorithms")) if "algorithms" in opts else None
        key, jwks, algorithms = _KEY_SOURCES[sources[0]](opts, sources[0], given)
        return JWTVerify(key=key, jwks=jwks, algorithms=tuple(algorithms), issuer=opts.items("issuer", None),
                         audience=opts.items("audience", None), max_age=opts.duration("max_age", None),
                         leeway=opts.duration("leeway", DEFAULT_LEEWAY, allow_zero=True))


jwt_kind = JWTKind()
