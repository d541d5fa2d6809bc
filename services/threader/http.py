"""The conversation API of the contract: list, detail, mark read, reply."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from libs.common import outbox
from libs.common.events import Address, Envelope, MailSend
from libs.common.tokens import Identity
from libs.common.web import ApiError, identity_dependency
from services.threader import storage

identity = identity_dependency(lambda request: request.app.state.service.verifier)
router = APIRouter()


def _cursor_encode(at: datetime, id_: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(json.dumps([at.isoformat(), str(id_)]).encode()).decode()


def _cursor_decode(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        at, id_ = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(at), uuid.UUID(id_)
    except Exception as exc:
        raise ApiError(400, "invalid cursor") from exc


def _uuid_or_404(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise ApiError(404, "conversation not found") from exc


async def _visible(request: Request, who: Identity, id_conversa: str) -> Any:
    """The conversation if the agent may see it; 404 otherwise, never revealing it exists."""
    row = await storage.resolve(request.app.state.service.pool, _uuid_or_404(id_conversa))
    if row is None or row["mailbox_id"] not in who.mailboxes:
        raise ApiError(404, "conversation not found")
    return row


def _item(row: Any) -> dict[str, Any]:
    return {
        "id_conversa": str(row["id_conversa"]),
        "number": row["number"],
        "subject": row["subject"],
        "mailbox": row["mailbox_id"],
        "channel": row["channel"],
        "status": row["status"],
        "participants": row["participants"],
        "last_message_at": row["last_message_at"].isoformat(),
        "message_count": row["message_count"],
        "unread": bool(row.get("unread", False)) if hasattr(row, "get") else False,
    }


def _message(row: Any) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "message_id": row["message_id"],
        "channel": row["channel"],
        "direction": row["direction"],
        "from": row["sender"],
        "to": row["to_addrs"],
        "cc": row["cc_addrs"],
        "subject": row["subject"],
        "date": row["date"].isoformat(),
        "text": row["text_body"],
        "html": row["html_body"],
        "attachments": [
            {
                k: a.get(k)
                for k in ("id", "filename", "content_type", "size", "content_id", "inline")
            }
            for a in row["attachments"]
        ],
        "status": row["status"],
        "in_reply_to": list(row["in_reply_to"]),
        "references": list(row["refs"]),
    }


@router.get("/api/conversations")
async def list_conversations(
    request: Request,
    who: Identity = Depends(identity),
    mailbox: str | None = None,
    status: Literal["open", "pending", "closed"] | None = None,
    q: str | None = Query(None, max_length=200),
    cursor: str | None = None,
    limit: int = Query(25, ge=1, le=100),
) -> dict[str, Any]:
    boxes = sorted(who.mailboxes)
    if mailbox is not None:
        boxes = [mailbox] if mailbox in who.mailboxes else []
    rows = await storage.list_conversations(
        request.app.state.service.pool,
        user_id=who.sub,
        mailboxes=boxes,
        status=status,
        q=q,
        after=_cursor_decode(cursor) if cursor else None,
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = _cursor_encode(rows[-1]["last_message_at"], rows[-1]["id_conversa"]) if more else None
    return {"items": [_item(r) for r in rows], "next_cursor": nxt}


@router.get("/api/conversations/{id_conversa}")
async def get_conversation(
    id_conversa: str, request: Request, who: Identity = Depends(identity)
) -> JSONResponse:
    row = await _visible(request, who, id_conversa)
    msgs = await storage.messages_of(request.app.state.service.pool, row["id_conversa"])
    body = {**_item(row), "messages": [_message(m) for m in msgs]}
    headers = {}
    if str(row["id_conversa"]) != id_conversa.lower():
        # An id merged into another answers with the survivor; the alias is documented.
        body["merged_from"] = id_conversa
        headers["content-location"] = f"/api/conversations/{row['id_conversa']}"
    return JSONResponse(body, headers=headers)


@router.post("/api/conversations/{id_conversa}/read", status_code=204)
async def mark_read(id_conversa: str, request: Request, who: Identity = Depends(identity)) -> None:
    row = await _visible(request, who, id_conversa)
    await storage.mark_read(request.app.state.service.pool, who.sub, row["id_conversa"])


class ReplyIn(BaseModel):
    html: str = Field(min_length=1, max_length=2_000_000)
    attachments: list[str] = Field(default_factory=list, max_length=50)
    to: list[Address] | None = None
    cc: list[Address] | None = None
    client_id: str = Field(default="", max_length=200)


@router.post("/api/conversations/{id_conversa}/replies", status_code=202)
async def reply(
    id_conversa: str, body: ReplyIn, request: Request, who: Identity = Depends(identity)
) -> dict[str, str]:
    if not who.is_agent:
        raise ApiError(403, "only agents can reply")
    row = await _visible(request, who, id_conversa)
    svc = request.app.state.service
    send_id = str(uuid.uuid4())
    cmd = MailSend(
        send_id=send_id,
        client_id=body.client_id,
        id_conversa=str(row["id_conversa"]),
        mailbox_id=row["mailbox_id"],
        user_id=who.sub,
        html=body.html,
        attachments=body.attachments,
        to=body.to,
        cc=body.cc,
    )
    async with svc.pool.acquire() as conn, conn.transaction():
        await outbox.add(conn, Envelope.of(cmd, producer="threader"))
    svc.relay.wake()
    return {"send_id": send_id}
