"""``/ws`` at the edge: check the upgrade, then carry the agent's frames over a trunk.

``FrontDoor`` is the public listener's protocol (uvicorn's ``Config.http``). It reads the first
request head of each connection: a WebSocket upgrade of ``/ws`` becomes a ``Session``, anything
else is handed, with the bytes read so far, to uvicorn's own HTTP protocol, as uvicorn itself
hands an upgraded connection to its WebSocket protocol (``transport.set_protocol``). An upgrade
sent later on a kept-alive HTTP connection still reaches the Starlette route and the frame-copy
bridge (``services.gateway.ws.WsBridge``), which enforces the same rules; browsers and websockets
clients open a connection per WebSocket, so that path is the exception (ADR 0004).

A session checks what the bridge checks (Origin, the ``bearer.`` subprotocol or the first-frame
``auth``, the rate limit, a disabled account), then sends ``open`` on a trunk to the notifier
(``services.gateway.trunk``, ADR 0005): one WebSocket per notifier replica carrying every agent
of this gateway. With the token in the subprotocol the 101 goes out only once the notifier has
answered ``accepted``, which it sends after registering the agent: a client that sees its socket
open gets every frame sent from then on (a 101 first let frames pass a busy gateway's new
connections by, found by the bench at 1,000 agents). A first-frame ``auth`` needs the 101 before
the token; that client is live once the notifier accepts it.

Live, the client's frames are parsed by websockets' sans-I/O protocol (masking, fragments, the
size cap with 1009, pings, the close handshake; UTF-8 is checked here, 1007) and whole messages
go on the trunk, with its flow control both ways (``wait``/``go``, ``hold``/``release``); the
notifier's frames arrive already encoded as a server sends them, once per trunk with the list of
sessions they are for, and each session writes them with one write per read of the trunk. The
gateway pings every live client itself (one timer for all), closes a client whose socket buffers
more than ``slow_bytes`` (4008, it resumes later), and passes close codes both ways: the
notifier's ``close`` (4401, 4008...), the client's code to the notifier, 1001 for a client that
vanished, 1011 to every client of a trunk that was lost, 1012 on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.auto import AutoHTTPProtocol
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from libs.common.logs import correlation_id
from libs.common.tokens import Identity, bearer_from_subprotocols
from libs.common.web import error_body
from services.gateway import metrics
from services.gateway.domain import wsframes as wf
from services.gateway.domain.headers import sane_request_id, with_security
from services.gateway.trunk import Trunk, TrunkDown, TrunkPool
from services.gateway.ws import (
    DISABLED,
    FORBIDDEN,
    PROTOCOL,
    UNAUTHORIZED,
    Refused,
    WsBridge,
)

log = logging.getLogger("chatflow.gateway.ws")
# websockets' sans-I/O handshake logs request heads (the token rides in one) at DEBUG.
_handshake_log = logging.getLogger("chatflow.gateway.ws.handshake")
_handshake_log.setLevel(logging.WARNING)

MAX_HEAD = 16 * 1024  # a longer head is not ours: uvicorn answers it
WS_PREFIX = b"GET /ws"
CLOSE_TIMEOUT_S = 5.0  # wait this long for the other side's close frame, then drop TCP
HEAD_TIMEOUT_S = 30.0  # a connection that sends no complete request head in this time is closed
PRE_SPLICE_BYTES = 64 * 1024  # client bytes buffered before the session is live (an auth frame)
SLOW_CONSUMER = 4008  # as the notifier's
DIRECT_BACKLOG = 16  # times slow_bytes of paced frames for one agent before it counts as slow
CONCURRENT_CHECKS = 16  # upgrades whose token and rate limit are checked at the same time

RawHeaders = list[tuple[bytes, bytes]]


def is_ws_upgrade(head: bytes) -> bool:
    """Whether a complete request head is ``GET /ws`` (any query) asking for a WebSocket."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[1].split(b"?", 1)[0] != b"/ws":
        return False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade":
            return b"websocket" in (t.strip().lower() for t in value.split(b","))
    return False


