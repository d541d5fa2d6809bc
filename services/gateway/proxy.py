"""The HTTP half of the gateway: check, then stream the request to its upstream and back.

A plain ASGI app rather than a FastAPI route: bodies go through in chunks as they arrive (the size
limit is enforced while streaming), headers stay raw so duplicates such as ``Set-Cookie`` survive,
and there is no per-request framework work beyond what the edge needs. Requests go straight to
httpcore's pool (``services.gateway.upstream``), without httpx's client layers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore
from starlette.types import Receive, Scope, Send

from libs.common.tokens import Identity, InvalidToken
from libs.common.web import error_body
from services.gateway import metrics
from services.gateway.domain.headers import (
    downstream_response_headers,
    header,
    public_location,
    upstream_request_headers,
)
from services.gateway.domain.routing import has_dot_segments, resolve
from services.gateway.ratelimit import RateLimiter
from services.gateway.tokencache import Verifier

log = logging.getLogger("chatflow.gateway.proxy")

REQUEST_ID_KEY = "chatflow.request_id"


class BodyTooLarge(Exception):
    """The client sent more than ``max_body_bytes``."""


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


async def send_json(
    send: Send,
    status: int,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    code: str | None = None,
) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def bearer(raw: list[tuple[bytes, bytes]]) -> str | None:
    value = header(raw, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True, slots=True)
class Origin:
    """An upstream base URL taken apart once: scheme, host, port, path prefix, Host header."""

    scheme: bytes
    host: bytes
    port: int
    path: bytes
    host_header: bytes

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.encode("ascii")
        host = (parts.hostname or "").encode("idna")
        port = parts.port or (443 if scheme == b"https" else 80)
        netloc = b"[" + host + b"]" if b":" in host else host
        return cls(scheme, host, port, parts.path.rstrip("/").encode(), netloc + b":%d" % port)


# A request-target is visible ASCII only (RFC 9112 §3.2); anything else is percent-encoded.
_NOT_VCHAR = re.compile(rb"[^\x21-\x7e]")


def request_target(raw: bytes) -> bytes:
    return _NOT_VCHAR.sub(lambda m: b"%%%02X" % m.group()[0], raw)


class Proxy:
    def __init__(
        self,
        upstreams: dict[str, str],
        pool: httpcore.AsyncConnectionPool,
        verifier: Verifier,
        limiter: RateLimiter,
        max_body_bytes: int,
        timeouts: dict[str, float],
        body_buffer_bytes: int = 1024 * 1024,
        body_timeout_s: float = 30.0,
        max_in_flight_per_ip: int = 64,
    ) -> None:
        self.bases = {name: Origin.of(url) for name, url in upstreams.items()}
        self.internal = sorted(
            {o.scheme + b"://" + o.host_header.lower() for o in self.bases.values()}
        )
        self.pool = pool
        self.verifier = verifier
        self.limiter = limiter
        self.max_body = max_body_bytes
        self.timeouts = timeouts
        self.buffer_bytes = body_buffer_bytes
        self.body_timeout_s = body_timeout_s
        self.max_in_flight = max_in_flight_per_ip
        self.in_flight: dict[str, int] = {}  # per client IP: requests holding an upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # a WebSocket on a path other than /ws
            await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope["path"]
        target = resolve(path, scope["method"])
        if target is None:
            await send_json(send, 404, "not found")
            return
        if has_dot_segments(path):
            await send_json(send, 400, "dot segments are not allowed in paths")
            return
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        identity: Identity | None = None
        problem = "missing bearer token"
        if target.needs_token:
            token = bearer(raw)
            if token is not None:
                try:
                    identity = await self.verifier.verify(token)
                except InvalidToken as exc:
                    problem = str(exc)
                except Exception as exc:  # Redis down while fetching keys, for instance
                    log.warning("token verification failed", extra={"error": repr(exc)})
                    await send_json(send, 503, "cannot verify tokens right now")
                    return
        ip = client_ip(scope)
        retry_after = await self.limiter.check(ip, identity.sub if identity else None)
        if retry_after is not None:
            await send_json(
                send,
                429,
                "too many requests",
                [(b"retry-after", str(int(retry_after) + 1).encode())],
            )
            return
        if target.needs_token and identity is None:
            await send_json(
                send, 401, problem, [(b"www-authenticate", b'Bearer error="invalid_token"')]
            )
            return
        if target.upstream is None:
            await send_json(send, 404, "no such API route")
            return
        await self.forward(target.upstream, scope, receive, send, ip)

    def _body(
        self, raw: list[tuple[bytes, bytes]], receive: Receive
    ) -> AsyncIterator[bytes] | None:
        """The request body as a stream that stops at the limit; None when there is none."""
        length = header(raw, b"content-length")
        if length is not None:
            if length.strip() in (b"", b"0"):
                return None
            if int(length) > self.max_body:
                raise BodyTooLarge
        elif header(raw, b"transfer-encoding") is None:
            return None
        return self._stream(receive)

    async def _stream(self, receive: Receive) -> AsyncIterator[bytes]:
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                raise BodyTooLarge
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def forward(self, name: str, scope: Scope, receive: Receive, send: Send, ip: str) -> None:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        origin = self.bases[name]
        query: bytes = scope.get("query_string", b"")
        raw_path = origin.path + (scope.get("raw_path") or scope["path"].encode())
        target = request_target(raw_path + (b"?" + query if query else b""))
        rid = scope.get(REQUEST_ID_KEY, "")
        try:
            body = self._body(raw, receive)
        except (BodyTooLarge, ValueError) as exc:
            status = 413 if isinstance(exc, BodyTooLarge) else 400
            metrics.REQUESTS.labels(upstream=name, status=str(status)).inc()
            await send_json(
                send, status, "request body too large" if status == 413 else "bad length"
            )
            return
        content: bytes | AsyncIterator[bytes] = b""
        length = header(raw, b"content-length")
        if body is not None and (length is None or int(length) <= self.buffer_bytes):
            # Read a modest body whole before taking an upstream connection, under a deadline
            # for all of it: a client trickling its body holds no connection of the shared pool
            # (a trial's 300 anonymous tricklers made every request 503).
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    content = await _prefetch(body, self.buffer_bytes)
            except TimeoutError:
                metrics.REQUESTS.labels(upstream=name, status="408").inc()
                await send_json(
                    send, 408, "request body not received in time", [(b"connection", b"close")]
                )
                return
            except BodyTooLarge:
                metrics.REQUESTS.labels(upstream=name, status="413").inc()
                await send_json(send, 413, "request body too large")
                return
            except ClientGone:
                return
        elif body is not None:
            content = body  # an upload over the buffer streams; it counts against the IP's cap
        if self.max_in_flight and self.in_flight.get(ip, 0) >= self.max_in_flight:
            metrics.RATE_LIMITED.labels(by="in_flight").inc()
            await send_json(send, 429, "too many requests at once", [(b"retry-after", b"1")])
            return
        self.in_flight[ip] = self.in_flight.get(ip, 0) + 1
        try:
            await self._send_upstream(name, origin, target, rid, scope, receive, send, ip, content)
        finally:
            left = self.in_flight.pop(ip) - 1
            if left:
                self.in_flight[ip] = left

    async def _send_upstream(
        self,
        name: str,
        origin: Origin,
        target: bytes,
        rid: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        ip: str,
        content: bytes | AsyncIterator[bytes],
    ) -> None:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        headers = upstream_request_headers(
            raw, client_ip=ip, request_id=rid, host=header(raw, b"host")
        )
        headers.insert(0, (b"host", origin.host_header))
        if header(raw, b"content-length") is None:
            if isinstance(content, bytes):
                if content:  # a chunked body read whole: its length is known now
                    headers.append((b"content-length", str(len(content)).encode()))
            else:
                headers.append((b"transfer-encoding", b"chunked"))
        request = httpcore.Request(
            scope["method"].encode("ascii"),
            httpcore.URL(scheme=origin.scheme, host=origin.host, port=origin.port, target=target),
            headers=headers,
            content=content,
            extensions={"timeout": self.timeouts},
        )
        started = time.perf_counter()
        try:
            response = await self.pool.handle_async_request(request)
        except BodyTooLarge:
            metrics.REQUESTS.labels(upstream=name, status="413").inc()
            await send_json(send, 413, "request body too large")
            return
        except ClientGone:
            return
        except UPSTREAM_ERRORS as exc:
            status, message, code = _failure(exc)
            metrics.UPSTREAM_ERRORS.labels(upstream=name, kind=type(exc).__name__).inc()
            metrics.REQUESTS.labels(upstream=name, status=str(status)).inc()
            log.warning(
                "upstream request failed",
                extra={"upstream": name, "error": type(exc).__name__, "status": status},
            )
            await send_json(send, status, message, code=code)
            return
        metrics.UPSTREAM_SECONDS.labels(upstream=name).observe(time.perf_counter() - started)
        metrics.REQUESTS.labels(upstream=name, status=str(response.status)).inc()
        # The request body is complete by now, so ``receive`` only has a disconnect left to say;
        # watching for it stops a large download from being read to the end for nobody.
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": public_location(
                        downstream_response_headers(response.headers), self.internal
                    ),
                }
            )
            async for chunk in response.aiter_stream():
                if gone.done():
                    return  # closing the response drops the upstream connection
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except UPSTREAM_ERRORS as exc:
            # Headers are out: all that is left is to cut the connection so the client sees a
            # truncated response rather than a complete-looking one.
            metrics.UPSTREAM_ERRORS.labels(upstream=name, kind=type(exc).__name__).inc()
            log.warning(
                "upstream response broke off", extra={"upstream": name, "error": type(exc).__name__}
            )
            raise
        finally:
            gone.cancel()
            await response.aclose()


async def _prefetch(body: AsyncIterator[bytes], limit: int) -> bytes | AsyncIterator[bytes]:
    """The whole body when it ends within ``limit`` bytes; else what was read, then the rest
    as it comes (a chunked upload larger than the buffer)."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in body:
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return _chain(chunks, body)
    return b"".join(chunks)


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# What httpcore raises for an upstream's failures (it has no common base class).
UPSTREAM_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
)


def _failure(exc: Exception) -> tuple[int, str, str]:
    """Status, message and code for an upstream failure before any response header arrived."""
    if isinstance(exc, httpcore.PoolTimeout):
        return 503, "upstream busy", "unavailable"
    if isinstance(exc, httpcore.ConnectError | httpcore.ConnectTimeout):
        return 502, "upstream unavailable", "bad_gateway"
    if isinstance(exc, httpcore.TimeoutException):
        return 504, "upstream timed out", "upstream_timeout"
    return 502, "upstream failed", "bad_gateway"
