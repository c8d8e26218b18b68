"""The HTTP/1.1 data path: front (client) connections, upstream connections and pools."""
