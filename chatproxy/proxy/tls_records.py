"""Application data in and out of an established TLS connection without
pyOpenSSL's per-call wrappers.

A served request over TLS goes through OpenSSL four or five times: the
client's records into the connection's receive BIO, plaintext out (until
OpenSSL wants more bytes), the response in, its records out of the send BIO
(until that is empty).  pyOpenSSL wraps each call in argument checks, a fresh
buffer and, for "nothing more right now", a raised and caught ``WantReadError``:
that was about half the TLS layer's CPU per request (bench/README.md).  The
functions here make the same OpenSSL calls through the binding pyOpenSSL
itself runs on (``cryptography``'s, see :mod:`chatproxy.proxy.openssl_binding`)
and say "nothing more" with a return value.

They handle only success and "wants more bytes".  Anything else -- a
close_notify, a fatal alert, a failed write -- they leave as it is (None, 0),
and the caller repeats the operation through pyOpenSSL,
which sees the same condition (OpenSSL keeps it, and its error queue, until
asked again) and raises the exception Twisted's TLS protocol handles.  If this
pyOpenSSL's connections lack the attributes read here, :data:`AVAILABLE` is
False and callers use pyOpenSSL for everything.

Only for the reactor thread: one read buffer serves every connection.
"""

from __future__ import annotations

from typing import Any, Final

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

__all__ = ["AVAILABLE", "READ_SIZE", "Handles", "feed", "handles", "read_plaintext", "records_waiting", "take_records",
           "write_plaintext"]

_binding = Binding()
_lib: Any = _binding.lib
_ffi: Any = _binding.ffi
# The calls below, looked up once: an attribute of the binding's ``lib`` is a
# module-attribute lookup every time it is read.
_SSL_read: Any = _lib.SSL_read
_SSL_write: Any = _lib.SSL_write
_SSL_get_error: Any = _lib.SSL_get_error
_BIO_read: Any = _lib.BIO_read
_BIO_write: Any = _lib.BIO_write
_unpack: Any = _ffi.unpack
_NULL: Any = _ffi.NULL
#: ``BIO_get_mem_data``: how many bytes a memory BIO holds (None if this binding lacks it).
_BIO_get_mem_data: Any = getattr(_lib, "BIO_get_mem_data", None)

#: The largest plaintext one read returns (a TLS record holds at most 16 KiB,
#: so a shorter read has emptied the record it decrypted).
READ_SIZE: Final = 2 ** 15
_buffer = _ffi.new("char[]", READ_SIZE)
_WANT_READ: Final = _lib.SSL_ERROR_WANT_READ


def _has_memory_bios(connection: SSL.Connection) -> bool:
    return all(getattr(connection, name, None) is not None for name in ("_ssl", "_into_ssl", "_from_ssl"))


def _check_available() -> bool:
    """Whether this pyOpenSSL's connections expose what the functions read."""
    try:
        return _has_memory_bios(SSL.Connection(SSL.Context(SSL.TLS_METHOD), None))
    except Exception:  # an OpenSSL that refuses the context: pyOpenSSL then
        return False


#: Whether the direct path can be used with this pyOpenSSL.
AVAILABLE: Final = _check_available()


#: A connection's OpenSSL objects, as :func:`handles` returns them: the
#: ``SSL`` object, its receive BIO and its send BIO.
Handles = tuple[Any, Any, Any]


def handles(connection: SSL.Connection) -> Handles:
    """The OpenSSL objects of ``connection`` the functions below work on (read
    once per connection: every attribute read on a pyOpenSSL connection goes
    through its ``__getattr__`` hook, several times the cost of a plain one)."""
    return connection._ssl, connection._into_ssl, connection._from_ssl


def feed(handles: Handles, data: bytes) -> bool:
    """Put records received from the peer into the connection's receive BIO;
    False when OpenSSL did not take them all (then use ``bio_write``)."""
    return bool(_BIO_write(handles[1], data, len(data)) == len(data))


def read_plaintext(handles: Handles) -> bytes | None:
    """The next application data the records fed so far decrypt to; b""
    when OpenSSL needs more bytes from the peer first; None for anything else
    (see the module docstring)."""
    ssl = handles[0]
    count = _SSL_read(ssl, _buffer, READ_SIZE)
    if count > 0:
        data: bytes = _unpack(_buffer, count)
        return data
    return b"" if _SSL_get_error(ssl, count) == _WANT_READ else None


def records_waiting(handles: Handles) -> bool:
    """Whether the receive BIO still holds bytes OpenSSL has not read.  After
    a read shorter than :data:`READ_SIZE` (its record emptied), False means
    the next :func:`read_plaintext` would answer b"" (nothing until more bytes
    come), which this tells for a fraction of the cost of that failing read."""
    if _BIO_get_mem_data is None:
        return True
    return bool(_BIO_get_mem_data(handles[1], _NULL) > 0)


def write_plaintext(handles: Handles, data: bytes) -> int:
    """Encrypt ``data`` (at most 16 KiB, one record) into the send BIO: the
    number of bytes taken, or 0 for anything else (see the module docstring)."""
    count: int = _SSL_write(handles[0], data, len(data))
    return max(count, 0)


def take_records(handles: Handles) -> bytes:
    """Everything in the connection's send BIO (records to send to the
    peer), emptying it; b"" when there is nothing."""
    bio = handles[2]
    count = _BIO_read(bio, _buffer, READ_SIZE)
    if count <= 0:
        return b""
    records: bytes = _unpack(_buffer, count)
    while count == READ_SIZE:
        count = _BIO_read(bio, _buffer, READ_SIZE)
        if count > 0:
            records += _unpack(_buffer, count)
    return records
