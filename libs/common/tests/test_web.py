"""JSON errors: a crash in a route is a 500 JSON answer, never an exception out of the app."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from libs.common import web


async def test_crash_is_a_json_500_and_the_app_does_not_raise() -> None:
    app = FastAPI()
    web.install_errors(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    @app.get("/missing")
    async def missing() -> None:
        raise web.ApiError(404, "no such thing")

    # raise_app_exceptions=True: the test fails if the exception escapes the app (uvicorn would
    # then close the keep-alive connection the gateway is about to reuse).
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        r = await http.get("/boom", headers={"x-request-id": "abc"})
        assert r.status_code == 500
        assert r.json() == {"error": {"code": "internal", "message": "internal error"}}
        r = await http.get("/missing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert r.headers["x-request-id"]


async def test_a_client_gone_mid_body_is_one_info_line_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway cutting an upload off at its limit leaves the service reading a body whose
    sender went away: no ERROR with a traceback (found by a trial)."""
    app = FastAPI()
    web.install_errors(app)

    @app.post("/upload")
    async def upload(request: Request) -> None:
        await request.body()

    messages = [
        {"type": "http.request", "body": b"part", "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/upload",
        "raw_path": b"/upload",
        "query_string": b"",
        "headers": [(b"content-length", b"100")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "scheme": "http",
        "root_path": "",
    }
    with caplog.at_level(logging.INFO, logger="chatflow"):
        await app(scope, receive, send)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("client disconnected" in r.getMessage() for r in caplog.records)
