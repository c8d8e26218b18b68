# The compiled build only (chatproxy/compiled.py): upstream_headers's loop over the
# request's headers as a C loop (its index, lists and sets typed).
cimport cython

@cython.locals(i=Py_ssize_t, special=frozenset, out=list, prior_for=list, kept=set, vias=list)
cpdef list upstream_headers(object headers, object names, object connection_named, object conn, object authority, object drop)
