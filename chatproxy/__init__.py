"""chatproxy: a TLS-terminating reverse proxy made for customer-service chat backends."""

__version__ = "0.1.0"
