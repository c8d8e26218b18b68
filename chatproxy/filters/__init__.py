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

from collections.abc import Mapping
from typing import Any

from attrs import frozen
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface

from chatproxy.config.values import Network, OptionText, option_path
from chatproxy.filters.options import REQUIRED, FilterOptionError, FilterOptions
from chatproxy.http.messages import Header

__all__ = [
    "DROP",
    "REQUIRED",
    "Answer",
    "CloseSession",
    "FilterOptionError",
    "FilterOptions",
    "Header",
    "IFilterFactory",
    "IRequestFilter",
    "Network",
    "OptionText",
    "Refuse",
    "Rewrite",
    "installed_filter_kinds",
    "option_path",
]


# ---------------------------------------------------------------------------
# Decisions of the request hook


@frozen
class Refuse:
    """Refuse the request with ``status``; ``reason`` is sent as the plain-text body
    and logged; ``headers`` are added to the answer (e.g. ``WWW-Authenticate``)."""

    status: int
    reason: str = ""
    headers: tuple[Header, ...] = ()


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
    """A filter on a route: sees each request head before it is forwarded.

    Optional hooks, used when the filter object has them:

    - ``response(head, status, headers)``: sees the response head before it
      is relayed; returns a new list of ``(name, value)`` headers, or None
      to leave them as they are.
    - ``message(head, payload, binary, upward)``: the WebSocket message hook,
      for every message of a session on a bridge route (``upward`` is True
      from client to upstream); returns None (pass), :data:`DROP`, or a
      :class:`CloseSession` (a refusal: the session ends, or with
      ``refused_message = drop`` the message is dropped).
    - ``max_body_bytes``: an attribute; the route's request body limit is the
      smallest of its filters' and its own.
    - ``inspect_body_bytes`` (an int attribute) with ``request_body(head,
      body, complete)``: the body hook.  The request is held until that many
      bytes of its body (or all of it, if shorter) have arrived; the hook sees
      them (``complete`` says whether that is the whole body) and returns a
      decision as ``request`` does (a Rewrite is ignored there).  Only then is
      the request forwarded, the held bytes first.
    """

    def request(request: Any) -> Any:
        """Decide about one request head (a ``chatproxy.http.messages.RequestHead``).

        Returns None, :class:`Refuse`, :class:`Answer` or :class:`Rewrite`, or a
        Deferred firing with one of them.
        """


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
