"""Who may read the admin listener's protected endpoints (``/status``,
``/status.json``, ``/metrics``): ``[admin] allow`` (the client's address in
those networks, checked as a listener's ``allow`` is) and, with
``[admin] user``, HTTP basic authentication against ``password_hash``.

The decision only: :meth:`AdminAccess.check` takes the client's address and
``Authorization`` header and says what to answer instead (None: go on), or
that the password must be checked first (a :class:`Verify`, which
:meth:`AdminAccess.verify` settles: an scrypt, tens of milliseconds of CPU,
so the admin site runs it in a thread, one at a time, never in the reactor).
"""

from __future__ import annotations

import hashlib
import hmac

from attrs import frozen

from chatproxy.config import Admin
from chatproxy.http.messages import in_networks
from chatproxy.http.passwords import basic_credentials, parse_password_hash

REALM = b"chatproxy"


@frozen
class Denial:
    """What a refused admin request gets."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


FORBIDDEN = Denial(403, b"forbidden: this address may not read the admin listener ([admin] allow)\n")
@frozen
class Verify:
    """Credentials whose password must be checked (:meth:`AdminAccess.verify`)."""

    user_ok: bool
    password: bytes
    fingerprint: bytes


UNAUTHORIZED = Denial(401, b"authentication required\n",
                      ((b"www-authenticate", b'Basic realm="' + REALM + b'", charset="UTF-8"'),))


class AdminAccess:
    """The ``[admin]`` section's ``allow``, ``user`` and ``password_hash`` (None: no section, all open).

    Checking a password costs an scrypt (tens of milliseconds): the last
    ``Authorization`` value that passed is remembered (as its SHA-256), so a
    scraper sending the same credentials every few seconds costs one; a wrong
    one costs a full check every time (in a thread: see :class:`Verify`)."""

    def __init__(self, admin: Admin | None) -> None:
        self.allow = admin.allow if admin is not None else None
        self.user = admin.user.encode("utf-8") if admin is not None and admin.user is not None else None
        self.password = parse_password_hash(admin.password_hash) \
            if admin is not None and admin.password_hash is not None else None
        self._accepted: bytes | None = None

    def check(self, host: str | None, authorization: bytes | None) -> Denial | Verify | None:
        """None when a client at ``host`` (None: not an IP client, e.g. a UNIX
        socket) sending ``authorization`` may go on, a Denial with what to
        answer, or a :class:`Verify` when the password must be checked first."""
        if self.allow is not None and host is not None and not in_networks(host, self.allow):
            return FORBIDDEN
        if self.user is None or self.password is None:
            return None
        credentials = basic_credentials(authorization)
        if credentials is None or authorization is None:
            return UNAUTHORIZED
        fingerprint = hashlib.sha256(authorization).digest()
        if self._accepted is not None and hmac.compare_digest(fingerprint, self._accepted):
            return None
        user, password = credentials
        return Verify(hmac.compare_digest(user, self.user), password, fingerprint)

    def verify(self, pending: Verify) -> Denial | None:
        """Check a password (the scrypt runs even for a wrong user: same cost);
        safe in any thread.  None when it passes (and is remembered)."""
        assert self.password is not None
        password_ok = self.password.matches(pending.password)
        if pending.user_ok and password_ok:
            self._accepted = pending.fingerprint
            return None
        return UNAUTHORIZED
