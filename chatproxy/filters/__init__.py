"""The public interface for request filters: what a filter plugin implements.

A filter *kind* is a plugin providing :class:`IFilterFactory`, found with
:func:`twisted.plugin.getPlugins` in the ``twisted.plugins`` package.  Its
``build(options)`` validates the options of one ``[filter:NAME]`` section and
returns an object providing :class:`IRequestFilter`.  The built-in kinds are
registered exactly the same way as a third party's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import frozen
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface


class FilterOptionError(Exception):
    """Raised by ``IFilterFactory.build`` when one option of a filter section is wrong.

    ``option`` names the offending option (``None`` for the section as a whole)
    so the configuration loader can name file, section and option.
    """

    def __init__(self, option: str | None, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


DROP = "drop"
"""A message hook's verdict: drop this WebSocket message, keep the session."""


@frozen
class CloseSession:
    """A message hook's verdict: end the WebSocket session with this close code."""

    code: int
    reason: str = ""


class IRequestFilter(Interface):
    """A filter on a route: sees each request head before it is forwarded.

    A filter may also define ``message(head, payload, binary, upward)``, the
    WebSocket message hook: it sees every message of a session on a bridge
    route (``upward`` is True from client to upstream) and returns None
    (pass), :data:`DROP`, or a :class:`CloseSession`.
    """

    def request(request: Any) -> Any:
        """Decide about one request head.

        Returns ``None`` to pass the request on, or a decision object (or a
        Deferred firing with one); the decision objects are defined by the
        filter chain.
        """


class IFilterFactory(IPlugin):
    """A filter kind: a named plugin that builds filters from config options."""

    name = Attribute("The unique kind name used in config: ``use = NAME``.")

    def build(options: Mapping[str, str]) -> IRequestFilter:
        """Validate ``options`` (everything in the section except ``use``) and
        return the filter, or raise :class:`FilterOptionError`."""


def installed_filter_kinds() -> dict[str, Any]:
    """Return the installed filter kinds by name, found with ``getPlugins``."""
    import twisted.plugins

    kinds: dict[str, Any] = {}
    for factory in getPlugins(IFilterFactory, twisted.plugins):
        kinds.setdefault(str(factory.name), factory)
    return kinds
