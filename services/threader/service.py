"""Threader: puts every message in its conversation and serves the conversation API."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from libs.common.bus import Ordered, Turns
from libs.common.service import Service
from services.threader.http import router
from services.threader.outbound import router as outbound_router
from services.threader.placement import Carried
from services.threader.settings import ThreaderSettings
from services.threader.storage import Rules
from services.threader.stream import (
    agents_handler,
    handlers,
    reads_handler,
    received_batch,
)


class ThreaderService(Service):
    name = "threader"
    settings_cls = ThreaderSettings
    migrations = Path(__file__).parent / "migrations"

    def build_app(self) -> FastAPI:
        app = FastAPI(title="ChatFLOW threader")
        app.include_router(router)
        app.include_router(outbound_router)
        return app

    token_secret: bytes = b""
    rules: Rules = Rules()
    turns: Turns
    carried: Carried | None = None  # the last batch placed, for the next one's prefetch

    async def on_start(self) -> None:
        s = self.settings
        self.token_secret = s.token_secret()  # type: ignore[attr-defined]
        self.rules = Rules(
            subject_window=timedelta(hours=s.subject_window_hours),  # type: ignore[attr-defined]
            reopen_max_age=timedelta(days=s.reopen_max_age_days),  # type: ignore[attr-defined]
        )
        ordered = Ordered()  # the consumers of mail.received read one at a time, in turns
        self.turns = ordered.turns
        on_received, on_status = handlers(self)
        for _ in range(max(1, s.received_consumers)):  # type: ignore[attr-defined]
            self.consumer(
                ["mail.received"],
                on_received,
                group="threader",
                batch_handler=received_batch(self),
                batch=s.received_batch,  # type: ignore[attr-defined]
                ordered=ordered,
            )
        self.consumer(["mail.status"], on_status, group="threader-status")
        self.consumer(
            ["membership.changed", "user.changed"], agents_handler(self), group="threader-agents"
        )
        self.consumer(["conversation.read"], reads_handler(self), group="threader-reads")
