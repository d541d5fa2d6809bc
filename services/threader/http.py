"""The conversation API of the contract: list, detail, mark read, reply.

Every route is for agents only: a machine token (client credentials: no roles, no mailboxes) gets
403. An agent gets 404 for a conversation outside its mailboxes, never learning that it exists.
Inputs are refused with 4xx before they can reach SQL or the outbox in a shape PostgreSQL rejects.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from libs.common import outbox, roster
from libs.common.addresses import check_address
from libs.common.events import (
    Address,
    ConversationRead,
    ConversationUpdated,
    Envelope,
    MailSend,
)
from libs.common.tokens import Identity
from libs.common.web import ApiError, identity_dependency
from services.threader import storage

identity = identity_dependency(lambda request: request.app.state.service.verifier)


router = APIRouter()

# PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded as UTF-8: both would
# fail deep inside asyncpg (a 500), so they are refused at the edge of the API.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
NO_NUL = r"^[^\x00]*$"
CURSOR = r"^[A-Za-z0-9_=-]+$"


def _storable(value: str) -> str:
    if _UNSTORABLE.search(value):
        raise ValueError("must not contain NUL or unpaired surrogate characters")
    return value


def _one_line(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


StorableText = Annotated[str, AfterValidator(_storable)]
OneLine = Annotated[str, AfterValidator(_one_line)]


def _has_text(value: str) -> str:
    if not value.strip():  # the WebSocket send frame strips and refuses it the same way
        raise ValueError("a reply needs some content")
    return value


ReplyHtml = Annotated[str, AfterValidator(_storable), AfterValidator(_has_text)]


async def agent(request: Request, who: Identity = Depends(identity)) -> Identity:
    """Conversations are agent data: tokens without the agent or admin role are refused.

    The token's mailboxes less those auth has since taken the agent out of (``membership.changed``,
    kept in ``mailbox_agents``): a removed agent's token still listed them for its lifetime,
    so it could read and reply over REST for up to 15 minutes (found by a trial)."""
    if not who.is_agent:
        raise ApiError(403, "this API is for agents")
    return await roster.effective(request.app.state.service.pool, who)


def _cursor_encode(at: datetime, id_: uuid.UUID, as_of: int) -> str:
    raw = json.dumps([at.isoformat(), str(id_), as_of]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _cursor_decode(cursor: str) -> tuple[datetime, uuid.UUID, int | None]:
    """(position, id, walk snapshot); cursors from before snapshots carry none."""
    try:
        at, id_, *rest = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive timestamp")
        as_of = None
        if rest:
            (as_of,) = rest
            if type(as_of) is not int or not 0 <= as_of < 2**63:
                raise ValueError("bad snapshot")
        return when, uuid.UUID(id_), as_of
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


def _like_literal(q: str) -> str:
    """``storage`` drops ``%`` and ``_`` but not the ILIKE escape character: doubled, a
    backslash matches itself instead of escaping what follows (or ending the pattern badly)."""
    return q.replace("\\", "\\\\")


def _item(row: Any) -> dict[str, Any]:
    return {
        "id_conversa": str(row["id_conversa"]),
        "number": row["number"],
        "subject": row["subject"],
        "mailbox": row["mailbox_id"],
        "channel": row["channel"],
        "status": row["status"],
        "assignee": row["assignee"],
        "participants": row["participants"],
        "last_message_at": row["last_message_at"].isoformat(),
        "message_count": row["message_count"],
        "unread": bool(row.get("unread", False)) if hasattr(row, "get") else False,
        "linked_to": str(row["linked_to"]) if row["linked_to"] else None,
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
        "reply_to": row["reply_to"],
        "automatic": storage.sent_by_a_machine(row),
        "truncated": bool((row["flags"] or {}).get("truncated")),
        "incomplete": bool((row["flags"] or {}).get("incomplete")),
    }


# ---- documented shapes (OpenAPI only: the routes build their dicts themselves) ----------------


class ErrorDetail(BaseModel):
    code: str
    message: str


class Error(BaseModel):
    """Every error of the API: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


class Participant(BaseModel):
    name: str = ""
    address: str


class ConversationItem(BaseModel):
    id_conversa: str
    number: int
    subject: str
    mailbox: str
    channel: str
    status: Literal["open", "pending", "closed"]
    assignee: str | None = Field(None, description="user id of the agent it is assigned to")
    participants: list[Participant]
    last_message_at: datetime
    message_count: int
    unread: bool
    linked_to: str | None = Field(
        None,
        description="the earlier conversation this one follows: the broadcast of ours it "
        "answers, or the closed conversation it came after once older than the reopen age",
    )


class ConversationPage(BaseModel):
    items: list[ConversationItem]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class AttachmentInfo(BaseModel):
    id: str
    filename: str
    content_type: str
    size: int
    content_id: str | None = None
    inline: bool = False


