"""Unit tests of chatproxy.http.messages.add_fields: where the header fields of
the heads the proxy relays or answers with get their wire form (a C loop in
the compiled build)."""

from __future__ import annotations

import pytest

from chatproxy.http.messages import add_fields, local_response


def test_each_field_is_name_colon_space_value_crlf_in_order() -> None:
    """The fields are appended after what the list holds, in their order,
    each as name, ``: ``, value and CRLF, names and values untouched."""
    lines = [b"HTTP/1.1 200 OK\r\n"]
    add_fields(lines, [(b"Content-Type", b"text/plain"), (b"x-Empty", b""), (b"Set-Cookie", b"a=b; Path=/")])
    assert b"".join(lines) == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nx-Empty: \r\n"
                               b"Set-Cookie: a=b; Path=/\r\n")


def test_a_tuple_of_fields_and_no_fields_are_taken_too() -> None:
    """A request head's headers are a tuple: they serialise as a list does; no fields add nothing."""
    fields = ((b"Host", b"chat.example.com"), (b"Accept", b"*/*"))
    from_tuple: list[bytes] = []
    from_list: list[bytes] = []
    add_fields(from_tuple, fields)
    add_fields(from_list, list(fields))
    assert from_tuple == from_list == [b"Host", b": ", b"chat.example.com", b"\r\n", b"Accept", b": ", b"*/*", b"\r\n"]
    nothing: list[bytes] = [b"x"]
    add_fields(nothing, [])
    assert nothing == [b"x"]


def test_a_field_that_is_not_a_pair_raises_in_either_build() -> None:
    """A field of three items is an error, not silently written (the compiled
    loop propagates the exception as the Python loop does)."""
    with pytest.raises(ValueError):
        add_fields([], [(b"Host", b"a", b"b")])  # type: ignore[list-item]


def test_local_responses_put_content_type_first_and_keep_the_other_fields_in_order() -> None:
    """A generated response: Content-Type, then Content-Length, then the other fields as given."""
    response = local_response(403, "no", extra=[(b"X-One", b"1"), (b"X-Two", b"2")], close=True)
    head = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head == [b"HTTP/1.1 403 Forbidden", b"Content-Type: text/plain; charset=utf-8", b"Content-Length: 3",
                    b"X-One: 1", b"X-Two: 2", b"Connection: close"]
