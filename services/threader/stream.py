"""Threader's stream handlers: inbound mail and our own sent mail join their conversations."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import asyncpg

from libs.common import inbox, outbox, roster
from libs.common.bus import BatchHandler, Handler, take_turn
from libs.common.events import (
    ConversationRead,
    Envelope,
    MailReceived,
    MailStatus,
    UserChanged,
)
from services.threader import announcements, placement, storage

if TYPE_CHECKING:
    from services.threader.service import ThreaderService

CONSUMER = "threader"
# Messages prepared between two turns of the loop (~60 us each).
PREPARE_SLICE = 16


async def _place_received(
    svc: ThreaderService, conn: asyncpg.Connection, env: Envelope, mail: MailReceived
) -> list[Envelope]:
    """Thread one new ``mail.received`` (its id recorded, its mailbox locked); what to publish."""
    placed = await storage.place_message(
        conn,
        mailbox_id=mail.mailbox_id,
        channel=mail.channel,
        message_id=mail.message_id,
        in_reply_to=mail.in_reply_to,
        references=mail.references,
        direction="in",
        sender=mail.from_,
        to=mail.to,
        cc=mail.cc,
        subject=mail.subject,
        date=mail.date,
        text=mail.text,
        html=mail.html,
        attachments=[a.model_dump() for a in mail.attachments],
        status=None,
        flags=mail.flags.model_dump(),
        token_secret=svc.token_secret,
        our_domain=mail.mailbox_address.rpartition("@")[2],
        thread_index=mail.thread_index,
        thread_topic=mail.thread_topic,
        rules=svc.rules,
        arrived=mail.received_at,
        reply_to=mail.reply_to,
        own_address=mail.mailbox_address,
        locked=True,
    )
    return [] if placed is None else announcements.announcement(env, placed, svc.token_secret)


async def _receive(svc: ThreaderService, envs: list[Envelope]) -> None:
    """``mail.received`` events in stream order placed in one transaction (one commit): their
    ids recorded, their mailboxes locked and their events staged in one statement each, the
    mail itself set-based (``placement``: a few statements per batch, not per message).

    A batch of several reads ahead of its turn (``placement.prefetch``), on another connection,
    while the batch before it is written: under the lock, the placement counts tell whether that
    read stands, with the effects of the batch before laid over it (``svc.carried``)."""
    ticket = take_turn(svc.turns)  # the read's, in stream order (before any await)
    carried: placement.Carried | None = None
    try:
        items = [(env, env.payload_as(MailReceived)) for env in envs]
        prepared: list[placement.Prepared] = []
        for i in range(0, len(items), PREPARE_SLICE):
            if i:
                # Let the batch in PostgreSQL go on as soon as its answer is in: it holds the
                # mailbox's placement lock, and every batch waits for it.
                await asyncio.sleep(0)
            prepared += placement.prepare(items[i : i + PREPARE_SLICE])
        ahead = None
        if len(prepared) > 1:
            ahead = await placement.prefetch(svc.pool, prepared, svc.rules)
        await svc.turns.wait(ticket)
        # Only the batch of the ticket before this one left it, and it is ours to replace.
        before_us, svc.carried = svc.carried, None
        async with svc.pool.acquire() as conn, conn.transaction():
            fresh = await inbox.first_times(conn, CONSUMER, [env.id for env in envs])
            todo = (
                prepared if all(fresh) else [m for m, n in zip(prepared, fresh, strict=True) if n]
            )
            before = await storage.lock_mailboxes(conn, [m.mail.mailbox_id for m in todo])

            async def slow(env: Envelope, mail: MailReceived) -> list[announcements.Entry]:
                return announcements.entries(await _place_received(svc, conn, env, mail))

            if len(todo) == 1:
                # One mail alone (the real-time case: at tens a second each comes by itself):
                # the per-message statements cost PostgreSQL less than the set-based ones.
                events = await slow(todo[0].env, todo[0].mail)
            else:
                events, carried = await placement.place_received(
                    conn,
                    todo,
                    rules=svc.rules,
                    token_secret=svc.token_secret,
                    slow=slow,
                    ahead=ahead,
                    before=before,
                    carried=before_us,
                )
            staged = await outbox.stage_entries(conn, events)
        svc.carried = carried
        await svc.relay.publish(staged)
    finally:
        svc.turns.finish(ticket)


def received_batch(svc: ThreaderService) -> BatchHandler:
    """A read's ``mail.received`` entries together (``_receive``)."""

    async def on_batch(items: list[tuple[Envelope, str]]) -> None:
        await _receive(svc, [env for env, _ in items])

    return on_batch


