"""The data path: everything a request and a WebSocket session pass through.

Client connections (``front``), the request decision (``request``), the
exchange with an upstream (``exchange``, ``upstream``, ``health``), the
forwarding headers (``forwarding``), tunnels and the WebSocket bridge
(``tunnel``, ``websocket``), routing, TLS, the plan of the configuration in
force and the process-wide core (``plan``, ``core``).  Process control
(services, workers, admin) lives in :mod:`chatproxy.process`.
"""
