"""twisted.plugin registration of chatproxy's built-in ``request_limits`` filter kind."""

from chatproxy.filters.request_limits import request_limits

__all__ = ["request_limits"]
