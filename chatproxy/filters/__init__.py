"""The public interface for request filters: what a filter plugin implements.

A filter *kind* is a plugin providing :class:`IFilterFactory`, found with
:func:`twisted.plugin.getPlugins` in the ``twisted.plugins`` package.  Its
``build(options)`` validates the options of one ``[filter:NAME]`` section
(with :class:`FilterOptions`, which raises :class:`FilterOptionError`) and
returns an object providing :class:`IRequestFilter`.  The built-in kinds are
registered exactly the same way as a third party's, and use only this
package (and :mod:`chatproxy.http.messages` for HTTP vocabulary); tests of a
kind use :mod:`chatproxy.testing`.

A filter's request hook returns a decision: ``None`` passes the request on;
:class:`Refuse` and :class:`Answer` end it; :class:`Rewrite` changes its
headers and passes it on.  Every section also takes ``mode = report``, which
turns refusals and answers into log lines and counts (a dry run), and
``refused_message = drop``, with which a WebSocket message the message hook
refuses (a :class:`CloseSession`) is dropped and the session goes on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface, implementer

from chatproxy.config.values import Network, OptionText, option_path
from chatproxy.filters.options import REQUIRED, FilterOptionError, FilterOptions
from chatproxy.http.messages import Header, RequestHead

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = [
    "DROP",
    "REQUIRED",
    "Answer",
    "CloseSession",
    "Filter",
    "FilterOptionError",
    "FilterOptions",
    "Header",
    "IFilterFactory",
    "IRequestFilter",
    "MessageVerdict",
    "Metric",
    "Network",
    "OptionText",
    "Refuse",
    "RequestDecision",
    "RequestHead",
    "Rewrite",
    "implements_hook",
    "installed_filter_kinds",
    "option_path",
]


# ---------------------------------------------------------------------------
# Decisions of the request hook


@frozen
class Refuse:
    """Refuse the request with ``status``; ``reason`` is sent as the plain-text body
    and logged; ``headers`` are added to the answer (e.g. ``WWW-Authenticate``);
    ``note`` (short, one line) is recorded in the request's access-log line, in
    report mode too (e.g. the waf's anomaly score and rule ids)."""

    status: int
    reason: str = ""
    headers: tuple[Header, ...] = ()
    note: str = ""


@frozen
class Answer:
    """Answer the request with this response instead of forwarding it."""

    status: int
    body: bytes = b""
    headers: tuple[Header, ...] = ()


@frozen
class Rewrite:
    """Pass the request on with headers changed: names in ``remove`` (lower-case)
    are dropped, then ``set`` replaces any header of the same name."""

    set: tuple[Header, ...] = ()
    remove: frozenset[bytes] = frozenset()


DROP = "drop"
"""A message hook's verdict: drop this WebSocket message, keep the session."""


@frozen
class CloseSession:
    """A message hook's verdict: end the WebSocket session with this close code."""

    code: int
    reason: str = ""


# ---------------------------------------------------------------------------
# Interfaces


class IRequestFilter(Interface):
    """A filter on a route: sees each request head before it is forwarded,
    and, through its optional hooks, the start of request bodies, response
    heads and WebSocket messages.

    ``request`` is required.  The other hooks and attributes are optional: a
    filter has the ones it needs, and the route's
    :class:`~chatproxy.filters.chain.FilterChain` calls only those.  Every
    hook is called with the request's head as the filters before it left it
    (a :class:`chatproxy.http.messages.RequestHead`).  How failures, report
    mode and counters are handled is the chain's, the same for every hook.
    """

    inspect_body_bytes = Attribute(
        """Optional (int): with ``request_body``, how many bytes of each request
        body the filter reads before the request is forwarded (0: none).""")

    inspect_response_bytes = Attribute(
        """Optional (int): with ``response_body``, how many bytes of each
        response body (of the media types in ``inspect_response_types``) the
        filter reads before the response is sent to the client (0: none).""")

    inspect_response_types = Attribute(
        """Optional (frozenset of lower-case media types, e.g. ``b"text/html"``):
        the responses ``response_body`` sees, by their ``Content-Type``
        (empty: every response but a protocol switch).""")

    max_body_bytes = Attribute(
        """Optional (int): a request body limit; the route's limit is the
        smallest of its filters' and its own (larger bodies get 413).""")

    def request(head: RequestHead) -> RequestDecision | Deferred[RequestDecision]:
        """Decide about one request head: None passes it on, :class:`Rewrite`
        changes its headers and passes it on, :class:`Refuse` and
        :class:`Answer` end it.  May return a Deferred firing with one."""

    def request_body(head: RequestHead, body: bytes, complete: bool) -> RequestDecision | Deferred[RequestDecision]:
        """Optional.  Decide about the first ``inspect_body_bytes`` bytes of a
        request body (``complete``: that is the whole body); the request is
        held until then.  Returns as ``request`` does (a Rewrite is ignored)."""

    def response(head: RequestHead, status: int, headers: list[Header]) -> list[Header] | None:
        """Optional.  See a response head before it is sent to the client (the
        upstream's, or the proxy's own answer on the route): return the new
        list of headers, or None to leave them.  Connection and framing
        headers are the proxy's and stay as they were."""

    def response_body(head: RequestHead, status: int, headers: list[Header], body: bytes,
                      complete: bool) -> RequestDecision | Deferred[RequestDecision]:
        """Optional.  Decide about a response before any of it is sent to the
        client: its status, its end-to-end headers and the first
        ``inspect_response_bytes`` bytes of its body (``complete``: that is
        the whole body).  The response is held (and the upstream not read)
        until then.  None lets it go on; :class:`Refuse` and :class:`Answer`
        replace it (the upstream connection is closed unless the response
        was complete).  May return a Deferred firing with one."""

    def message(head: RequestHead, payload: bytes, binary: bool, upward: bool) -> MessageVerdict | Deferred[MessageVerdict]:
        """Optional.  See one whole WebSocket message of a session on a bridge
        route (``upward``: from the client to the upstream): return None to
        relay it, :data:`DROP` to drop it, or a :class:`CloseSession`.  May
        return a Deferred firing with one: the session's later messages in
        that direction wait, in order, until it has fired, and reading from
        the client pauses meanwhile."""

    def metrics() -> Iterable[Metric]:
        """Optional.  The filter's own counters for ``/metrics``, read at each
        scrape: the proxy adds the label ``filter`` (the section's name) and
        exposes each family once, however many sections give it."""


@frozen
class Metric:
    """One counter value a filter reports (see ``IRequestFilter.metrics``): the
    family's name (``chatproxy_KIND_...``), its help text, the labels and the
    count.  Every value of one family has the same label names."""

    name: str
    help: str
    labels: tuple[tuple[str, str], ...]
    value: float


RequestDecision = Refuse | Answer | Rewrite | None
"""What a request (or body) hook returns."""

MessageVerdict = CloseSession | str | None
"""What a message hook returns: None, :data:`DROP` or a :class:`CloseSession`."""


@implementer(IRequestFilter)
class Filter:
    """A base class for filters: every optional hook of
    :class:`IRequestFilter`, doing nothing.  A filter overrides the hooks it
    needs; the route's chain calls only those (a hook left as defined here is
    never called).  ``request`` passes every request unless overridden."""

    inspect_body_bytes: int = 0
    inspect_response_bytes: int = 0
    inspect_response_types: frozenset[bytes] = frozenset()
    max_body_bytes: int | None = None

    def request(self, head: RequestHead) -> RequestDecision | Deferred[RequestDecision]:
        """Pass the request on (override to decide)."""
        return None

    def request_body(self, head: RequestHead, body: bytes, complete: bool) -> RequestDecision | Deferred[RequestDecision]:
        """Pass the body (override, and set ``inspect_body_bytes``, to read bodies)."""
        return None

    def response(self, head: RequestHead, status: int, headers: list[Header]) -> list[Header] | None:
        """Leave the response head as it is (override to change it)."""
        return None

    def response_body(self, head: RequestHead, status: int, headers: list[Header], body: bytes,
                      complete: bool) -> RequestDecision | Deferred[RequestDecision]:
        """Let the response go on (override, and set ``inspect_response_bytes``, to read responses)."""
        return None

    def message(self, head: RequestHead, payload: bytes, binary: bool,
                upward: bool) -> MessageVerdict | Deferred[MessageVerdict]:
        """Relay the message (override to look at WebSocket messages)."""
        return None

    def metrics(self) -> Iterable[Metric]:
        """No counters of its own (override to report some)."""
        return ()


def implements_hook(flt: object, hook: str) -> bool:
    """Whether ``flt`` has the optional ``hook`` (``request_body``,
    ``response``, ``response_body``, ``message``, ``metrics``): a method of its own, not
    :class:`Filter`'s do-nothing one."""
    method = getattr(flt, hook, None)
    if not callable(method):
        return False
    return not (isinstance(flt, Filter) and getattr(type(flt), hook, None) is getattr(Filter, hook))


class IFilterFactory(IPlugin):
    """A filter kind: a named plugin that builds filters from config options."""

    name = Attribute("The unique kind name used in config: ``use = NAME``.")

    def build(options: Mapping[str, str]) -> IRequestFilter:
        """Validate ``options`` (everything in the section except ``use``,
        ``mode`` and ``refused_message``) and return the filter, or raise
        :class:`FilterOptionError`."""


def installed_filter_kinds() -> dict[str, Any]:
    """Return the installed filter kinds by name, found with ``getPlugins``."""
    import twisted.plugins

    kinds: dict[str, Any] = {}
    for factory in getPlugins(IFilterFactory, twisted.plugins):
        kinds.setdefault(str(factory.name), factory)
    return kinds
