"""``/ws`` without copying frames: check the upgrade, open the notifier's socket, splice bytes.

``FrontDoor`` is the public listener's protocol (uvicorn's ``Config.http``). It reads the first
request head of each connection: a WebSocket upgrade of ``/ws`` becomes a ``Session``, anything
else is handed, with the bytes read so far, to uvicorn's own HTTP protocol, as uvicorn itself
hands an upgraded connection to its WebSocket protocol (``transport.set_protocol``). An upgrade
sent later on a kept-alive HTTP connection still reaches the Starlette route and the frame-copy
bridge (``services.gateway.ws.WsBridge``), which enforces the same rules; browsers and websockets
clients open a connection per WebSocket, so that path is the exception (ADR 0004).

A session checks what the bridge checks (Origin, the ``bearer.`` subprotocol or the first-frame
``auth``, the rate limit, a disabled account), connects to the notifier as a WebSocket client,
answers 101 itself (no extension: the bytes of both sides must mean the same thing) and from
then on writes what one side sends to the other. With the token in the subprotocol the 101 goes
out only once the notifier's has come back, and the notifier registers a connection before its
101 can be read: a client that sees its socket open gets every frame sent from then on (a 101
first let frames pass a busy gateway's new connections by, unseen, found by the bench at 1,000
agents). A first-frame ``auth`` needs the 101 before the token; that client is live once the
notifier answers its frames. Once spliced, the client's frames are already masked as
a client's must be, the notifier's are unmasked as a server's are, so nothing is re-encoded.
A ``FrameCursor`` per direction follows frame boundaries from the headers alone: the gateway's
own close frames (4401 when the account is disabled, 1012 on restart, 1009 for a frame over the
cap, 1011 when the notifier vanishes) go between two frames, and the client's frames are held to
the size cap. Close frames of either side pass through unchanged, so close codes do too. Flow
control is the transports' own: a side that can't take more pauses reading on the other side.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any, ClassVar, cast
from urllib.parse import urlsplit

from uvicorn.protocols.http.auto import AutoHTTPProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from libs.common.logs import correlation_id
from libs.common.tokens import Identity, bearer_from_subprotocols
from libs.common.web import error_body
from services.gateway import metrics
from services.gateway.domain import wsframes as wf
from services.gateway.domain.headers import sane_request_id, with_security
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
PRE_SPLICE_BYTES = 64 * 1024  # client bytes buffered before the splice (an auth frame is small)
STALL_TIMEOUT_S = 60.0  # a client that takes no bytes for this long is dropped (see pause_upstream)
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
    """What every session shares: the bridge's checks and settings, the security headers."""

    def __init__(self, bridge: WsBridge, security: RawHeaders, max_client_bytes: int) -> None:
        self.bridge = bridge
        self.security = security
        self.max_client_bytes = max_client_bytes  # largest client message (as the notifier's)
        # Each check takes a Redis connection for the rate limit: a reconnect storm of thousands
        # must not drain the pool the gateway's consumers share.
        self.checks = asyncio.Semaphore(CONCURRENT_CHECKS)


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
        self.s.pause_upstream(True)

    def resume_writing(self) -> None:
        self.s.pause_upstream(False)

    def shutdown(self) -> None:
        self.s.shutdown()


