"""The ``user_agent_block`` filter kind: refuse requests by their User-Agent.

    [filter:no-scanners]
    use = user_agent_block
    patterns = *sqlmap*, *nikto*, python-requests/*
    block_missing = yes

``patterns`` are shell-style wildcards (``*`` any text, ``?`` one character,
``[abc]`` one of those), compared with the whole User-Agent header without
regard to case.  A request whose User-Agent matches one of them is refused
with ``403 Forbidden``; so is a request without a User-Agent when
``block_missing = yes``.  Everything else is passed on.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.filters import Filter, FilterOptions, IFilterFactory, Refuse, RequestHead

OPTIONS = ("patterns", "block_missing")
REASON = "user agent not allowed"


class UserAgentBlock(Filter):
    """Refuses (403) requests whose User-Agent matches one of ``patterns``."""

    def __init__(self, patterns: Sequence[str], block_missing: bool = False) -> None:
        self.patterns = tuple(patterns)
        self.block_missing = block_missing
        # One compiled regular expression for all the patterns.
        self._match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns),
                                 re.IGNORECASE | re.DOTALL).match

    def request(self, head: RequestHead) -> Refuse | None:
        """Refuse with 403 when the User-Agent is blocked; otherwise pass."""
        agent = head.header("User-Agent")
        if agent is None:
            return Refuse(403, REASON) if self.block_missing else None
        if self._match(agent.strip()):
            return Refuse(403, REASON)
        return None  # pass the request on to the next filter, then the upstream


@implementer(IPlugin, IFilterFactory)
class UserAgentBlockKind:
    """The filter kind: ``use = user_agent_block``."""

    name = "user_agent_block"

    def build(self, options: Mapping[str, str]) -> UserAgentBlock:
        """Validate the section's options and build the filter."""
        opts = FilterOptions(self.name, options, OPTIONS)
        return UserAgentBlock(opts.items("patterns", what="pattern"), opts.boolean("block_missing", False))


# The object Twisted's plugin system finds (see twisted/plugins/).
user_agent_block = UserAgentBlockKind()
