"""The public app on 8443: edge headers, CORS, the SPA placeholder, ``/ws`` and the proxy.

Layers, outermost first: ``Edge`` (request id, security headers on every response, including
CORS preflights and refused WebSocket handshakes), Starlette's CORS middleware (pure ASGI, so
bodies still stream), then a router whose default is the proxy.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, Router, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send

from libs.common.logs import correlation_id
from libs.common.web import error_body
from services.gateway.domain.headers import header, sane_request_id, with_security
from services.gateway.proxy import REQUEST_ID_KEY, Proxy
from services.gateway.ws import WsBridge

SPA_PLACEHOLDER = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>ChatFLOW</title></head>
<body><h1>ChatFLOW</h1><p>The agent app is not deployed here yet.</p></body>
</html>
"""


async def spa(request: Request) -> Response:
    """Placeholder for the SPA's entry points until the web app ships."""
    if request.method not in ("GET", "HEAD"):
        return JSONResponse(error_body(405, "method not allowed"), 405, {"allow": "GET, HEAD"})
    return HTMLResponse(SPA_PLACEHOLDER, headers={"cache-control": "no-cache"})


class Edge:
    """Request id for every request; security headers on every HTTP response it sends."""

    def __init__(self, app: Any, security: list[tuple[bytes, bytes]]) -> None:
        self.app = app
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        value = header(scope["headers"], b"x-request-id")
        rid = sane_request_id(value.decode("latin-1") if value is not None else None)
        scope[REQUEST_ID_KEY] = rid
        token = correlation_id.set(rid)

        async def send_secured(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                message["headers"] = with_security(
                    list(message.get("headers", [])), self.security, rid
                )
            await send(message)

        try:
            await self.app(scope, receive, send_secured)
        finally:
            correlation_id.reset(token)


def build_public_app(
    proxy: Proxy, bridge: WsBridge, allowed_origins: list[str], security: list[tuple[bytes, bytes]]
) -> Edge:
    router = Router(
        routes=[
            Route("/", spa, methods=None),
            Route("/callback", spa, methods=None),
            WebSocketRoute("/ws", bridge.handle),
        ],
        redirect_slashes=False,
        default=proxy,
    )
    cors = CORSMiddleware(
        router,
        allow_origins=allowed_origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["authorization", "content-type", "x-request-id", "idempotency-key"],
        allow_credentials=True,
        expose_headers=["x-request-id", "location", "retry-after"],
        max_age=600,
    )
    return Edge(cors, security)
