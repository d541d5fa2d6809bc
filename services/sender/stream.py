"""Sender's stream handlers: keep our view of mailboxes and threads, queue ``mail.send`` commands."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from libs.common import inbox, outbox
from libs.common.bus import Handler
from libs.common.events import (
    ConversationMessageAdded,
    Envelope,
    MailboxChanged,
    MailSend,
    MailStatus,
    SentMessage,
)
from services.sender.domain import compose as c

if TYPE_CHECKING:
    from services.sender.service import SenderService

CONSUMER = "sender"


def status_event(
    row: Any, status: str, detail: str, env: Envelope | None = None, **kw: Any
) -> Envelope:
    payload = MailStatus(
        send_id=str(row["send_id"]),
        client_id=row["client_id"],
        id_conversa=row["id_conversa"],
        mailbox_id=row["mailbox_id"],
        user_id=row["user_id"],
        status=status,  # type: ignore[arg-type]
        detail=detail,
        attempt=row["attempts"],
        **kw,
    )
    return Envelope.of(
        payload, producer="sender", correlation_id=env.correlation_id if env else None
    )


def _addr(d: dict[str, Any]) -> c.Addr:
    return c.Addr(name=d.get("name") or "", address=d["address"])


async def _thread(conn: asyncpg.Connection, id_conversa: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT * FROM thread_messages WHERE id_conversa = $1 ORDER BY date, seen_at",
            id_conversa,
        )
    )


def plan(
    cmd: MailSend, box: asyncpg.Record, thread: list[asyncpg.Record], now: datetime
) -> tuple[c.Draft, c.ThreadContext]:
    """Who gets the reply and which headers thread it, from our view of the conversation."""
    last = thread[-1]
    last_in = next((m for m in reversed(thread) if m["direction"] == "in"), None)
    if cmd.to is not None:
        to = [c.Addr(a.name, a.address) for a in cmd.to]
    elif last_in is not None:
        to = [_addr(last_in["sender"])]
    else:
        to = [_addr(a) for a in last["to_addrs"]]
    cc = [c.Addr(a.name, a.address) for a in cmd.cc] if cmd.cc is not None else []
    domain = box["address"].rpartition("@")[2]
    number = last["number"]
    token = str(number) if number is not None else cmd.id_conversa.split("-")[0]
    draft = c.Draft(
        mailbox=c.Addr(box["name"], box["address"]),
        to=to,
        cc=cc,
        html=cmd.html,
        attachments=[],
        # Short enough that clients' folders keep it one plain token (long ids get encoded).
        message_id=f"<{uuid.UUID(cmd.send_id).hex}.{token}@{domain}>",
        reply_to=None,
        date=now,
    )
    subject = cmd.subject or thread[0]["conv_subject"] or thread[0]["subject"]
    ctx = c.ThreadContext(
        subject=subject,
        last_message_id=last["message_id"],
        references=list(last["refs"]),
        token=token,
    )
    return draft, ctx


def handlers(svc: SenderService) -> tuple[Handler, Handler, Handler]:
    async def on_mailbox(env: Envelope, entry_id: str) -> None:
        box = env.payload_as(MailboxChanged)
        async with svc.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, CONSUMER, env.id):
                return
            await conn.execute(
                """INSERT INTO mailboxes (id, address, name, active) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (id) DO UPDATE SET address = $2, name = $3, active = $4""",
                box.mailbox_id,
                box.address,
                box.name,
                box.active,
            )

    async def on_message_added(env: Envelope, entry_id: str) -> None:
        ev = env.payload_as(ConversationMessageAdded)
        m = ev.message
        async with svc.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, CONSUMER, env.id):
                return
            await conn.execute(
                """INSERT INTO thread_messages (id_conversa, message_id, mailbox_id, number,
                       conv_subject, direction, sender, to_addrs, cc_addrs, subject, date, refs)
                   VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)
                   ON CONFLICT DO NOTHING""",
                ev.id_conversa,
                m.message_id,
                ev.mailbox_id,
                ev.conversation.number,
                ev.conversation.subject,
                m.direction,
                m.from_.model_dump(),
                [a.model_dump() for a in m.to],
                [a.model_dump() for a in m.cc],
                m.subject,
                m.date,
                m.references,
            )

    async def on_send(env: Envelope, entry_id: str) -> None:
        cmd = env.payload_as(MailSend)
        deadline = time.monotonic() + svc.settings.unknown_conversation_wait_s
        while True:
            async with svc.pool.acquire() as conn:
                thread = await _thread(conn, cmd.id_conversa)
            if thread or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)  # the conversation's message_added may still be on its way
        async with svc.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, CONSUMER, env.id):
                return
            if await conn.fetchval(
                "SELECT 1 FROM sends WHERE send_id = $1", uuid.UUID(cmd.send_id)
            ):
                return
            box = await conn.fetchrow("SELECT * FROM mailboxes WHERE id = $1", cmd.mailbox_id)
            failure = ""
            mime = None
            sent: SentMessage | None = None
            draft = None
            if box is None:
                failure = "unknown mailbox"
            elif not thread:
                failure = "unknown conversation"
            else:
                try:
                    draft, ctx = plan(cmd, box, thread, datetime.now(UTC))
                    mime = c.compose(draft, ctx)
                    clean = c.sanitize(draft.html)
                    irt, refs = c.build_references(ctx.last_message_id, ctx.references)
                    sent = SentMessage.model_validate(
                        {
                            "message_id": draft.message_id,
                            "from": {"name": draft.mailbox.name, "address": draft.mailbox.address},
                            "to": [{"name": a.name, "address": a.address} for a in draft.to],
                            "cc": [{"name": a.name, "address": a.address} for a in draft.cc],
                            "subject": c.reply_subject(ctx.subject, ctx.token),
                            "date": draft.date,
                            "text": c.html_to_text(clean),
                            "html": clean,
                            "in_reply_to": irt,
                            "references": refs,
                        }
                    )
                except (c.HeaderInjection, c.InvalidDraft) as exc:
                    failure = f"invalid message: {exc}"
            row = await conn.fetchrow(
                """INSERT INTO sends (send_id, client_id, user_id, id_conversa, mailbox_id, state,
                                      message_id, mail_from, recipients, mime, sent_message, detail)
                   VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) RETURNING *""",
                uuid.UUID(cmd.send_id),
                cmd.client_id,
                cmd.user_id,
                cmd.id_conversa,
                cmd.mailbox_id,
                "failed" if failure else "queued",
                draft.message_id if draft else None,
                box["address"] if box else None,
                [a.address for a in (draft.to + draft.cc)] if draft else [],
                mime,
                sent.model_dump(mode="json") if sent else None,
                failure,
            )
            await outbox.add(
                conn, status_event(row, "failed" if failure else "queued", failure or "queued", env)
            )
        svc.relay.wake()
        svc.delivery.wake()

    return on_mailbox, on_message_added, on_send
