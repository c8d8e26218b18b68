# The compiled build only (chatproxy/compiled.py): UpstreamConnectionBase as a C-typed class.
# Its attributes are those of UpstreamConnectionBase.__slots__ in upstream.py, in the same order.

cdef class UpstreamConnectionBase:
    cdef public object transport, connected, factory, pool, sink, deadline, exchanges, tunnel, _parser
    cdef public object _headers, _reason, _head_done, _framing, _method_head, _request_sent, _response_done
    cdef public object _got_bytes, _reusable, _connected, _closed, _now, _reading_paused
