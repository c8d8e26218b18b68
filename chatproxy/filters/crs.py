"""Where the OWASP Core Rule Set is installed, and what it holds.

chatproxy ships no rules: the CRS comes from a package (Debian's
``modsecurity-crs`` installs it under :data:`DEFAULT_CRS`), or from any
directory an operator points the ``waf`` filter's ``crs`` option at (a
newer CRS release unpacked somewhere).  :func:`find_crs` reads such a
directory: its rule files (``rules/*.conf``, in name order, as CRS's own
``Include`` does) and the ids and tags of the rules they define, so that an
exclusion naming an unknown id or tag is a configuration error.
"""

from __future__ import annotations

import re
from pathlib import Path

from attrs import frozen

__all__ = ["CRS_PACKAGE", "DEFAULT_CRS", "CrsError", "CrsInstall", "find_crs"]

DEFAULT_CRS = "/usr/share/modsecurity-crs"
CRS_PACKAGE = "modsecurity-crs"
"""The Debian package that installs the CRS under :data:`DEFAULT_CRS`."""

_ID = re.compile(rb"""\bid\s*:\s*['"]?(\d+)""")
_TAG = re.compile(rb"""\btag\s*:\s*'([^']+)'""")
_VERSION = re.compile(rb"ver:'?OWASP_CRS/([0-9][0-9A-Za-z.\-]*)")


class CrsError(Exception):
    """The directory holds no CRS rules (the message says what to do)."""


@frozen
class CrsInstall:
    """A CRS installation: its rules directory, the rule files to load, the
    ids and tags of the rules they define and the CRS version they declare."""

    rules_dir: str
    files: tuple[str, ...]
    rule_ids: frozenset[int]
    version: str
    tags: frozenset[str] = frozenset()


def find_crs(path: str = DEFAULT_CRS) -> CrsInstall:
    """The CRS at ``path``: a CRS root (with ``rules/``) or its rules
    directory.  Raises :class:`CrsError`."""
    root = Path(path)
    rules = root / "rules" if (root / "rules").is_dir() else root
    if not rules.is_dir():
        hint = f" (install Debian's {CRS_PACKAGE} package)" if path == DEFAULT_CRS else ""
        raise CrsError(f"no OWASP CRS at {path}: the directory does not exist{hint}")
    files = sorted(str(p) for p in rules.glob("*.conf"))
    if not files:
        raise CrsError(f"no OWASP CRS at {path}: {rules} holds no rule files (*.conf)")
    ids: set[int] = set()
    tags: set[str] = set()
    version = ""
    for name in files:
        text = Path(name).read_bytes()
        ids.update(int(found) for found in _ID.findall(text))
        tags.update(found.decode("utf-8", "replace") for found in _TAG.findall(text))
        if not version:
            found = _VERSION.search(text)
            version = found.group(1).decode("ascii") if found else ""
    return CrsInstall(str(rules), tuple(files), frozenset(ids), version or "unknown", frozenset(tags))
