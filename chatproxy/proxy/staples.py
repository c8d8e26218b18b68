"""OCSP responses kept for stapling, in memory and on disk.

Responses are stored by the SHA-256 fingerprint of the certificate they
speak of, as ``STATE_DIRECTORY/ocsp/FINGERPRINT.der``.  The disk copy lets
a restarted process staple at once (and keep stapling while the responder
is down), and it is how the workers of a master get what the master
fetched.  Whoever reads a response verifies it again
(:func:`chatproxy.proxy.ocsp.verify_response`): the store trusts nothing.
"""

from __future__ import annotations

from pathlib import Path

from twisted.logger import Logger

from chatproxy.proxy.ocsp import OCSPTarget
from chatproxy.proxy.tls import write_file

__all__ = ["StapleStore"]

log = Logger()


class StapleStore:
    """DER OCSP responses by certificate, in memory and (when ``directory``
    is given) on disk."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[str, bytes] = {}

    def _path(self, target: OCSPTarget) -> Path | None:
        return None if self.directory is None else self.directory / f"{target.fingerprint}.der"

    def put(self, target: OCSPTarget, der: bytes) -> None:
        """Keep ``der`` for the target's certificate; a disk that cannot be
        written is logged, and the response kept in memory only."""
        self._memory[target.fingerprint] = der
        path = self._path(target)
        if path is None:
            return
        try:
            write_file(path, der, 0o600)
        except OSError as e:
            log.warn("OCSP: cannot write the response cache {path}: {error}", path=str(path), error=e.strerror)
            path.unlink(missing_ok=True)  # an older response must not win over the one in memory

    def get(self, target: OCSPTarget) -> bytes | None:
        """The response kept for the target's certificate: on disk (where
        the master of workers leaves what it fetched), else in memory, else None."""
        path = self._path(target)
        if path is not None:
            try:
                return path.read_bytes()
            except OSError:
                pass
        return self._memory.get(target.fingerprint)