class FrontDoor(asyncio.Protocol):
    """The first request head of a connection decides whose it is (see the module docstring).

    ``edge`` is set on a subclass per listener by ``front_door``; uvicorn builds one instance per
    connection with its own arguments, which are passed on to its HTTP protocol unchanged.
    """

    edge: ClassVar[WsEdge]

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config, self.server_state, self.app_state = config, server_state, app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server_state.connections.add(self)
        self.timer = self.loop.call_later(HEAD_TIMEOUT_S, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: nothing is in flight yet, just close."""
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        n = min(len(buf), len(WS_PREFIX))
        if buf[:n] != WS_PREFIX[:n]:
            self._to_http()
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._to_http()
            return
        head = bytes(buf[: end + 4])
        if not is_ws_upgrade(head):
            self._to_http()
            return
        self._to_ws(head, bytes(buf[end + 4 :]))

    def eof_received(self) -> bool | None:
        return None  # close

    def _leave(self) -> asyncio.Transport:
        assert self.transport is not None
        if self.timer is not None:
            self.timer.cancel()
        self.server_state.connections.discard(self)
        return self.transport

    def _to_http(self) -> None:
        transport = self._leave()
        inner = AutoHTTPProtocol(  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )
        transport.set_protocol(inner)
        inner.connection_made(transport)
        inner.data_received(bytes(self.buf))

    def _to_ws(self, head: bytes, rest: bytes) -> None:
        transport = self._leave()
        session = Session(self.edge, transport, self.server_state)
        transport.set_protocol(session.client)
        session.start(head, rest)


def front_door(edge: WsEdge) -> type[FrontDoor]:
    """The protocol class for uvicorn's ``Config.http`` of the public listener."""
    return type("FrontDoor", (FrontDoor,), {"edge": edge})


class WsEdge:
    """What every session shares: the bridge's checks and settings, the security headers, the
    trunks to the notifier, and one heartbeat for all live sessions."""

    def __init__(
        self,
        bridge: WsBridge,
        security: RawHeaders,
        max_client_bytes: int,
        trunks: TrunkPool,
        slow_bytes: int = 1024 * 1024,
        ping_interval_s: float = 20.0,
        ping_timeout_s: float = 20.0,
    ) -> None:
        self.bridge = bridge
        self.security = security
        self.max_client_bytes = max_client_bytes  # largest client message (as the notifier's)
        self.trunks = trunks
        self.slow_bytes = slow_bytes
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        # Each check takes a Redis connection for the rate limit: a reconnect storm of thousands
        # must not drain the pool the gateway's consumers share.
        self.checks = asyncio.Semaphore(CONCURRENT_CHECKS)
        self.sessions: set[Session] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    def live(self, session: Session) -> None:
        self.sessions.add(session)
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        """Ping every live session each interval; one that has not answered the last is closed
        (1011), like websockets' keepalive, with one timer for all instead of one each."""
        while True:
            await asyncio.sleep(min(self.ping_interval_s, self.ping_timeout_s))
            now = asyncio.get_running_loop().time()
            self.trunks.heartbeat(now, self.ping_timeout_s)
            for s in list(self.sessions):
                s.heartbeat(now, self.ping_interval_s, self.ping_timeout_s)

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self.trunks.close()


class ClientSide(asyncio.Protocol):
    """The agent's connection once it is ours; also what uvicorn's shutdown sees."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def data_received(self, data: bytes) -> None:
        self.s.from_client(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.s.client_lost()

    def pause_writing(self) -> None:
        self.s.client_full(True)

    def resume_writing(self) -> None:
        self.s.client_full(False)

    def shutdown(self) -> None:
        self.s.shutdown()


class Session:
    """One ``/ws`` connection: the upgrade and its checks, then its frames through a trunk."""

    def __init__(self, edge: WsEdge, transport: asyncio.Transport, server_state: Any) -> None:
        self.edge = edge
        self.bridge = edge.bridge
        self.transport = transport
        self.server_state = server_state
        self.client = ClientSide(self)
        self.loop = asyncio.get_running_loop()
        self.rid = ""
        self.inbuf = bytearray()  # client bytes not yet parsed (before the session is live)
        self.more = asyncio.Event()  # client bytes arrived (before the session is live)
        self.proto: ServerProtocol | None = None  # the client side, after the handshake
        self.trunk: Trunk | None = None
        self.cid = 0
        # Set by the trunk: None once the notifier accepted, (code, reason) if it refused.
        self.opened: asyncio.Future[tuple[int, str] | None] = self.loop.create_future()
        self.accepted = False  # 101 sent
        # The 101 waiting for the notifier's (see the module docstring): (protocol, response).
        self.pending_accept: tuple[ServerProtocol, Any] | None = None
        self.live = False  # accepted by the notifier, 101 sent: frames go both ways
        self.held: list[bytes] = []  # frames that came before the session was live
        self.out: list[bytes] = []  # frames of this read of the trunk, written at its end
        self.out_broadcast = False  # some of them are live frames (not paced by wait/go)
        self.early_close: tuple[int, str] | None = None  # the notifier closed before live
        self.client_gone = False
        self.closing = False  # our close frame (or the echo of the client's) is out
        self.paused_reading_client = False
        self.fragments: list[bytes] = []
        self.fragment_opcode: Opcode | None = None
        self.ping_sent: float | None = None  # when the unanswered ping went out
        self.ping_data = b""
        self.on_hold = False  # the notifier asked us to stop reading the client (``hold``)
        self.full = False  # the client's socket is full: the notifier was told to wait
        self.unregister: Callable[[], None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.close_timer: asyncio.TimerHandle | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, head: bytes, rest: bytes) -> None:
        self.server_state.connections.add(self.client)
        self.inbuf += rest
        self.task = self.loop.create_task(self._run(head))
        self.server_state.tasks.add(self.task)
        self.task.add_done_callback(self.server_state.tasks.discard)

    async def _run(self, head: bytes) -> None:
        self.rid = sane_request_id(_header_value(head, b"x-request-id"))
        correlation_id.set(self.rid)
        try:
            await self._open(head)
        except Refused as exc:
            self._refuse(exc)
        except Exception:
            log.exception("websocket session failed")
            self._refuse(Refused(1011, 500, "internal error"))

    async def _open(self, head: bytes) -> None:
        proto = ServerProtocol(
            select_subprotocol=_select_subprotocol, max_size=None, logger=_handshake_log
        )
        self.proto = proto
        proto.receive_data(head)
        events = proto.events_received()
        request = events[0] if events else None
        if not isinstance(request, Request):
            self._write_raw(b"".join(proto.data_to_send()))
            self.transport.close()
            return
        origin = request.headers.get("Origin")
        if origin is None or origin not in self.bridge.origins:
            raise Refused(FORBIDDEN, 403, "origin not allowed")
        offered = _offered(request.headers)
        token = bearer_from_subprotocols(offered)
        peer = self.transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        response = proto.accept(request)
        if response.status_code != 101:  # not a valid upgrade: websockets' 400/426 answer
            response.headers.update(_headers_of(self._secured([])))
            proto.send_response(response)
            self._write_raw(b"".join(d for d in proto.data_to_send() if d))
            self.transport.close()
            return
        identity: Identity | None
        if token is not None:
            try:
                identity, problem = await self._check(token, ip)
            except Refused:  # throttled: told the same way as a bad token
                self._accept(proto, response)
                raise
            if identity is None:
                # Accept first: a browser only sees close codes, never the handshake's status.
                self._accept(proto, response)
                raise Refused(UNAUTHORIZED, 401, problem)
            self.pending_accept = (proto, response)  # sent once the notifier has the socket
        else:
            self._accept(proto, response)
            token = await self._first_frame_token()
            if token is None:
                return
            identity, problem = await self._check(token, ip)
            if identity is None:
                raise Refused(UNAUTHORIZED, 401, problem)
        # Registered before the notifier's answer, so a disable meanwhile is not missed.
        self.unregister = self.bridge.register(identity.sub, self.revoke)
        if self.bridge.is_disabled(identity.sub):
            raise Refused(UNAUTHORIZED, 401, DISABLED)
        await self._attach(token, origin, ip)
        self._accept_pending()
        if self.closing or self.client_gone:
            return
        self._go_live()

    async def _check(self, token: str, ip: str) -> tuple[Identity | None, str]:
        """The token and, when it is good, the rate limit (``Refused`` 4429 over it); a few
        upgrades at a time."""
        async with self.edge.checks:
            identity, problem = await self.bridge.verify(token)
            if identity is not None:
                await self.bridge.limit(ip, identity)
        return identity, problem

    def _accept(self, proto: ServerProtocol, response: Any) -> None:
        proto.send_response(response)
        self._write_raw(b"".join(proto.data_to_send()))
        self.accepted = True

    def _accept_pending(self) -> None:
        """Send the 101 held back for the notifier's; also before any close of ours, since a
        browser sees close codes only, never the handshake's status."""
        if self.pending_accept is not None and not self.accepted:
            proto, response = self.pending_accept
            self.pending_accept = None
            self._accept(proto, response)

    def _secured(self, headers: RawHeaders) -> RawHeaders:
        return with_security(headers, self.edge.security, self.rid)

    def _refuse(self, exc: Refused) -> None:
        """Before the 101: an HTTP status; after: the matching close code."""
        if self.client_gone:
            return
        self._leave_trunk(1000)
        self._accept_pending()
        if not self.accepted:
            body = json.dumps(error_body(exc.status, exc.message)).encode()
            head = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            lines = [f"HTTP/1.1 {exc.status} {_reason_phrase(exc.status)}".encode()]
            lines += [k + b": " + v for k, v in self._secured(head)]
            self._write_raw(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            self.transport.close()
            return
        self.close_client(exc.code, exc.message)

    def _write_raw(self, data: bytes) -> None:
        if not self.client_gone and not self.transport.is_closing():
            self.transport.write(data)

    # ---- before the session is live: the first-frame auth --------------------------------------
    async def _first_frame_token(self) -> str | None:
        """``{"type": "auth", "token": ...}`` as the first message (text or binary, fragmented
        or not, as the notifier's own socket takes it); None when the client left."""
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.bridge.auth_timeout_s):
                while True:
                    try:
                        frame = wf.parse_frame(self.inbuf, self.edge.max_client_bytes)
                    except ValueError:
                        raise Refused(1009, 413, "message too big") from None
                    if frame is not None:
                        del self.inbuf[: frame.size]
                        if frame.opcode == wf.OP_PING:
                            self._write_raw(wf.server_frame(wf.OP_PONG, frame.payload))
                            continue
                        if frame.opcode == wf.OP_CLOSE:
                            self._answer_close(frame.payload)
                            return None
                        if frame.opcode not in (wf.OP_TEXT, wf.OP_BINARY, wf.OP_CONT):
                            continue  # a pong
                        if (frame.opcode == wf.OP_CONT) != bool(parts):
                            raise Refused(UNAUTHORIZED, 401, "authentication required")
                        parts.append(frame.payload)
                        size += len(frame.payload)
                        if size > PRE_SPLICE_BYTES:
                            raise Refused(UNAUTHORIZED, 401, "authentication required")
                        if frame.fin:
                            break
                        continue
                    if self.client_gone:
                        return None
                    if len(self.inbuf) > PRE_SPLICE_BYTES:
                        raise Refused(UNAUTHORIZED, 401, "authentication required")
                    self.more.clear()
                    await self.more.wait()
        except TimeoutError as exc:
            raise Refused(UNAUTHORIZED, 401, "authentication timed out") from exc
        try:
            data = json.loads(b"".join(parts))
        except ValueError:  # UnicodeDecodeError included
            data = None
        if (
            not isinstance(data, dict)
            or data.get("type") != "auth"
            or not isinstance(data.get("token"), str)
            or not data["token"]
        ):
            raise Refused(UNAUTHORIZED, 401, "authentication required")
        return str(data["token"])

    def _answer_close(self, payload: bytes) -> None:
        """The client closed before it was live: echo its code, then TCP goes."""
        self._write_raw(wf.server_frame(wf.OP_CLOSE, payload[:2]))
        self.transport.close()

    # ---- the notifier's side: a trunk ----------------------------------------------------------
    async def _attach(self, token: str, origin: str, ip: str) -> None:
        """``open`` on a trunk, then wait for the notifier to register the agent (``accepted``)."""
        try:
            trunk = await self.edge.trunks.attach()
        except TrunkDown as exc:
            log.warning("notifier unreachable", extra={"error": str(exc)})
            raise Refused(1013, 503, "notifier unavailable") from exc
        self.trunk = trunk
        self.cid = trunk.open(self, token, origin, ip, self.rid)
        try:
            async with asyncio.timeout(self.bridge.open_timeout_s):
                refused = await self.opened
        except TimeoutError as exc:
            log.warning("notifier did not answer an open in time")
            raise Refused(1013, 503, "notifier unavailable") from exc
        if refused is not None:
            code, reason = refused
            status = 401 if code == UNAUTHORIZED else 403 if code == 4403 else 503
            raise Refused(code, status, reason or "refused by notifier")

    def trunk_accepted(self) -> None:
        if not self.opened.done():
            self.opened.set_result(None)

    def trunk_refused(self, code: int, reason: str) -> None:
        self.trunk = None  # the notifier has forgotten this cid
        if not self.opened.done():
            self.opened.set_result((code, reason))

    def trunk_frames(self, data: bytes, broadcast: bool = True) -> None:
        if self.live:
            self.out.append(data)
            self.out_broadcast = self.out_broadcast or broadcast
        elif not self.closing:
            self.held.append(data)  # accepted, the 101 not out yet: after it

    def trunk_flush(self) -> None:
        """Write what this read of the trunk brought: one write, or close a slow consumer."""
        if not self.out:
            return
        chunks, self.out = self.out, []
        broadcast, self.out_broadcast = self.out_broadcast, False
        if self.closing or self.client_gone or self.transport.is_closing():
            return
        # Live frames for a socket that stays full: a slow consumer. Frames for this agent
        # alone (a replay) are paced by wait/go, so only a far larger backlog is one.
        limit = self.edge.slow_bytes if broadcast else DIRECT_BACKLOG * self.edge.slow_bytes
        if self.transport.get_write_buffer_size() > limit:
            metrics.WS_SLOW_CLOSED.inc()
            log.warning("closing slow consumer")
            self._leave_trunk(SLOW_CONSUMER)
            self.close_client(SLOW_CONSUMER, "slow consumer")
            return
        self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def trunk_close(self, code: int, reason: str) -> None:
        """The notifier closes the agent's socket (token expired, disabled, slow, restart)."""
        self.trunk = None
        if self.live:
            self.close_client(code, reason)
        else:
            self.early_close = (code, reason)
            if not self.opened.done():
                self.opened.set_result((code, reason))

    def trunk_lost(self) -> None:
        """The notifier vanished: 1011 (the client reconnects and resumes elsewhere)."""
        self.trunk = None
        if not self.opened.done():
            self.opened.set_result((1013, "notifier unavailable"))
        elif self.live:
            self.trunk_flush()
            self.close_client(1011, "")
        else:
            self.early_close = (1011, "")

    def trunk_hold(self, hold: bool) -> None:
        """The notifier has this many of the client's frames still to handle: stop reading its
        socket (TCP pushes back on the client) until it says so, instead of closing it."""
        self.on_hold = hold
        if self.client_gone or self.closing:
            return
        if hold and not self.paused_reading_client:
            self.paused_reading_client = True
            self.transport.pause_reading()
        elif not hold and self.paused_reading_client and self.live:
            self._resume_client_reading()

    def client_full(self, full: bool) -> None:
        """The client's socket is full (or drained): the notifier's sends to it (a resume's
        replay) wait, as they would on a socket of their own."""
        self.full = full
        if self.trunk is not None and self.live:
            self.trunk.full(self.cid, full)

    def _leave_trunk(self, code: int) -> None:
        trunk, self.trunk = self.trunk, None
        if trunk is not None and self.cid:
            trunk.closed(self.cid, code)

    # ---- live ---------------------------------------------------------------------------------
    def _go_live(self) -> None:
        if self.early_close is not None:
            self.close_client(*self.early_close)
            return
        proto = self.proto
        assert proto is not None
        # The cap on a client's message (fragments summed), enforced by websockets: 1009.
        proto.max_message_size = self.edge.max_client_bytes
        self.live = True
        metrics.WS_OPEN.inc()
        self.edge.live(self)
        if self.held:
            self.out, self.held = self.held, []
            self.trunk_flush()
        if self.inbuf:
            data, self.inbuf = bytes(self.inbuf), bytearray()
            self._client_frames(data)
        if self.paused_reading_client and not self.on_hold:
            self._resume_client_reading()

    def from_client(self, data: bytes) -> None:
        if self.live or self.closing:
            self._client_frames(data)
        else:
            self.inbuf += data
            self.more.set()
            if len(self.inbuf) > PRE_SPLICE_BYTES and not self.paused_reading_client:
                # Nothing goes anywhere before the session is live: stop reading until then.
                self.paused_reading_client = True
                self.transport.pause_reading()

    def _client_frames(self, data: bytes) -> None:
        """The client's frames, parsed by websockets (masking, fragments, the cap, the close
        handshake); whole messages, their UTF-8 checked, go to the notifier."""
        proto = self.proto
        if proto is None:
            return
        proto.receive_data(data)
        for event in proto.events_received():
            if not isinstance(event, Frame):
                continue
            op = event.opcode
            if op is Opcode.PONG:
                if event.data == self.ping_data:  # an unsolicited pong proves nothing
                    self.ping_sent = None
            elif op is Opcode.TEXT or op is Opcode.BINARY or op is Opcode.CONT:
                self._message_part(event)
        self._write_proto()
        if proto.state is not State.OPEN and not self.closing:
            # The client closed, or broke the protocol (websockets sent the close: 1009, 1007...).
            rcvd, sent = proto.close_rcvd, proto.close_sent
            code = rcvd.code if rcvd is not None else sent.code if sent is not None else 1006
            self._leave_trunk(code)
            self._closing()

    def _message_part(self, frame: Frame) -> None:
        if frame.opcode is not Opcode.CONT:
            self.fragment_opcode = frame.opcode
            self.fragments = []
        self.fragments.append(bytes(frame.data))
        if not frame.fin:
            return
        payload = self.fragments[0] if len(self.fragments) == 1 else b"".join(self.fragments)
        self.fragments = []
        trunk = self.trunk
        if trunk is None or self.closing or not self.live:
            return
        if self.fragment_opcode is Opcode.TEXT:
            # websockets' sans-I/O layer leaves this to its callers (its asyncio one does it).
            try:
                payload.decode()
            except UnicodeDecodeError as exc:
                assert self.proto is not None
                self.proto.fail(1007, f"invalid UTF-8 at position {exc.start}")
                return
            trunk.text(self.cid, payload)
        else:
            trunk.binary(self.cid, payload)

    def _write_proto(self) -> None:
        """What websockets has to send (pongs, close frames); an empty chunk means TCP goes."""
        assert self.proto is not None
        for chunk in self.proto.data_to_send():
            if chunk:
                self._write_raw(chunk)
            elif not self.transport.is_closing():
                self.transport.close()

    def heartbeat(self, now: float, interval: float, timeout: float) -> None:
        if self.closing or self.client_gone or not self.live or self.proto is None:
            return
        if self.ping_sent is not None:
            if now - self.ping_sent >= timeout:
                self._leave_trunk(1006)
                self.close_client(1011, "keepalive ping timeout")
            return
        self.ping_sent = now
        self.ping_data = os.urandom(4)
        self.proto.send_ping(self.ping_data)
        self._write_proto()

    def client_lost(self) -> None:
        self.client_gone = True
        self.server_state.connections.discard(self.client)
        self.more.set()
        if self.close_timer is not None:
            self.close_timer.cancel()
        if self.task is not None and not self.task.done() and not self.live:
            self.task.cancel()
        if self.live:
            metrics.WS_OPEN.dec()
            self.edge.sessions.discard(self)
        rcvd = self.proto.close_rcvd if self.proto is not None else None
        self._leave_trunk(rcvd.code if rcvd is not None else 1001)
        if self.unregister is not None:
            self.unregister()
            self.unregister = None

    # ---- our own close frames -------------------------------------------------------------------
    def close_client(self, code: int, reason: str) -> None:
        """Our close frame to the client, then wait for its own (or give up after a while)."""
        if self.closing or self.client_gone:
            return
        proto = self.proto
        if proto is None or not self.accepted or proto.state is not State.OPEN:
            self.transport.close()
            return
        proto.send_close(code, reason)
        self._write_proto()
        self._closing()

    def _closing(self) -> None:
        self.closing = True
        self.out.clear()
        self.held.clear()
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(CLOSE_TIMEOUT_S, _abort, self.transport)
        if self.paused_reading_client:
            self._resume_client_reading()
        if self.inbuf:  # bytes from before the session was live: the client's close is there
            data, self.inbuf = bytes(self.inbuf), bytearray()
            self._client_frames(data)

    def revoke(self) -> None:
        """The account was disabled: 4401 to the client, a close to the notifier."""
        self.loop.call_soon(self._end, UNAUTHORIZED, DISABLED, 1000)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: 1012 "service restart", the SPA reconnects elsewhere."""
        self._accept_pending()
        if not self.accepted:
            self.transport.close()
            return
        self._end(1012, "service restart", 1001)

    def _end(self, code: int, reason: str, upstream_code: int) -> None:
        if self.client_gone:
            return
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._leave_trunk(upstream_code)
        self._accept_pending()
        if not self.accepted:
            self.transport.close()
            return
        self.close_client(code, reason)

    def _resume_client_reading(self) -> None:
        self.paused_reading_client = False
        with contextlib.suppress(Exception):
            self.transport.resume_reading()


def _abort(transport: asyncio.Transport) -> None:
    with contextlib.suppress(Exception):
        transport.abort()


def _select_subprotocol(protocol: ServerProtocol, offered: Any) -> Subprotocol | None:
    # Never select bearer.*: that would echo the token in the response.
    return Subprotocol(PROTOCOL) if PROTOCOL in offered else None


def _offered(headers: Headers) -> list[str]:
    return [
        p.strip()
        for value in headers.get_all("Sec-WebSocket-Protocol")
        for p in value.split(",")
        if p.strip()
    ]


def _header_value(head: bytes, name: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip().decode("latin-1")
    return None


def _headers_of(raw: RawHeaders) -> Headers:
    h = Headers()
    for k, v in raw:
        h[k.decode("latin-1")] = v.decode("latin-1")
    return h


def _reason_phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