class Message(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    message_id: str
    channel: str
    direction: Literal["in", "out"]
    from_: Participant = Field(alias="from")
    to: list[Participant]
    cc: list[Participant]
    subject: str
    date: datetime
    text: str
    html: str
    attachments: list[AttachmentInfo]
    status: str | None
    in_reply_to: list[str]
    references: list[str]
    reply_to: list[Participant] = Field(
        description="where the sender asked replies to go (Reply-To); a reply goes there"
    )
    automatic: bool = Field(
        description="sent by a machine (an auto-reply, a bounce): it reopened nothing and "
        "counts as no unread mail"
    )
    truncated: bool = Field(
        description="the text or HTML was cut for size; the whole text is the attachment "
        "message.txt"
    )
    incomplete: bool = Field(
        description="part of the body could not be read (nested too deep, too many parts); "
        "an admin can get the raw message from ingest"
    )


class ConversationDetail(ConversationItem):
    messages: list[Message]
    merged_from: str | None = Field(
        None, description="the id asked for, when it was merged into this conversation"
    )


class ReplyAccepted(BaseModel):
    send_id: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Bad request",
        401: "Missing or invalid bearer token",
        403: "Not an agent token",
        404: "No such conversation in the agent's mailboxes",
        409: "The client_id was already used for another request",
        422: "Invalid parameters or body",
    }
    return {s: {"model": Error, "description": text[s]} for s in statuses}


# ---- routes --------------------------------------------------------------------------------------


@router.get(
    "/api/conversations",
    response_model=None,
    responses={200: {"model": ConversationPage}, **_errors(400, 401, 403, 422)},
)
async def list_conversations(
    request: Request,
    who: Identity = Depends(agent),
    mailbox: str | None = Query(None, max_length=200),
    status: Literal["open", "pending", "closed"] | None = None,
    assignee: str | None = Query(
        None, min_length=1, max_length=200, pattern=NO_NUL, description="a user id, or `me`"
    ),
    unread: bool | None = Query(None, description="only unread (true) or only read (false)"),
    q: str | None = Query(
        None,
        max_length=200,
        pattern=NO_NUL,
        description="full-text search over subject, bodies and participants (accents ignored)",
    ),
    cursor: str | None = Query(None, max_length=500, pattern=CURSOR),
    limit: int = Query(25, ge=1, le=100),
) -> dict[str, Any]:
    """Newest activity first, in pages joined by ``next_cursor``.

    A walk (a first page and the cursors that follow from it) is a snapshot of the order at its
    first page: every conversation that existed then is returned exactly once, even when mail
    arrives while paging.  A conversation that gets new activity moves to the top and may
    appear again on a later *first* page, but never twice in one walk; conversations created
    after the walk started belong to the next walk.  Filters apply to the current state.
    """
    boxes = sorted(who.mailboxes)
    if mailbox is not None:
        boxes = [mailbox] if mailbox in who.mailboxes else []
    after = _cursor_decode(cursor) if cursor else None
    pool = request.app.state.service.pool
    async with pool.acquire() as conn, conn.transaction():
        as_of = after[2] if after and after[2] is not None else await storage.snapshot(conn, boxes)
        rows = await storage.list_conversations(
            conn,
            user_id=who.sub,
            mailboxes=boxes,
            status=status,
            assignee=who.sub if assignee == "me" else assignee,
            unread=unread,
            q=q.strip() or None if q else None,
            after=after[:2] if after else None,
            as_of=as_of,
            limit=limit + 1,
        )
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    nxt = _cursor_encode(last["walk_key"], last["id_conversa"], as_of) if more and last else None
    return {"items": [_item(r) for r in rows], "next_cursor": nxt}


@router.get(
    "/api/conversations/{id_conversa}",
    response_model=None,
    responses={200: {"model": ConversationDetail}, **_errors(401, 403, 404)},
)
async def get_conversation(
    id_conversa: str, request: Request, who: Identity = Depends(agent)
) -> JSONResponse:
    asked = _uuid_or_404(id_conversa)
    row = await _visible(request, who, id_conversa)
    pool = request.app.state.service.pool
    msgs = await storage.messages_of(pool, row["id_conversa"])
    body = {**_item(row), "messages": [_message(m) for m in msgs]}
    body["unread"] = await storage.is_unread(pool, who.sub, row["id_conversa"])
    headers = {}
    if row["id_conversa"] != asked:
        # An id merged into another answers with the survivor; the alias is documented.
        body["merged_from"] = str(asked)
        headers["content-location"] = f"/api/conversations/{row['id_conversa']}"
    return JSONResponse(body, headers=headers)


@router.post(
    "/api/conversations/{id_conversa}/read",
    status_code=204,
    response_model=None,
    responses=_errors(401, 403, 404),
)
async def mark_read(id_conversa: str, request: Request, who: Identity = Depends(agent)) -> None:
    """Read for this agent; ``conversation.read`` tells the notifier to zero their badge."""
    row = await _visible(request, who, id_conversa)
    svc = request.app.state.service
    async with svc.pool.acquire() as conn, conn.transaction():
        read_at = await storage.mark_read(conn, who.sub, row["id_conversa"])
        event = ConversationRead(
            id_conversa=str(row["id_conversa"]),
            mailbox_id=row["mailbox_id"],
            user_id=who.sub,
            read_at=read_at,
        )
        await outbox.add(conn, Envelope.of(event, producer="threader"))
    svc.relay.wake()


