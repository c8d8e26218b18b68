"""Password hashes for HTTP basic authentication (the ``[admin]`` listener).

A hash is ``scrypt$N$r$p$SALT$HASH`` (salt and hash in unpadded URL-safe
base64), made by ``python -m chatproxy hash-password`` with the standard
library's :func:`hashlib.scrypt`; a password is checked by hashing it again
with the same parameters and comparing in constant time
(:func:`hmac.compare_digest`).  No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from attrs import frozen

__all__ = ["PasswordHash", "basic_credentials", "hash_password", "parse_password_hash"]

#: The parameters new hashes get: 16 MiB and some tens of milliseconds per check.
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2 ** 14, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
#: Bounds on what a configured hash may ask for (memory 128 * N * r bytes).
MAX_N, MAX_R, MAX_P = 2 ** 20, 32, 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)


@frozen
class PasswordHash:
    """A parsed ``scrypt$N$r$p$SALT$HASH``."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def __str__(self) -> str:
        return f"scrypt${self.n}${self.r}${self.p}${_b64(self.salt)}${_b64(self.digest)}"

    def matches(self, password: bytes) -> bool:
        """Whether ``password`` hashes to this (constant-time comparison)."""
        candidate = _scrypt(password, self.salt, self.n, self.r, self.p, len(self.digest))
        return hmac.compare_digest(candidate, self.digest)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * n * r * p + 2 ** 20)


def hash_password(password: str, salt: bytes | None = None, n: int = DEFAULT_N, r: int = DEFAULT_R,
                  p: int = DEFAULT_P) -> PasswordHash:
    """The hash of ``password`` (UTF-8) with a new random salt (or ``salt``)."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    return PasswordHash(n, r, p, salt, _scrypt(password.encode("utf-8"), salt, n, r, p, HASH_BYTES))


def parse_password_hash(text: str) -> PasswordHash:
    """``scrypt$N$r$p$SALT$HASH`` as a PasswordHash; raises ValueError saying what is wrong."""
    parts = text.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$SALT$HASH, as printed by python -m chatproxy hash-password")
    try:
        n, r, p = (int(part) for part in parts[1:4])
    except ValueError:
        raise ValueError("N, r and p of scrypt$N$r$p$SALT$HASH must be integers") from None
    if n < 2 or n & (n - 1) or n > MAX_N:
        raise ValueError(f"scrypt N must be a power of two from 2 to {MAX_N}, got {n}")
    if not 1 <= r <= MAX_R or not 1 <= p <= MAX_P:
        raise ValueError(f"scrypt r must be 1-{MAX_R} and p 1-{MAX_P}, got r={r} p={p}")
    try:
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (binascii.Error, ValueError):
        raise ValueError("the salt and hash of scrypt$N$r$p$SALT$HASH must be base64") from None
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("the salt (8 bytes or more) or the hash (16 bytes or more) is too short")
    return PasswordHash(n, r, p, salt, digest)


def basic_credentials(authorization: bytes | None) -> tuple[bytes, bytes] | None:
    """(user, password) from an ``Authorization: Basic ...`` header value, or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None
