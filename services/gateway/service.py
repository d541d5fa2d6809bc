"""The gateway, the only door in: ops HTTP on ``http_port``, public HTTPS/WSS on ``public_port``.

The public listener is a second uvicorn server run as a background task of the Service, so a
crash of it stops the service like any other loop; ``before_stop`` lets it drain in-flight
requests and WebSockets before the pools close.

The one piece of state: accounts auth disabled (``services.gateway.access``), refused on every
request even while their tokens are still valid.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import httpcore
import uvicorn
from fastapi import FastAPI

from libs.common import tls, web
from libs.common.bus import BroadcastReader
from libs.common.service import Service
from libs.common.settings import ServiceSettings
from services.gateway.access import ACCESS_TYPE, TYPES, Access
from services.gateway.domain.headers import security_headers
from services.gateway.domain.routing import AUTH, INGEST, NOTIFIER, SENDER, THREADER
from services.gateway.http import Edge, build_public_app
from services.gateway.proxy import Proxy
from services.gateway.ratelimit import RateLimiter
from services.gateway.settings import GatewaySettings
from services.gateway.tokencache import CachingVerifier
from services.gateway.trunk import TrunkPool
from services.gateway.upstream import AsyncioBackend
from services.gateway.ws import WsBridge
from services.gateway.wsedge import WsEdge, front_door

log = logging.getLogger("chatflow.gateway")


def upstream_pool(s: GatewaySettings) -> httpcore.AsyncConnectionPool:
    """One shared HTTP/1.1 keep-alive pool for every upstream, verified against our CA.

    Requests are built by hand (``Proxy.forward``): nothing is added to them and no cookie is
    ever stored, so one user's session can't leak into another's request.
    """
    return httpcore.AsyncConnectionPool(
        ssl_context=tls.client_context(s.tls_ca),
        max_connections=s.upstream_max_connections,
        max_keepalive_connections=s.upstream_max_keepalive,
        keepalive_expiry=s.upstream_keepalive_expiry_s,
        http1=True,
        http2=False,
        retries=0,
        network_backend=AsyncioBackend(),
    )


def upstream_timeouts(s: GatewaySettings) -> dict[str, float]:
    return {
        "connect": s.upstream_connect_timeout_s,
        "read": s.upstream_read_timeout_s,
        "write": s.upstream_write_timeout_s,
        "pool": s.upstream_pool_timeout_s,
    }


class GatewayService(Service):
    name = "gateway"
    settings_cls: ClassVar[type[ServiceSettings]] = GatewaySettings
    migrations = Path(__file__).parent / "migrations"

    def __init__(self, settings: ServiceSettings) -> None:
        super().__init__(settings)
        self.cfg: GatewaySettings = settings  # type: ignore[assignment]
        self.upstream: httpcore.AsyncConnectionPool | None = None
        self.public: uvicorn.Server | None = None
        self.public_app: Edge | None = None
        self.edge: WsEdge | None = None
        self.access: Access
        self._public_done = asyncio.Event()

    def build_app(self) -> FastAPI:
        """Ops only (health, readiness, metrics); the public app is built in ``on_start``."""
        return FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def extra_checks(self) -> dict[str, web.Check]:
        async def public() -> bool:
            return self.public is not None and self.public.started

        return {"public": public}

    async def on_start(self) -> None:
        s = self.cfg
        try:
            await self.verifier.refresh()  # keys ready before the first request, if auth is up
        except Exception as exc:
            log.warning("no signing keys yet", extra={"error": repr(exc)})
        self.upstream = upstream_pool(s)
        self.access = Access(self.pool, self.relay, self.bus)
        cursor = await self.access.start()
        self.consumer(TYPES, self.access.handle)
        self.consumers.append(
            BroadcastReader(
                self.bus,
                [ACCESS_TYPE],
                self.access.on_entry,
                start=cursor,
                block_ms=s.consumer_block_ms,
            )
        )
        verifier = CachingVerifier(
            self.verifier,
            s.token_cache_ttl_s,
            s.jwt_leeway_s,
            is_disabled=self.access.is_disabled,
        )
        limiter = RateLimiter(
            self.redis,
            s.stream_prefix,
            s.rate_limit_window_s,
            s.rate_limit_per_ip,
            s.rate_limit_per_user,
            s.rate_limit_timeout_s,
        )
        proxy = Proxy(
            {
                AUTH: s.auth_url,
                INGEST: s.ingest_url,
                THREADER: s.threader_url,
                SENDER: s.sender_url,
                NOTIFIER: s.notifier_url,
            },
            self.upstream,
            verifier,
            limiter,
            s.max_body_bytes,
            upstream_timeouts(s),
            body_buffer_bytes=s.body_buffer_bytes,
            body_timeout_s=s.body_timeout_s,
            max_in_flight_per_ip=s.max_in_flight_per_ip,
        )
        bridge = WsBridge(
            s.notifier_ws_url,
            s.allowed_origins,
            verifier,
            limiter,
            tls.client_context(s.tls_ca),
            s.ws_auth_timeout_s,
            s.ws_open_timeout_s,
            s.ws_max_upstream_message_bytes,
            is_disabled=self.access.is_disabled,
        )
        self.access.on_disable(bridge.disable)
        security = security_headers(s.hsts_max_age_s)
        self.public_app = build_public_app(proxy, bridge, s.allowed_origins, security)
        self.public = web.server(
            self.public_app, s.public_host, s.public_port, str(s.tls_cert), str(s.tls_key)
        )
        self.public.config.ws_max_size = s.ws_max_message_bytes
        # /ws upgrades are spliced to the notifier; every other request goes on to uvicorn.
        trunk_url = urlunsplit(urlsplit(s.notifier_ws_url)._replace(path=s.notifier_trunk_path))
        trunks = TrunkPool(
            trunk_url,
            tls.client_context(s.tls_ca),
            s.ws_trunks,
            s.ws_open_timeout_s,
            s.ws_max_upstream_message_bytes,
        )
        self.edge = WsEdge(
            bridge,
            security,
            s.ws_max_message_bytes,
            trunks,
            s.ws_slow_consumer_bytes,
            s.ws_ping_interval_s,
            s.ws_ping_timeout_s,
        )
        self.public.config.http = front_door(self.edge)
        self.background.append(self._serve_public)

    async def _serve_public(self) -> Any:
        assert self.public is not None
        try:
            await self.public.serve()
        finally:
            self._public_done.set()
        log.info("public listener closed")

    async def before_stop(self) -> None:
        """Stop accepting on 8443 and let in-flight requests finish (uvicorn's own grace)."""
        if self.public is None:
            return
        self.public.should_exit = True
        try:
            await asyncio.wait_for(self._public_done.wait(), self.cfg.shutdown_grace_s)
        except TimeoutError:
            log.warning("public listener did not drain in time")

    async def on_stop(self) -> None:
        if self.edge is not None:
            self.edge.close()
        if self.upstream is not None:
            await self.upstream.aclose()
