"""The ``jwt_sign`` filter kind: add a freshly signed bearer token to each request.

    [filter:to-pega]
    use = jwt_sign
    secret_env = PEGA_JWT_SECRET
    issuer = 5f0c3e2a-connection-id
    lifetime = 5m

The other direction of the ``jwt`` kind: chatproxy holds the shared secret
and every request that passes this filter is forwarded with
``Authorization: Bearer <token>``, the token signed (HS256/384/512, with
PyJWT) with the claims ``iss`` (``issuer``), ``iat`` (now), ``exp``
(``iat + lifetime``) and, when configured, ``aud`` (``audience``).  An
``Authorization`` header sent by the client is replaced.  So an integration
layer behind chatproxy never holds the secret.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.filters import Filter, FilterOptionError, FilterOptions, IFilterFactory, IRequestFilter, Rewrite
from chatproxy.filters.jwt_verify import (
    HMAC_ALGORITHMS,
    KEY_LENGTH_WARNING,
    parse_algorithms,
    read_secret,
    warn_short_secret,
)

OPTIONS = ("secret_file", "secret_env", "algorithm", "issuer", "audience", "lifetime")
DEFAULT_LIFETIME = 300.0


@implementer(IRequestFilter)
class JWTSign(Filter):
    """Passes every request on with ``Authorization: Bearer <fresh token>``."""

    def __init__(self, *, secret: bytes, algorithm: str, issuer: str, lifetime: float,
                 audience: str | list[str] | None, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.algorithm = algorithm
        self.issuer = issuer
        self.lifetime = int(math.ceil(lifetime))
        self.audience = audience
        self.clock = clock

    def __repr__(self) -> str:
        return f"<JWTSign {self.algorithm} iss={self.issuer!r} lifetime={self.lifetime}s>"

    def token(self) -> str:
        """A token signed now."""
        issued = int(self.clock())
        claims: dict[str, Any] = {"iss": self.issuer, "iat": issued, "exp": issued + self.lifetime}
        if self.audience is not None:
            claims["aud"] = self.audience
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KEY_LENGTH_WARNING)
            return jwt.encode(claims, self._secret, algorithm=self.algorithm)

    def request(self, head: Any) -> Rewrite:
        """Replace the request's Authorization with a fresh bearer token."""
        return Rewrite(set=((b"Authorization", b"Bearer " + self.token().encode("ascii")),))


@implementer(IPlugin, IFilterFactory)
class JWTSignKind:
    """The filter kind ``use = jwt_sign``."""

    name = "jwt_sign"

    def build(self, options: Mapping[str, str]) -> JWTSign:
        """Validate the options and read the secret."""
        opts = FilterOptions(self.name, options, OPTIONS)
        sources = opts.given("secret_file", "secret_env")
        if not sources:
            raise FilterOptionError(None, "needs the secret: secret_file or secret_env")
        if len(sources) > 1:
            raise FilterOptionError(sources[1], "only one of secret_file and secret_env may be given")
        option, secret = read_secret(opts)
        algorithm = _algorithm(opts)
        warn_short_secret(self.name, option, secret, (algorithm,))
        issuer = opts.text("issuer")
        audiences = opts.items("audience", None)
        audience: str | list[str] | None = None
        if audiences is not None:
            audience = audiences[0] if len(audiences) == 1 else list(audiences)
        lifetime = opts.duration("lifetime", DEFAULT_LIFETIME)
        if lifetime < 1:
            raise FilterOptionError("lifetime", "must be at least one second")
        return JWTSign(secret=secret, algorithm=algorithm, issuer=issuer, lifetime=lifetime, audience=audience)


def _algorithm(opts: FilterOptions) -> str:
    """``algorithm``: one of HS256 (the default), HS384, HS512."""
    if "algorithm" not in opts:
        return "HS256"
    names = parse_algorithms(opts.items("algorithm"), "algorithm")
    if len(names) != 1:
        raise FilterOptionError("algorithm", "give one algorithm")
    if names[0] not in HMAC_ALGORITHMS:
        raise FilterOptionError("algorithm", f"{names[0]} is not available: jwt_sign signs with the "
                                             "shared secret, with HS256, HS384 or HS512")
    return names[0]


jwt_sign = JWTSignKind()
