"""twisted.plugin registration of chatproxy's built-in ``headers`` filter kind."""

from chatproxy.filters.headers import headers

__all__ = ["headers"]
