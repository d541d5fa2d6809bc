"""Admins' view of quarantined messages: list, download the raw message, reprocess.

A message the reader could not read is still stored (SMTP answered 250), with ``status
'quarantined'`` and its reason. Here an admin sees them newest first, downloads one as a file
(``message/rfc822`` as an attachment, never rendered: it is hostile until shown otherwise), and,
after a reader fix is deployed, reprocesses it: read again through ``IngestHandler.prepare``; if
it reads now it becomes accepted, its attachments are stored and its ``mail.received`` outbox row
is written in the same transaction (as ``IngestHandler.store`` does for a new message), keeping
its original ``received_at``. If it still cannot be read, the new reason replaces the old one.

Admin role only (403 otherwise), also for machine tokens: quarantine can hold any mailbox's mail.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
from aiosmtpd.smtp import Session
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel

from libs.common import outbox
from libs.common.events import Envelope
from libs.common.tokens import Identity
from libs.common.web import ApiError
from services.ingest import storage
from services.ingest.received import to_event
from services.ingest.smtp import IngestEnvelope, IngestHandler

if TYPE_CHECKING:
    from services.ingest.service import IngestService

PREFIX = "/api/admin/quarantine"


class QuarantinedMessage(BaseModel):
    id: str
    mailbox_id: str
    mailbox: str  # the mailbox's address ("" if ingest no longer knows it)
    envelope_from: str
    rcpt: list[str]
    reason: str
    size: int
    received_at: datetime
    peer: str


class QuarantinePage(BaseModel):
    items: list[QuarantinedMessage]
    next_cursor: str | None


class Reprocessed(BaseModel):
    ingest_id: str
    status: Literal["accepted", "quarantined"]
    reason: str | None = None


def encode_cursor(received_at: datetime, msg_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{received_at.isoformat()}|{msg_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        at, _, key = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(at), uuid.UUID(key)
    except Exception as exc:  # anything undecodable is the client's mistake
        raise ApiError(400, "invalid cursor") from exc


def _item(r: asyncpg.Record) -> QuarantinedMessage:
    return QuarantinedMessage(
        id=str(r["id"]),
        mailbox_id=r["mailbox_id"],
        mailbox=r["mailbox_address"] or "",
        envelope_from=r["envelope_from"],
        rcpt=[x for x in r["rcpt"].split(",") if x],
        reason=r["reason"] or "",
        size=r["size"],
        received_at=r["received_at"],
        peer=r["peer"],
    )


def _key(msg_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(msg_id)
    except ValueError as exc:
        raise ApiError(404, "no such quarantined message") from exc


def router(service: IngestService, identity: Any) -> APIRouter:
    api = APIRouter()
    handler = IngestHandler(service)

    async def admin(who: Identity = Depends(identity)) -> Identity:
        if not who.is_admin:
            raise ApiError(403, "admins only")
        return who

    errors: dict[int | str, dict[str, Any]] = {
        401: {"description": "Missing or invalid bearer token"},
        403: {"description": "Not an admin"},
    }

    @api.get(
        PREFIX,
        response_model=QuarantinePage,
        responses={**errors, 400: {"description": "Invalid cursor"}},
    )
    async def list_quarantine(
        limit: int = Query(50, ge=1, le=200),
        cursor: str | None = Query(None, max_length=200),
        _: Identity = Depends(admin),
    ) -> QuarantinePage:
        """Quarantined messages of every mailbox, newest first, with why they were kept aside."""
        before = decode_cursor(cursor) if cursor else None
        rows = await storage.list_quarantined(service.pool, limit + 1, before)
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = encode_cursor(rows[-1]["received_at"], rows[-1]["id"]) if more else None
        return QuarantinePage(items=[_item(r) for r in rows], next_cursor=nxt)

    @api.get(
        PREFIX + "/{msg_id}/raw",
        response_class=Response,
        responses={
            200: {
                "description": "The raw message as stored, always as a download",
                "content": {"message/rfc822": {}},
            },
            **errors,
            404: {"description": "No such quarantined message"},
        },
    )
    async def raw(msg_id: str, _: Identity = Depends(admin)) -> Response:
        """The quarantined message's bytes (line endings already normalized to CRLF)."""
        row = await storage.quarantined(service.pool, _key(msg_id))
        if row is None:
            raise ApiError(404, "no such quarantined message")
        return Response(
            bytes(row["raw"]),
            media_type="message/rfc822",
            headers={
                "content-disposition": f'attachment; filename="quarantined-{row["id"]}.eml"',
                "x-content-type-options": "nosniff",
                "content-security-policy": "sandbox",
                "cache-control": "no-store",
            },
        )

    @api.post(
        PREFIX + "/{msg_id}/reprocess",
        response_model=Reprocessed,
        responses={
            **errors,
            404: {"description": "No such quarantined message"},
            409: {"description": "Reprocessed meanwhile by another request"},
        },
    )
    async def reprocess(msg_id: str, _: Identity = Depends(admin)) -> Reprocessed:
        """Read the stored message again; if it reads now, accept and announce it."""
        key = _key(msg_id)
        row = await storage.quarantined(service.pool, key)
        if row is None:
            raise ApiError(404, "no such quarantined message")
        envelope = IngestEnvelope()
        envelope.original_content = bytes(row["raw"])
        prepared = await handler.prepare(Session(asyncio.get_running_loop()), envelope)
        if isinstance(prepared, str):
            reason = f"over a content limit: {prepared}"
        elif prepared.read is None:
            reason = prepared.reason or "unreadable"
        else:
            read = prepared.read
            async with service.pool.acquire() as conn, conn.transaction():
                if await storage.quarantined(conn, key, for_update=True) is None:
                    raise ApiError(409, "already reprocessed")
                box = await storage.mailbox_by_id(conn, row["mailbox_id"])
                if box is None:
                    raise ApiError(409, "the message's mailbox is unknown to ingest")
                await storage.release_quarantined(conn, key, read.message_id)
                refs = []
                for part in read.parts:
                    att_id = await storage.insert_attachment(
                        conn,
                        message_id=key,
                        mailbox_id=box.id,
                        data=part.data,
                        filename=part.filename,
                        content_type=part.content_type,
                        content_id=part.content_id,
                        inline=part.inline,
                    )
                    refs.append((str(att_id), part))
                payload = to_event(read, str(key), box, refs, row["received_at"])
                await outbox.add(conn, Envelope.of(payload, producer="ingest"))
            service.relay.wake()
            service.bounces.wake()
            return Reprocessed(ingest_id=str(key), status="accepted")
        await storage.set_quarantine_reason(service.pool, key, reason)
        return Reprocessed(ingest_id=str(key), status="quarantined", reason=reason)

    return api