class UpstreamSide(asyncio.Protocol):
    def __init__(self, session: Session) -> None:
        self.s = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.s.from_upstream(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.s.upstream_lost()

    def pause_writing(self) -> None:
        self.s.pause_client(True)

    def resume_writing(self) -> None:
        self.s.pause_client(False)


class Session:
    """One ``/ws`` connection: the upgrade and its checks, then the splice."""

    def __init__(self, edge: WsEdge, transport: asyncio.Transport, server_state: Any) -> None:
        self.edge = edge
        self.bridge = edge.bridge
        self.transport = transport
        self.server_state = server_state
        self.client = ClientSide(self)
        self.loop = asyncio.get_running_loop()
        self.rid = ""
        self.inbuf = bytearray()  # client bytes not yet forwarded (before the splice)
        self.more = asyncio.Event()  # client bytes arrived (before the splice)
        self.upbuf = bytearray()  # notifier bytes before its handshake completed
        self.up_head: asyncio.Future[tuple[bytes, bytes]] = self.loop.create_future()
        # Failed after nobody waits any more (the session ended first): not worth a warning.
        self.up_head.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.upstream: UpstreamSide | None = None
        self.up_cursor = wf.FrameCursor()  # client -> notifier
        self.down_cursor = wf.FrameCursor()  # notifier -> client
        self.message_bytes = 0  # of the client's fragmented message under way
        self.accepted = False  # 101 sent
        # The 101 waiting for the notifier's (see the module docstring): (protocol, response).
        self.pending_accept: tuple[ServerProtocol, Any] | None = None
        self.spliced = False
        self.client_gone = False
        self.upstream_gone = False
        self.client_sent_close = False
        self.notifier_sent_close = False
        self.cut: tuple[int, str] | None = None  # our close frame waiting for a boundary
        self.closing = False  # our close frame is out: waiting for the client's
        self.paused_reading_client = False
        self.paused_reading_upstream = False
        self.client_paused = False  # the client's transport is full
        self.upstream_paused = False
        self.unregister: Callable[[], None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.close_timer: asyncio.TimerHandle | None = None
        self.stall_timer: asyncio.TimerHandle | None = None

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
            identity, problem = await self._check(token, ip)
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
        # Registered before the upstream handshake, so a disable during it is not missed.
        self.unregister = self.bridge.register(identity.sub, self.revoke)
        if self.bridge.is_disabled(identity.sub):
            raise Refused(UNAUTHORIZED, 401, DISABLED)
        await self._connect(token, origin, ip)
        self._accept_pending()
        if self.cut is not None or self.client_gone:
            return
        self._splice()

    async def _check(self, token: str, ip: str) -> tuple[Identity | None, str]:
        """The token and, when it is good, the rate limit; a few upgrades at a time."""
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
        self._drop_upstream()  # refusals all come before the splice
        self.close_client(exc.code, exc.message)

    def _write_raw(self, data: bytes) -> None:
        if not self.client_gone and not self.transport.is_closing():
            self.transport.write(data)

    # ---- before the splice: the first-frame auth -----------------------------------------------
    async def _first_frame_token(self) -> str | None:
        """``{"type": "auth", "token": ...}`` as the first frame; None when the client left."""
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
                        break
                    if self.client_gone:
                        return None
                    if len(self.inbuf) > PRE_SPLICE_BYTES:
                        raise Refused(UNAUTHORIZED, 401, "authentication required")
                    self.more.clear()
                    await self.more.wait()
        except TimeoutError as exc:
            raise Refused(UNAUTHORIZED, 401, "authentication timed out") from exc
        try:
            data = json.loads(frame.payload) if frame.opcode == wf.OP_TEXT and frame.fin else None
        except ValueError:
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
        """The client closed before we spliced: echo its code, then TCP goes."""
        self._write_raw(wf.server_frame(wf.OP_CLOSE, payload[:2]))
        self.transport.close()

    # ---- the notifier's side ----------------------------------------------------------------
    async def _connect(self, token: str, origin: str, ip: str) -> None:
        b = self.bridge
        u = urlsplit(b.url)
        host, port = u.hostname or "127.0.0.1", u.port or 443
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {u.path or '/'}{'?' + u.query if u.query else ''} HTTP/1.1",
            f"Host: {u.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {PROTOCOL}, bearer.{token}",
            f"Origin: {origin}",
            f"X-Forwarded-For: {ip}",
            "X-Forwarded-Proto: https",
            f"X-Request-Id: {self.rid}",
        ]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        try:
            async with asyncio.timeout(b.open_timeout_s):
                _, up = await self.loop.create_connection(
                    lambda: UpstreamSide(self), host, port, ssl=b.ssl, server_hostname=host
                )
                self.upstream = up
                assert up.transport is not None
                up.transport.write(request)
                status_head, rest = await self.up_head
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            # Only the exception type: its text could echo handshake headers.
            log.warning("notifier unreachable", extra={"error": type(exc).__name__})
            self._drop_upstream()
            raise Refused(1013, 503, "notifier unavailable") from exc
        status, headers = _parse_response(status_head)
        if status != 101:
            self._drop_upstream()
            if status in (401, 403):
                raise Refused(4000 + status, status, "refused by notifier")
            log.warning("notifier refused the handshake", extra={"status": status})
            raise Refused(1013, 503, "notifier unavailable")
        if (
            headers.get("sec-websocket-accept") != wf.accept_key(key)
            or headers.get("upgrade", "").lower() != "websocket"
            or "sec-websocket-extensions" in headers
        ):
            self._drop_upstream()
            log.warning("notifier sent an invalid handshake")
            raise Refused(1013, 503, "notifier unavailable")
        self.upbuf = bytearray(rest)

    def _drop_upstream(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream_gone = True
            self.upstream.transport.abort()

    def from_upstream(self, data: bytes) -> None:
        if self.spliced:
            self._down(data)
            return
        if self.up_head.done():
            self.upbuf += data
            return
        self.upbuf += data
        end = self.upbuf.find(b"\r\n\r\n")
        if end >= 0:
            head, rest = bytes(self.upbuf[:end]), bytes(self.upbuf[end + 4 :])
            self.upbuf = bytearray()
            self.up_head.set_result((head, rest))
        elif len(self.upbuf) > MAX_HEAD:
            self.up_head.set_exception(ConnectionError("response head too long"))

    def upstream_lost(self) -> None:
        self.upstream_gone = True
        if not self.up_head.done():
            self.up_head.set_exception(ConnectionError("notifier closed"))
            return
        if not self.spliced or self.client_gone:
            return
        if self.paused_reading_client:
            self._resume_client_reading()
        if self.notifier_sent_close and self.client_sent_close:
            self.transport.close()  # both close frames went through: the handshake is done
        elif self.notifier_sent_close:
            self._await_client_close()
        else:
            self.close_client(1011, "")  # lost without a close frame

    # ---- the splice ---------------------------------------------------------------------------
    def _splice(self) -> None:
        self.spliced = True
        metrics.WS_OPEN.inc()
        if self.paused_reading_client and not self.upstream_paused:
            self._resume_client_reading()
        if self.upbuf:
            data, self.upbuf = bytes(self.upbuf), bytearray()
            self._down(data)
        if self.inbuf:
            data, self.inbuf = bytes(self.inbuf), bytearray()
            self._up(data)
        if self.upstream_gone:
            self.upstream_lost()

    def _down(self, data: bytes) -> None:
        """Notifier bytes to the client, unless our own close frame is under way."""
        if self.closing or self.client_gone:
            return
        headers = self.down_cursor.feed(data)
        if self.cut is not None:
            start = next((h.start for h in headers if h.start >= 0), None)
            if start is not None:
                self._write_raw(data[:start])
                self._send_cut()
            else:
                self._write_raw(data)
                if self.down_cursor.at_boundary:
                    self._send_cut()
            return
        for h in headers:
            if h.opcode == wf.OP_CLOSE:
                self.notifier_sent_close = True
        self._write_raw(data)

    def from_client(self, data: bytes) -> None:
        if self.closing:
            self._closing_input(data)
        elif self.spliced:
            self._up(data)
        else:
            self.inbuf += data
            self.more.set()
            if len(self.inbuf) > PRE_SPLICE_BYTES and not self.paused_reading_client:
                # Nothing goes anywhere before the splice: stop reading until it starts.
                self.paused_reading_client = True
                self.transport.pause_reading()

    def _up(self, data: bytes) -> None:
        """Client bytes to the notifier, each frame held to the size cap."""
        cap = self.edge.max_client_bytes
        for h in self.up_cursor.feed(data):
            if h.opcode == wf.OP_CLOSE:
                self.client_sent_close = True
            elif h.opcode not in wf.CONTROL:
                self.message_bytes = (
                    h.length if h.opcode != wf.OP_CONT else self.message_bytes + h.length
                )
                if self.message_bytes > cap:
                    if h.start > 0:
                        self._to_upstream(data[: h.start])
                    self._drop_upstream()
                    self.close_client(1009, "message too big")
                    return
        self._to_upstream(data)

    def _to_upstream(self, data: bytes) -> None:
        up = self.upstream
        if up is not None and up.transport is not None and not up.transport.is_closing():
            up.transport.write(data)

    def client_lost(self) -> None:
        self.client_gone = True
        self.server_state.connections.discard(self.client)
        self.more.set()
        for timer in (self.close_timer, self.stall_timer):
            if timer is not None:
                timer.cancel()
        if self.task is not None and not self.task.done() and not self.spliced:
            self.task.cancel()
        if self.spliced:
            metrics.WS_OPEN.dec()
            if not self.client_sent_close and not self.closing:
                self._close_upstream(1001, "")
            else:
                self._end_upstream()
        else:
            self._drop_upstream()
        if self.unregister is not None:
            self.unregister()
            self.unregister = None

    # ---- our own close frames -------------------------------------------------------------------
    def close_client(self, code: int, reason: str) -> None:
        """Send the client our close frame at the next boundary of the notifier's stream."""
        if self.closing or self.client_gone or self.cut is not None:
            return
        self.cut = (code, reason)
        if not self.spliced or self.down_cursor.at_boundary:
            self._send_cut()
        elif self.upstream_gone:
            self.transport.abort()  # the notifier's last frame will never end
        else:
            # Mid-frame: wait for its end, but not forever.
            self.close_timer = self.loop.call_later(CLOSE_TIMEOUT_S, _abort, self.transport)

    def _send_cut(self) -> None:
        assert self.cut is not None
        code, reason = self.cut
        self._write_raw(wf.server_frame(wf.OP_CLOSE, wf.close_payload(code, reason)))
        self._await_client_close()

    def _await_client_close(self) -> None:
        """Read the client's close frame (then close TCP), or give up after a while."""
        if self.closing:
            return
        self.closing = True
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(CLOSE_TIMEOUT_S, _abort, self.transport)
        if self.paused_reading_client:
            self._resume_client_reading()
        if self.client_sent_close:  # it already did (forwarded to a notifier now gone)
            self.transport.close()
            return
        if self.inbuf:
            data, self.inbuf = bytes(self.inbuf), bytearray()
            self._closing_input(data)

    def _closing_input(self, data: bytes) -> None:
        for h in self.up_cursor.feed(data):
            if h.opcode == wf.OP_CLOSE:
                self.client_sent_close = True
                # The rest of that frame may still be on its way; the client waits for TCP to
                # close, so closing once the frame has begun is enough.
                self.transport.close()
                return

    def _close_upstream(self, code: int, reason: str) -> None:
        """A close frame of ours to the notifier if we are between two of the client's frames,
        else just the TCP close; either way the notifier forgets the connection."""
        up = self.upstream
        if up is None or up.transport is None or up.transport.is_closing():
            return
        if self.up_cursor.at_boundary and not self.client_sent_close:
            up.transport.write(
                wf.client_frame(wf.OP_CLOSE, wf.close_payload(code, reason), os.urandom(4))
            )
            self.client_sent_close = True
        self.loop.call_later(CLOSE_TIMEOUT_S, _abort, up.transport)

    def _end_upstream(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None and not up.transport.is_closing():
            self.loop.call_later(CLOSE_TIMEOUT_S, _abort, up.transport)

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
        self._accept_pending()
        if not self.accepted:
            self.transport.close()
            return
        if self.spliced:
            self._close_upstream(upstream_code, reason)
        else:
            self._drop_upstream()
        self.close_client(code, reason)

    # ---- flow control -------------------------------------------------------------------------
    def pause_upstream(self, paused: bool) -> None:
        """The client's transport is full (or has room again): stop (or go on) reading the
        notifier, whose own buffer then grows until it closes a slow consumer (4008)."""
        self.client_paused = paused
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        if paused:
            # The notifier closes a consumer this slow (4008), but its close frame waits behind
            # the bytes we hold: a client that never reads again is dropped here.
            self.stall_timer = self.loop.call_later(STALL_TIMEOUT_S, _abort, self.transport)
        up = self.upstream
        if up is None or up.transport is None or up.transport.is_closing():
            return
        if paused and not self.paused_reading_upstream:
            self.paused_reading_upstream = True
            up.transport.pause_reading()
        elif not paused and self.paused_reading_upstream:
            self.paused_reading_upstream = False
            up.transport.resume_reading()

    def pause_client(self, paused: bool) -> None:
        """The notifier's transport is full: stop reading the client until it drains."""
        self.upstream_paused = paused
        if self.client_gone or self.transport.is_closing():
            return
        if paused and not self.paused_reading_client and not self.closing:
            self.paused_reading_client = True
            self.transport.pause_reading()
        elif not paused and self.paused_reading_client:
            self._resume_client_reading()

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


def _parse_response(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names) of the notifier's handshake response."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        status = int(parts[1]) if len(parts) >= 2 and parts[0].startswith("HTTP/1.") else 0
    except ValueError:
        status = 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


def _reason_phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
