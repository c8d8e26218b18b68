"""twisted.plugin registration of chatproxy's built-in ``jwt`` filter kind.

The module is ``jwt_verify`` (not ``jwt``) so that it is never confused with PyJWT.
"""

from chatproxy.filters.jwt_verify import jwt_kind as jwt

__all__ = ["jwt"]
