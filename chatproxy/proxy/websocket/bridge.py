"""The WebSocket bridge: Autobahn on both legs, messages relayed between them.

For an upgrade request on a route with ``websocket = yes`` (bridge mode), the
front connection hands its transport to an Autobahn *server* protocol (the
client leg).  When Autobahn has validated the client's handshake it asks
:meth:`ClientLeg.onConnect`, which opens the upstream with an Autobahn
*client* protocol (the upstream leg) and answers only once the upstream has
accepted: the client then gets its 101 with the subprotocol the upstream
chose; a refusal gets the upstream's status, an unreachable upstream 502, a
late one 504.

Messages are relayed whole (Autobahn reassembles fragmented messages and
validates UTF-8), in order, through the route's message filters.  A close
from either side is passed on with its code and reason unchanged, once
:func:`close_frame_problem` found it valid (payload of 0 or 2-125 bytes,
code 1000-1003, 1007-1014 or 3000-4999, UTF-8 reason); an invalid one is
never passed on: its sender gets 1002 and so does the other leg (1002, as
for any protocol error of a peer: the session ended on a protocol error,
and the other peer did nothing wrong but is told why), and the access log
records 1002.  An abrupt loss of the upstream closes the client with 1011,
an abrupt loss of the client closes the upstream with 1001.

Closing relays what is still in flight.  When one leg's peer closes, or the
leg fails (Autobahn: 1002 protocol error, 1007 invalid UTF-8, 1009 too big),
the close goes on to the other leg at once; what that leg's peer sent before
answering it is still relayed to the first, and only then does the first
leg get its close frame: the other peer's answer, passed through (or its
own code echoed if the other leg went away), or its failure's code.  Nothing
is relayed from a leg after its peer's close or its failure, and nothing is
sent on a leg after its close frame.  The wait is bounded by the other
leg's close handshake timeout (``close_timeout``).  chatproxy's own closes (limits,
filters, idle, reload, drain) close both legs at once.  Once a leg's close
handshake is complete its connection ends cleanly (the client leg through
the front connection, which reads on until the client's FIN or TLS
close_notify); only a close handshake that timed out is aborted.

Each leg's slowness pauses reading from the other; bytes sent to a leg that
stays paused are counted and past ``max_buffered_bytes`` the session is
closed with 1013.  A leg whose messages are no longer relayed is read
again whatever the other's backlog, so that its answer to the close frame
gets through.
"""

from __future__ import annotations

import random
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from attrs import evolve
from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, TimeoutError as ConnectTimeout
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproxy.filters import CloseSession
from chatproxy.filters.chain import FilterChain
from chatproxy.http.messages import HOP_BY_HOP, add_fields
from chatproxy.proxy.forwarding import upstream_headers
from chatproxy.proxy.websocket.frames import settle
from chatproxy.proxy.websocket.legs import ClientLeg, UpstreamLeg, is_closed, is_open, shed_handshake
from chatproxy.proxy.websocket.sockets import RouteSockets

if TYPE_CHECKING:
    from chatproxy.config import Listener
    from chatproxy.proxy.core import ProxyCore
    from chatproxy.proxy.exchange import Exchange
    from chatproxy.proxy.forwarding import Connection

log = Logger(namespace=__name__)  # (a compiled module has no frame Twisted could name it from)

# Close codes used when one side vanishes without a close frame.
UPSTREAM_LOST = 1011
CLIENT_LOST = 1001
# Request headers the bridge does not copy to the upstream handshake: the
# handshake's own (Autobahn writes fresh ones) and hop-by-hop ones; the
# forwarding headers follow chatproxy's policy (forwarding.upstream_headers).
_NOT_COPIED = HOP_BY_HOP | {
    b"host", b"origin", b"user-agent", b"content-length",
    b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"sec-websocket-accept", b"pragma", b"cache-control",
}


