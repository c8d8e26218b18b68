"""twisted.plugin registration of chatproxy's built-in ``jwt_sign`` filter kind."""

from chatproxy.filters.jwt_sign import jwt_sign

__all__ = ["jwt_sign"]
