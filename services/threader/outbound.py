"""``POST /api/conversations``: an agent starts a conversation by writing to a customer.

The conversation is created open, with the recipients as its participants and the subject as
typed, and its first message is commanded (``mail.send``) in the same transaction, through the
outbox, with ``conversation.updated`` so every agent's list shows it at once. The sender has no
message of a new conversation to thread by, so the command carries what it needs
(``NewConversation``: the number and the signed token our Message-ID and Reply-To carry); the
customer's answer then finds the conversation like any answer to a reply does, also when a relay
rewrote our Message-ID (the token of the Reply-To address still names it).

A retry with the same ``client_id`` (same agent) answers with the first request's ids.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from libs.common import outbox
from libs.common.events import ConversationUpdated, Envelope, MailSend, NewConversation
from libs.common.tokens import Identity
from libs.common.web import ApiError
from services.threader import storage
from services.threader.domain import tokens
from services.threader.http import (
    AddressIn,
    Error,
    OneLine,
    ReplyHtml,
    _addresses,
    _errors,
    agent,
)

router = APIRouter()


class StartIn(BaseModel):
    mailbox: str = Field(min_length=1, max_length=200, description="the mailbox it is sent from")
    to: list[AddressIn] = Field(min_length=1, max_length=50)
    cc: list[AddressIn] | None = Field(None, max_length=50)
    subject: OneLine = Field(min_length=1, max_length=500)
    html: ReplyHtml = Field(min_length=1, max_length=2_000_000)
    attachments: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,100}$")]] = Field(
        default_factory=list, max_length=50, description="ids from POST /api/attachments"
    )
    client_id: OneLine = Field(
        default="",
        max_length=200,
        description="the client's id: a retry with it starts nothing new",
    )


class Started(BaseModel):
    id_conversa: str
    send_id: str


class _Replay(Exception):
    """The same (agent, client_id) was started meanwhile: roll back and answer with that one."""


async def _started(conn: Any, user_id: str, client_id: str) -> dict[str, str] | None:
    if not client_id:
        return None
    row = await storage.client_id_use(conn, user_id, client_id)
    if row is None:
        return None
    if row["kind"] != "start":
        raise ApiError(409, f"client_id {client_id!r} was already used for a reply")
    return {"id_conversa": str(row["id_conversa"]), "send_id": str(row["send_id"])}


async def create_conversation(
    conn: asyncpg.Connection, mailbox_id: str, subject: str, participants: list[dict[str, str]]
) -> asyncpg.Record:
    """A new open conversation with no message yet, placed at the top of its mailbox's list."""
    row: asyncpg.Record = await conn.fetchrow(
        """INSERT INTO conversations (id_conversa, mailbox_id, channel, subject, status,
                                      created_at, last_message_at, participants, activity_seq)
           VALUES ($1, $2, 'email', $3, 'open', clock_timestamp(), clock_timestamp(), $4,
                   nextval('activity_seq'))
           RETURNING *""",
        uuid.uuid4(),
        mailbox_id,
        subject,
        participants,
    )
    await conn.execute(
        "INSERT INTO activity (seq, id_conversa, last_message_at) VALUES ($1, $2, $3)",
        row["activity_seq"],
        row["id_conversa"],
        row["last_message_at"],
    )
    return row


@router.post(
    "/api/conversations",
    status_code=202,
    response_model=None,
    responses={
        202: {"model": Started},
        **_errors(401, 403, 409, 422),
        404: {"model": Error, "description": "The mailbox is not one of the agent's"},
    },
)
async def start_conversation(
    body: StartIn, request: Request, who: Identity = Depends(agent)
) -> dict[str, str]:
    """Open a conversation with a first message to ``to`` (and ``cc``); the mail goes out like a
    reply (``send.status`` on the WebSocket, ``mail.status`` on the bus)."""
    if body.mailbox not in who.mailboxes:
        raise ApiError(404, "mailbox not found")
    svc = request.app.state.service
    to, cc = _addresses(body.to) or [], _addresses(body.cc)
    participants: list[dict[str, str]] = []
    for a in [*to, *(cc or [])]:
        if all(p["address"].lower() != a.address.lower() for p in participants):
            participants.append(a.model_dump())
    async with svc.pool.acquire() as conn:
        done = await _started(conn, who.sub, body.client_id)
        if done is not None:
            return done
        try:
            async with conn.transaction():
                conv = await create_conversation(conn, body.mailbox, body.subject, participants)
                send_id = uuid.uuid4()
                if body.client_id and not await conn.fetchval(
                    """INSERT INTO outbound_starts (user_id, client_id, id_conversa, send_id)
                       VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1""",
                    who.sub,
                    body.client_id,
                    conv["id_conversa"],
                    send_id,
                ):
                    raise _Replay
                state = storage.state(conv, svc.token_secret)
                cmd = MailSend(
                    send_id=str(send_id),
                    client_id=body.client_id,
                    id_conversa=state.id_conversa,
                    mailbox_id=body.mailbox,
                    user_id=who.sub,
                    html=body.html,
                    attachments=body.attachments,
                    to=to,
                    cc=cc,
                    subject=body.subject,
                    conversation=NewConversation(
                        number=conv["number"],
                        token=tokens.sign(conv["number"], svc.token_secret),
                        subject=body.subject,
                    ),
                )
                await outbox.add(
                    conn,
                    Envelope.of(cmd, producer="threader"),
                    Envelope.of(
                        ConversationUpdated(**state.model_dump(by_alias=False)),
                        producer="threader",
                    ),
                )
        except _Replay:
            replayed = await _started(conn, who.sub, body.client_id)
            if replayed is None:  # pragma: no cover - the conflicting row committed
                raise ApiError(409, "a start with this client_id is in progress") from None
            return replayed
    svc.relay.wake()
    return {"id_conversa": state.id_conversa, "send_id": str(send_id)}
