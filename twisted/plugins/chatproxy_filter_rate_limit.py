"""The built-in ``rate_limit`` filter kind (see :mod:`chatproxy.filters.rate_limit`)."""

from chatproxy.filters.rate_limit import rate_limit

__all__ = ["rate_limit"]
