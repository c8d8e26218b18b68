# The compiled build only (chatproxy/compiled.py): xor_loop as a C loop.
# The key is checked to have 4 bytes before the loop reads it through a pointer.
cimport cython

@cython.locals(n=Py_ssize_t, i=Py_ssize_t, out=bytearray, source=cython.p_uchar, target=cython.p_uchar,
               mask=cython.p_uchar)
cpdef bytes xor_loop(bytes payload, bytes key)
