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
from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.config import parse_bool, parse_list, parse_size
from chatproxy.filters import Filter, FilterOptionError, IFilterFactory, IRequestFilter, Refuse

_OPTIONS = ("methods", "max_body_bytes", "max_headers", "max_header_bytes", "require_headers", "content_types",
            "require_body")
# RFC 9110 5.6.2: a method or a field name is a token.
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def header_bytes(headers: tuple[tuple[bytes, bytes], ...]) -> int:
    """The size of header fields as written on the wire: ``Name: value`` CRLF each."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


@implementer(IRequestFilter)
class RequestLimits(Filter):
    """Refuses requests outside the configured limits; None means no limit."""

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

    def request(self, head: Any) -> Refuse | None:
        """The first limit the request breaks, as a refusal, or None."""
        if self.methods is not None and head.method not in self._method_set:
            return Refuse(405, f"method {head.method} not allowed here (allowed: {', '.join(self.methods)})",
                          self._allow)
        headers = head.headers
        if self.max_body_bytes is not None:
            declared = (head.header("content-length") or "").strip()
            if declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
                return Refuse(413, f"request body larger than {self.max_body_bytes} bytes")
        if self.max_headers is not None and len(headers) > self.max_headers:
            return Refuse(431, f"more than {self.max_headers} header fields")
        if self.max_header_bytes is not None and header_bytes(headers) > self.max_header_bytes:
            return Refuse(431, f"header fields larger than {self.max_header_bytes} bytes")
        if self._required:
            present = {name.lower() for name, value in headers if value.strip()}
            for name, lower in self._required:
                if lower not in present:
                    return Refuse(400, f"missing required header {name}")
        if self.require_body:
            length = (head.header("content-length") or "").strip()
            chunked = head.header("transfer-encoding") is not None
            if not chunked and (not length or length == "0"):
                return Refuse(400, "a request body is required")
        if self.content_types:
            media = (head.header("content-type") or "").split(";", 1)[0].strip().lower()
            if media not in self.content_types:
                return Refuse(415, f"content type must be one of: {', '.join(self.content_types)}")
        return None


def _positive(option: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise FilterOptionError(option, f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise FilterOptionError(option, "must be at least 1")
    return value


def _size(option: str, text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as e:
        raise FilterOptionError(option, str(e)) from None
    if option == "max_header_bytes" and value < 1:
        raise FilterOptionError(option, "must be at least 1")
    return value


def _tokens(option: str, text: str, what: str) -> tuple[str, ...]:
    items = parse_list(text)
    if not items:
        raise FilterOptionError(option, f"expected at least one {what}")
    for item in items:
        if not TOKEN_RE.fullmatch(item):
            raise FilterOptionError(option, f"{item!r} is not an HTTP {what}")
    return tuple(items)


@implementer(IPlugin, IFilterFactory)
class RequestLimitsKind:
    """The filter kind ``use = request_limits``."""

    name = "request_limits"

    def build(self, options: Mapping[str, str]) -> RequestLimits:
        """Parse the options; at least one of them is required."""
        for option in options:
            if option not in _OPTIONS:
                raise FilterOptionError(option, f"unknown option (request_limits takes: {', '.join(_OPTIONS)})")
        if not options:
            raise FilterOptionError(None, f"request_limits needs at least one of: {', '.join(_OPTIONS)}")
        methods = None
        if "methods" in options:
            # Methods are case-sensitive; the standard ones are upper-case.
            methods = tuple(dict.fromkeys(m.upper() for m in _tokens("methods", options["methods"], "method")))
        required: tuple[str, ...] = ()
        if "require_headers" in options:
            required = tuple(dict.fromkeys(_tokens("require_headers", options["require_headers"], "header name")))
        content_types: tuple[str, ...] = ()
        if "content_types" in options:
            content_types = tuple(dict.fromkeys(t.lower() for t in parse_list(options["content_types"])))
            if not content_types:
                raise FilterOptionError("content_types", "expected at least one media type")
            for media in content_types:
                if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", media):
                    raise FilterOptionError("content_types", f"{media!r} is not a media type such as application/json")
        require_body = False
        if "require_body" in options:
            try:
                require_body = parse_bool(options["require_body"])
            except ValueError as e:
                raise FilterOptionError("require_body", str(e)) from None
        return RequestLimits(
            content_types=content_types,
            require_body=require_body,
            methods=methods,
            max_body_bytes=_size("max_body_bytes", options["max_body_bytes"]) if "max_body_bytes" in options else None,
            max_headers=_positive("max_headers", options["max_headers"]) if "max_headers" in options else None,
            max_header_bytes=(_size("max_header_bytes", options["max_header_bytes"])
                              if "max_header_bytes" in options else None),
            require_headers=required,
        )


request_limits = RequestLimitsKind()
