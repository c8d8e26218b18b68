"""The ``jwt`` and ``jwt_sign`` filter kinds: bearer token verification
(secrets, public keys, JWK sets, claims, lifetimes, algorithm confusion),
signing, build-time option errors, and both kinds at work in a real
``twistd -n chatproxy`` process (the Pega Client Channel API webhook case)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import implementer

from chatproxy.config import ConfigError, load_config
from chatproxy.proxy.validate import validate
from chatproxy.filters import FilterOptionError, IFilterFactory, IRequestFilter, Refuse, Rewrite, \
    installed_filter_kinds
from chatproxy.filters.chain import apply_rewrite
from chatproxy.filters.jwt_sign import JWTSign, jwt_sign
from chatproxy.filters.jwt_verify import KEY_LENGTH_WARNING, JWTVerify, jwt_kind
from chatproxy.http.messages import RequestHead
from chatproxy.testing import request_head
from conftest import basic_config, free_port

SECRET = b"pega-client-channel-jwt-secret-0123456789abcdef-0123456789abcdef"
OTHER_SECRET = b"another-connection-jwt-secret-0123456789abcdef-0123456789abcdef"
ISSUER = "5f0c3e2a-9d1b-4c7e-8a66-connection-id"
AUDIENCE = "chatproxy-webhook"


# ---------------------------------------------------------------------------
# Keys and tokens


def _pem_public(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))


def _jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    """The public JWK of ``key`` with ``kid``."""
    if isinstance(key, rsa.RSAPrivateKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    else:
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return dict(data)


class Keys:
    """Key material written to files: the secret, RSA and EC keys, JWK sets."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa_pem = _pem_public(self.rsa)
        self.secret_file = self.write("secret", SECRET + b"\n")
        self.rsa_file = self.write("rsa.pub.pem", self.rsa_pem)
        self.ec_file = self.write("ec.pub.pem", _pem_public(self.ec))
        self.jwks_file = self.write("jwks.json", json.dumps({"keys": [
            _jwk(self.rsa, "rsa-1", use="sig"), _jwk(self.rsa2, "rsa-2", alg="RS256"), _jwk(self.ec, "ec-1"),
            {"kty": "RSA", "kid": "enc-1", "use": "enc", "n": "AQAB", "e": "AQAB"},
        ]}).encode())
        self.single_jwks_file = self.write("single.json", json.dumps({"keys": [_jwk(self.rsa2, "only")]}).encode())

    def write(self, name: str, data: bytes) -> str:
        """Write ``data`` to a file in the key directory; its absolute path."""
        path = self.dir / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Generated keys and their files (shared by the module's tests)."""
    return Keys(tmp_path_factory.mktemp("jwt-keys"))


def claims(**changes: Any) -> dict[str, Any]:
    """Pega-like claims: iss, iat now, exp in five minutes; ``None`` drops a claim."""
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "iat": now, "exp": now + 300}
    for name, value in changes.items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def hs(payload: dict[str, Any] | None = None, secret: bytes = SECRET, alg: str = "HS256", **header: Any) -> str:
    """An HMAC-signed token (short test secrets allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KEY_LENGTH_WARNING)
        return jwt.encode(payload if payload is not None else claims(), secret, algorithm=alg, headers=header or None)


def b64(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], mac_key: bytes | None) -> str:
    """A token built by hand, as an attacker would: HMAC-SHA256 with ``mac_key``
    (any bytes, even a public key PEM, which PyJWT refuses to use) or no signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if mac_key is None:
        return signing_input + "."
    return signing_input + "." + b64(hmac.new(mac_key, signing_input.encode(), hashlib.sha256).digest())


def head(authorization: str | list[str] | None = None, path: str = "/webhook") -> RequestHead:
    """A request head with the given Authorization header(s)."""
    values = [] if authorization is None else [authorization] if isinstance(authorization, str) else authorization
    return request_head(path, method="POST", headers=[("Content-Type", "application/json")]
                        + [("Authorization", value) for value in values], host="chat.example.test", client="192.0.2.7")


# ---------------------------------------------------------------------------
# jwt: the table


PASS = "pass"
MISSING = "bearer token required"  # no usable credentials: realm-only challenge
EXPIRED = "token expired"
IMMATURE = "token not yet valid"
MALFORMED = "malformed token"
REJECTED = "token not accepted"


def secret_config(k: Keys) -> dict[str, str]:
    return {"secret_file": k.secret_file, "issuer": ISSUER}


def pega_config(k: Keys) -> dict[str, str]:
    return {"secret_file": k.secret_file, "issuer": ISSUER, "max_age": "5m", "leeway": "10s"}


def audience_config(k: Keys) -> dict[str, str]:
    return {"secret_file": k.secret_file, "issuer": ISSUER, "audience": f"{AUDIENCE}, other-audience"}


def public_config(k: Keys) -> dict[str, str]:
    return {"public_key_file": k.rsa_file, "issuer": ISSUER}


def ec_config(k: Keys) -> dict[str, str]:
    return {"public_key_file": k.ec_file}


def jwks_config(k: Keys) -> dict[str, str]:
    return {"jwks_file": k.jwks_file, "algorithms": "RS256, ES256"}


def single_jwks_config(k: Keys) -> dict[str, str]:
    return {"jwks_file": k.single_jwks_file}


