"""Request paths in normal form: what routing matches and what is forwarded.

:func:`normalize_path` resolves dot-segments, decodes percent-encoded
unreserved characters and merges repeated slashes, and refuses the forms
whose meaning differs between servers (encoded slashes and backslashes,
``..;`` path parameters, NUL, double encoding) with :class:`PathError`.
The configuration uses it to require route paths in normal form; the data
path, to normalise every request path.
"""

from __future__ import annotations

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Bytes allowed literally in a path (RFC 3986 pchar plus "/"), besides "%".
_PATH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/")
_ALLOWED = _PATH_CHARS | {"%"}
_FORBIDDEN_ENCODED = {0x2F: "an encoded slash (%2F)", 0x5C: "an encoded backslash (%5C)", 0x00: "an encoded NUL (%00)"}


class PathError(ValueError):
    """A request path that is refused with 400 rather than guessed at."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _decode_unreserved(path: str) -> str:
    if "%" not in path:
        return path
    out: list[str] = []
    i = 0
    length = len(path)
    while i < length:
        char = path[i]
        if char != "%":
            out.append(char)
            i += 1
            continue
        hex_digits = path[i + 1 : i + 3]
        if len(hex_digits) != 2 or not set(hex_digits) <= _HEX:
            raise PathError("a malformed percent-encoding")
        byte = int(hex_digits, 16)
        if byte in _FORBIDDEN_ENCODED:
            raise PathError(f"{_FORBIDDEN_ENCODED[byte]} in the path")
        if byte == 0x25:
            following = path[i + 3 : i + 5]
            if len(following) == 2 and set(following) <= _HEX and int(following, 16) in (0x2E, 0x2F, 0x5C, 0x00):
                raise PathError("a double-encoded character in the path")
        if byte in _UNRESERVED:
            out.append(chr(byte))
        else:
            out.append("%" + hex_digits.upper())
        i += 3
    return "".join(out)


def normalize_path(path: str) -> str:
    """Return the normal form of a request path, or raise :class:`PathError`.

    The normal form has percent-encoded unreserved characters decoded (other
    escapes upper-cased), dot-segments resolved, and repeated slashes merged.
    Refused: a path not starting with ``/``; characters outside RFC 3986;
    encoded ``/``, ``\\`` or NUL; double-encoded dots and slashes; dot-segments
    carrying ``;`` parameters (``..;``, which Java servers treat as ``..``);
    and ``..`` climbing above the root.
    """
    if not path.startswith("/"):
        raise PathError("the path must start with /")
    if not _ALLOWED.issuperset(path):
        raise PathError("a character that must be percent-encoded in the path")
    if "%" not in path and "//" not in path and "/." not in path:
        return path
    decoded = _decode_unreserved(path)
    segments = decoded.split("/")
    output: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments[1:], start=1):
        bare = segment.split(";", 1)[0]
        if bare in (".", ".."):
            if bare != segment:
                raise PathError("a dot-segment with ;parameters in the path")
            if bare == "..":
                if not output:
                    raise PathError("the path climbs above the root")
                output.pop()
            if index == last:
                output.append("")
            continue
        if segment == "" and index != last:
            continue  # repeated slash
        output.append(segment)
    return "/" + "/".join(output)
