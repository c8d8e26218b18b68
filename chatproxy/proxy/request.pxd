# The compiled build only (chatproxy/compiled.py): _Scan as a C-typed class, and
# _scan's loop over the request's headers as a C loop (its lists and the set of
# special names typed).
cimport cython


# _Scan as a C-typed class: its attributes are those of _Scan.__slots__ in request.py, in the same order.
cdef class _Scan:
    cdef public object names, hosts, content_length, chunked, expect_continue, forwarded_for, named, size, error

@cython.locals(scan=_Scan, names=list, special=frozenset, size=Py_ssize_t)
cpdef _Scan _scan(list headers, bint trusted)

@cython.locals(scan=_Scan)
cpdef object decide(object method, object version, object keep_alive, object upgrade, object url, list headers, object connection, object table, object max_header_bytes, object memo, object unframed_body=*)
