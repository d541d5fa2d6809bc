"""Ingest: the MX. Receives mail over SMTP (or LMTP, or ``POST /api/messages/raw``), stores it raw
and read, announces ``mail.received`` (and ``mail.bounced`` for a DSN about one of our messages);
admins see what it quarantined (``/api/admin/quarantine``)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from libs.common import inbox, roster, tls
from libs.common.bus import BroadcastReader
from libs.common.events import Envelope, EventError, MailboxChanged
from libs.common.service import Service
from libs.common.tokens import Identity
from libs.common.web import ApiError, identity_dependency
from services.ingest import lmtp, quarantine, storage, submit
from services.ingest.bounces import BounceScanner
from services.ingest.settings import IngestSettings
from services.ingest.smtp import smtp_factory

log = logging.getLogger("chatflow.ingest")
identity = identity_dependency(lambda request: request.app.state.service.verifier)


_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]{1,127}/[A-Za-z0-9!#$&^_.+-]{1,127}$")


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII ``filename`` for old clients and the real name as ``filename*``.

    Response headers are latin-1 on the wire, so a name such as ``отчёт.pdf`` must never go
    into them as it is; control characters, quotes and path separators never go in at all.
    """
    name = "".join(c for c in filename if c.isprintable() and c not in '"\\/')[:200].strip()
    ascii_ = "".join(c for c in name if c.isascii() and (c.isalnum() or c in "._- ")).strip()
    stem, dot, ext = ascii_.rpartition(".")
    if not dot:
        stem, ext = ascii_, ""
    if not any(c.isalnum() for c in stem):
        ascii_ = "attachment" + (f".{ext}" if ext else "")
    value = f'attachment; filename="{ascii_}"'
    if not name.isascii():
        value += f"; filename*=UTF-8''{quote(name, safe='', errors='replace')}"
    return value


def header_token(content_type: str) -> str:
    """The stored media type when it is a plain ``type/subtype``, else the generic one."""
    bare = content_type.split(";", 1)[0].strip()
    return bare.lower() if _MEDIA_TYPE.match(bare) else "application/octet-stream"


MAILBOX_CHANGED = "mailbox.changed"


def apply_mailbox_change(
    boxes: dict[str, storage.Mailbox], change: MailboxChanged
) -> dict[str, storage.Mailbox]:
    """The map of active mailboxes by address after ``change`` (a new dict: readers keep theirs)."""
    out = {addr: b for addr, b in boxes.items() if b.id != change.mailbox_id}
    if change.active:
        address = change.address.lower()
        out[address] = storage.Mailbox(change.mailbox_id, address, change.name)
    return out


class IngestService(Service):
    name = "ingest"
    settings_cls = IngestSettings
    migrations = Path(__file__).parent / "migrations"
    settings: IngestSettings

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.mailboxes: dict[str, storage.Mailbox] = {}
        self._smtp: asyncio.AbstractServer | None = None
        self._lmtp: asyncio.AbstractServer | None = None
        self.bounces = BounceScanner(self)

    def build_app(self) -> FastAPI:
        app = FastAPI(title="ChatFLOW ingest")
        router = APIRouter()

        @router.get(
            "/api/attachments/{att_id}",
            response_class=Response,
            responses={
                200: {
                    "description": "The attachment's bytes, always as a download",
                    "content": {"application/octet-stream": {}},
                },
                401: {"description": "Missing or invalid bearer token"},
                403: {"description": "Not an agent token"},
                404: {"description": "No such attachment in the agent's mailboxes"},
            },
        )
        async def download(
            att_id: str, request: Request, who: Identity = Depends(identity)
        ) -> Response:
            """An attachment of a message in one of the agent's mailboxes (404 for any other)."""
            if not who.is_agent:
                raise ApiError(403, "this API is for agents")
            try:
                key = uuid.UUID(att_id)
            except ValueError as exc:
                raise ApiError(404, "attachment not found") from exc
            row = await storage.fetch_attachment(self.pool, key)
            if (
                row is None
                or row["mailbox_id"] not in who.mailboxes
                or await roster.removed(self.pool, who.sub, [row["mailbox_id"]])
            ):
                raise ApiError(404, "attachment not found")
            return Response(
                bytes(row["data"]),
                media_type="application/octet-stream",
                headers={
                    "content-disposition": content_disposition(row["filename"]),
                    "x-content-type-options": "nosniff",
                    "x-original-content-type": header_token(row["content_type"]),
                },
            )

        app.include_router(router)
        app.include_router(submit.router(self, identity))
        app.include_router(quarantine.router(self, identity))
        return app

    async def on_start(self) -> None:
        # Every replica answers RCPT from memory. The group consumer below stores a change once
        # for all replicas, so each replica also reads the whole stream itself (a broadcast
        # reader from its first entry: mailbox changes are few) and applies every change in
        # stream order on top of what the schema held at start, including changes published
        # while no ingest ran.
        self.mailboxes = await storage.load_mailboxes(self.pool)
        self.consumer([MAILBOX_CHANGED], self.on_mailbox_changed)
        # A removed agent's token lists the mailbox until it expires: downloads check this.
        self.consumer(["membership.changed"], roster.handler(self.pool), group="ingest-members")
        self.consumers.append(
            BroadcastReader(
                self.bus,
                [MAILBOX_CHANGED],
                self.on_mailbox_entry,
                start="0-0",
                block_ms=self.settings.consumer_block_ms,
            )
        )
        self.background.append(self.bounces.run)
        s = self.settings
        ctx = tls.server_context(s.tls_cert, s.tls_key)
        loop = asyncio.get_running_loop()
        self._smtp = await loop.create_server(
            lambda: smtp_factory(self, ctx), host=s.smtp_host, port=s.smtp_port
        )
        self._lmtp = await lmtp.serve(self, ctx)

    async def on_mailbox_changed(self, env: Envelope, entry_id: str) -> None:
        box = env.payload_as(MailboxChanged)
        async with self.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, "ingest", env.id):
                return
            await storage.upsert_mailbox(conn, box.mailbox_id, box.address, box.name, box.active)
        # The map is not reloaded here: the broadcast reader applies every change in stream
        # order, and a reload could put back an older state than one it has already applied.

    async def on_mailbox_entry(
        self, stream: str, entry_id: str, fields: dict[bytes, bytes]
    ) -> None:
        """This replica's map follows every change at once (another replica may store it)."""
        try:
            box = Envelope.from_entry(fields).payload_as(MailboxChanged)
        except EventError as exc:
            log.warning("skipping invalid mailbox entry", extra={"error": str(exc)})
            return
        self.mailboxes = apply_mailbox_change(self.mailboxes, box)

    async def before_stop(self) -> None:
        # Stop taking new sessions; sessions in DATA finish their commit before the pool closes.
        for listener in (self._smtp, self._lmtp):
            if listener is not None:
                listener.close()
                await asyncio.wait_for(listener.wait_closed(), self.settings.shutdown_grace_s)
