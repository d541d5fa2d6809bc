"""The WebSocket half: check Origin and token, then bridge frames to the notifier.

The fast path is ``services.gateway.wsedge`` (a byte splice after the same checks, ADR 0004);
this Starlette endpoint copies frames and serves only an upgrade sent on a kept-alive HTTP
connection, which never reaches the splice's front door. Both share the checks below.

Browsers send cookies and no CORS preflight with a WebSocket handshake, so Origin is checked here
by hand. The token travels as a ``bearer.<token>`` subprotocol (browsers cannot set headers on a
WebSocket) or, for clients that keep it out of the handshake, as the first frame. Close codes go
through both ways so the SPA sees the notifier's 44xx codes as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketState
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Origin, Subprotocol

from libs.common.tokens import Identity, InvalidToken, bearer_from_subprotocols
from libs.common.web import error_body
from services.gateway import metrics
from services.gateway.proxy import REQUEST_ID_KEY, client_ip
from services.gateway.ratelimit import RateLimiter
from services.gateway.tokencache import DISABLED, Verifier

log = logging.getLogger("chatflow.gateway.ws")
# The upstream handshake carries the token as a subprotocol and websockets logs handshakes at
# DEBUG: its logger for our client stays at WARNING whatever the service's log level.
_client_log = logging.getLogger("chatflow.gateway.ws.upstream")
_client_log.setLevel(logging.WARNING)

PROTOCOL = "chatflow.v1"
UNAUTHORIZED, FORBIDDEN, THROTTLED = 4401, 4403, 4429


def sendable(code: int | None, abnormal: int) -> int:
    """A close code that may go on the wire (RFC 6455 §7.4.1): "no status" becomes 1000, a
    connection lost without a close frame becomes ``abnormal``."""
    if code in (1004, 1005):
        return 1000
    if code is None or code in (1006, 1015) or not 1000 <= code <= 4999:
        return abnormal
    return code


def _reason(reason: str | None) -> str:
    """Close reasons are limited to 123 bytes of UTF-8."""
    data = (reason or "").encode()[:123]
    return data.decode(errors="ignore")


class Refused(Exception):
    def __init__(self, code: int, status: int, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


class WsBridge:
    def __init__(
        self,
        upstream_url: str,
        allowed_origins: list[str],
        verifier: Verifier,
        limiter: RateLimiter,
        ssl_context: ssl.SSLContext,
        auth_timeout_s: float,
        open_timeout_s: float,
        max_message_bytes: int,
        is_disabled: Callable[[str], bool] = lambda sub: False,
    ) -> None:
        self.url = upstream_url
        self.origins = frozenset(allowed_origins)
        self.verifier = verifier
        self.limiter = limiter
        self.ssl = ssl_context
        self.auth_timeout_s = auth_timeout_s
        self.open_timeout_s = open_timeout_s
        self.max_message_bytes = max_message_bytes
        self.is_disabled = is_disabled
        # Open sessions per token subject, each with the callback that ends it when disabled.
        self._sessions: dict[str, set[Callable[[], None]]] = {}

    async def handle(self, websocket: WebSocket) -> None:
        """The /ws endpoint (a bound method, so Starlette treats it as a WebSocket session)."""
        try:
            await self._session(websocket)
        except Refused as exc:
            await self._refuse(websocket, exc)

    async def _refuse(self, websocket: WebSocket, exc: Refused) -> None:
        """Before accepting: a real HTTP status; after: the matching 44xx close code."""
        with contextlib.suppress(Exception):
            if websocket.application_state == WebSocketState.CONNECTING:
                if "websocket.http.response" in websocket.scope.get("extensions", {}):
                    body = error_body(exc.status, exc.message)
                    await websocket.send_denial_response(JSONResponse(body, exc.status))
                else:
                    await websocket.close(exc.code, exc.message)
            elif websocket.application_state == WebSocketState.CONNECTED:
                await websocket.close(exc.code, exc.message)

    async def _session(self, websocket: WebSocket) -> None:
        origin = websocket.headers.get("origin")
        if origin is None or origin not in self.origins:
            raise Refused(FORBIDDEN, 403, "origin not allowed")
        offered: list[str] = list(websocket.scope.get("subprotocols", []))
        token = bearer_from_subprotocols(offered)
        ip = client_ip(websocket.scope)
        if token is not None:
            identity, problem = await self.verify(token)
            if identity is None:
                # Accept first: a browser only sees close codes, never the handshake's status.
                await websocket.accept(PROTOCOL if PROTOCOL in offered else None)
                raise Refused(UNAUTHORIZED, 401, problem)
            # Accepted before the limit too: throttling must reach a browser as 4429.
            await websocket.accept(PROTOCOL if PROTOCOL in offered else None)
            await self.limit(ip, identity)
        else:
            await websocket.accept(PROTOCOL if PROTOCOL in offered else None)
            token = await self._first_frame_token(websocket)
            if token is None:
                return
            identity, problem = await self.verify(token)
            if identity is None:
                raise Refused(UNAUTHORIZED, 401, problem)
            await self.limit(ip, identity)
        # Registered before the upstream handshake, so a disable during it is not missed.
        revoked = asyncio.Event()
        unregister = self.register(identity.sub, revoked.set)
        if self.is_disabled(identity.sub):  # disabled while we were accepting
            revoked.set()
        try:
            upstream = await self._connect(websocket, token, origin, ip)
            metrics.WS_OPEN.inc()
            try:
                await self._pump(websocket, upstream, revoked)
            finally:
                metrics.WS_OPEN.dec()
        finally:
            unregister()

    def register(self, sub: str, end: Callable[[], None]) -> Callable[[], None]:
        """``end()`` runs if ``sub`` is disabled while the session is open; returns the undo."""
        sessions = self._sessions.setdefault(sub, set())
        sessions.add(end)

        def unregister() -> None:
            sessions.discard(end)
            if not sessions and self._sessions.get(sub) is sessions:
                del self._sessions[sub]

        return unregister

    async def verify(self, token: str) -> tuple[Identity | None, str]:
        """The identity, or None and the close reason ("account disabled" is worth telling)."""
        try:
            return await self.verifier.verify(token), ""
        except InvalidToken as exc:
            return None, DISABLED if str(exc) == DISABLED else "invalid token"
        except Exception as exc:
            log.warning("token verification failed", extra={"error": repr(exc)})
            raise Refused(1013, 503, "cannot verify tokens right now") from exc

    def disable(self, user_id: str) -> None:
        """The account was disabled: its sessions (bridged or spliced) close with 4401 now."""
        for end in list(self._sessions.get(user_id, ())):
            try:
                end()
            except Exception:
                log.exception("closing a disabled user's session failed")

    async def limit(self, ip: str, identity: Identity) -> None:
        if await self.limiter.check(ip, identity.sub) is not None:
            raise Refused(THROTTLED, 429, "too many requests")

    async def _first_frame_token(self, websocket: WebSocket) -> str | None:
        """``{"type": "auth", "token": ...}`` as the first frame; None when the client left."""
        try:
            message = await asyncio.wait_for(websocket.receive(), self.auth_timeout_s)
        except TimeoutError as exc:
            raise Refused(UNAUTHORIZED, 401, "authentication timed out") from exc
        if message["type"] == "websocket.disconnect":
            return None
        try:
            frame = json.loads(message.get("text") or "")
        except ValueError:
            frame = None
        if (
            not isinstance(frame, dict)
            or frame.get("type") != "auth"
            or not isinstance(frame.get("token"), str)
            or not frame["token"]
        ):
            raise Refused(UNAUTHORIZED, 401, "authentication required")
        return str(frame["token"])

    async def _connect(
        self, websocket: WebSocket, token: str, origin: str, ip: str
    ) -> ClientConnection:
        rid = str(websocket.scope.get(REQUEST_ID_KEY, ""))
        try:
            return await connect(
                self.url,
                subprotocols=[Subprotocol(PROTOCOL), Subprotocol("bearer." + token)],
                ssl=self.ssl,
                origin=Origin(origin),
                compression=None,
                additional_headers={
                    "X-Forwarded-For": ip,
                    "X-Forwarded-Proto": "https",
                    "X-Request-Id": rid,
                },
                user_agent_header=None,
                proxy=None,
                open_timeout=self.open_timeout_s,
                max_size=self.max_message_bytes,
                logger=_client_log,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise Refused(4000 + status, status, "refused by notifier") from exc
            log.warning("notifier refused the handshake", extra={"status": status})
            raise Refused(1013, 503, "notifier unavailable") from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            # Only the exception type: its text could echo handshake headers.
            log.warning("notifier unreachable", extra={"error": type(exc).__name__})
            raise Refused(1013, 503, "notifier unavailable") from exc

    async def _pump(
        self, websocket: WebSocket, upstream: ClientConnection, revoked: asyncio.Event
    ) -> None:
        async def downstream() -> None:
            async for data in upstream:
                if isinstance(data, str):
                    await websocket.send_text(data)
                else:
                    await websocket.send_bytes(data)

        async def upstream_side() -> dict[str, Any]:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return cast(dict[str, Any], message)
                if message.get("text") is not None:
                    await upstream.send(message["text"])
                elif message.get("bytes") is not None:
                    await upstream.send(message["bytes"])

        down = asyncio.create_task(downstream())
        up = asyncio.create_task(upstream_side())
        cut = asyncio.create_task(revoked.wait())
        try:
            done, _ = await asyncio.wait([down, up, cut], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (down, up, cut):
                t.cancel()
            await asyncio.gather(down, up, cut, return_exceptions=True)
        if revoked.is_set():
            with contextlib.suppress(Exception):
                await upstream.close(1000, DISABLED)
            with contextlib.suppress(Exception):
                if websocket.application_state == WebSocketState.CONNECTED:
                    await websocket.close(UNAUTHORIZED, DISABLED)
            return
        client_left = _result(up, done)
        if client_left is not None or not isinstance(_error(down, done), ConnectionClosed | None):
            # The client left (or sending to it failed): tell the notifier, with the client's code.
            code = sendable(client_left.get("code"), 1001) if client_left else 1001
            reason = _reason(client_left.get("reason")) if client_left else ""
            with contextlib.suppress(Exception):
                await upstream.close(code, reason)
            return
        # The notifier closed (or a send to it failed): pass its code on to the client.
        with contextlib.suppress(Exception):
            await upstream.close()
        with contextlib.suppress(Exception):
            if websocket.application_state == WebSocketState.CONNECTED:
                await websocket.close(
                    sendable(upstream.close_code, 1011), _reason(upstream.close_reason)
                )


def _result(task: asyncio.Task[Any], done: set[asyncio.Task[Any]]) -> Any:
    if task in done and not task.cancelled() and task.exception() is None:
        return task.result()
    return None


def _error(task: asyncio.Task[Any], done: set[asyncio.Task[Any]]) -> BaseException | None:
    if task in done and not task.cancelled():
        return task.exception()
    return None
