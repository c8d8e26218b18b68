# The compiled build only (chatproxy/compiled.py): Stats as a C-typed class.
# Its attributes are those of Stats.__slots__ in stats.py, in the same order.

cdef class Stats:
    cdef public object requests, duration_buckets, duration_sum, bytes_sent, bytes_received, connect_failures
    cdef public object websocket_messages, websocket_bytes, websocket_closes, filter_outcomes
    cdef public object tls_handshake_failures, tls_handshakes, reloads, last_reload_success, last_reload_ok
    cdef public object refusals
