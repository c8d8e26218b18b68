# The compiled build only (chatproxy/compiled.py): HostMemo and _Scan as C-typed
# classes (their attributes are those of their __slots__ in request.py, in the same
# order), read as C fields by decide, _scan and _where; _scan's loop over the
# request's headers as a C loop (its lists and the set of special names typed).
cimport cython

cdef class HostMemo:
    cdef public object valid, routed

cdef class _Scan:
    cdef public object names, hosts, content_length, chunked, expect_continue, forwarded_for, named, size, error

@cython.locals(scan=_Scan, names=list, special=frozenset, size=Py_ssize_t)
cpdef _Scan _scan(list headers, bint trusted)

@cython.locals(hosts=list)
cpdef tuple _where(_Scan scan, object version, object target, HostMemo memo)

@cython.locals(scan=_Scan)
cpdef object decide(object method, object version, object keep_alive, object upgrade, object url, list headers, object connection, object table, object max_header_bytes, HostMemo memo, object unframed_body=*)
