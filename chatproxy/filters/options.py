"""Reading a filter section's options: :class:`FilterOptions`, the one helper
a kind's ``build`` uses to check its options and read them as typed values.

::

    def build(self, options):
        opts = FilterOptions("user_agent_block", options, ("patterns", "block_missing"))
        patterns = opts.items("patterns", what="pattern")        # required
        block_missing = opts.boolean("block_missing", False)     # optional, with a default
        return UserAgentBlock(patterns, block_missing)

Every mistake is a :class:`FilterOptionError` naming the option, which the
configuration loader reports with the file and the section: an unknown
option lists the options the kind takes, a missing required one says so, and
a value that does not parse gets the parser's message.  The value parsers
are :mod:`chatproxy.config.values`' (the ones chatproxy's own sections use),
so a kind's ``size`` or ``duration`` is written the same way as the core's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from chatproxy.config.values import (
    Network,
    option_path,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_header_names,
    parse_int,
    parse_list,
    parse_networks,
    parse_size,
    parse_text,
)
from chatproxy.http.messages import Header, parse_header_lines

__all__ = ["REQUIRED", "FilterOptionError", "FilterOptions"]

T = TypeVar("T")
D = TypeVar("D")


class FilterOptionError(Exception):
    """Raised by ``IFilterFactory.build`` when one option of a filter section is wrong.

    ``option`` names the offending option (``None`` for the section as a whole)
    so the configuration loader can name file, section and option.
    """

    def __init__(self, option: str | None, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


class _Required:
    """The default of an option that must be given."""

    def __repr__(self) -> str:
        return "REQUIRED"


#: The ``default`` of a getter whose option must be given (the default default).
REQUIRED: Any = _Required()


class FilterOptions:
    """The options of one ``[filter:NAME]`` section as a kind reads them.

    ``options`` is what ``build`` received (names to text); ``known`` the
    options the kind ``kind`` takes, in the order its error messages list
    them.  An option not in ``known`` is refused at once.

    Each getter reads one option: without ``default`` the option is required
    (``required option is missing``), with one it is optional and ``default``
    is returned when it is absent.  A value that does not parse raises
    :class:`FilterOptionError` with the parser's message.  :meth:`get` reads
    an option with a parser of the kind's own (a callable that takes the text
    and returns the value or raises ``ValueError``).
    """

    def __init__(self, kind: str, options: Mapping[str, str], known: Iterable[str]) -> None:
        self.kind = kind
        self.known = tuple(known)
        self.options = options
        for option in options:
            if option not in self.known:
                raise FilterOptionError(option, f"unknown option ({kind} takes: {', '.join(self.known)})")

    def __contains__(self, option: object) -> bool:
        return option in self.options

    def given(self, *options: str) -> list[str]:
        """Which of ``options`` are given, in that order (every given option,
        in the section's order, when none are named)."""
        if not options:
            return list(self.options)
        return [option for option in options if option in self.options]

    def require_any(self, message: str | None = None) -> None:
        """Refuse a section that gives none of the kind's options (a
        section-wide error; ``message`` replaces ``KIND needs at least one of: …``)."""
        if not self.options:
            raise FilterOptionError(None, message or f"{self.kind} needs at least one of: {', '.join(self.known)}")

    def get(self, option: str, parse: Callable[[str], T], default: D = REQUIRED) -> T | D:
        """``option`` parsed by ``parse`` (its ``ValueError`` becomes a
        FilterOptionError naming the option), or ``default`` when absent."""
        if option not in self.options:
            if default is REQUIRED:
                raise FilterOptionError(option, "required option is missing")
            return default
        try:
            return parse(self.options[option])
        except ValueError as e:
            raise FilterOptionError(option, str(e)) from None

    # -- typed getters

    def text(self, option: str, default: D = REQUIRED) -> str | D:
        """Text, surrounding spaces removed; empty text is refused."""
        return self.get(option, parse_text, default)

    def choice(self, option: str, choices: Sequence[str], default: D = REQUIRED) -> str | D:
        """One of ``choices`` (lower-case words; any case accepted), lower-cased."""
        alternatives = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
        return self.get(option, lambda text: parse_choice(text, choices, alternatives), default)

    def boolean(self, option: str, default: D = REQUIRED) -> bool | D:
        """``yes/no``, ``true/false``, ``on/off``, ``1/0``."""
        return self.get(option, parse_bool, default)

    def integer(self, option: str, default: D = REQUIRED, *, minimum: int | None = 1, maximum: int | None = None,
                expected: str | None = None) -> int | D:
        """A whole number from ``minimum`` (default 1) to ``maximum``; with
        ``expected`` (``a paranoia level from 1 to 4``) errors say
        ``expected <expected>, got <value>``."""
        return self.get(option, lambda text: parse_int(text, minimum, maximum, expected), default)

    def size(self, option: str, default: D = REQUIRED, *, minimum: int = 0) -> int | D:
        """A byte count (``65536``, ``64k``, ``10m``) of at least ``minimum``."""

        def parse(text: str) -> int:
            value = parse_size(text)
            if value < minimum:
                raise ValueError(f"must be at least {minimum}")
            return value

        return self.get(option, parse, default)

    def duration(self, option: str, default: D = REQUIRED, *, allow_zero: bool = False) -> float | D:
        """Seconds (``30``, ``1.5s``, ``250ms``, ``2m``, ``1h``), above zero unless ``allow_zero``."""
        return self.get(option, lambda text: parse_duration(text, allow_zero), default)

    def items(self, option: str, default: D = REQUIRED, *, what: str | None = None,
              allow_empty: bool = False) -> tuple[str, ...] | D:
        """A list (comma- or newline-separated, blanks dropped).  Unless
        ``allow_empty``, an empty one is refused with ``expected at least one
        <what>`` (or ``must not be empty``)."""

        def parse(text: str) -> tuple[str, ...]:
            found = tuple(parse_list(text))
            if not found and not allow_empty:
                raise ValueError(f"expected at least one {what}" if what else "must not be empty")
            return found

        return self.get(option, parse, default)

    def networks(self, option: str, default: D = REQUIRED) -> tuple[Network, ...] | D:
        """IPv4/IPv6 networks (CIDR) or addresses."""
        return self.get(option, parse_networks, default)

    def header_names(self, option: str, default: D = REQUIRED) -> tuple[str, ...] | D:
        """HTTP header names, as written (duplicates dropped)."""
        return self.get(option, parse_header_names, default)

    def header_lines(self, option: str, default: D = REQUIRED) -> tuple[Header, ...] | D:
        """``Name: value`` lines as header pairs."""
        return self.get(option, parse_header_lines, default)

    def path(self, option: str, default: D = REQUIRED) -> Path | D:
        """A file name, ``~`` expanded; a relative one is relative to the
        directory of the configuration file that set it."""
        return self.get(option, option_path, default)

    def file_bytes(self, option: str, default: D = REQUIRED) -> bytes | D:
        """The contents of the file named by the option (see :meth:`path`)."""

        def read(text: str) -> bytes:
            path = option_path(text)
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise ValueError(f"no such file: {path}") from None
            except IsADirectoryError:
                raise ValueError(f"is a directory, not a file: {path}") from None
            except OSError as e:
                raise ValueError(f"cannot read {path}: {e.strerror or e}") from None

        return self.get(option, read, default)
