"""twisted.plugin registration of chatproxy's built-in ``origin`` filter kind."""

from chatproxy.filters.origin import origin

__all__ = ["origin"]
