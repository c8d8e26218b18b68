"""twistd plugin: ``twistd chatproxy`` (the service is built in :mod:`chatproxy.tap`)."""

from twisted.application.service import ServiceMaker

chatproxy = ServiceMaker(
    "chatproxy",
    "chatproxy.tap",
    "TLS-terminating reverse proxy for customer-service chat backends.",
    "chatproxy",
)
