# The compiled build only (chatproxy/compiled.py): Exchange as a C-typed class.
# Its attributes are those of Exchange.__slots__ in exchange.py, in the same order.
# And _end_to_end's loops as C loops (its lists and set typed).
cimport cython

@cython.locals(count=Py_ssize_t, i=Py_ssize_t, listed=set, kept=list)
cpdef list _end_to_end(list headers, list names, frozenset drop)

cdef class Exchange:
    cdef public object client, plan, request, head, content_length, chunked_in, body_done, body_limit
    cdef public object started, close_after, _buffer, error, client_keep_alive, upgrade, expect_continue
    cdef public object names, connection_named, body_received, active, finished, discarding, route
    cdef public object chain, server, connection, retried, connect_retried, set_cookie, response_started
    cdef public object held, status, bytes_sent, _buffered, _inspect_limit, _sent_continue, _trailers
