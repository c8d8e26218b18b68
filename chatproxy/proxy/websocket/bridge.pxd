# The compiled build only (chatproxy/compiled.py): WebSocketBridge as a C-typed class.
# Its attributes are those of WebSocketBridge.__slots__ in bridge.py, in the same order.

cdef class WebSocketBridge:
    cdef public object front, exchange, sockets, options, reactor, started, client, upstream, _handshake
    cdef public object _handshake_timer, _connecting, _client_open, _upstream_open, _pending_to_client
    cdef public object _held, _paused, _excess, _ended, messages_up, messages_down, bytes_up, bytes_down
    cdef public object close_code, refused_status, _rate_tokens, _rate_stamp, _last_message, _idle_call
