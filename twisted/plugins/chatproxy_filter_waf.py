"""twisted.plugin registration of chatproxy's built-in ``waf`` filter kind."""

from chatproxy.filters.waf import waf

__all__ = ["waf"]
