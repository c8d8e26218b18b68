"""The ``request_limits`` filter kind: per-route limits on what a request may be.

::

    [filter:chat-api-limits]
    use = request_limits
    methods = GET, POST, OPTIONS
    max_body_bytes = 64k
    max_headers = 50
    max_header_bytes = 16k
    require_headers = X-Requested-With

Checks, in this order: the method (``405`` with ``Allow``), a declared
``Content-Length`` above ``max_body_bytes`` (``413``), the number of header
fields and their total size (``431``), the required headers (``400`` naming
the first one missing).  ``max_body_bytes`` is also an attribute of the
filter, so the proxy enforces it with ``413`` while a body of unknown length
(chunked) streams in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.filters import Filter, FilterOptionError, FilterOptions, IFilterFactory, IRequestFilter, Refuse

_OPTIONS = ("methods", "max_body_bytes", "max_headers", "max_header_bytes", "require_headers", "content_types",
            "require_body")
# RFC 9110 5.6.2: a method or a field name is a token.
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MEDIA_TYPE_RE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")


def header_bytes(headers: tuple[tuple[bytes, bytes], ...]) -> int:
    """The size of header fields as written on the wire: ``Name: value`` CRLF each."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


@implementer(IRequestFilter)
class RequestLimits(Filter):
    """Refuses requests outside the configured limits; None means no limit.

    The limits are checked in this order: method, declared body size, header
    count, header size, required headers, required body, content type; the
    first one broken is the refusal."""

    def __init__(self, methods: tuple[str, ...] | None, max_body_bytes: int | None, max_headers: int | None,
                 max_header_bytes: int | None, require_headers: tuple[str, ...],
                 content_types: tuple[str, ...] = (), require_body: bool = False) -> None:
        self.methods = methods
        self._method_set = frozenset(methods or ())
        self._allow = ((b"Allow", ", ".join(methods).encode("ascii")),) if methods else ()
        # The proxy lowers the route's body limit to this (``None``: no change).
        self.max_body_bytes = max_body_bytes
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.require_headers = require_headers
        self._required = tuple((name, name.lower().encode("ascii")) for name in require_headers)
        self.content_types = content_types
        self.require_body = require_body
        checks: list[tuple[object, Callable[[Any], Refuse | None]]] = [
            (methods is not None, self._check_method),
            (max_body_bytes is not None, self._check_declared_body),
            (max_headers is not None, self._check_header_count),
            (max_header_bytes is not None, self._check_header_bytes),
            (self._required, self._check_required_headers),
            (require_body, self._check_body_present),
            (content_types, self._check_content_type),
        ]
        self._checks = tuple(check for wanted, check in checks if wanted)

    def request(self, head: Any) -> Refuse | None:
        """The first limit the request breaks, as a refusal, or None."""
        for check in self._checks:
            refusal = check(head)
            if refusal is not None:
                return refusal
        return None

    def _check_method(self, head: Any) -> Refuse | None:
        if head.method in self._method_set:
            return None
        assert self.methods is not None
        return Refuse(405, f"method {head.method} not allowed here (allowed: {', '.join(self.methods)})", self._allow)

    def _check_declared_body(self, head: Any) -> Refuse | None:
        assert self.max_body_bytes is not None
        declared = (head.header("content-length") or "").strip()
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            return Refuse(413, f"request body larger than {self.max_body_bytes} bytes")
        return None

    def _check_header_count(self, head: Any) -> Refuse | None:
        assert self.max_headers is not None
        if len(head.headers) > self.max_headers:
            return Refuse(431, f"more than {self.max_headers} header fields")
        return None

    def _check_header_bytes(self, head: Any) -> Refuse | None:
        assert self.max_header_bytes is not None
        if header_bytes(head.headers) > self.max_header_bytes:
            return Refuse(431, f"header fields larger than {self.max_header_bytes} bytes")
        return None

    def _check_required_headers(self, head: Any) -> Refuse | None:
        present = {name.lower() for name, value in head.headers if value.strip()}
        for name, lower in self._required:
            if lower not in present:
                return Refuse(400, f"missing required header {name}")
        return None

    def _check_body_present(self, head: Any) -> Refuse | None:
        length = (head.header("content-length") or "").strip()
        chunked = head.header("transfer-encoding") is not None
        if not chunked and (not length or length == "0"):
            return Refuse(400, "a request body is required")
        return None

    def _check_content_type(self, head: Any) -> Refuse | None:
        media = (head.header("content-type") or "").split(";", 1)[0].strip().lower()
        if media not in self.content_types:
            return Refuse(415, f"content type must be one of: {', '.join(self.content_types)}")
        return None


def _methods(option: str, items: Sequence[str]) -> tuple[str, ...]:
    """Method names (tokens), upper-cased (the standard methods are upper-case), duplicates dropped."""
    for item in items:
        if not TOKEN_RE.fullmatch(item):
            raise FilterOptionError(option, f"{item!r} is not an HTTP method")
    return tuple(dict.fromkeys(item.upper() for item in items))


def _media_types(option: str, items: Sequence[str]) -> tuple[str, ...]:
    """Media types (``type/subtype``), lower-cased, duplicates dropped."""
    media_types = tuple(dict.fromkeys(item.lower() for item in items))
    for media in media_types:
        if not _MEDIA_TYPE_RE.fullmatch(media):
            raise FilterOptionError(option, f"{media!r} is not a media type such as application/json")
    return media_types


@implementer(IPlugin, IFilterFactory)
class RequestLimitsKind:
    """The filter kind ``use = request_limits``."""

    name = "request_limits"

    def build(self, options: Mapping[str, str]) -> RequestLimits:
        """Parse the options; at least one of them is required."""
        opts = FilterOptions(self.name, options, _OPTIONS)
        opts.require_any()
        methods = _methods("methods", opts.items("methods", what="method")) if "methods" in opts else None
        return RequestLimits(
            methods=methods,
            require_headers=opts.header_names("require_headers", ()),
            content_types=_media_types("content_types", opts.items("content_types", (), what="media type")),
            require_body=opts.boolean("require_body", False),
            max_body_bytes=opts.size("max_body_bytes", None),
            max_headers=opts.integer("max_headers", None),
            max_header_bytes=opts.size("max_header_bytes", None, minimum=1),
        )


request_limits = RequestLimitsKind()
