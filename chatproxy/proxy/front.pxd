# The compiled build only (chatproxy/compiled.py): FrontConnectionBase as a C-typed class.
# Its attributes are those of FrontConnectionBase.__slots__ in front.py, in the same order.

cdef class FrontConnectionBase:
    cdef public object transport, connected, factory, core, listener, settings, peer, connection, deadline
    cdef public object closing, draining, client_paused, tunnel, _deadline_kind, _parser, _queue, _parsing
    cdef public object _read_pauses, _in_head, _head_bytes, _url, _headers, _max_headers, _hosts
    cdef public object _pending_error, _upgrade_buffer, _upgrade_request, _body_parser, _starting
    cdef public object _stop_parsing, _peer_known, _corked, _out, _chunked, _close_delimited
    cdef public object _close_after_response, _now
