"""twisted.plugin registration of chatproxy's built-in ``ip_allowlist`` filter kind."""

from chatproxy.filters.ip_allowlist import ip_allowlist

__all__ = ["ip_allowlist"]
