"""The demo chat upstream that the quick-start configuration proxies to.

A tiny chat server: ``/`` serves a chat page, ``/chat`` is a WebSocket where
every text message is broadcast to every connected client (the sender too, so
it is also an echo), and ``/whoami`` shows the request headers the upstream
received (the forwarding headers chatproxy adds).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.web.resource import Resource
from twisted.web.server import Site


class ChatProtocol(WebSocketServerProtocol):  # type: ignore[misc]
    """One chat participant; messages are broadcast to everyone."""

    def onOpen(self) -> None:
        self.factory.members.add(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        for member in list(self.factory.members):
            member.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.members.discard(self)


class ChatFactory(WebSocketServerFactory):  # type: ignore[misc]
    """Holds the set of connected chat participants."""

    protocol = ChatProtocol

    def __init__(self) -> None:
        super().__init__()
        self.members: set[ChatProtocol] = set()


class _Leaf(Resource):
    """A leaf resource that answers HEAD as GET without the body (and with its length)."""

    isLeaf = True

    def render_HEAD(self, request: Any) -> bytes:
        body = self.render_GET(request)  # type: ignore[attr-defined]
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""


class _Page(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return resources.files(__package__).joinpath("chat.html").read_bytes()


class _WhoAmI(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        headers = {k.decode("latin-1"): v[0].decode("latin-1") for k, v in request.requestHeaders.getAllRawHeaders()}
        return json.dumps({"method": "GET", "uri": request.uri.decode("latin-1"), "headers": headers},
                          indent=2).encode("utf-8")


class _NoIcon(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(204)  # browsers ask; there is none, and that is fine
        return b""


def demo_site() -> Site:
    """The demo upstream as a twisted.web Site."""
    root = Resource()
    page = _Page()
    root.putChild(b"", page)
    root.putChild(b"index.html", page)
    root.putChild(b"whoami", _WhoAmI())
    root.putChild(b"favicon.ico", _NoIcon())
    root.putChild(b"chat", WebSocketResource(ChatFactory()))
    site = _QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


class _QuietSite(Site):
    """A Site without its own access log: chatproxy's access log covers the demo."""

    def log(self, request: Any) -> None:
        pass
