"""The asyncio network layer under httpcore's pool, against a raw TLS server of the test's own."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httpcore
import pytest

from libs.common import testing, tls
from services.gateway.tests.conftest import CA, CERT, KEY
from services.gateway.upstream import AsyncioBackend

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def read_all(r: httpcore.Response) -> bytes:
    """The body, then the response closed (which hands the connection back to the pool)."""
    try:
        return await r.aread()
    finally:
        await r.aclose()


def response(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(body) + b"".join(extra)
    return head + b"\r\n" + body


async def serve(handler: Handler) -> tuple[asyncio.Server, int, list[int]]:
    """A TLS server; the list counts the connections it accepted."""
    accepted: list[int] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    port = testing.free_port()
    server = await asyncio.start_server(
        on_conn, "127.0.0.1", port, ssl=tls.server_context(CERT, KEY)
    )
    return server, port, accepted


@pytest.fixture
async def pool() -> AsyncIterator[httpcore.AsyncConnectionPool]:
    p = httpcore.AsyncConnectionPool(
        ssl_context=tls.client_context(CA), retries=0, network_backend=AsyncioBackend()
    )
    yield p
    await p.aclose()


def get(port: int, timeout: float = 5.0) -> httpcore.Request:
    return httpcore.Request(
        b"GET",
        httpcore.URL(scheme=b"https", host=b"127.0.0.1", port=port, target=b"/x"),
        headers=[(b"host", b"127.0.0.1:%d" % port)],
        extensions={"timeout": {"connect": timeout, "read": timeout, "write": timeout}},
    )


async def test_keep_alive_and_a_server_side_close_between_requests(
    pool: httpcore.AsyncConnectionPool,
) -> None:
    async def two_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(response(b"ok"))
            await writer.drain()
        # Closes without having said "Connection: close": the pool must notice before reuse.

    server, port, accepted = await serve(two_then_close)
    try:
        for _ in range(2):
            r = await pool.handle_async_request(get(port))
            assert r.status == 200 and await read_all(r) == b"ok"
        assert len(accepted) == 1  # reused
        await asyncio.sleep(0.2)  # the close arrives at the idle connection
        r = await pool.handle_async_request(get(port))
        assert await read_all(r) == b"ok"
        assert len(accepted) == 2
    finally:
        server.close()


async def test_large_body_streams_with_back_pressure(pool: httpcore.AsyncConnectionPool) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, beyond the read high-water mark

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(body))
        await writer.drain()

    server, port, _ = await serve(big)
    try:
        r = await pool.handle_async_request(get(port))
        await asyncio.sleep(0.3)  # let the buffer fill up and reading pause
        got = b"".join([chunk async for chunk in r.aiter_stream()])
        await r.aclose()
        assert got == body
    finally:
        server.close()


async def test_request_body_and_upload(pool: httpcore.AsyncConnectionPool) -> None:
    async def echo_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        data = await reader.readexactly(length)
        writer.write(response(str(len(data)).encode()))
        await writer.drain()

    server, port, _ = await serve(echo_length)
    try:
        payload = b"z" * 3_000_000  # several times the transport's write buffer
        req = httpcore.Request(
            b"POST",
            httpcore.URL(scheme=b"https", host=b"127.0.0.1", port=port, target=b"/up"),
            headers=[(b"host", b"x"), (b"content-length", str(len(payload)).encode())],
            content=payload,
        )
        r = await pool.handle_async_request(req)
        assert await read_all(r) == b"3000000"
    finally:
        server.close()


async def test_failures_map_to_httpcore_errors(pool: httpcore.AsyncConnectionPool) -> None:
    with pytest.raises(httpcore.ConnectError):
        await pool.handle_async_request(get(testing.free_port()))

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    server, port, _ = await serve(silent)
    try:
        with pytest.raises(httpcore.ReadTimeout):
            await pool.handle_async_request(get(port, timeout=0.3))
    finally:
        server.close()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
        await writer.drain()

    server, port, _ = await serve(hang_up)
    try:
        r = await pool.handle_async_request(get(port))
        with pytest.raises(httpcore.RemoteProtocolError):
            await read_all(r)
    finally:
        server.close()


async def test_certificate_is_verified() -> None:
    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(b"ok"))
        await writer.drain()

    server, port, _ = await serve(ok)
    untrusting = httpcore.AsyncConnectionPool(
        ssl_context=ssl.create_default_context(), retries=0, network_backend=AsyncioBackend()
    )
    try:
        with pytest.raises(httpcore.ConnectError):
            await untrusting.handle_async_request(get(port))
    finally:
        await untrusting.aclose()
        server.close()


def test_the_same_under_uvloop() -> None:
    """The service runs on uvloop (its own TLS and ``start_tls``); the tests above on asyncio."""
    import uvloop

    async def scenario() -> None:
        p = httpcore.AsyncConnectionPool(
            ssl_context=tls.client_context(CA), retries=0, network_backend=AsyncioBackend()
        )
        try:
            await test_keep_alive_and_a_server_side_close_between_requests(p)
            await test_large_body_streams_with_back_pressure(p)
            await test_request_body_and_upload(p)
            await test_failures_map_to_httpcore_errors(p)
        finally:
            await p.aclose()
        await test_certificate_is_verified()

    uvloop.run(scenario())
