"""Gateway test rig: TLS echo upstreams, a WebSocket echo notifier, JWKS on the bus, a gateway.

Everything runs in the test's event loop: the upstreams are uvicorn servers from
``libs.common.web.server`` with the dev certificates, the notifier is a ``websockets`` server, and
the gateway is the real ``GatewayService.run()`` in a task.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from joserfc import jwt
from joserfc.jwk import OKPKey
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from libs.common import db, testing, tls, web
from libs.common.bus import Bus, connect
from libs.common.events import Envelope, JwksPublished
from libs.common.settings import ROOT
from libs.common.trunk import TrunkEnd, TrunkLink, server_frame
from services.gateway.service import GatewayService
from services.gateway.settings import GatewaySettings

CERT, KEY, CA = (
    ROOT / "var/certs/server.pem",
    ROOT / "var/certs/server.key",
    ROOT / "var/certs/ca.pem",
)
ORIGIN = "https://127.0.0.1:8443"
KID = "test-key-1"
BODY_LIMIT = 256 * 1024


ENDLESS_CLOSED: list[str] = []  # the endless stream below appends here when it is torn down


def echo_app(name: str) -> FastAPI:
    """An upstream that tells the test what reached it."""
    app = FastAPI()

    @app.get("/api/attachments/endless")
    async def endless() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"z" * 65536
                    await asyncio.sleep(0.005)
            finally:
                ENDLESS_CLOSED.append(name)

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.post("/oauth/authorize")
    async def authorize() -> Response:
        r = RedirectResponse("https://127.0.0.1:8443/callback?code=abc&state=xyz", 302)
        r.set_cookie("sid", "s1", httponly=True, secure=True)
        r.set_cookie("csrf", "c1", secure=True)
        return r

    @app.get("/api/conversations/moved")
    async def moved(request: Request) -> Response:
        """What Starlette's slash redirect did: a Location on this upstream's own origin."""
        target = request.query_params.get("to", "/api/conversations/teapot")
        return RedirectResponse(f"{request.url.scheme}://{request.url.netloc}{target}", 307)

    @app.get("/api/conversations/teapot")
    async def teapot() -> JSONResponse:
        return JSONResponse({"error": {"code": "teapot", "message": "short and stout"}}, 418)

    @app.get("/api/conversations/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"chunk-{i}\n".encode()
                await asyncio.sleep(0.01)

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.api_route(
        "/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    )
    async def echo(request: Request, path: str) -> JSONResponse:
        body = await request.body()
        return JSONResponse(
            {
                "upstream": name,
                "method": request.method,
                "path": request.url.path,
                "raw_path": request.scope["raw_path"].decode(),
                "query": request.url.query,
                "headers": [[k.decode(), v.decode()] for k, v in request.scope["headers"]],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            },
            headers={"x-upstream": name, "x-request-id": "upstream-must-not-win"},
        )

    return app


@dataclass
class Notifier:
    """WebSocket echo: ``close:<code>`` makes it close with that code."""

    port: int
    handshakes: list[dict[str, Any]] = field(default_factory=list)
    closes: list[int | None] = field(default_factory=list)
    # When each connection's handler began (the real notifier registers it there, before any
    # await), on this process's monotonic clock.
    registered: list[float] = field(default_factory=list)
    links: list[TrunkLink] = field(default_factory=list)

    async def handler(self, ws: ServerConnection) -> None:
        req = ws.request
        assert req is not None
        if req.path == "/trunk":  # the gateway's trunk: the notifier's own end of it
            ws.protocol.max_message_size = None
            await TrunkEnd(ws, 64 * 1024 * 1024, 4096, None).serve(self.on_link)
            return
        self.registered.append(time.monotonic())
        self.handshakes.append(
            {
                "origin": req.headers.get("Origin"),
                "protocols": req.headers.get_all("Sec-WebSocket-Protocol"),
                "forwarded_for": req.headers.get("X-Forwarded-For"),
                "subprotocol": ws.subprotocol,
            }
        )
        try:
            async for msg in ws:
                if isinstance(msg, str) and msg.startswith("close:"):
                    await ws.close(int(msg.split(":")[1]), "bye")
                    break
                await ws.send(f"echo:{msg}" if isinstance(msg, str) else msg)
        except ConnectionClosed:
            pass
        self.closes.append(ws.close_code)

    async def on_link(self, link: TrunkLink) -> None:
        """The same echo for an agent on a trunk."""
        self.registered.append(time.monotonic())
        info = link.info
        self.handshakes.append(
            {
                "origin": info.get("origin"),
                "protocols": [f"chatflow.v1, bearer.{info['token']}"],
                "forwarded_for": info.get("ip"),
                "subprotocol": "chatflow.v1",
            }
        )
        self.links.append(link)
        link.end.accept(link)
        async for msg in link:
            if isinstance(msg, str) and msg.startswith("close:"):
                await link.close(int(msg.split(":")[1]), "bye")
                break
            if isinstance(msg, str) and msg.startswith("slowly:"):
                await asyncio.sleep(float(msg.split(":")[1]))  # a handler that takes its time
                await link.send(msg)
                continue
            if isinstance(msg, str) and msg.startswith("replay:"):
                n, size = (int(x) for x in msg.split(":")[1:])
                for i in range(n):  # as a resume replays: each send waits for room
                    await link.send(f"{i}:" + "r" * size)
                continue
            if isinstance(msg, str) and msg.startswith("flood:"):
                n, size = (int(x) for x in msg.split(":")[1:])
                for i in range(n):
                    link.queue(server_frame(f"{i}:" + "f" * size))
                    if i % 100 == 99:
                        await asyncio.sleep(0)
                continue
            await link.send(f"echo:{msg}" if isinstance(msg, str) else msg)
        self.closes.append(link.close_code)


@dataclass
class Rig:
    ports: dict[str, int]
    notifier: Notifier
    prefix: str
    database_url: str
    key: OKPKey
    ctx: ssl.SSLContext


def token(key: OKPKey, kid: str = KID, alg: str = "Ed25519", **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "https://127.0.0.1:8443",
        "aud": "chatflow",
        "sub": "user-1",
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
        "roles": ["agent"],
        "mailboxes": ["mb-1"],
        "scope": "openid",
        "client_id": "spa",
    }
    claims.update(overrides)
    return jwt.encode({"alg": alg, "kid": kid}, claims, key, algorithms=[alg])


async def publish_jwks(prefix: str, *keys: OKPKey) -> None:
    """What auth does on every key change: an ``auth.jwks`` entry with the public keys."""
    redis = connect(testing.REDIS_URL)
    try:
        jwks = JwksPublished(keys=[k.as_dict(private=False) for k in keys])
        await Bus(redis, prefix).publish(Envelope.of(jwks, "auth"))
    finally:
        await redis.aclose()


async def _serve_http(app: FastAPI, port: int) -> tuple[Any, asyncio.Task[None]]:
    srv = web.server(app, "127.0.0.1", port, str(CERT), str(KEY))
    task = asyncio.create_task(srv.serve())
    await testing.eventually(lambda: srv.started, timeout=10)
    return srv, task


@pytest.fixture(scope="session")
async def rig(database_url: str, stream_prefix: str) -> AsyncIterator[Rig]:
    ports = {n: testing.free_port() for n in ("auth", "ingest", "threader", "sender", "notifier")}
    servers = [
        await _serve_http(echo_app(n), ports[n]) for n in ("auth", "ingest", "threader", "sender")
    ]
    notifier = Notifier(ports["notifier"])
    ws_server = await serve(
        notifier.handler,
        "127.0.0.1",
        notifier.port,
        ssl=tls.server_context(CERT, KEY),
        subprotocols=["chatflow.v1", "chatflow.trunk.v1"],  # type: ignore[list-item]
        compression=None,
    )
    prefix = f"{stream_prefix}gw{testing.new_run_id()}:"
    key = OKPKey.generate_key("Ed25519", parameters={"kid": KID})
    yield Rig(ports, notifier, prefix, database_url, key, tls.client_context(CA))
    ws_server.close()
    await ws_server.wait_closed()
    for srv, task in servers:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)
    await testing.drop_prefix(prefix)


@dataclass
class Gateway:
    service: GatewayService
    settings: GatewaySettings
    task: asyncio.Task[None]

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.settings.public_port}"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.settings.public_port}/ws"


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture(scope="session")
async def start_gateway(rig: Rig) -> AsyncIterator[StartGateway]:
    """Starts gateways (each with its own settings overrides); all are stopped at the end."""
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        p = rig.ports
        # A prefix per gateway: rate-limit counters of one test never leak into another's.
        prefix = f"{rig.prefix}{testing.new_run_id()}:"
        await publish_jwks(prefix, rig.key)
        values: dict[str, Any] = {
            "database_url": rig.database_url,
            "redis_url": testing.REDIS_URL,
            "stream_prefix": prefix,
            "http_port": testing.free_port(),
            "public_port": testing.free_port(),
            "auth_url": f"https://127.0.0.1:{p['auth']}",
            "ingest_url": f"https://127.0.0.1:{p['ingest']}",
            "threader_url": f"https://127.0.0.1:{p['threader']}",
            "sender_url": f"https://127.0.0.1:{p['sender']}",
            "notifier_ws_url": f"wss://127.0.0.1:{p['notifier']}/ws",
            "tls_cert": CERT,
            "tls_key": KEY,
            "tls_ca": CA,
            "max_body_bytes": BODY_LIMIT,
            "db_pool_min": 1,
            "db_pool_max": 2,
            "shutdown_grace_s": 5.0,
        }
        values.update(overrides)
        settings = GatewaySettings.load(**values)
        assert isinstance(settings, GatewaySettings)
        await db.migrate(
            settings.database_url,
            settings.own_database_url,
            settings.db_role,
            settings.db_schema,
            GatewayService.migrations,
        )
        svc = GatewayService(settings)
        task = asyncio.create_task(svc.run())

        def up() -> bool:
            if task.done():
                raise RuntimeError(f"gateway exited early: {task.exception()!r}")
            return svc.public is not None and svc.public.started

        await testing.eventually(up, timeout=15)
        gw = Gateway(svc, settings, task)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await stop_gateway(gw)


async def stop_gateway(gw: Gateway) -> None:
    if gw.task.done():
        return
    gw.service.stop_event.set()
    await asyncio.wait_for(gw.task, 20)


@pytest.fixture(scope="session")
async def gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


@pytest.fixture(scope="session")
async def client(gateway: Gateway, rig: Rig) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.base, verify=rig.ctx, trust_env=False) as c:
        yield c


@pytest.fixture
def good_token(rig: Rig) -> str:
    return token(rig.key)