class Case(NamedTuple):
    """One request: the filter's options, the Authorization header(s) and the expected outcome."""

    name: str
    config: Callable[[Keys], dict[str, str]]
    authorization: Callable[[Keys], str | list[str] | None]
    expect: str


def bearer(token: str) -> str:
    return f"Bearer {token}"


NOW = int(time.time())  # only for claims far from the edges (an hour or more)

CASES = [
    # Secrets (Pega's HS256 webhook tokens)
    Case("valid", secret_config, lambda k: bearer(hs()), PASS),
    Case("valid-lower-case-scheme", secret_config, lambda k: f"bearer   {hs()}", PASS),
    Case("valid-secret-file-newline-stripped", secret_config, lambda k: bearer(hs(secret=SECRET)), PASS),
    Case("expired", secret_config, lambda k: bearer(hs(claims(iat=NOW - 7200, exp=NOW - 3600))), EXPIRED),
    Case("expired-within-leeway", secret_config, lambda k: bearer(hs(claims(exp=int(time.time()) - 5))), PASS),
    Case("not-yet-valid-nbf", secret_config, lambda k: bearer(hs(claims(nbf=NOW + 3600))), IMMATURE),
    Case("iat-in-the-future", secret_config, lambda k: bearer(hs(claims(iat=NOW + 3600, exp=NOW + 7200))), IMMATURE),
    Case("no-exp-without-max-age", secret_config, lambda k: bearer(hs(claims(exp=None))), REJECTED),
    Case("exp-not-a-number", secret_config, lambda k: bearer(hs(claims(exp=str(NOW + 3600)))), REJECTED),
    Case("wrong-issuer", secret_config, lambda k: bearer(hs(claims(iss="another-connection"))), REJECTED),
    Case("missing-issuer", secret_config, lambda k: bearer(hs(claims(iss=None))), REJECTED),
    Case("wrong-signature", secret_config, lambda k: bearer(hs(secret=OTHER_SECRET)), REJECTED),
    Case("tampered-payload", secret_config,
         lambda k: bearer(".".join([hs().split(".")[0], b64(json.dumps(claims(iss=ISSUER, admin=True)).encode()),
                                    hs().split(".")[2]])), REJECTED),
    Case("alg-none", secret_config, lambda k: bearer(handmade({"alg": "none", "typ": "JWT"}, claims(), None)),
         REJECTED),
    Case("alg-none-pyjwt", secret_config,
         lambda k: bearer(jwt.encode(claims(), None, algorithm="none")), REJECTED),  # type: ignore[arg-type]
    Case("alg-not-in-algorithms", secret_config, lambda k: bearer(hs(alg="HS384")), REJECTED),
    Case("rs256-token-against-secret", secret_config,
         lambda k: bearer(jwt.encode(claims(), k.rsa, algorithm="RS256")), REJECTED),
    # max_age (Pega: five minutes from iat)
    Case("max-age-valid", pega_config, lambda k: bearer(hs()), PASS),
    Case("max-age-without-exp", pega_config, lambda k: bearer(hs(claims(iat=int(time.time()) - 60, exp=None))),
         PASS),
    Case("too-old-by-max-age", pega_config,
         lambda k: bearer(hs(claims(iat=NOW - 600, exp=NOW + 3600))), EXPIRED),
    Case("max-age-needs-iat", pega_config, lambda k: bearer(hs(claims(iat=None))), REJECTED),
    Case("max-age-iat-not-a-number", pega_config, lambda k: bearer(hs(claims(iat=str(NOW)))), REJECTED),
    Case("max-age-iat-in-the-future", pega_config, lambda k: bearer(hs(claims(iat=NOW + 3600))), IMMATURE),
    # Audience
    Case("audience-valid", audience_config, lambda k: bearer(hs(claims(aud=AUDIENCE))), PASS),
    Case("audience-in-a-list", audience_config, lambda k: bearer(hs(claims(aud=["x", "other-audience"]))), PASS),
    Case("wrong-audience", audience_config, lambda k: bearer(hs(claims(aud="someone-else"))), REJECTED),
    Case("missing-audience", audience_config, lambda k: bearer(hs()), REJECTED),
    Case("audience-but-none-configured", secret_config, lambda k: bearer(hs(claims(aud=AUDIENCE))), REJECTED),
    # Public keys
    Case("rs256-valid", public_config, lambda k: bearer(jwt.encode(claims(), k.rsa, algorithm="RS256")), PASS),
    Case("rs256-other-key", public_config, lambda k: bearer(jwt.encode(claims(), k.rsa2, algorithm="RS256")),
         REJECTED),
    Case("ps256-not-in-default-algorithms", public_config,
         lambda k: bearer(jwt.encode(claims(), k.rsa, algorithm="PS256")), REJECTED),
    Case("alg-confusion-public-key-as-hmac-secret", public_config,
         lambda k: bearer(handmade({"alg": "HS256", "typ": "JWT"}, claims(), k.rsa_pem)), REJECTED),
    Case("alg-confusion-pem-without-newline", public_config,
         lambda k: bearer(handmade({"alg": "HS256", "typ": "JWT"}, claims(), k.rsa_pem.rstrip())), REJECTED),
    Case("alg-none-with-public-key", public_config,
         lambda k: bearer(handmade({"alg": "none"}, claims(), None)), REJECTED),
    Case("es256-default-for-ec-key", ec_config, lambda k: bearer(jwt.encode(claims(), k.ec, algorithm="ES256")),
         PASS),
    # JWK set: the key chosen by kid
    Case("jwks-kid-rsa-1", jwks_config,
         lambda k: bearer(jwt.encode(claims(), k.rsa, algorithm="RS256", headers={"kid": "rsa-1"})), PASS),
    Case("jwks-kid-rsa-2", jwks_config,
         lambda k: bearer(jwt.encode(claims(), k.rsa2, algorithm="RS256", headers={"kid": "rsa-2"})), PASS),
    Case("jwks-kid-ec-1", jwks_config,
         lambda k: bearer(jwt.encode(claims(), k.ec, algorithm="ES256", headers={"kid": "ec-1"})), PASS),
    Case("jwks-kid-names-another-key", jwks_config,
         lambda k: bearer(jwt.encode(claims(), k.rsa2, algorithm="RS256", headers={"kid": "rsa-1"})), REJECTED),
    Case("jwks-unknown-kid", jwks_config,
         lambda k: bearer(jwt.encode(claims(), k.rsa, algorithm="RS256", headers={"kid": "rsa-9"})), REJECTED),
    Case("jwks-encryption-key-not-used", jwks_config,
         lambda k: bearer(jwt.encode(claims(), k.rsa, algorithm="RS256", headers={"kid": "enc-1"})), REJECTED),
    Case("jwks-no-kid-several-keys", jwks_config,
         lambda k: bearer(jwt.encode(claims(), k.rsa, algorithm="RS256")), REJECTED),
    Case("jwks-alg-does-not-fit-kid", jwks_config,
         lambda k: bearer(jwt.encode(claims(), k.ec, algorithm="ES256", headers={"kid": "rsa-1"})), REJECTED),
    Case("jwks-hs256-with-kid", jwks_config,
         lambda k: bearer(handmade({"alg": "HS256", "kid": "rsa-1"}, claims(), k.rsa_pem)), REJECTED),
    Case("jwks-no-kid-single-key", single_jwks_config,
         lambda k: bearer(jwt.encode(claims(), k.rsa2, algorithm="RS256")), PASS),
    # The Authorization header itself
    Case("missing-header", secret_config, lambda k: None, MISSING),
    Case("not-bearer", secret_config, lambda k: "Basic dXNlcjpwYXNz", MISSING),
    Case("bearer-without-token", secret_config, lambda k: "Bearer ", MISSING),
    Case("two-authorization-headers", secret_config, lambda k: [bearer(hs()), bearer(hs())], MISSING),
    Case("garbage-token", secret_config, lambda k: "Bearer not-a-jwt", MALFORMED),
    Case("garbage-three-segments", secret_config, lambda k: "Bearer a.b.c", MALFORMED),
    Case("garbage-json-header", secret_config,
         lambda k: f"Bearer {b64(b'[1]')}.{b64(b'{}')}.{b64(b'x')}", MALFORMED),
    Case("garbage-binary", secret_config, lambda k: "Bearer \xff\xfe.\x00.x", MALFORMED),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_jwt_table(case: Case, keys: Keys) -> None:
    """Each request gets what the table says: passed on, or 401 with a
    Bearer challenge naming only the category (realm-only when there is no
    usable bearer token), the category also being the body."""
    flt = jwt_kind.build(case.config(keys))
    result = flt.request(head(case.authorization(keys)))
    if case.expect == PASS:
        assert result is None
        return
    assert isinstance(result, Refuse)
    assert result.status == 401
    assert result.reason == case.expect
    challenge = dict(result.headers)[b"WWW-Authenticate"].decode()
    if case.expect == MISSING:
        assert challenge == 'Bearer realm="chatproxy"'
    else:
        assert challenge == (f'Bearer realm="chatproxy", error="invalid_token", '
                             f'error_description="{case.expect}"')


def test_secret_env(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """``secret_env`` reads the secret from the environment when the filter is built."""
    monkeypatch.setenv("TEST_PEGA_JWT_SECRET", SECRET.decode())
    flt = jwt_kind.build({"secret_env": "TEST_PEGA_JWT_SECRET", "issuer": ISSUER})
    assert flt.request(head(bearer(hs()))) is None
    assert isinstance(flt.request(head(bearer(hs(secret=OTHER_SECRET)))), Refuse)


def test_secret_file_keeps_all_but_one_trailing_newline(keys: Keys, tmp_path: Path) -> None:
    """Only a single trailing newline (``\\n`` or ``\\r\\n``) is stripped from
    a secret file; anything else is part of the secret."""
    for content, secret in [(b"abc\r\n", b"abc"), (b"abc\n\n", b"abc\n"), (b"abc ", b"abc "), (b"abc", b"abc")]:
        path = tmp_path / "s"
        path.write_bytes(content)
        flt = jwt_kind.build({"secret_file": str(path)})
        assert flt.request(head(bearer(hs(claims(), secret=secret)))) is None, content


def test_algorithms_option_allows_several(keys: Keys) -> None:
    """``algorithms = HS256, HS512`` accepts both (names in any case)."""
    flt = jwt_kind.build({"secret_file": keys.secret_file, "algorithms": "hs256\nHS512"})
    assert flt.request(head(bearer(hs(alg="HS512")))) is None
    assert flt.request(head(bearer(hs(alg="HS256")))) is None
    assert isinstance(flt.request(head(bearer(hs(alg="HS384")))), Refuse)


def test_leeway_zero_and_custom(keys: Keys) -> None:
    """``leeway = 0`` refuses a token expired a minute ago that ``leeway = 2m`` accepts."""
    token = hs(claims(iat=int(time.time()) - 300, exp=int(time.time()) - 60))
    strict = jwt_kind.build({"secret_file": keys.secret_file, "leeway": "0"})
    lenient = jwt_kind.build({"secret_file": keys.secret_file, "leeway": "2m"})
    assert isinstance(strict.request(head(bearer(token))), Refuse)
    assert lenient.request(head(bearer(token))) is None


def test_jwks_default_algorithms_follow_the_keys(keys: Keys) -> None:
    """Without ``algorithms``, a JWK set allows each key's own algorithm:
    RS256 for RSA keys, ES256 for a P-256 key."""
    flt = jwt_kind.build({"jwks_file": keys.jwks_file})
    assert isinstance(flt, JWTVerify)
    assert flt.algorithms == ("RS256", "ES256")
    token = jwt.encode(claims(), keys.ec, algorithm="ES256", headers={"kid": "ec-1"})
    assert flt.request(head(bearer(token))) is None


@contextmanager
def captured_log() -> Iterator[list[str]]:
    """The Twisted log events emitted inside the block, formatted."""
    lines: list[str] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def test_refusal_log_has_the_detail_but_never_the_token_or_secret(keys: Keys) -> None:
    """The log line of a refusal says why (here: the issuer), and holds
    neither the token nor the secret; the client only learns the category."""
    token = hs(claims(iss="another-connection"))
    with captured_log() as lines:
        result = jwt_kind.build(secret_config(keys)).request(head(bearer(token)))
    text = "\n".join(lines)
    assert isinstance(result, Refuse) and result.reason == REJECTED
    assert "another-connection" in text and "192.0.2.7" in text and "/webhook" in text
    assert token not in text and token.split(".")[2] not in text
    assert SECRET.decode() not in text


def test_short_secret_is_warned_about_at_build_time(tmp_path: Path) -> None:
    """A secret shorter than RFC 7518 asks for HS256 (32 bytes) is accepted,
    with one warning when the filter is built, naming the length, not the secret."""
    path = tmp_path / "short"
    path.write_bytes(b"short-secret\n")
    with captured_log() as lines:
        flt = jwt_kind.build({"secret_file": str(path)})
    text = "\n".join(lines)
    assert "12 bytes" in text and "short-secret" not in text
    assert flt.request(head(bearer(hs(secret=b"short-secret")))) is None


def test_kinds_are_plugins_providing_the_interfaces(keys: Keys) -> None:
    """Both kinds are found by getPlugins and provide IFilterFactory; their
    filters provide IRequestFilter."""
    kinds = installed_filter_kinds()
    assert kinds["jwt"] is jwt_kind and kinds["jwt_sign"] is jwt_sign
    assert IFilterFactory.providedBy(jwt_kind) and IFilterFactory.providedBy(jwt_sign)
    assert IRequestFilter.providedBy(jwt_kind.build(secret_config(keys)))
    assert IRequestFilter.providedBy(jwt_sign.build({"secret_file": keys.secret_file, "issuer": ISSUER}))


# ---------------------------------------------------------------------------
# Build-time option errors


def _write(k: Keys, name: str, data: str | bytes) -> str:
    return k.write(name, data.encode() if isinstance(data, str) else data)


def _private_pem(k: Keys) -> bytes:
    return bytes(k.rsa.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))


def _weak_rsa_pem(k: Keys) -> bytes:
    return _pem_public(rsa.generate_private_key(public_exponent=65537, key_size=1024))


JWT_ERRORS: list[tuple[str, Callable[[Keys], dict[str, str]], str | None, str]] = [
    ("no-key-source", lambda k: {"issuer": ISSUER}, None, "needs a key source"),
    ("two-key-sources", lambda k: {"secret_file": k.secret_file, "public_key_file": k.rsa_file},
     "public_key_file", "only one key source"),
    ("secret-file-missing", lambda k: {"secret_file": str(k.dir / "nonexistent")}, "secret_file", "no such file"),
    ("secret-file-directory", lambda k: {"secret_file": str(k.dir)}, "secret_file", "is a directory"),
    ("secret-file-relative", lambda k: {"secret_file": "secret"}, "secret_file", "absolute path"),
    ("secret-file-empty", lambda k: {"secret_file": _write(k, "empty", "\n")}, "secret_file", "is empty"),
    ("secret-file-holds-pem", lambda k: {"secret_file": k.rsa_file}, "secret_file", "PEM key"),
    ("secret-env-unset", lambda k: {"secret_env": "TEST_JWT_NO_SUCH_VARIABLE"}, "secret_env", "is not set"),
    ("secret-env-empty", lambda k: {"secret_env": "TEST_JWT_EMPTY_VARIABLE"}, "secret_env", "is empty"),
    ("secret-env-blank-name", lambda k: {"secret_env": " "}, "secret_env", "must not be empty"),
    ("public-key-garbage", lambda k: {"public_key_file": _write(k, "garbage.pem", "hello")}, "public_key_file",
     "not a PEM public key"),
    ("public-key-is-private", lambda k: {"public_key_file": _write(k, "private.pem", _private_pem(k))},
     "public_key_file", "private key"),
    ("public-key-weak-rsa", lambda k: {"public_key_file": _write(k, "weak.pem", _weak_rsa_pem(k))},
     "public_key_file", "fewer than the 2048"),
    ("hs256-with-public-key", lambda k: {"public_key_file": k.rsa_file, "algorithms": "HS256"}, "algorithms",
     "algorithm confusion"),
    ("hs256-among-rs-with-public-key", lambda k: {"public_key_file": k.rsa_file, "algorithms": "RS256, HS256"},
     "algorithms", "needs a shared secret"),
    ("hs256-with-jwks", lambda k: {"jwks_file": k.jwks_file, "algorithms": "HS256"}, "algorithms",
     "algorithm confusion"),
    ("rs256-with-secret", lambda k: {"secret_file": k.secret_file, "algorithms": "RS256"}, "algorithms",
     "needs a public key"),
    ("es256-with-rsa-key", lambda k: {"public_key_file": k.rsa_file, "algorithms": "ES256"}, "algorithms",
     "does not fit the RSA 2048-bit key"),
    ("rs256-with-ec-key", lambda k: {"public_key_file": k.ec_file, "algorithms": "RS256"}, "algorithms",
     "does not fit the EC secp256r1 key"),
    ("algorithm-none", lambda k: {"secret_file": k.secret_file, "algorithms": "none"}, "algorithms",
     "'none' algorithm is never accepted"),
    ("algorithm-none-among-others", lambda k: {"public_key_file": k.rsa_file, "algorithms": "RS256, None"},
     "algorithms", "never accepted"),
    ("algorithm-unknown", lambda k: {"secret_file": k.secret_file, "algorithms": "XS256"}, "algorithms",
     "unknown algorithm 'XS256'"),
    ("algorithms-empty", lambda k: {"secret_file": k.secret_file, "algorithms": " , "}, "algorithms",
     "must not be empty"),
    ("jwks-not-json", lambda k: {"jwks_file": _write(k, "bad.json", "{")}, "jwks_file", "not valid JSON"),
    ("jwks-not-a-set", lambda k: {"jwks_file": _write(k, "list.json", "[]")}, "jwks_file", "expected a JWK set"),
    ("jwks-symmetric-key", lambda k: {"jwks_file": _write(k, "oct.json", '{"keys": [{"kty": "oct", "k": "c2Vj"}]}')},
     "jwks_file", "symmetric (oct)"),
    ("jwks-private-key", lambda k: {"jwks_file": _write(k, "d.json", json.dumps(
        {"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.rsa))]}))}, "jwks_file", "private key material"),
    ("jwks-duplicate-kid", lambda k: {"jwks_file": _write(k, "dup.json", json.dumps(
        {"keys": [_jwk(k.rsa, "same"), _jwk(k.rsa2, "same")]}))}, "jwks_file", "same kid appears twice"),
    ("jwks-only-encryption-keys", lambda k: {"jwks_file": _write(k, "enc.json", json.dumps(
        {"keys": [_jwk(k.rsa, "e", use="enc")]}))}, "jwks_file", "no public signature key"),
    ("jwks-alg-none", lambda k: {"jwks_file": _write(k, "none.json", json.dumps(
        {"keys": [_jwk(k.rsa, "n", alg="none")]}))}, "jwks_file", "never accepted"),
    ("jwks-broken-key", lambda k: {"jwks_file": _write(k, "broken.json", '{"keys": [{"kty": "RSA", "n": "x"}]}')},
     "jwks_file", "not a usable public JWK"),
    ("jwks-no-key-fits", lambda k: {"jwks_file": k.jwks_file, "algorithms": "ES384"}, "algorithms",
     "no key in jwks_file fits ES384"),
    ("jwks-missing", lambda k: {"jwks_file": str(k.dir / "absent.json")}, "jwks_file", "no such file"),
    ("max-age-bogus", lambda k: {"secret_file": k.secret_file, "max_age": "five minutes"}, "max_age",
     "expected a duration"),
    ("max-age-zero", lambda k: {"secret_file": k.secret_file, "max_age": "0"}, "max_age", "greater than zero"),
    ("leeway-bogus", lambda k: {"secret_file": k.secret_file, "leeway": "-1"}, "leeway", "expected a duration"),
    ("issuer-empty", lambda k: {"secret_file": k.secret_file, "issuer": ""}, "issuer", "must not be empty"),
    ("audience-empty", lambda k: {"secret_file": k.secret_file, "audience": ","}, "audience", "must not be empty"),
    ("unknown-option", lambda k: {"secret_file": k.secret_file, "secret": "hunter2"}, "secret",
     "unknown option (jwt takes: secret_file, secret_env, public_key_file, jwks_file, algorithms"),
]


@pytest.mark.parametrize("name, options, option, fragment", JWT_ERRORS, ids=[e[0] for e in JWT_ERRORS])
def test_jwt_build_errors_name_the_option(name: str, options: Callable[[Keys], dict[str, str]], option: str | None,
                                          fragment: str, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad, missing or conflicting option of ``jwt`` raises FilterOptionError
    naming that option (None: the section as a whole)."""
    monkeypatch.delenv("TEST_JWT_NO_SUCH_VARIABLE", raising=False)
    monkeypatch.setenv("TEST_JWT_EMPTY_VARIABLE", "")
    with pytest.raises(FilterOptionError) as info:
        jwt_kind.build(options(keys))
    assert info.value.option == option
    assert fragment in info.value.message
    assert SECRET.decode() not in info.value.message


SIGN_ERRORS: list[tuple[str, Callable[[Keys], dict[str, str]], str | None, str]] = [
    ("no-secret", lambda k: {"issuer": ISSUER}, None, "needs the secret"),
    ("two-secrets", lambda k: {"secret_file": k.secret_file, "secret_env": "X", "issuer": ISSUER}, "secret_env",
     "only one"),
    ("secret-file-missing", lambda k: {"secret_file": str(k.dir / "nope"), "issuer": ISSUER}, "secret_file",
     "no such file"),
    ("secret-env-unset", lambda k: {"secret_env": "TEST_JWT_NO_SUCH_VARIABLE", "issuer": ISSUER}, "secret_env",
     "is not set"),
    ("algorithm-rs256", lambda k: {"secret_file": k.secret_file, "issuer": ISSUER, "algorithm": "RS256"},
     "algorithm", "HS256, HS384 or HS512"),
    ("algorithm-none", lambda k: {"secret_file": k.secret_file, "issuer": ISSUER, "algorithm": "none"},
     "algorithm", "never accepted"),
    ("algorithm-two", lambda k: {"secret_file": k.secret_file, "issuer": ISSUER, "algorithm": "HS256, HS512"},
     "algorithm", "one algorithm"),
    ("issuer-missing", lambda k: {"secret_file": k.secret_file}, "issuer", "required option is missing"),
    ("issuer-empty", lambda k: {"secret_file": k.secret_file, "issuer": " "}, "issuer", "must not be empty"),
    ("lifetime-bogus", lambda k: {"secret_file": k.secret_file, "issuer": ISSUER, "lifetime": "soon"}, "lifetime",
     "expected a duration"),
    ("lifetime-under-a-second", lambda k: {"secret_file": k.secret_file, "issuer": ISSUER, "lifetime": "250ms"},
     "lifetime", "at least one second"),
    ("public-key-option", lambda k: {"secret_file": k.secret_file, "issuer": ISSUER, "public_key_file": k.rsa_file},
     "public_key_file", "unknown option (jwt_sign takes: secret_file, secret_env, algorithm"),
]


@pytest.mark.parametrize("name, options, option, fragment", SIGN_ERRORS, ids=[e[0] for e in SIGN_ERRORS])
def test_jwt_sign_build_errors_name_the_option(name: str, options: Callable[[Keys], dict[str, str]],
                                               option: str | None, fragment: str, keys: Keys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad, missing or conflicting option of ``jwt_sign`` raises
    FilterOptionError naming that option (None: the section as a whole)."""
    monkeypatch.delenv("TEST_JWT_NO_SUCH_VARIABLE", raising=False)
    with pytest.raises(FilterOptionError) as info:
        jwt_sign.build(options(keys))
    assert info.value.option == option
    assert fragment in info.value.message


@pytest.mark.parametrize("kind, section, option, fragment", [
    ("jwt", "[filter:pega]\nuse = jwt\nsecret_file = {missing}\nissuer = x\n", "secret_file", "no such file"),
    ("jwt", "[filter:pega]\nuse = jwt\npublic_key_file = {rsa}\nalgorithms = HS256\n", "algorithms",
     "algorithm confusion"),
    ("jwt_sign", "[filter:pega]\nuse = jwt_sign\nsecret_file = {secret}\n", "issuer", "required option is missing"),
])
def test_config_error_names_file_section_and_option(kind: str, section: str, option: str, fragment: str,
                                                    keys: Keys, tmp_path: Path) -> None:
    """Through load_config and validate (with the installed plugins), a bad jwt or jwt_sign
    option is reported with the file, the ``[filter:NAME]`` section and the option."""
    path = tmp_path / "chatproxy.ini"
    extra = section.format(missing=tmp_path / "missing", rsa=keys.rsa_file, secret=keys.secret_file)
    path.write_text(basic_config("http://127.0.0.1:9", 8080, route="filters = pega", extra=extra))
    with pytest.raises(ConfigError) as info:
        validate(load_config([path]))
    error = info.value
    assert (error.file, error.section, error.option) == (str(path), "filter:pega", option)
    assert str(error).startswith(f"{path} [filter:pega] {option}: ") and fragment in str(error)


# ---------------------------------------------------------------------------
# jwt_sign


def test_jwt_sign_adds_a_fresh_token(keys: Keys) -> None:
    """The Rewrite sets ``Authorization: Bearer <token>`` with iss, iat (now),
    exp = iat + lifetime and aud, signed with the secret; the client's own
    Authorization is replaced."""
    flt = jwt_sign.build({"secret_file": keys.secret_file, "issuer": ISSUER, "lifetime": "2m",
                          "audience": AUDIENCE, "algorithm": "hs512"})
    assert isinstance(flt, JWTSign)
    before = int(time.time())
    result = flt.request(head("Bearer client-token"))
    after = int(time.time())
    assert isinstance(result, Rewrite)
    rewritten = apply_rewrite(head("Bearer client-token"), result)
    values = [v for n, v in rewritten.headers if n.lower() == b"authorization"]
    assert len(values) == 1 and values[0].startswith(b"Bearer ")
    token = values[0][len(b"Bearer "):].decode()
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    decoded = jwt.decode(token, SECRET, algorithms=["HS512"], audience=AUDIENCE, issuer=ISSUER)
    assert set(decoded) == {"iss", "iat", "exp", "aud"}
    assert before <= decoded["iat"] <= after and decoded["exp"] == decoded["iat"] + 120
    assert SECRET.decode() not in repr(flt)


def test_jwt_sign_defaults_and_several_audiences(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults: HS256, a lifetime of five minutes, no aud; several audiences
    become a list; the secret may come from the environment."""
    monkeypatch.setenv("TEST_PEGA_JWT_SECRET", SECRET.decode())
    token = jwt_sign.build({"secret_env": "TEST_PEGA_JWT_SECRET", "issuer": ISSUER}).token()
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert decoded["exp"] - decoded["iat"] == 300 and "aud" not in decoded
    token = jwt_sign.build({"secret_file": keys.secret_file, "issuer": ISSUER, "audience": "a, b"}).token()
    assert jwt.decode(token, SECRET, algorithms=["HS256"], audience="b")["aud"] == ["a", "b"]


def test_jwt_sign_tokens_pass_a_jwt_filter_with_the_same_secret(keys: Keys) -> None:
    """What jwt_sign adds, a jwt filter with the same secret, issuer and max_age accepts."""
    signer = jwt_sign.build({"secret_file": keys.secret_file, "issuer": ISSUER})
    verifier = jwt_kind.build(pega_config(keys))
    rewritten = apply_rewrite(head(None), signer.request(head(None)))
    assert verifier.request(rewritten) is None


# ---------------------------------------------------------------------------
# Through twistd


def post(port: int, path: str, body: bytes, authorization: str | None) -> tuple[int, dict[str, str], bytes]:
    """One POST with a JSON body on a fresh connection: (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def wait_for(process: Any, text: str, timeout: float = 10.0) -> str:
    """The process output once it contains ``text`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while text not in process.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    return str(process.output())


WEBHOOK_BODY = json.dumps({"type": "text", "customerId": "c-1", "text": "Hello from the chatbot"}).encode()


@pytest.fixture
def webhook_filter(keys: Keys) -> Iterator[Callable[[str], str]]:
    """A ``[filter:pega]`` jwt section for the given key-source lines."""
    def section(source: str) -> str:
        return f"\n[filter:pega]\nuse = jwt\n{source}\nissuer = {ISSUER}\nmax_age = 5m\n"
    yield section


def test_webhook_valid_token_reaches_upstream_expired_gets_401(proxy: Any, upstream: Any, keys: Keys,
                                                               webhook_filter: Callable[[str], str]) -> None:
    """The Pega webhook case through twistd: a POST with a JSON body and a
    valid HS256 token reaches the upstream with its body and token; one with
    an expired token gets 401 with a Bearer challenge and never reaches it."""
    port = free_port()
    proxy.start(basic_config(upstream.url, port, route="filters = pega",
                             extra=webhook_filter(f"secret_file = {keys.secret_file}")), port=port)
    token = hs()
    status, _, body = post(port, "/webhook/ok", WEBHOOK_BODY, bearer(token))
    assert status == 200, body
    assert len(upstream.requests) == 1
    record = upstream.requests[0]
    assert record["method"] == "POST" and record["path"] == "/webhook/ok"
    assert record["body_sha"] == hashlib.sha256(WEBHOOK_BODY).hexdigest()
    assert ["Authorization", bearer(token)] in record["headers"]

    expired = hs(claims(iat=NOW - 7200, exp=NOW - 3600))
    status, headers, body = post(port, "/webhook/expired", WEBHOOK_BODY, bearer(expired))
    assert status == 401
    assert headers["www-authenticate"] == ('Bearer realm="chatproxy", error="invalid_token", '
                                           'error_description="token expired"')
    assert body == b"token expired\n"
    status, headers, _ = post(port, "/webhook/none", WEBHOOK_BODY, None)
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="chatproxy"'
    assert [r["path"] for r in upstream.requests] == ["/webhook/ok"]


def test_secret_env_through_twistd(proxy: Any, upstream: Any, monkeypatch: pytest.MonkeyPatch,
                                   webhook_filter: Callable[[str], str]) -> None:
    """``secret_env``: the variable set in the environment of the twistd
    process is the secret; tokens signed with another secret get 401."""
    monkeypatch.setenv("CHATPROXY_TEST_PEGA_SECRET", SECRET.decode())
    port = free_port()
    process = proxy.start(basic_config(upstream.url, port, route="filters = pega",
                                       extra=webhook_filter("secret_env = CHATPROXY_TEST_PEGA_SECRET")), port=port)
    assert post(port, "/webhook/env", WEBHOOK_BODY, bearer(hs()))[0] == 200
    assert post(port, "/webhook/other", WEBHOOK_BODY, bearer(hs(secret=OTHER_SECRET)))[0] == 401
    assert [r["path"] for r in upstream.requests] == ["/webhook/env"]
    output = wait_for(process, "signature does not verify")
    assert "signature does not verify" in output and SECRET.decode() not in output


def test_jwt_sign_through_twistd(proxy: Any, upstream: Any, keys: Keys) -> None:
    """``jwt_sign``: the upstream receives a token it can verify with the same
    secret (iss, iat, exp = iat + lifetime, aud), in place of the client's own."""
    port = free_port()
    extra = (f"\n[filter:to-pega]\nuse = jwt_sign\nsecret_file = {keys.secret_file}\nissuer = {ISSUER}\n"
             f"lifetime = 90s\naudience = {AUDIENCE}\n")
    proxy.start(basic_config(upstream.url, port, route="filters = to-pega", extra=extra), port=port)
    before = int(time.time())
    status, _, _ = post(port, "/dms/message", WEBHOOK_BODY, "Bearer forged-by-the-client")
    assert status == 200
    assert len(upstream.requests) == 1
    values = [v for n, v in upstream.requests[0]["headers"] if n.lower() == "authorization"]
    assert len(values) == 1 and values[0].startswith("Bearer ")
    decoded = jwt.decode(values[0][len("Bearer "):], SECRET, algorithms=["HS256"], issuer=ISSUER,
                         audience=AUDIENCE)
    assert decoded["iat"] >= before and decoded["exp"] == decoded["iat"] + 90
    assert upstream.requests[0]["body_sha"] == hashlib.sha256(WEBHOOK_BODY).hexdigest()


def test_report_mode_lets_an_unauthenticated_request_through(proxy: Any, upstream: Any, keys: Keys,
                                                             webhook_filter: Callable[[str], str]) -> None:
    """With ``mode = report``, a request without a token is forwarded and the
    twistd log says the filter would have refused it with 401."""
    port = free_port()
    process = proxy.start(basic_config(upstream.url, port, route="filters = pega",
                                       extra=webhook_filter(f"secret_file = {keys.secret_file}\nmode = report")),
                          port=port)
    assert post(port, "/webhook/report", WEBHOOK_BODY, None)[0] == 200
    assert [r["path"] for r in upstream.requests] == ["/webhook/report"]
    output = wait_for(process, "would have refused")
    lines = [line for line in output.splitlines() if "would have refused" in line]
    assert len(lines) == 1, output
    assert "filter pega (report mode)" in lines[0] and "/webhook/report" in lines[0] and "401" in lines[0]


def test_check_command_finds_both_kinds(keys: Keys, tmp_path: Path) -> None:
    """``python -m chatproxy check`` loads a configuration using both kinds
    from the installed plugins."""
    path = tmp_path / "chatproxy.ini"
    path.write_text(basic_config("http://127.0.0.1:9", 8080, route="filters = pega, to-backend", extra=(
        f"\n[filter:pega]\nuse = jwt\nsecret_file = {keys.secret_file}\nissuer = {ISSUER}\nmax_age = 5m\n"
        f"\n[filter:to-backend]\nuse = jwt_sign\nsecret_file = {keys.secret_file}\nissuer = chatproxy\n")))
    result = subprocess.run([sys.executable, "-m", "chatproxy", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pega,to-backend" in result.stdout
    assert SECRET.decode() not in result.stdout + result.stderr


def test_public_key_from_a_certificate_or_pkcs1_pem(keys: Keys, pki: Any, tmp_path: Path) -> None:
    """``public_key_file`` also takes a PEM certificate (its EC P-256 key:
    ES256 by default) and a PKCS#1 ``RSA PUBLIC KEY`` PEM."""
    private = serialization.load_pem_private_key(Path(pki.key).read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    flt = jwt_kind.build({"public_key_file": str(pki.cert)})
    assert flt.request(head(bearer(jwt.encode(claims(), private, algorithm="ES256")))) is None
    pkcs1 = tmp_path / "rsa-pkcs1.pem"
    pkcs1.write_bytes(keys.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.PKCS1))
    flt = jwt_kind.build({"public_key_file": str(pkcs1), "algorithms": "RS256, PS256"})
    assert flt.request(head(bearer(jwt.encode(claims(), keys.rsa, algorithm="PS256")))) is None


def test_relative_secret_file_is_relative_to_the_config_file(tmp_path, monkeypatch):
    """secret_file = a relative name is read from beside the configuration file that sets it,
    whatever the working directory."""
    from chatproxy.config import load_config
    from chatproxy.filters import installed_filter_kinds

    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "webhook.secret").write_text("s3cret-s3cret-s3cret-s3cret-s3cret!\n")
    path = conf_dir / "c.ini"
    path.write_text("[listen:main]\nendpoint = tcp:8080\n[upstream:app]\nservers = http://127.0.0.1:9\n"
                    "[route:all]\npath = /\nupstream = app\nfilters = token\n"
                    "[filter:token]\nuse = jwt\nsecret_file = webhook.secret\nissuer = conn-1\n")
    monkeypatch.chdir(tmp_path)
    config = load_config([path])
    validate(config, installed_filter_kinds())  # builds the filter: reads the secret file
    assert config.filters["token"].kind == "jwt"
