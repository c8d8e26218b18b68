"""What a plain (``tls = no``) listener answers itself, before routing:
ACME HTTP-01 challenges, and, with ``redirect_to_https = yes``, a redirect
to the same host and target over https for every other request.

:func:`plain_answer` decides (no I/O but the challenge lookup it is given);
:class:`ChallengeFiles` looks up the key authorizations that the ACME client
(:mod:`chatproxy.process.renewal`, in the single process or the master)
writes as files, which every worker can read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from chatproxy.config import Listener
from chatproxy.filters import Answer
from chatproxy.http.messages import RequestHead

__all__ = ["CHALLENGE_PREFIX", "ChallengeFiles", "https_location", "plain_answer"]

#: Where HTTP-01 challenges are asked for (RFC 8555, section 8.3).
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,255}")
_TEXT = (b"Content-Type", b"text/plain; charset=utf-8")
#: Methods redirected with 301 (the others get 308, which keeps the method and body).
_SAFE = frozenset({"GET", "HEAD"})


class ChallengeFiles:
    """Key authorizations of pending HTTP-01 challenges, one file per token
    in ``directory`` (written by the ACME client, read here on request)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, token: str) -> bytes | None:
        """The key authorization for ``token``, or None."""
        try:
            return (self.directory / token).read_bytes()
        except OSError:
            return None


def https_location(head: RequestHead, port: int) -> str | None:
    """``https://HOST[:PORT]TARGET`` for a request (None without a host to send it to)."""
    if not head.host:
        return None
    host = f"[{head.host}]" if ":" in head.host else head.host
    authority = host if port == 443 else f"{host}:{port}"
    target = head.target if head.target.startswith("/") else head.path + (f"?{head.query}" if head.query else "")
    return f"https://{authority}{target}"


def plain_answer(listener: Listener, head: RequestHead,
                 challenges: Callable[[str], bytes | None] | None) -> Answer | None:
    """The answer a plain listener gives itself, or None to route the request.

    With ACME configured (``challenges`` given), ``GET``/``HEAD
    /.well-known/acme-challenge/TOKEN`` gets the token's key authorization,
    or 404 when no challenge with that token is pending.  With
    ``redirect_to_https``, every other request gets 301 (GET, HEAD) or 308
    (other methods) to the same host and target on https, or 400 without a
    Host header."""
    if challenges is not None and head.method in _SAFE and head.path.startswith(CHALLENGE_PREFIX):
        token = head.path[len(CHALLENGE_PREFIX):]
        answer = challenges(token) if _TOKEN.fullmatch(token) else None
        if answer is None:
            return Answer(404, b"no such ACME challenge\n", (_TEXT,))
        return Answer(200, answer, ((b"Content-Type", b"application/octet-stream"),))
    if not listener.redirect_to_https:
        return None
    location = https_location(head, listener.https_port)
    if location is None:
        return Answer(400, b"a redirect to https needs a Host header\n", (_TEXT,))
    status = 301 if head.method in _SAFE else 308
    return Answer(status, f"moved to {location}\n".encode("latin-1", "replace"),
                  (_TEXT, (b"Location", location.encode("latin-1", "replace"))))
