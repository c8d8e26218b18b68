"""Who may read the admin listener's protected endpoints (``/status``,
``/status.json``, ``/metrics``): ``[admin] allow`` (the client's address in
those networks, checked as a listener's ``allow`` is) and, with
``[admin] user``, HTTP basic authentication against ``password_hash``.

The decision only: :meth:`AdminAccess.check` takes the client's address and
``Authorization`` header and says what to answer instead (None: go on).
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
UNAUTHORIZED = Denial(401, b"authentication required\n",
                      ((b"www-authenticate", b'Basic realm="' + REALM + b'", charset="UTF-8"'),))


class AdminAccess:
    """The ``[admin]`` section's ``allow``, ``user`` and ``password_hash`` (None: no section, all open).

    Checking a password costs an scrypt (tens of milliseconds): the last
    ``Authorization`` value that passed is remembered (as its SHA-256), so a
    scraper sending the same credentials every few seconds costs one; a wrong
    one costs a full check every time."""

    def __init__(self, admin: Admin | None) -> None:
        self.allow = admin.allow if admin is not None else None
        self.user = admin.user.encode("utf-8") if admin is not None and admin.user is not None else None
        self.password = parse_password_hash(admin.password_hash) \
            if admin is not None and admin.password_hash is not None else None
        self._accepted: bytes | None = None

    def check(self, host: str | None, authorization: bytes | None) -> Denial | None:
        """None when a client at ``host`` (None: not an IP client, e.g. a UNIX
        socket) sending ``authorization`` may go on, else what to answer."""
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
        user_ok = hmac.compare_digest(user, self.user)
        password_ok = self.password.matches(password)  # computed even for a wrong user: same cost
        if user_ok and password_ok:
            self._accepted = fingerprint
            return None
        return UNAUTHORIZED
