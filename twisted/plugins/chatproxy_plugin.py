"""twistd plugin: ``twistd chatproxy`` (the service is built in :mod:`chatproxy.process.tap`)."""

from twisted.application.service import ServiceMaker

chatproxy = ServiceMaker(
    "chatproxy",
    "chatproxy.process.tap",
    "TLS-terminating reverse proxy for customer-service chat backends.",
    "chatproxy",
)
