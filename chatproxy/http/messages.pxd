# The compiled build only (chatproxy/compiled.py): add_fields's loop as a C loop
# (its list of lines typed, so that each append is a C call).
cpdef void add_fields(list lines, object headers)
