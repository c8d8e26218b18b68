"""Tests of the ``user_agent_block`` kind with chatproxy's test kit
(``chatproxy.testing``): no proxy runs, the filter's hooks are called as the
proxy calls them.  Run them with ``python -m pytest tests`` in this directory,
chatproxy installed."""

from __future__ import annotations

import pytest

from chatproxy.filters import FilterOptionError, IFilterFactory, IRequestFilter, RequestHead
from chatproxy.testing import ChainRunner, build_filter, request_head

from chatproxy_example_filter.user_agent_block import REASON, user_agent_block

SCANNERS = {"patterns": "*sqlmap*, *nikto*, python-requests/*"}


def head(user_agent: str | None) -> RequestHead:
    """A request head with that User-Agent (none when None)."""
    return request_head("/prweb/PRChat", headers=[] if user_agent is None else [("User-Agent", user_agent)])


def test_the_kind_provides_the_interfaces() -> None:
    """The kind is an IFilterFactory named user_agent_block; its filters provide IRequestFilter."""
    assert IFilterFactory.providedBy(user_agent_block) and user_agent_block.name == "user_agent_block"
    assert IRequestFilter.providedBy(build_filter(user_agent_block, SCANNERS))


@pytest.mark.parametrize("user_agent, refused", [
    ("sqlmap/1.7.2#stable (https://sqlmap.org)", True),
    ("Mozilla/5.00 (Nikto/2.5.0)", True),
    ("PYTHON-REQUESTS/2.31.0", True),  # without regard to case
    ("  python-requests/2.31.0  ", True),  # surrounding spaces ignored
    ("Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0", False),
    ("curl/8.5.0", False),
    (None, False),  # block_missing = no
])
def test_blocked_user_agents_are_refused_with_403(user_agent: str | None, refused: bool) -> None:
    """A User-Agent matching a pattern is refused with 403 and the plugin's reason; others pass."""
    decision = build_filter(user_agent_block, SCANNERS).request(head(user_agent))
    if refused:
        assert decision is not None and (decision.status, decision.reason) == (403, REASON)
    else:
        assert decision is None


def test_block_missing_refuses_requests_without_user_agent() -> None:
    """With block_missing = yes a request without User-Agent is refused too."""
    flt = build_filter(user_agent_block, {**SCANNERS, "block_missing": "yes"})
    assert flt.request(head(None)).status == 403
    assert flt.request(head("Mozilla/5.0")) is None


@pytest.mark.parametrize("options, option, message", [
    ({}, "patterns", "required option is missing"),
    ({"patterns": " , "}, "patterns", "expected at least one pattern"),
    ({**SCANNERS, "block_missing": "maybe"}, "block_missing", "expected yes or no, got 'maybe'"),
    ({**SCANNERS, "pattern": "x"}, "pattern", "unknown option (user_agent_block takes: patterns, block_missing)"),
])
def test_option_errors_name_the_option(options: dict[str, str], option: str, message: str) -> None:
    """A bad section raises FilterOptionError naming the option, which chatproxy reports
    with the file and the section."""
    with pytest.raises(FilterOptionError) as info:
        build_filter(user_agent_block, options)
    assert (info.value.option, info.value.message) == (option, message)


def test_report_mode_logs_and_lets_the_request_through() -> None:
    """In a route's chain with mode = report, a blocked request goes on and is counted as reported."""
    runner = ChainRunner.of_kind(user_agent_block, SCANNERS, name="no-scanners", mode="report")
    assert runner.request(head("sqlmap/1.7.2")).passed
    assert runner.counters == {"no-scanners:reported": 1}
    enforcing = ChainRunner.of_kind(user_agent_block, SCANNERS, name="no-scanners")
    assert enforcing.request(head("sqlmap/1.7.2")).status == 403
    assert enforcing.counters == {"no-scanners:refused": 1}
