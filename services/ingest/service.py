"""Ingest: the MX. Receives mail over SMTP, stores it raw and read, announces ``mail.received``."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from libs.common import inbox, tls
from libs.common.events import Envelope, MailboxChanged
from libs.common.service import Service
from libs.common.tokens import Identity
from libs.common.web import ApiError, identity_dependency
from services.ingest import storage
from services.ingest.settings import IngestSettings
from services.ingest.smtp import smtp_factory

identity = identity_dependency(lambda request: request.app.state.service.verifier)


class IngestService(Service):
    name = "ingest"
    settings_cls = IngestSettings
    migrations = Path(__file__).parent / "migrations"
    settings: IngestSettings

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.mailboxes: dict[str, storage.Mailbox] = {}
        self._smtp: asyncio.AbstractServer | None = None

    def build_app(self) -> FastAPI:
        app = FastAPI(title="ChatFLOW ingest")
        router = APIRouter()

        @router.get("/api/attachments/{att_id}")
        async def download(
            att_id: str, request: Request, who: Identity = Depends(identity)
        ) -> Response:
            try:
                key = uuid.UUID(att_id)
            except ValueError as exc:
                raise ApiError(404, "attachment not found") from exc
            row = await storage.fetch_attachment(self.pool, key)
            if row is None or row["mailbox_id"] not in who.mailboxes:
                raise ApiError(404, "attachment not found")
            safe = "".join(c for c in row["filename"] if c.isalnum() or c in "._- ") or "attachment"
            return Response(
                bytes(row["data"]),
                media_type="application/octet-stream",
                headers={
                    "content-disposition": f'attachment; filename="{safe}"',
                    "x-content-type-options": "nosniff",
                    "x-original-content-type": row["content_type"],
                },
            )

        app.include_router(router)
        return app

    async def on_start(self) -> None:
        self.mailboxes = await storage.load_mailboxes(self.pool)
        self.consumer(["mailbox.changed"], self.on_mailbox_changed)
        s = self.settings
        ctx = tls.server_context(s.tls_cert, s.tls_key)
        loop = asyncio.get_running_loop()
        self._smtp = await loop.create_server(
            lambda: smtp_factory(self, ctx), host=s.smtp_host, port=s.smtp_port
        )

    async def on_mailbox_changed(self, env: Envelope, entry_id: str) -> None:
        box = env.payload_as(MailboxChanged)
        async with self.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, "ingest", env.id):
                return
            await storage.upsert_mailbox(conn, box.mailbox_id, box.address, box.name, box.active)
        self.mailboxes = await storage.load_mailboxes(self.pool)

    async def before_stop(self) -> None:
        # Stop taking new sessions; sessions in DATA finish their commit before the pool closes.
        if self._smtp is not None:
            self._smtp.close()
            await asyncio.wait_for(self._smtp.wait_closed(), self.settings.shutdown_grace_s)
