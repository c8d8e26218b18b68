"""Value parsers for option text, shared by the loader and by filter kinds.

Each parser takes the text of one option and returns its value, or raises
``ValueError`` with a message for the operator; the caller locates it (the
loader as a :class:`~chatproxy.config.ConfigError` naming file, section and
option; a filter kind as a ``FilterOptionError`` through
:class:`chatproxy.filters.FilterOptions`).  Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from chatproxy.http.messages import FIELD_NAME_RE

__all__ = [
    "Network",
    "OptionText",
    "option_path",
    "parse_bool",
    "parse_choice",
    "parse_duration",
    "parse_header_names",
    "parse_int",
    "parse_list",
    "parse_networks",
    "parse_size",
    "parse_text",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}


def parse_bool(text: str) -> bool:
    """``yes/no``, ``true/false``, ``on/off``, ``1/0``."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def parse_list(text: str) -> list[str]:
    """Items separated by commas and/or newlines, blanks dropped."""
    return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]


def parse_text(text: str) -> str:
    """Any text but the empty one (surrounding spaces removed)."""
    text = text.strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def parse_choice(text: str, choices: Sequence[str], expected: str | None = None) -> str:
    """One of ``choices`` (lower-case names, compared without regard to case),
    lower-cased.  ``expected`` words the alternatives in the error message
    (default: ``one of a, b, c``)."""
    lowered = text.strip().lower()
    if lowered not in choices:
        raise ValueError(f"expected {expected or 'one of ' + ', '.join(choices)}, got {text!r}")
    return lowered


def parse_int(text: str, minimum: int | None = None, maximum: int | None = None, expected: str | None = None) -> int:
    """A whole number from ``minimum`` to ``maximum`` (None: unbounded).

    With ``expected`` (``a paranoia level from 1 to 4``) every error reads
    ``expected <expected>, got <value>``; otherwise it says what is wrong
    (``expected a whole number``, ``must be at least 1``, ``must not be
    negative``, ``must be at most N``)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected {expected or 'a whole number'}, got {text!r}") from None
    if expected is not None and not _within(value, minimum, maximum):
        raise ValueError(f"expected {expected}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError("must not be negative" if minimum == 0 else f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {maximum}")
    return value


def _within(value: int, minimum: int | None, maximum: int | None) -> bool:
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """A byte count: ``65536``, ``64k``, ``10m``, ``1g`` (binary units)."""
    match = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", text.strip())
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 65536, 64k or 10m, got {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str, allow_zero: bool = False) -> float:
    """A duration in seconds: ``30``, ``1.5``, ``250ms``, ``2m``, ``1h``;
    greater than zero unless ``allow_zero``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip().lower())
    if not match or match.group(2) not in _TIME_UNITS:
        raise ValueError(f"expected a duration such as 30, 1.5s, 250ms or 2m, got {text!r}")
    value = float(match.group(1)) * _TIME_UNITS[match.group(2)]
    if value <= 0 and not allow_zero:
        raise ValueError("must be greater than zero")
    return value


def parse_networks(text: str) -> tuple[Network, ...]:
    """A list of IPv4/IPv6 networks (CIDR) or single addresses; an
    IPv4-mapped IPv6 network is the IPv4 network."""
    networks: list[Network] = []
    for item in parse_list(text):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (CIDR)") from None
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
            mapped = network.network_address.ipv4_mapped
            if mapped is not None:
                network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        networks.append(network)
    if not networks:
        raise ValueError("expected at least one network")
    return tuple(networks)


def parse_header_names(text: str) -> tuple[str, ...]:
    """A list of HTTP header names (tokens, RFC 9110 5.6.2), as written,
    duplicates dropped."""
    names = parse_list(text)
    if not names:
        raise ValueError("expected at least one header name")
    for name in names:
        if not FIELD_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not an HTTP header name")
    return tuple(dict.fromkeys(names))


class OptionText(str):
    """An option value as a filter kind's ``build`` receives it: the text, plus
    ``directory``, the directory of the configuration file that set it (None
    when built without a file), against which relative file names are
    resolved (:func:`option_path`), and ``section``, the name of the
    ``[filter:NAME]`` section it belongs to (None when built without one)."""

    directory: Path | None
    section: str | None

    def __new__(cls, text: str, directory: Path | None = None, section: str | None = None) -> OptionText:
        value = super().__new__(cls, text)
        value.directory = directory
        value.section = section
        return value


def option_path(text: str) -> Path:
    """A file name from an option, ``~`` expanded, relative names resolved
    against the directory of the file that set the option (like every other
    path in the configuration).  Without that directory (``text`` is not an
    :class:`OptionText` from a file) a relative name is refused."""
    if not text.strip():
        raise ValueError("must not be empty")
    path = Path(text.strip()).expanduser()
    if path.is_absolute():
        return path
    directory = getattr(text, "directory", None)
    if directory is None:
        raise ValueError(f"must be an absolute path, got {str(text)!r}")
    return Path(directory) / path
