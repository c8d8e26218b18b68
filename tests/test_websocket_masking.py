"""Unit tests of chatproxy.proxy.websocket.masking: WebSocket payloads XOR
their masking key, the same in either build, by whichever way the build and
the payload's size choose."""

from __future__ import annotations

import os

import pytest

from chatproxy.proxy.websocket import masking
from chatproxy.proxy.websocket.masking import NATIVE_FROM, unmask, xor_loop

#: .ci/run sets it: 0 for its run of the suite on pure Python, 1 for the compiled build.
EXPECTED_BUILD = os.environ.get("CHATPROXY_EXPECT_COMPILED")


def _reference(payload: bytes, key: bytes) -> bytes:
    return bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))


SIZES = [*range(0, 41), 100, 125, 126, 1000, NATIVE_FROM, NATIVE_FROM + 1, 5000, 65_536]


@pytest.mark.parametrize("size", SIZES)
def test_unmask_is_the_payload_xor_the_repeated_key_and_undoes_itself(size: int) -> None:
    """Every size (short, around the native masker's threshold, long) gives
    the payload XOR the key repeated, and masking twice gives the payload back."""
    payload, key = os.urandom(size), os.urandom(4)
    masked = unmask(payload, key)
    assert type(masked) is bytes
    assert masked == _reference(payload, key)
    assert unmask(masked, key) == payload


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 100, NATIVE_FROM])
def test_the_byte_loop_gives_the_same_bytes(size: int) -> None:
    """The byte loop (a C loop in the compiled build) agrees with the reference."""
    payload, key = os.urandom(size), os.urandom(4)
    assert xor_loop(payload, key) == _reference(payload, key)


def test_the_byte_loop_refuses_a_key_that_is_not_four_bytes() -> None:
    """A key of another length is refused before any byte is read (compiled,
    the loop reads the key through a pointer, four bytes of it)."""
    for key in (b"", b"abc", b"abcde"):
        with pytest.raises(ValueError):
            xor_loop(b"payload", key)


def test_other_byte_types_are_masked_too() -> None:
    """A bytearray or a memoryview payload gives the same bytes as its bytes."""
    payload, key = os.urandom(100), os.urandom(4)
    expected = _reference(payload, key)
    assert unmask(bytearray(payload), key) == expected
    assert unmask(memoryview(payload), key) == expected


def test_the_compiled_build_runs_the_typed_loop() -> None:
    """In the compiled build the module is compiled and its byte loop typed
    (it takes only bytes, which a Python function would not check); in the
    pure build neither."""
    if EXPECTED_BUILD is None:
        pytest.skip("CHATPROXY_EXPECT_COMPILED is set by .ci/run: 0 for its first run, 1 for its second")
    assert masking.COMPILED is (EXPECTED_BUILD == "1")
    if masking.COMPILED:
        with pytest.raises(TypeError):
            xor_loop(bytearray(b"payload"), b"abcd")  # type: ignore[arg-type]
    else:
        assert xor_loop(bytearray(b"payload"), b"abcd") == _reference(b"payload", b"abcd")
