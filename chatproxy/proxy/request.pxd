# The compiled build only (chatproxy/compiled.py): _scan's loop over the request's
# headers as a C loop (its lists and the set of special names typed).
cimport cython

@cython.locals(names=list, special=frozenset, size=Py_ssize_t)
cpdef object _scan(list headers, bint trusted)
