"""Threader: puts every message in its conversation and serves the conversation API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from libs.common.service import Service
from services.threader.http import router
from services.threader.settings import ThreaderSettings
from services.threader.stream import handlers


class ThreaderService(Service):
    name = "threader"
    settings_cls = ThreaderSettings
    migrations = Path(__file__).parent / "migrations"

    def build_app(self) -> FastAPI:
        app = FastAPI(title="ChatFLOW threader")
        app.include_router(router)
        return app

    token_secret: bytes = b""

    async def on_start(self) -> None:
        self.token_secret = self.settings.token_secret()  # type: ignore[attr-defined]
        on_received, on_status = handlers(self)
        self.consumer(["mail.received"], on_received, group="threader")
        self.consumer(["mail.status"], on_status, group="threader-status")
