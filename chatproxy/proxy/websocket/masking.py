"""XOR masking of WebSocket payloads (RFC 6455, section 5.3): the payload
XOR its 4-byte masking key repeated; the same function masks and unmasks.

The bridge does it twice per relayed client message (unmasking what the
client sent, masking what goes upstream), so its cost matters.  For a
100-byte message, Autobahn's native masker spends some 30,000 instructions
(its set-up, before it touches a byte), Python's integer arithmetic
(``int.from_bytes``, XOR, ``to_bytes``) about 8,000, and a C loop, at 9 per
byte, 2,500 with its call.  :func:`unmask` picks
the cheapest this build has: the C loop in the compiled build (``masking.pxd``
types :func:`xor_loop` for it), the integer arithmetic in pure Python, and
Autobahn's masker past :data:`NATIVE_FROM` bytes in both.
"""

from __future__ import annotations

from typing import Final

from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]

#: Longer payloads go to Autobahn's native (C, SIMD) masker, whose set-up
#: costs less than the bytes then.
NATIVE_FROM: Final = 1024
#: This module is an extension module (the compiled build), where
#: :func:`xor_loop` is a C loop.
COMPILED: Final = not __file__.endswith(".py")


def unmask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (masking and unmasking alike)."""
    n = len(payload)
    if n > NATIVE_FROM:
        return create_xor_masker(key, n).process(payload)  # type: ignore[no-any-return]
    if COMPILED and type(payload) is bytes and type(key) is bytes:
        return xor_loop(payload, key)
    whole = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(whole, "little")).to_bytes(n, "little")


def xor_loop(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key``, a byte at a time.  Compiled,
    a C loop over the two buffers (``masking.pxd`` types its variables as
    pointers); in pure Python ten to twenty times slower than :func:`unmask`'s
    integer arithmetic (some 900 instructions per byte), which that build uses
    instead."""
    if len(key) != 4:
        raise ValueError("a WebSocket masking key has 4 bytes")
    n = len(payload)
    out = bytearray(n)
    source = payload
    target = out
    mask = key
    for i in range(n):
        target[i] = source[i] ^ mask[i & 3]
    return bytes(out)
