"""The ``headers`` filter kind: set or remove request and response headers.

::

    [filter:security-headers]
    use = headers
    response_set =
        Strict-Transport-Security: max-age=31536000; includeSubDomains
        X-Content-Type-Options: nosniff
    response_remove = Server, X-Powered-By
    request_remove = X-Debug

``*_set`` options take one ``Name: value`` a line; a set header replaces
every header of that name (several lines with one name give several
fields).  ``*_remove`` options take a list of names.  Request headers are
changed before the request is forwarded (a :class:`Rewrite`), response
headers before the response head is relayed (the ``response`` hook).
Headers that describe the connection or the message framing cannot be
touched: the proxy writes those itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.filters import Filter, FilterOptionError, FilterOptions, Header, IFilterFactory, IRequestFilter, Rewrite
from chatproxy.http.messages import CONNECTION_HEADERS, FORWARDING

_OPTIONS = ("request_set", "request_remove", "response_set", "response_remove")

# In requests, also the headers chatproxy writes or handles itself.
REQUEST_ONLY = FORWARDING | {b"via", b"expect"}


def check_editable(option: str, names: Iterable[str]) -> None:
    """Refuse (naming ``option``) a header chatproxy writes itself: the
    connection and framing headers, and in requests the forwarding ones."""
    for name in names:
        lower = name.lower().encode("ascii")
        if lower in CONNECTION_HEADERS:
            raise FilterOptionError(option, f"{name} is a hop-by-hop or framing header, which chatproxy manages "
                                            "itself: it cannot be set or removed")
        if option.startswith("request_") and lower in REQUEST_ONLY:
            raise FilterOptionError(option, f"{name} is written by chatproxy itself (see trusted_proxies): "
                                            "it cannot be set or removed")


def edit(headers: Sequence[Header], set_: tuple[Header, ...], remove: frozenset[bytes]) -> list[Header]:
    """``headers`` without the names in ``remove`` or ``set_``, then ``set_`` added."""
    dropped = remove | {name.lower() for name, _ in set_}
    return [h for h in headers if h[0].lower() not in dropped] + list(set_)


@implementer(IRequestFilter)
class HeadersFilter(Filter):
    """Sets and removes request headers (a Rewrite) and response headers (the
    response hook).  Never refuses."""

    def __init__(self, request_set: tuple[Header, ...], request_remove: frozenset[bytes],
                 response_set: tuple[Header, ...], response_remove: frozenset[bytes]) -> None:
        self.request_set = request_set
        self.request_remove = request_remove
        self.response_set = response_set
        self.response_remove = response_remove
        self._rewrite = Rewrite(set=request_set, remove=request_remove) if request_set or request_remove else None
        self._edits_response = bool(response_set or response_remove)

    def request(self, head: Any) -> Rewrite | None:
        """The configured request header changes.  (A client naming a set header
        in ``Connection`` cannot get it dropped: the chain's rewrite takes
        set names out of ``Connection`` for every filter.)"""
        return self._rewrite

    def response(self, head: Any, status: int, headers: list[Header]) -> list[Header] | None:
        """The response headers with the configured changes (None: no response changes)."""
        if not self._edits_response:
            return None
        return edit(headers, self.response_set, self.response_remove)


@implementer(IPlugin, IFilterFactory)
class HeadersKind:
    """The filter kind ``use = headers``."""

    name = "headers"

    def build(self, options: Mapping[str, str]) -> HeadersFilter:
        """Parse the four options; at least one is required."""
        opts = FilterOptions(self.name, options, _OPTIONS)
        opts.require_any()
        sets: dict[str, tuple[Header, ...]] = {}
        removes: dict[str, frozenset[bytes]] = {}
        for side in ("request", "response"):
            set_option, remove_option = f"{side}_set", f"{side}_remove"
            sets[side] = opts.header_lines(set_option, ())
            check_editable(set_option, (name.decode("ascii") for name, _ in sets[side]))
            names = opts.header_names(remove_option, ())
            check_editable(remove_option, names)
            removes[side] = frozenset(name.lower().encode("ascii") for name in names)
            both = removes[side] & {name.lower() for name, _ in sets[side]}
            if both:
                listed = ", ".join(sorted(n.decode("ascii") for n in both))
                raise FilterOptionError(remove_option, f"{listed} also in {set_option}: a header is either set "
                                                       "(which replaces it) or removed")
        return HeadersFilter(sets["request"], removes["request"], sets["response"], removes["response"])


headers = HeadersKind()
