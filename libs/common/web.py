"""The HTTP side every service shares: ops routes, JSON errors, request ids, a uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from libs.common.logs import correlation_id
from libs.common.tokens import Identity, InvalidToken, TokenVerifier

log = logging.getLogger("chatflow.web")
Check = Callable[[], Awaitable[bool]]

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "throttled",
    500: "internal",
    502: "bad_gateway",
    503: "unavailable",
}


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(status, message)
        self.code = code or _CODES.get(status, "error")


async def read_limited_body(request: Request, limit: int, too_large: str) -> bytes:
    """The request body, refused with 413 ``too_large`` as soon as it is known to pass ``limit``
    (from Content-Length, or while streaming: a body is never read to its end first)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, too_large)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code or _CODES.get(status, "error"), "message": message}}


def install_errors(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 401:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), code), exc.status_code, headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()[:5]
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errs)
        return JSONResponse(error_body(422, msg or "invalid request"), 422)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        return _unhandled(exc)

    @app.middleware("http")
    async def _request_id(request: Request, call_next: Any) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        token = correlation_id.set(rid)
        try:
            response: Response = await call_next(request)
        except Exception as exc:
            # Answer here: an exception that reaches Starlette's outer handler is re-raised after
            # the 500 and uvicorn then drops the keep-alive connection under the gateway's feet.
            response = _unhandled(exc)
        finally:
            correlation_id.reset(token)
        response.headers["x-request-id"] = rid
        return response


def _unhandled(exc: Exception) -> JSONResponse:
    """A 500 with the traceback logged; a client that left while its body was being read
    (the gateway cut an upload off at its size limit, say) is no error of ours: one info line."""
    if isinstance(exc, ClientDisconnect):
        log.info("client disconnected before its request was read")
        return JSONResponse(error_body(400, "client disconnected"), 400)
    log.error("unhandled error", exc_info=exc)
    return JSONResponse(error_body(500, "internal error"), 500)


def install_ops(app: FastAPI, checks: dict[str, Check]) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        results: dict[str, bool] = {}
        for name, check in checks.items():
            try:
                results[name] = bool(await asyncio.wait_for(check(), 2.0))
            except Exception:
                results[name] = False
        ok = all(results.values())
        return JSONResponse({"ready": ok, "checks": results}, 200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest().decode(), media_type=CONTENT_TYPE_LATEST)


def bearer_token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token")
    return token.strip()


def identity_dependency(verifier_of: Callable[[Request], TokenVerifier]) -> Any:
    """A FastAPI dependency that verifies the bearer token and returns the Identity."""

    async def dep(request: Request) -> Identity:
        try:
            return await verifier_of(request).verify(bearer_token(request))
        except InvalidToken as exc:
            raise ApiError(401, str(exc)) from exc

    return dep


def server(app: Any, host: str, port: int, cert: str, key: str) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=cert,
        ssl_keyfile=key,
        log_config=None,
        access_log=False,
        lifespan="off",
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
        ws="websockets-sansio",
    )
    srv = uvicorn.Server(config)
    # The service owns SIGTERM/SIGINT (it drains consumers first); uvicorn must not take them.
    srv.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    return srv
