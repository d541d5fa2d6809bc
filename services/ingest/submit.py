"""``POST /api/messages/raw``: other systems hand ingest a raw RFC 5322 message over HTTPS.

The message takes the SMTP path, not a copy of it: the same ``IngestHandler.prepare`` (line
endings normalized, content limits, read or quarantined) and ``IngestHandler.store`` (one
transaction with the ``mail.received`` outbox row, the same raw bytes for the same mailbox stored
once), so a message submitted here cannot be read or announced differently from one that came by
SMTP.

Who may call: a machine client whose token carries the ``ingest:submit`` scope (client
credentials), or an admin. Agents may not, not even for their own mailboxes: a message here
appears as mail *from a customer*, and no agent workflow needs to forge one.

The body is the message itself (``Content-Type: message/rfc822``), at most
``smtp_max_message_bytes`` (413 above, checked while reading). ``mailbox`` is the address or the
id of one of our mailboxes (404 otherwise); ``mail_from`` is the envelope sender (the return
path), empty by default: like any message with a null return path it is then also checked as a
possible bounce (``bounces.py``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal

from aiosmtpd.smtp import Session
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from libs.common.tokens import Identity
from libs.common.web import ApiError, read_limited_body
from services.ingest import storage
from services.ingest.smtp import IngestEnvelope, IngestHandler, base_address

if TYPE_CHECKING:
    from services.ingest.service import IngestService

SCOPE = "ingest:submit"
MEDIA_TYPES = ("message/rfc822", "message/global")


class Submitted(BaseModel):
    ingest_id: str
    status: Literal["accepted", "quarantined", "duplicate"]
    reason: str | None = None


def find_mailbox(service: IngestService, key: str) -> storage.Mailbox | None:
    """A mailbox by address (``box+tag@x`` is ``box@x``, as for SMTP) or by id."""
    key = key.strip()
    if "@" in key:
        return service.mailboxes.get(base_address(key))
    return next((b for b in service.mailboxes.values() if b.id == key), None)


def router(service: IngestService, identity: Any) -> APIRouter:
    api = APIRouter()
    handler = IngestHandler(service)

    @api.post(
        "/api/messages/raw",
        status_code=202,
        response_model=Submitted,
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "The raw RFC 5322 message, exactly as it would be sent by SMTP",
                "content": {"message/rfc822": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
        responses={
            200: {"description": "Already stored (same bytes, same mailbox)", "model": Submitted},
            202: {"description": "Stored and committed; read, or quarantined with its reason"},
            401: {"description": "Missing or invalid bearer token"},
            403: {"description": f"Neither the {SCOPE} scope nor the admin role"},
            404: {"description": "No such mailbox"},
            413: {"description": "Larger than smtp_max_message_bytes"},
            415: {"description": "Not message/rfc822"},
            422: {"description": "Empty, or over a content limit (line length, header fields)"},
        },
    )
    async def submit(
        request: Request,
        mailbox: str = Query(max_length=320, description="address or id of one of our mailboxes"),
        mail_from: str = Query("", max_length=320, description="envelope sender (return path)"),
        who: Identity = Depends(identity),
    ) -> JSONResponse:
        """Store a raw message for a mailbox exactly as if it had arrived by SMTP."""
        if SCOPE not in who.scopes and not who.is_admin:
            raise ApiError(403, f"needs the {SCOPE} scope")
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype not in MEDIA_TYPES:
            raise ApiError(415, "send the message as message/rfc822")
        box = find_mailbox(service, mailbox)
        if box is None:
            raise ApiError(404, "no such mailbox")
        if any(c in mail_from for c in "\r\n<>\x00"):
            raise ApiError(422, "mail_from must be a bare address")
        limit = service.settings.smtp_max_message_bytes
        raw = await read_limited_body(
            request, limit, f"message larger than the limit of {limit} octets"
        )
        if not raw.strip():
            raise ApiError(422, "empty message")
        envelope = IngestEnvelope()
        envelope.mail_from = mail_from
        envelope.original_content = raw
        envelope.rcpt_tos.append(box.address)
        envelope.boxes.append(box)
        session = Session(asyncio.get_running_loop())
        # Recorded as the message's peer: which system handed it over.
        session.peer = (f"api:{who.client_id or who.sub}", 0)  # type: ignore[assignment]
        prepared = await handler.prepare(session, envelope)
        if isinstance(prepared, str):
            raise ApiError(422, prepared.split(" ", 2)[-1])
        (stored,) = await handler.finish(handler.store(prepared, [box], session, envelope))
        service.bounces.wake()
        if not stored.new:
            body = Submitted(ingest_id=stored.id, status="duplicate")
            return JSONResponse(body.model_dump(), 200)
        status: Literal["accepted", "quarantined"] = (
            "accepted" if prepared.read is not None else "quarantined"
        )
        body = Submitted(ingest_id=stored.id, status=status, reason=prepared.reason)
        return JSONResponse(body.model_dump(), 202)

    return api
