"""What chatproxy needs of OpenSSL that pyOpenSSL has no API for: the key
exchange groups of a context, and whether a connection resumed a session.

pyOpenSSL has no API for OpenSSL's group list (``SSL_CTX_set1_groups_list``;
its ``set_tmp_ecdh`` leaves exactly one elliptic curve, without X25519).
``cryptography``'s OpenSSL binding
(:class:`cryptography.hazmat.bindings.openssl.binding.Binding`, whose ``lib``
is the documented entry point to the OpenSSL that pyOpenSSL runs on) has
``SSL_CTX_set1_curves_list``, OpenSSL's older name of the same call, which
takes every group name (``X25519``, ``P-256``, ``X25519MLKEM768``, ...).
It is called on the ``SSL_CTX`` a pyOpenSSL context wraps, so each listener
and each SNI certificate has its own list; see docs/architecture.md ("TLS").
The same binding's ``SSL_session_reused`` tells a resumed handshake.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

__all__ = ["GroupError", "session_reused", "set_groups", "unknown_groups"]

_lib = Binding().lib


class GroupError(ValueError):
    """OpenSSL refused a group list."""


def _raw_context(context: SSL.Context) -> object:
    """The ``SSL_CTX *`` a pyOpenSSL context wraps."""
    raw = getattr(context, "_context", None)
    if raw is None or not hasattr(_lib, "SSL_CTX_set1_curves_list"):
        raise GroupError("this pyOpenSSL/cryptography cannot set TLS groups (no SSL_CTX_set1_curves_list)")
    return raw


def set_groups(context: SSL.Context, groups: Sequence[str]) -> None:
    """Offer exactly ``groups`` (OpenSSL names, in the server's order of
    preference) for key exchange on ``context``.  Raises GroupError."""
    text = ":".join(groups).encode("ascii")
    if not groups or _lib.SSL_CTX_set1_curves_list(_raw_context(context), text) != 1:
        _lib.ERR_clear_error()  # nothing of the refusal may surface in a later, unrelated call
        raise GroupError(f"OpenSSL refuses the group list {':'.join(groups)!r}")


def unknown_groups(groups: Sequence[str]) -> list[str]:
    """The names in ``groups`` that this OpenSSL does not know, in order."""
    unknown = []
    for name in groups:
        try:
            set_groups(SSL.Context(SSL.TLS_METHOD), [name])
        except GroupError:
            unknown.append(name)
    return unknown


def session_reused(connection: SSL.Connection) -> bool:
    """Whether the handshake of ``connection`` resumed a session (False when it cannot be told)."""
    raw = getattr(connection, "_ssl", None)
    if raw is None or not hasattr(_lib, "SSL_session_reused"):
        return False
    return bool(_lib.SSL_session_reused(raw))
