"""Sender: turns ``mail.send`` commands into signed MIME and delivers them through the relay."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from libs.common import roster, tls
from libs.common.service import Service
from services.sender import bounces, storage
from services.sender.delivery import Delivery
from services.sender.http import router
from services.sender.settings import SenderSettings
from services.sender.stream import handlers, thread_batch

log = logging.getLogger("chatflow.sender")


class SenderService(Service):
    name = "sender"
    settings_cls = SenderSettings
    migrations = Path(__file__).parent / "migrations"
    settings: SenderSettings

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        # Loads the DKIM keys: a key that cannot be used stops the service here, not at send time.
        self.delivery = Delivery(self, tls.client_context(settings.tls_ca))

    async def on_start(self) -> None:
        on_mailbox, on_added, on_send, on_sends = handlers(self)
        self.consumer(["mailbox.changed"], on_mailbox, group="sender-mailboxes")
        self.consumer(
            ["conversation.message_added"],
            on_added,
            group="sender-threads",
            batch_handler=thread_batch(self),
        )
        for _ in range(self.settings.send_consumers):
            self.consumer(["mail.send"], on_send, group="sender", batch_handler=on_sends)
        self.consumer(["mail.bounced"], bounces.handler(self), group=bounces.CONSUMER)
        self.consumer(["membership.changed"], roster.handler(self.pool), group="sender-members")
        self.background.append(self.delivery.run)
        self.background.append(self.expire_uploads)

    def build_app(self) -> FastAPI:
        app = FastAPI(title="ChatFLOW sender")
        app.include_router(router)
        return app

    async def expire_uploads(self) -> None:
        """Uploads no send used within ``upload_orphan_ttl_s`` are deleted, now and then."""
        s = self.settings
        while not self.stop_event.is_set():
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    gone = await storage.expire_uploads(conn, s.upload_orphan_ttl_s)
                if gone:
                    log.info("expired unused uploads", extra={"count": gone})
            except Exception:
                log.exception("upload expiry failed; retrying later")
            try:
                await asyncio.wait_for(self.stop_event.wait(), s.upload_expire_interval_s)
            except TimeoutError:
                pass

    async def before_stop(self) -> None:
        # Attempts in flight record their outcome before the outbox relay drains and stops.
        await self.delivery.drain(self.settings.shutdown_grace_s)

    async def on_stop(self) -> None:
        await self.delivery.close()
