"""The ``ip_allowlist`` filter kind: let a route serve only some client addresses.

::

    [filter:office-only]
    use = ip_allowlist
    allow = 10.0.0.0/8, 2001:db8::/32
    deny = 10.66.0.0/16

The address checked is ``RequestHead.client``: the client address after the
listener's ``trusted_proxies`` resolution (so ``X-Forwarded-For`` counts only
when it comes from a trusted proxy).  ``deny`` wins over ``allow``; with only
``deny`` every other address passes; with ``allow`` only the addresses in it
pass.  Refusals are ``403``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.filters import Filter, FilterOptions, IFilterFactory, IRequestFilter, Network, Refuse
from chatproxy.http.messages import in_networks

_OPTIONS = ("allow", "deny")


@implementer(IRequestFilter)
class IPAllowlist(Filter):
    """Passes requests whose client address is allowed and not denied; refuses
    the others with 403.  ``allow`` None means every address not denied."""

    def __init__(self, allow: tuple[Network, ...] | None, deny: tuple[Network, ...]) -> None:
        self.allow = allow
        self.deny = deny

    def request(self, head: Any) -> Refuse | None:
        """403 when the client is in ``deny``, or ``allow`` is set and it is not in it."""
        client = str(head.client)
        if self.deny and in_networks(client, self.deny):
            return Refuse(403, f"client address {client} is denied")
        if self.allow is not None and not in_networks(client, self.allow):
            return Refuse(403, f"client address {client} is not allowed")
        return None


@implementer(IPlugin, IFilterFactory)
class IPAllowlistKind:
    """The filter kind ``use = ip_allowlist`` (options ``allow``, ``deny``)."""

    name = "ip_allowlist"

    def build(self, options: Mapping[str, str]) -> IPAllowlist:
        """Parse ``allow`` and ``deny`` (networks); at least one is required."""
        opts = FilterOptions(self.name, options, _OPTIONS)
        opts.require_any("ip_allowlist needs allow, deny or both")
        return IPAllowlist(opts.networks("allow", None), opts.networks("deny", ()))


ip_allowlist = IPAllowlistKind()
