"""HTTP vocabulary without I/O, shared by the configuration, the filters and
the data path: request heads, header rules, locally made responses, paths."""
