"""The lifecycle every service shares: connect, run consumers, relay and HTTP, stop cleanly.

A service subclasses ``Service`` and fills in ``build`` (its FastAPI app and stream consumers).
SIGTERM or SIGINT stops reading new entries, lets in-flight handlers finish and ack, drains the
outbox, closes the HTTP server, then the pools.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import redis.asyncio as aioredis
from fastapi import FastAPI

from libs.common import db, gcpause, logs, web
from libs.common.bus import (
    BatchHandler,
    BroadcastReader,
    Bus,
    Consumer,
    Handler,
    Ordered,
    connect,
)
from libs.common.outbox import OutboxRelay
from libs.common.settings import ServiceSettings
from libs.common.tokens import TokenVerifier

log = logging.getLogger("chatflow.service")


class Service:
    name: ClassVar[str]
    settings_cls: ClassVar[type[ServiceSettings]]
    migrations: ClassVar[Path]

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.pool: asyncpg.Pool
        self.redis: aioredis.Redis
        self.bus: Bus
        self.relay: OutboxRelay
        self.verifier: TokenVerifier
        self.consumers: list[Consumer | BroadcastReader] = []
        self.background: list[Callable[[], Coroutine[Any, Any, Any]]] = []
        self.stop_event = asyncio.Event()
        self._http: Any = None

    # ---- hooks --------------------------------------------------------------------------------
    def build_app(self) -> FastAPI:
        """The service's HTTP app; ops routes and JSON errors are added for it."""
        return FastAPI()

    async def on_start(self) -> None:
        """Runs once connected, before consumers and HTTP start."""

    async def on_stop(self) -> None:
        """Runs after consumers stopped, before the pools close."""

    def extra_checks(self) -> dict[str, web.Check]:
        return {}

    # ---- helpers ------------------------------------------------------------------------------
    def consumer(
        self,
        types: Sequence[str],
        handler: Handler,
        group: str | None = None,
        batch_handler: BatchHandler | None = None,
        batch: int = 100,
        ordered: Ordered | None = None,
    ) -> Consumer:
        s = self.settings
        c = Consumer(
            self.bus,
            group or self.name,
            list(types),
            handler,
            block_ms=s.consumer_block_ms,
            claim_idle_ms=s.consumer_claim_idle_ms,
            claim_interval_ms=s.consumer_claim_interval_ms,
            max_deliveries=s.consumer_max_deliveries,
            batch=batch,
            batch_handler=batch_handler,
            ordered=ordered,
        )
        self.consumers.append(c)
        return c

    # ---- lifecycle ----------------------------------------------------------------------------
    async def connect(self) -> None:
        s = self.settings
        self.pool = await db.connect_pool(
            s.own_database_url, s.db_schema, s.db_pool_min, s.db_pool_max, ca=s.tls_ca
        )
        self.redis = connect(s.redis_url, str(s.tls_ca))
        self.bus = Bus(self.redis, s.stream_prefix, s.stream_maxlen)
        self.relay = OutboxRelay(self.pool, self.bus, s.db_schema, s.outbox_poll_ms)
        self.verifier = TokenVerifier(self.bus, s.jwt_issuer, s.jwt_audience, s.jwt_leeway_s)

    def app(self) -> FastAPI:
        app = self.build_app()
        # Starlette answers ``/x/`` with a redirect to ``/x`` built from the request's own URL:
        # behind the gateway that is this service's internal origin, which a client must never
        # be sent to. A path with a stray slash is a 404 like any other unknown path.
        app.router.redirect_slashes = False
        web.install_errors(app)

        async def pg() -> bool:
            return bool(await self.pool.fetchval("SELECT 1"))

        async def rd() -> bool:
            return bool(await self.redis.ping())

        async def loops() -> bool:
            return self.relay.healthy and all(c.healthy for c in self.consumers)

        web.install_ops(app, {"postgres": pg, "redis": rd, "loops": loops, **self.extra_checks()})
        app.state.service = self
        return app

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        await self.connect()
        await self.on_start()
        s = self.settings
        self._http = web.server(
            self.app(), s.http_host, s.http_port, str(s.tls_cert), str(s.tls_key)
        )
        tasks = [asyncio.create_task(self.relay.run(), name="outbox-relay")]
        tasks += [
            asyncio.create_task(c.run(), name=f"consumer-{i}") for i, c in enumerate(self.consumers)
        ]
        tasks += [asyncio.create_task(fn(), name=f"bg-{i}") for i, fn in enumerate(self.background)]
        http_task = asyncio.create_task(self._http.serve(), name="http")
        gcpause.freeze()  # modules, settings, pools: never walked again by a collection
        log.info("started", extra={"http_port": s.http_port})
        stopper = asyncio.create_task(self.stop_event.wait())
        done, _ = await asyncio.wait(
            [stopper, http_task, *tasks], return_when=asyncio.FIRST_COMPLETED
        )
        for t in done:
            if t is not stopper and t.exception():
                log.error("task crashed; stopping", exc_info=t.exception())
        log.info("stopping")
        for c in self.consumers:
            c.stop()
        await self.before_stop()
        grace = s.shutdown_grace_s
        consumer_tasks = [t for t in tasks if t.get_name().startswith("consumer")]
        await asyncio.wait(consumer_tasks, timeout=grace) if consumer_tasks else None
        self.relay.stop()
        relay_task = tasks[0]
        await asyncio.wait([relay_task], timeout=grace)
        self._http.should_exit = True
        await asyncio.wait([http_task], timeout=grace)
        for t in [*tasks, http_task]:
            t.cancel()
        await asyncio.gather(*tasks, http_task, return_exceptions=True)
        await self.on_stop()
        await self.pool.close()
        await self.redis.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")

    async def before_stop(self) -> None:
        """Runs right after consumers were told to stop (close listeners here)."""


def main(service_cls: type[Service], argv: Sequence[str] | None = None) -> None:
    """``python -m services.<name> [run|migrate|...]``; subclasses add commands via ``commands``."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{service_cls.name}")
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run the service (default)")
    sub.add_parser("migrate", help="create the role and schema, apply migrations")
    extra: dict[
        str, Callable[[argparse.Namespace, ServiceSettings], Coroutine[Any, Any, int | None]]
    ] = {}
    register = getattr(service_cls, "commands", None)
    if register:
        extra = register(sub)
    args = parser.parse_args(argv)
    settings = service_cls.settings_cls.load()
    logs.setup(service_cls.name, settings.log_level)
    cmd = args.cmd or "run"
    if cmd == "migrate":
        applied = asyncio.run(
            db.migrate(
                settings.database_url,
                settings.own_database_url,
                settings.db_role,
                settings.db_schema,
                service_cls.migrations,
            )
        )
        print(f"{service_cls.name}: {len(applied)} migration(s) applied", file=sys.stderr)
        return
    if cmd == "run":
        import uvloop

        gcpause.install()
        uvloop.run(service_cls(settings).run())
        return
    rc: int | None = asyncio.run(extra[cmd](args, settings))
    sys.exit(rc or 0)
