"""The Twisted baseline: ``twisted.web.proxy.ReverseProxyResource`` in one process.

    python bench/baseline_reverse_proxy.py --port 18081 --upstream-port 18000

Serves everything on 127.0.0.1:PORT from the upstream on 127.0.0.1:UPSTREAM_PORT.
The proxy itself is stock Twisted; only logging is off, as it is for the
other targets (``access_log = off``): no access log, and no "Starting
factory" message for each upstream connection.  That makes the baseline a
little faster, never slower.
"""

# Twisted's web and endpoint APIs are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import argparse
from typing import cast

from twisted.internet import endpoints, reactor
from twisted.web import http, proxy, server


class QuietProxyClientFactory(proxy.ProxyClientFactory):
    """The stock client factory without its per-connection log messages."""

    noisy = False


class QuietReverseProxyResource(proxy.ReverseProxyResource):
    """``ReverseProxyResource`` using :class:`QuietProxyClientFactory`."""

    proxyClientFactoryClass = QuietProxyClientFactory

    def getChild(self, path: bytes, request: server.Request) -> proxy.ReverseProxyResource:
        """Like the stock one, but keeps the quiet client factory for children."""
        child = cast(proxy.ReverseProxyResource, super().getChild(path, request))
        child.proxyClientFactoryClass = QuietProxyClientFactory
        return child


class QuietSite(server.Site):
    """A ``Site`` without an access log."""

    def log(self, request: http.Request) -> None:
        """Do not log requests."""


def main() -> None:
    """Parse the options, listen, and run the reactor until terminated."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--upstream-port", type=int, required=True, help="upstream port on 127.0.0.1")
    options = parser.parse_args()
    site = QuietSite(QuietReverseProxyResource("127.0.0.1", options.upstream_port, b""))
    site.noisy = False
    endpoint = endpoints.TCP4ServerEndpoint(reactor, options.port, backlog=4096, interface="127.0.0.1")
    endpoint.listen(site)
    print(f"ReverseProxyResource on 127.0.0.1:{options.port} -> 127.0.0.1:{options.upstream_port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
