"""JSON errors: a crash in a route is a 500 JSON answer, never an exception out of the app."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

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