def handlers(svc: ThreaderService) -> tuple[Handler, Handler]:
    async def on_mail_received(env: Envelope, entry_id: str) -> None:
        await _receive(svc, [env])

    async def on_mail_status(env: Envelope, entry_id: str) -> None:
        st = env.payload_as(MailStatus)
        if st.status == "failed" and st.message is not None:
            # A bounce (a DSN after our 250 from the relay): the sent message shows as failed.
            async with svc.pool.acquire() as conn, conn.transaction():
                if await inbox.first_time(conn, CONSUMER, env.id):
                    await storage.mark_message_failed(conn, st.mailbox_id, st.message.message_id)
            return
        if st.status != "sent" or st.message is None:
            return
        m = st.message
        async with svc.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, CONSUMER, env.id):
                return
            conv = await conn.fetchrow(
                "SELECT mailbox_id FROM conversations WHERE id_conversa = $1::uuid", st.id_conversa
            )
            if conv is None:
                return
            placed = await storage.place_message(
                conn,
                mailbox_id=conv["mailbox_id"],
                channel="email",
                message_id=m.message_id,
                in_reply_to=m.in_reply_to,
                references=m.references,
                direction="out",
                sender=m.from_,
                to=m.to,
                cc=m.cc,
                subject=m.subject,
                date=m.date,
                text=m.text,
                html=m.html,
                attachments=[a.model_dump() for a in m.attachments],
                status="sent",
                flags={},
                id_conversa=st.id_conversa,
                our_domain=m.from_.address.rpartition("@")[2],
                own_address=m.from_.address,
                rules=svc.rules,
            )
            if placed is None:
                return
            staged = await outbox.stage(
                conn, *announcements.announcement(env, placed, svc.token_secret)
            )
        await svc.relay.publish(staged)

    return on_mail_received, on_mail_status


def agents_handler(svc: ThreaderService) -> Handler:
    """``membership.changed`` (``libs.common.roster``) and ``user.changed``: who may be assigned
    a conversation, and whose token's mailboxes are no longer theirs."""
    members = roster.handler(svc.pool)

    async def on_agent(env: Envelope, entry_id: str) -> None:
        if env.type == "membership.changed":
            await members(env, entry_id)
        elif env.type == "user.changed":
            u = env.payload_as(UserChanged)
            await storage.record_account(svc.pool, u.user_id, u.active, env.occurred_at)

    return on_agent


def reads_handler(svc: ThreaderService) -> Handler:
    """``conversation.read`` from elsewhere (an agent's ``read`` frame on the WebSocket): the
    REST list's ``unread`` follows it (it stayed true for ever; found by a trial)."""

    async def on_read(env: Envelope, entry_id: str) -> None:
        if env.producer == CONSUMER:
            return  # our own REST mark-read, already stored
        read = env.payload_as(ConversationRead)
        try:
            conv_id = uuid.UUID(read.id_conversa)
        except ValueError:
            return
        row = await storage.resolve(svc.pool, conv_id)
        if row is None or row["mailbox_id"] != read.mailbox_id:
            return
        await storage.record_read(svc.pool, read.user_id, row["id_conversa"], read.read_at)

    return on_read
