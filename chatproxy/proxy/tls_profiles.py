"""Mozilla's server-side TLS profiles as data, and the settings a listener
ends up with (its profile, then its own ``min_tls_version``, ``ciphers`` and
``groups``).  No I/O: :mod:`chatproxy.proxy.tls` applies the result to
OpenSSL contexts.

The profiles follow Mozilla's "Server Side TLS" guidelines, version 5.7
(the one sslyze checks with ``--mozilla_config``), with one difference in
the intermediate profile: no ``DHE-RSA-*`` suites and no finite-field
groups, so there are no Diffie-Hellman parameters to manage; every client
the profile names speaks ECDHE.
"""

from __future__ import annotations

from attrs import frozen

from chatproxy.config import Listener

__all__ = ["INTERMEDIATE", "MODERN", "PROFILES", "TLSProfile", "TLSSettings", "listener_settings"]

#: TLS 1.3 suites of both profiles, in the server's order of preference.
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#: Key exchange groups of both profiles, in the server's order of preference
#: (Mozilla's X25519, prime256v1, secp384r1 in OpenSSL's names).
GROUPS = ("X25519", "P-256", "P-384")


@frozen
class TLSProfile:
    """One of Mozilla's configurations: versions, TLS 1.2 suites (OpenSSL
    names; empty when TLS 1.2 is not offered), TLS 1.3 suites, groups."""

    name: str
    min_version: str
    ciphers: str
    tls13_ciphers: str = TLS13_SUITES
    groups: tuple[str, ...] = GROUPS


INTERMEDIATE = TLSProfile(
    "intermediate",
    "1.2",
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
)
MODERN = TLSProfile("modern", "1.3", "")
PROFILES = {profile.name: profile for profile in (INTERMEDIATE, MODERN)}


@frozen
class TLSSettings:
    """What a listener's server contexts are made with."""

    profile: str
    min_version: str
    ciphers: str
    tls13_ciphers: str
    groups: tuple[str, ...]
    #: The application protocols ALPN selects from, in the server's order of
    #: preference: h2 first on a listener with ``http2`` on.
    alpn: tuple[bytes, ...] = (b"http/1.1",)


def listener_settings(listener: Listener) -> TLSSettings:
    """A listener's profile with its own options laid over it."""
    profile = PROFILES[listener.tls_profile]
    return TLSSettings(
        profile=profile.name,
        min_version=listener.min_tls_version or profile.min_version,
        ciphers=listener.ciphers or profile.ciphers or INTERMEDIATE.ciphers,
        tls13_ciphers=profile.tls13_ciphers,
        groups=listener.groups or profile.groups,
        alpn=(b"h2", b"http/1.1") if listener.http2 else (b"http/1.1",),
    )
