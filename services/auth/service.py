"""Auth: the OAuth2 authorization server and the user directory.

On start it makes sure a signing key is active and republishes ``auth.jwks`` so every verifier
learns the current public keys; every ``jwks_check_interval_s`` it checks that the stream still
holds them and publishes them again if not (Redis restarted empty, the stream was trimmed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from libs.common.service import Service
from libs.common.settings import ServiceSettings
from services.auth import admin, keys, storage
from services.auth.http import router
from services.auth.keys import KeyRing
from services.auth.oauth import AuthorizationServer
from services.auth.passwords import Passwords
from services.auth.settings import AuthSettings
from services.auth.throttle import LoginThrottle

log = logging.getLogger("chatflow.auth")
Command = Callable[[argparse.Namespace, ServiceSettings], Awaitable[int]]


class AuthService(Service):
    name = "auth"
    settings_cls = AuthSettings
    migrations = Path(__file__).parent / "migrations"
    settings: AuthSettings

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.passwords = Passwords(settings)
        self.keys: KeyRing
        self.oauth: AuthorizationServer

    def build_app(self) -> FastAPI:
        app = FastAPI(title="ChatFLOW auth", docs_url=None, redoc_url=None, openapi_url=None)
        app.include_router(router(self))
        app.include_router(admin.router(self))
        return app

    async def on_start(self) -> None:
        s = self.settings
        self.keys = KeyRing(self.pool, s)
        throttle = LoginThrottle(
            self.redis,
            s.stream_prefix,
            s.login_max_failures,
            s.login_max_failures_ip,
            s.login_window_s,
            s.login_max_failures_account,
        )
        self.oauth = AuthorizationServer(self.pool, s, self.keys, self.passwords, throttle)
        async with self.pool.acquire() as conn, conn.transaction():
            if await keys.ensure_active(conn):
                log.info("generated a signing key")
            await keys.publish(conn, s)
        await self.keys.active()
        # Publish now rather than when the relay starts, so tokens verify from the first request.
        try:
            while await self.relay.publish_once():
                pass
        except Exception:
            log.warning("could not publish auth.jwks yet; the relay will retry", exc_info=True)
        self.background.append(self._sweep_loop)
        self.background.append(self._jwks_loop)

    async def _jwks_loop(self) -> None:
        """Keep the current keys on ``auth.jwks``: a verifier has no other place to learn them."""
        while not self.stop_event.is_set():
            try:
                await asyncio.wait_for(self.stop_event.wait(), self.settings.jwks_check_interval_s)
                return
            except TimeoutError:
                pass
            try:
                if await keys.republish_if_missing(self.pool, self.bus, self.settings):
                    log.info("auth.jwks lacked the current keys; published them again")
                    while await self.relay.publish_once():
                        pass
            except Exception as exc:  # Redis or PostgreSQL away: the next round tries again
                log.warning("could not check auth.jwks", extra={"error": repr(exc)})

    async def _sweep_loop(self) -> None:
        """Delete long-expired codes and refresh families so the tables stay small."""
        while not self.stop_event.is_set():
            try:
                await asyncio.wait_for(self.stop_event.wait(), self.settings.sweep_interval_s)
                return
            except TimeoutError:
                pass
            try:
                n = await storage.sweep(self.pool, keep_s=86400)
                if n:
                    log.info("swept expired credentials", extra={"rows": n})
            except Exception:
                log.exception("sweep failed")

    @staticmethod
    def commands(sub: Any) -> dict[str, Command]:
        from services.auth import cli

        return cli.register(sub)