class BridgeClient(Protocol):
    """What the bridge needs of the client's connection (a front connection,
    whose transport the client leg speaks on)."""

    core: ProxyCore
    listener: Listener
    connection: Connection
    transport: Any

    def close(self) -> None:
        """Close after what was written is sent."""

    def abort(self, hard: bool = False) -> None:
        """Close at once (``hard``: a reset)."""

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client for ``reason``."""

    def resume_reading(self, reason: str) -> None:
        """Read again, as far as ``reason`` is concerned."""


class WebSocketBridge:
    """One proxied WebSocket session: a client leg, an upstream leg, the relay."""

    def __init__(self, front: BridgeClient, exchange: Exchange, sockets: RouteSockets) -> None:
        self.front = front
        self.exchange = exchange
        self.sockets = sockets
        self.options = sockets.options
        self.reactor = front.core.reactor
        self.started = monotonic()
        self.client = sockets.client_leg()
        self.client.bridge = self
        self.client.factory = sockets.server_factory
        self.upstream: UpstreamLeg | None = None
        self._handshake: defer.Deferred[Any] | None = None
        self._handshake_timer: Any = None
        self._connecting: defer.Deferred[Any] | None = None
        self._client_open = False
        self._upstream_open = False
        self._pending_to_client: list[tuple[bytes, bool]] = []
        # Messages waiting behind one whose filter verdict is not there yet, by direction (True: upward).
        self._held: dict[bool, deque[tuple[bytes, bool]] | None] = {True: None, False: None}
        self._paused = {"client": False, "upstream": False}
        self._excess = {"client": 0, "upstream": 0}
        self._ended = False
        self.messages_up = self.messages_down = 0
        self.bytes_up = self.bytes_down = 0
        self.close_code: int | None = None
        self.refused_status = 0
        self._rate_tokens = float(self.options.max_messages_per_second or 0) * 2
        self._rate_stamp = monotonic()
        self._last_message = monotonic()
        self._idle_call: Any = None

    # -- start: hand the client's transport to Autobahn

    def start(self, after: bytes) -> None:
        """Attach the client leg to the front's transport and feed it the
        handshake, then ``after``: what the client sent after it.

        Autobahn takes a handshake only as bytes it parses itself, so the
        request head (already parsed, checked and filtered) is written out
        again here, the one place it is: as the filters left it (a Rewrite
        included), with the normalised target as the client sent it."""
        head = self.exchange.head
        request = [f"{head.method} {head.target} HTTP/1.1\r\n".encode("latin-1")]
        add_fields(request, head.headers)
        request += (b"\r\n", after)
        self.client.makeConnection(self.front.transport)
        self.client.dataReceived(b"".join(request))

    def from_client(self, data: bytes) -> None:
        """Raw bytes from the client connection."""
        self.client.dataReceived(data)

    def client_lost(self) -> None:
        """The front connection closed."""
        self.client.connectionLost(Failure(ConnectionDone()))

    def client_writable(self, writable: bool) -> None:
        """The client's send buffer filled or drained."""
        self.leg_writable(upstream=False, writable=writable)

    # -- the upstream handshake

    def open_upstream(self, request: Any) -> defer.Deferred[Any]:
        """Called by the client leg with the client's validated handshake."""
        exchange = self.exchange
        head = exchange.head
        route = exchange.route
        assert head is not None and route is not None
        pools = exchange.plan.pools[route.upstream]
        # A sticky cookie chooses the server; the client's 101 sets it when it did not name that one.
        if pools.sticky is None:
            server = pools.pick()
        else:
            server, exchange.set_cookie = pools.pick_sticky(head.headers, self.front.connection.tls)
        exchange.server = server
        upstream_config = server.upstream
        path = route.rewrite_path or head.path
        resource = f"{path}?{head.query}" if head.query else path
        scheme = "wss" if server.server.tls else "ws"
        factory = self.sockets.client_factory(
            url=f"{scheme}://{_url_host(server.server.host)}:{server.server.port}{resource}",
            protocols=list(request.protocols or []),
            headers=self._upstream_headers(),
            useragent=head.header("user-agent") or None,
            origin=head.header("origin") or None,
        )
        if upstream_config.host_header == "client" and head.authority:
            # Host as the client sent it (Autobahn writes "Host: host:port"), not
            # the client's host name with the upstream's port.
            factory.host, factory.port = _split_authority(head.authority, 443 if self.front.connection.tls else 80)
        self._handshake = defer.Deferred()
        leg = self.sockets.upstream_leg()
        leg.bridge = self
        leg.factory = factory
        self.upstream = leg
        endpoint = server._endpoint()
        connecting = self._connecting = endpoint.connect(_Prepared(leg))
        connecting.addErrback(self._connect_failed)
        self._handshake_timer = self.reactor.callLater(
            upstream_config.connect_timeout + upstream_config.response_timeout, self._handshake_timed_out)
        return self._handshake

    def _upstream_headers(self) -> dict[str, str]:
        """The handshake's headers for the upstream, as a plain request's
        (:func:`chatproxy.proxy.forwarding.upstream_headers`), without those
        Autobahn writes itself; repeated ones joined (cookies with "; ")."""
        exchange = self.exchange
        head = exchange.head
        headers: dict[str, str] = {}
        for name, value in upstream_headers(head.headers, exchange.names, exchange.connection_named,
                                            self.front.connection, head.authority, _NOT_COPIED):
            text, value_text = name.decode("latin-1"), value.decode("latin-1")
            if text in headers:
                headers[text] += ("; " if text.lower() == "cookie" else ", ") + value_text
            else:
                headers[text] = value_text
        return headers

    def _settle(self) -> defer.Deferred[Any] | None:
        handshake, self._handshake = self._handshake, None
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        return handshake

    def _connect_failed(self, failure: Failure) -> None:
        if self._handshake is None:
            return  # nobody waits for it any more (the client left, or it timed out)
        timeout = failure.check(ConnectTimeout, ConnectingCancelledError) is not None
        server = self.exchange.server
        log.warn("WebSocket upstream {server} unreachable: {reason}",
                 server=server.server.url if server else "-", reason=failure.getErrorMessage())
        self._deny(504 if timeout else 502, "upstream timed out" if timeout else "upstream unreachable")

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self._handshake is not None:
            log.warn("WebSocket upstream handshake timed out")
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.abortConnection()  # type: ignore[attr-defined]
            self._deny(504, "upstream timed out")

    def _deny(self, status: int, reason: str) -> None:
        handshake = self._settle()
        if handshake is not None:
            self.refused_status = status
            handshake.errback(ConnectionDeny(status, reason))

    def upstream_refused(self, status: int, reason: str) -> None:
        """The upstream answered the handshake with another status than 101."""
        self._deny(status, reason or "refused by upstream")

    def upstream_accepted(self, response: Any) -> None:
        """The upstream accepted: the client gets its 101 with the same subprotocol."""
        handshake = self._settle()
        if handshake is None:
            return
        headers: dict[str, Any] = {}
        # One line each: Autobahn's parsed headers join repeated ones with ", ",
        # which breaks Set-Cookie (its Expires dates hold commas).
        raw = getattr(self.upstream, "http_response_data", b"") or b""
        cookies = [line.split(b":", 1)[1].strip().decode("latin-1") for line in raw.split(b"\r\n")[1:]
                   if line[:11].lower() == b"set-cookie:"]
        if self.exchange.set_cookie is not None:
            cookies.append(self.exchange.set_cookie.decode("latin-1"))  # sticky sessions
        if cookies:
            headers["Set-Cookie"] = cookies
        headers.update(self.own_headers())
        handshake.callback((response.protocol, headers))

    def drain(self) -> None:
        """Shutdown: the proxy core closes sessions with 1001 (see ``ProxyCore.drain``)."""

    def client_ended(self, clean: bool) -> None:
        """Autobahn ends the client's connection: through the front connection,
        which reads on until the client's FIN or TLS close_notify (bounded).
        Autobahn asks for an abort also once the close handshake is complete (a
        server drops the TCP connection when the peer's close arrives): a reset
        the peer may see before it has read the close frame, and on TLS the
        close frame never leaves.  Only a close handshake that did not
        complete (timed out, dead peer) is aborted."""
        if clean:
            self.front.close()
        else:
            self.front.abort(hard=True)

    def own_headers(self) -> list[tuple[str, str]]:
        """The listener's ``response_headers``, for the answers Autobahn writes (the 101, a refusal)."""
        return [(name.decode("ascii"), value.decode("latin-1")) for name, value in self.front.listener.response_headers]

    # -- open

    def upstream_open(self) -> None:
        """The upstream leg is open (before or as the client leg opens)."""
        self._upstream_open = True

    def client_open(self) -> None:
        """The client leg is open: make both legs small for an idle session and
        fix their fast-path limits (both open now), then deliver what the
        upstream already sent."""
        self._client_open = True
        self._last_message = monotonic()
        shed_handshake(self.client)
        settle(self.client)
        if self.upstream is not None:
            shed_handshake(self.upstream, self.sockets.open_client_factory)
            settle(self.upstream)
        self.front.core.websocket_sessions.add(self)
        pending, self._pending_to_client = self._pending_to_client, []
        for payload, binary in pending:
            self._send(self.client, "client", payload, binary)
        if self.options.idle_timeout:
            self._idle_call = self.reactor.callLater(self.options.idle_timeout, self._check_idle)

    # -- messages

    def relay(self, source: Any, payload: bytes, binary: bool) -> None:
        """A whole message from one leg: filter it and send it to the other.
        Also while the session closes: what a leg sends before its own close
        (or its failure) is relayed as long as the other leg had no close
        frame sent to it; nothing is relayed from a leg after that."""
        client = self.client
        upward = source is client
        if not self._carries(source, self.upstream if upward else client, upward):
            return
        self._last_message = monotonic()
        if upward:
            if self.options.max_messages_per_second and not self._take_token():
                log.info("WebSocket session over {rate} messages/s: closed with 1008",
                         rate=self.options.max_messages_per_second)
                self.front.core.counters["websocket_rate_limited"] += 1
                self.close_both(1008, "message rate limit exceeded")
                return
            self.messages_up += 1
            self.bytes_up += len(payload)
        else:
            self.messages_down += 1
            self.bytes_down += len(payload)
        exchange = self.exchange
        chain = exchange.plan.chain(exchange.route) if exchange.route is not None else None  # (a reload may change it)
        if chain is not None and chain.sees_messages:
            self._filter(chain, upward, payload, binary)
        else:
            self._deliver(None, upward, payload, binary)

    def _filter(self, chain: FilterChain, upward: bool, payload: bytes, binary: bool) -> None:
        """Run the message hooks; a verdict that comes later (a Deferred) holds
        this direction's next messages, in order, and reading from the client
        meanwhile."""
        held = self._held[upward]
        if held is not None:
            held.append((payload, binary))
            return
        verdict = chain.message(self.exchange.head, payload, binary, upward)
        if isinstance(verdict, defer.Deferred):
            self._held[upward] = deque()
            self.front.pause_reading("message filter")
            verdict.addCallback(self._verdict_came, chain, upward, payload, binary)
            return
        self._deliver(verdict, upward, payload, binary)

    def _verdict_came(self, verdict: Any, chain: FilterChain, upward: bool, payload: bytes, binary: bool) -> None:
        """A held message's verdict: deliver it, then filter the messages held
        behind it (until one of them waits for its verdict in turn)."""
        held, self._held[upward] = self._held[upward] or deque(), None
        self._deliver_if_relaying(verdict, upward, payload, binary)
        while held:
            waiting = self._held[upward]
            if waiting is not None:
                waiting.extend(held)
                return
            next_payload, next_binary = held.popleft()
            if self._relaying(upward):
                self._filter(chain, upward, next_payload, next_binary)
        if self._held[True] is None and self._held[False] is None:
            self.front.resume_reading("message filter")

    def _relaying(self, upward: bool) -> bool:
        """Whether a message from that direction may still be delivered."""
        if upward:
            return self._carries(self.client, self.upstream, True)
        return self._carries(self.upstream, self.client, False)

    def _carries(self, source: Any, target: Any, upward: bool) -> bool:
        """Whether a message from leg ``source`` may still be delivered to leg
        ``target`` (``upward``: from the client)."""
        return not (source is None or source.peer_closed or source.failed is not None or target is None
                    or (not is_open(target) and (upward or self._client_open)))

    def _deliver_if_relaying(self, verdict: Any, upward: bool, payload: bytes, binary: bool) -> None:
        """Carry out a late verdict, unless that direction has stopped relaying meanwhile."""
        if self._relaying(upward):
            self._deliver(verdict, upward, payload, binary)

    def _deliver(self, verdict: Any, upward: bool, payload: bytes, binary: bool) -> None:
        """Carry out the filters' verdict on a message: close, drop, or send it on."""
        if verdict is not None:
            if isinstance(verdict, CloseSession):
                self.close_both(verdict.code, verdict.reason)
            else:
                self.front.core.counters["websocket_dropped"] += 1
            return
        if upward:
            assert self.upstream is not None
            self._send(self.upstream, "upstream", payload, binary)
        elif self._client_open:
            self._send(self.client, "client", payload, binary)
        else:
            self._pending_to_client.append((payload, binary))

    def _send(self, leg: Any, side: str, payload: bytes, binary: bool) -> None:
        """Send a message to ``leg``, the ``side`` ("client" or "upstream") it is."""
        leg.sendMessage(payload, binary)
        if self._paused[side]:
            self._excess[side] += len(payload)
            if self._excess[side] > self.options.max_buffered_bytes:
                log.info("WebSocket {side} reads too slowly ({n} bytes waiting): session closed with 1013",
                         side=side, n=self._excess[side])
                self.front.core.counters["websocket_slow_reader"] += 1
                self.close_both(1013, "peer reads too slowly")

    def _take_token(self) -> bool:
        rate = float(self.options.max_messages_per_second)
        now = monotonic()
        self._rate_tokens = min(rate * 2, self._rate_tokens + (now - self._rate_stamp) * rate)
        self._rate_stamp = now
        if self._rate_tokens < 1:
            return False
        self._rate_tokens -= 1
        return True

    def _check_idle(self) -> None:
        idle = monotonic() - self._last_message
        if idle >= self.options.idle_timeout:
            log.info("WebSocket session idle for {seconds:.0f}s: closed with 1001", seconds=idle)
            self.close_both(1001, "idle timeout")
            self._idle_call = None
        else:
            self._idle_call = self.reactor.callLater(self.options.idle_timeout - idle, self._check_idle)

    # -- flow control

    def leg_writable(self, upstream: bool, writable: bool) -> None:
        """One leg's send buffer filled (stop reading the other) or drained."""
        side = "upstream" if upstream else "client"
        self._paused[side] = not writable
        if writable:
            self._excess[side] = 0
        # A leg whose messages are no longer relayed is read on (see _reread),
        # whatever this one's buffer holds.
        self._read_other(upstream, writable or not self._relays_from(self.client if upstream else self.upstream))

    def _read_other(self, upstream: bool, read: bool) -> None:
        """Read from the leg opposite ``upstream`` (the upstream when False) or stop."""
        other = self.client if upstream else self.upstream
        transport = getattr(other, "transport", None) if other is not None else None
        if transport is None:
            return
        if other is self.client:
            if read:
                self.front.resume_reading("websocket")
            else:
                self.front.pause_reading("websocket")
        elif read:
            transport.resumeProducing()
        else:
            transport.pauseProducing()

    def _relays_from(self, leg: Any) -> bool:
        """Whether what ``leg`` sends may still be relayed: it neither closed
        nor failed, and the other leg had no close frame sent to it."""
        other = self.upstream if leg is self.client else self.client
        return (leg is not None and not leg.peer_closed and leg.failed is None and other is not None
                and getattr(other, "state", None) in (WebSocketProtocol.STATE_OPEN, WebSocketProtocol.STATE_CONNECTING))

    def _reread(self) -> None:
        """Read again a leg held back by the other's full send buffer once its
        messages are no longer relayed (it closed or failed, or the other leg
        had a close frame sent): what it still sends is discarded, and its
        close frame, queued behind, must get through (the 1013 case: else its
        close handshake ends only at closeHandshakeTimeout, with the
        connection dropped)."""
        for upstream in (False, True):
            if self._paused["upstream" if upstream else "client"] and \
                    not self._relays_from(self.client if upstream else self.upstream):
                self._read_other(upstream, True)

    # -- closing
    #
    # A close (or failure) of one leg is passed on to the other at once; the
    # first leg's own close frame waits until the other leg has answered or
    # is gone (see _BridgeLeg), bounded by the other leg's close handshake
    # timeout.  close_both (limits, filters, idle, reload, drain) closes both
    # at once.

    def side(self, leg: Any) -> str:
        """``client`` or ``upstream``: which leg ``leg`` is (for log lines)."""
        return "client" if leg is self.client else "upstream"

    def _record_close(self, code: int) -> None:
        if self.close_code is None:
            self.close_code = code

    def close_received(self, source: Any, code: int | None, reason: bytes | None) -> None:
        """A valid close frame from ``source``'s peer, the first on that leg:
        pass it on, code and reason unchanged; ``source`` answers it once the
        other leg has answered (that answer passed back) or is gone (then its
        own code and reason are echoed)."""
        self._record_close(code if code is not None else 1005)
        if source.owed is None:  # (a failed leg already owes its failure's close)
            source.owed = (code, reason)
        other = self.upstream if source is self.client else self.client
        if other is not None and is_open(other) and other.owed is None:
            other.send_close(code, reason)
        self._send_owed()

    def close_answered(self, leg: Any, code: int | None, reason: bytes | None) -> None:
        """``leg``'s peer answered the close frame sent to it: the other leg,
        if it owes its peer an answer, passes this one back (a failed leg
        sends its failure's close)."""
        other = self.upstream if leg is self.client else self.client
        if other is not None and other.owed is not None and other.failed is None:
            other.owed = (code, reason)
        self._send_owed()

    def leg_failed(self, leg: Any, code: int, reason: str) -> None:
        """Autobahn fails one leg (1007 invalid UTF-8, 1009 too big, 1002
        protocol error, an invalid close frame): the other leg is closed with
        that code at once, the failed one once the other has answered (what
        that one sent until then still reaches it); the access log says so
        (not 1001/1011)."""
        log.info("WebSocket {side} failed with {code}: {reason}", side=self.side(leg), code=code, reason=reason)
        self._record_close(code)
        leg.owed = (code, reason.encode("utf-8")[:120])
        other = self.upstream if leg is self.client else self.client
        if other is not None and is_open(other) and other.owed is None:
            other.send_close(code, reason.encode("utf-8")[:120])
        self._send_owed()

    def close_both(self, code: int, reason: str) -> None:
        """chatproxy itself ends the session (limits, filters, idle, reload,
        drain): each leg still open gets its close frame now (the answer it
        owes, if any, else this code)."""
        self._record_close(code)
        for leg in (self.client, self.upstream):
            if leg is not None and is_open(leg):
                owed = leg.owed or (code, reason.encode("utf-8")[:120])
                leg.send_close(*owed)
        self._reread()

    def _send_owed(self) -> None:
        """Send each owed close frame whose leg waits for nothing any more: the
        other leg is not awaiting its peer's answer (answered, gone, or never
        sent a close); and read on the legs no longer relayed from."""
        for leg in (self.client, self.upstream):
            other = self.upstream if leg is self.client else self.client
            if leg is not None and leg.owed is not None and is_open(leg) and \
                    (other is None or not other.awaiting_answer or is_closed(other)):
                leg.send_close(*leg.owed)
        self._reread()

    def leg_closed(self, leg: Any, was_clean: bool, code: int | None, reason: str | None) -> None:
        """A leg's connection is gone; make sure the other one goes too."""
        leg.awaiting_answer = False
        # Gone, it no longer holds the other leg back: read that one again, or
        # its answer to the close below waits unread for closeHandshakeTimeout.
        self.leg_writable(upstream=leg is self.upstream, writable=True)
        if leg is self.upstream and self._handshake is not None:
            self._deny(502, "upstream closed during the handshake")
        other = self.upstream if leg is self.client else self.client
        if leg is self.client and other is not None and other.transport is None and self._connecting is not None:
            # The client left while the upstream was still being connected: give
            # up on it, or the upstream would get a session nobody ever closes.
            self._settle()
            self._connecting.cancel()
        if other is not None and is_open(other):
            if other.owed is None:
                lost_code = UPSTREAM_LOST if leg is self.upstream else CLIENT_LOST
                self._record_close(lost_code)
                other.owed = (lost_code, b"upstream connection lost" if leg is self.upstream else b"client went away")
            self._send_owed()
        elif (other is not None and other.transport is not None and not is_closed(other)
              and getattr(other, "state", None) != other.STATE_CLOSING):
            # Still handshaking: drop it.  A leg already closing finishes its
            # close handshake by itself (bounded by closeHandshakeTimeout).
            other.dropConnection(abort=not was_clean)
        if leg is self.client or (other is None or is_closed(other)):
            self._end()

    def _end(self) -> None:
        if self._ended:
            return
        if self.upstream is not None and not is_closed(self.upstream):
            return  # logged when the upstream leg closes too
        self._ended = True
        self.front.core.websocket_sessions.discard(self)
        route = self.exchange.route
        self.front.core.stats.websocket_session(route.name if route else "", (self.messages_up, self.bytes_up),
                                                (self.messages_down, self.bytes_down),
                                                self.close_code if self._client_open else None)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._settle()
        core = self.front.core
        if core.access_log.enabled:
            record = self.exchange.record()
            core.access_log.log(evolve(
                record,
                status=101 if self._client_open else (self.refused_status or 499),
                bytes_sent=self.bytes_down,
                websocket=(f"messages_up={self.messages_up} messages_down={self.messages_down} "
                           f"bytes_up={self.bytes_up} bytes_down={self.bytes_down} "
                           f"close={self.close_code if self.close_code is not None else '-'}"),
            ))


class _Prepared(Factory):
    """Hands out one prepared protocol instance, quietly."""

    noisy = False

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` (host possibly ``[v6]``) -> (host, port or ``default_port``)."""
    end = authority.find("]") + 1 if authority.startswith("[") else 0
    host, _, port = authority[end:].partition(":")
    return authority[:end] + host, int(port) if port.isdigit() else default_port
