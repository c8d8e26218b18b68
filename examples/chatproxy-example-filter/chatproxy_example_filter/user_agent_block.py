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
from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from chatproxy.config import parse_bool, parse_list
from chatproxy.filters import FilterOptionError, IFilterFactory, IRequestFilter, Refuse

OPTIONS = ("patterns", "block_missing")
REASON = "user agent not allowed"


@implementer(IRequestFilter)
class UserAgentBlock:
    """Refuses (403) requests whose User-Agent matches one of ``patterns``."""

    def __init__(self, patterns: list[str], block_missing: bool = False) -> None:
        self.patterns = patterns
        self.block_missing = block_missing
        # One compiled regular expression for all the patterns.
        self._match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns),
                                 re.IGNORECASE | re.DOTALL).match

    def request(self, head: Any) -> Refuse | None:
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
        for option in options:
            if option not in OPTIONS:
                raise FilterOptionError(option, f"unknown option (user_agent_block takes: {', '.join(OPTIONS)})")
        patterns = parse_list(options.get("patterns", ""))
        if not patterns:
            raise FilterOptionError("patterns", "required option is missing (at least one pattern)")
        block_missing = False
        if "block_missing" in options:
            try:
                block_missing = parse_bool(options["block_missing"])
            except ValueError as e:
                raise FilterOptionError("block_missing", str(e)) from None
        return UserAgentBlock(patterns, block_missing)


# The object Twisted's plugin system finds (see twisted/plugins/).
user_agent_block = UserAgentBlockKind()