class StateIn(BaseModel):
    """The fields to change; an absent field stays as it is, ``assignee: null`` unassigns."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["open", "pending", "closed"] | None = None
    assignee: OneLine | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="the user id of an agent of the conversation's mailbox, `me`, or null to "
        "unassign",
    )


@router.patch(
    "/api/conversations/{id_conversa}",
    response_model=None,
    responses={200: {"model": ConversationItem}, **_errors(401, 403, 404, 422)},
)
async def update_conversation(
    id_conversa: str, body: StateIn, request: Request, who: Identity = Depends(agent)
) -> dict[str, Any]:
    """Set status and/or assignee; a real change is announced as ``conversation.updated`` in the
    same transaction (the event has no assignee field: it lives in libs.common)."""
    if "status" in body.model_fields_set and body.status is None:
        raise ApiError(422, "status must be open, pending or closed")
    svc = request.app.state.service
    assignee = who.sub if body.assignee == "me" else body.assignee
    for _ in range(3):  # a merge between lookup and lock moves the change to the survivor
        row = await _visible(request, who, id_conversa)
        if (
            assignee is not None
            and assignee != who.sub  # the caller is an agent of it: the token says so
            and not await storage.assignable(svc.pool, row["mailbox_id"], assignee)
        ):
            raise ApiError(
                422,
                f"assignee {assignee!r} is not an agent of this conversation's mailbox "
                "(a member with an enabled account)",
            )
        async with svc.pool.acquire() as conn, conn.transaction():
            done = await storage.update_state(
                conn,
                row["id_conversa"],
                status=body.status,
                assignee=assignee,
                set_assignee="assignee" in body.model_fields_set,
            )
            if done is None:
                continue
            updated, changed = done
            if changed:
                conv = storage.state(updated, request.app.state.service.token_secret)
                await outbox.add(
                    conn,
                    Envelope.of(
                        ConversationUpdated(**conv.model_dump(by_alias=False)),
                        producer="threader",
                    ),
                )
        if changed:
            svc.relay.wake()
        item = _item(updated)
        item["unread"] = await storage.is_unread(svc.pool, who.sub, updated["id_conversa"])
        return item
    raise ApiError(404, "conversation not found")


class AddressIn(BaseModel):
    """A recipient the agent typed: one line each, so nothing can smuggle in a header, and an
    address the sender can send to (its composer's rule), so the error is a 422 here and not a
    failed send later."""

    name: OneLine = Field("", max_length=200)
    address: OneLine = Field(
        min_length=3,
        max_length=254,
        description="local@domain: a dot-atom ASCII local part (no SMTPUTF8) and a domain of two"
        " or more labels, IDN allowed; anything else is a 422",
    )

    @field_validator("address")
    @classmethod
    def _sendable(cls, value: str) -> str:
        check_address(value)  # AddressError is a ValueError: pydantic's 422 names the reason
        return value.strip()


class ReplyIn(BaseModel):
    html: ReplyHtml = Field(min_length=1, max_length=2_000_000)
    attachments: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,100}$")]] = Field(
        default_factory=list, max_length=50
    )
    to: list[AddressIn] | None = Field(
        None, min_length=1, max_length=50, description="omitted: the conversation's customer"
    )
    cc: list[AddressIn] | None = Field(None, max_length=50)
    client_id: OneLine = Field(default="", max_length=200)
    draft: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="the collaborative draft this reply was written in: emptied once sent",
    )


def _addresses(values: list[AddressIn] | None) -> list[Address] | None:
    return None if values is None else [Address(name=a.name, address=a.address) for a in values]


@router.post(
    "/api/conversations/{id_conversa}/replies",
    status_code=202,
    response_model=None,
    responses={202: {"model": ReplyAccepted}, **_errors(401, 403, 404, 409, 422)},
)
async def reply(
    id_conversa: str, body: ReplyIn, request: Request, who: Identity = Depends(agent)
) -> dict[str, str]:
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
        to=_addresses(body.to),
        cc=_addresses(body.cc),
        draft=body.draft,
    )
    async with svc.pool.acquire() as conn, conn.transaction():
        if body.client_id:
            first = await storage.claim_reply_client_id(
                conn, who.sub, body.client_id, row["id_conversa"], send_id
            )
            if first is not None:
                if first["kind"] == "reply" and first["id_conversa"] == row["id_conversa"]:
                    return {"send_id": str(first["send_id"])}  # a retry: sent once
                raise ApiError(
                    409,
                    f"client_id {body.client_id!r} was already used for "
                    + (
                        "a reply in another conversation"
                        if first["kind"] == "reply"
                        else "a conversation this agent started"
                    ),
                )
        await outbox.add(conn, Envelope.of(cmd, producer="threader"))
    svc.relay.wake()
    return {"send_id": send_id}
