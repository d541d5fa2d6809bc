"""Sender's stream handlers: keep our view of mailboxes and threads, queue ``mail.send`` commands.

The ``mail.send`` handler only stores the command (one short transaction, shared with the
commands other readers of the stream hand in at the same time) and publishes ``queued``: composing waits for the conversation and costs CPU, so it happens in the delivery
queue's prepare stage, and one slow or early command never holds up the ones behind it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from libs.common import inbox, outbox
from libs.common.bus import BatchHandler, Handler
from libs.common.events import (
    ConversationMessageAdded,
    Envelope,
    MailboxChanged,
    MailSend,
    MailStatus,
)
from services.sender import storage
from services.sender.groupcommit import GroupCommit

if TYPE_CHECKING:
    from services.sender.service import SenderService

CONSUMER = "sender"
log = logging.getLogger("chatflow.sender.stream")


def _failed(env: Envelope, cmd: MailSend, detail: str) -> Envelope:
    """``failed`` for a command that is not queued at all (there is no row to take it from)."""
    failed = MailStatus(
        send_id=cmd.send_id,
        client_id=cmd.client_id,
        id_conversa=cmd.id_conversa,
        mailbox_id=cmd.mailbox_id,
        user_id=cmd.user_id,
        status="failed",
        detail=detail,
    )
    return Envelope.of(failed, producer="sender", correlation_id=env.correlation_id)


def thread_batch(svc: SenderService) -> BatchHandler:
    """``conversation.message_added`` in batches: ids, rows and the release of the sends that
    waited for them in one transaction of three statements (one per inbound mail before)."""

    async def on_messages_added(items: list[tuple[Envelope, str]]) -> None:
        events = [env.payload_as(ConversationMessageAdded) for env, _ in items]
        async with svc.pool.acquire() as conn, conn.transaction():
            fresh = await inbox.first_times(conn, CONSUMER, [env.id for env, _ in items])
            rows = [_thread_row(ev) for ev, new in zip(events, fresh, strict=True) if new]
            released = await storage.add_thread_messages(conn, rows)
        if released:  # else nothing waits for it: no delivery pass per inbound mail
            svc.delivery.wake()

    return on_messages_added


def _thread_row(ev: ConversationMessageAdded) -> tuple[Any, ...]:
    m = ev.message
    return (
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
        ev.conversation.token,
        [a.model_dump() for a in m.reply_to],
    )


def handlers(svc: SenderService) -> tuple[Handler, Handler, Handler, BatchHandler]:
    on_messages_added = thread_batch(svc)

    async def on_mailbox(env: Envelope, entry_id: str) -> None:
        box = env.payload_as(MailboxChanged)
        async with svc.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, CONSUMER, env.id):
                return
            released = await storage.upsert_mailbox(
                conn, box.mailbox_id, box.address, box.name, box.active
            )
        if released:  # else nothing waits for it: no delivery pass per inbound mail
            svc.delivery.wake()

    async def on_message_added(env: Envelope, entry_id: str) -> None:
        await on_messages_added([(env, entry_id)])

    async def accept_many(items: list[tuple[Envelope, MailSend]]) -> list[None]:
        """Store a group of commands and their ``queued`` events in one transaction."""
        events: list[Envelope] = []
        queued: list[uuid.UUID] = []
        async with svc.pool.acquire() as conn, conn.transaction():
            fresh: list[tuple[Envelope, MailSend, uuid.UUID]] = []
            firsts = await inbox.first_times(conn, CONSUMER, [env.id for env, _ in items])
            for (env, cmd), first in zip(items, firsts, strict=True):
                if not first:
                    continue
                try:
                    fresh.append((env, cmd, uuid.UUID(cmd.send_id)))
                except ValueError:
                    # Nothing to queue under that id, but the sender of the command hears why.
                    events.append(_failed(env, cmd, f"send_id {cmd.send_id!r} is not a UUID"))
            rows = await storage.insert_sends(
                conn, [(send_id, cmd, env.correlation_id) for env, cmd, send_id in fresh]
            )
            left_out = [
                (c.user_id, c.client_id) for _, c, sid in fresh if sid not in rows and c.client_id
            ]
            owners = await storage.client_id_owners(conn, left_out) if left_out else {}
            for env, cmd, send_id in fresh:
                row = rows.pop(send_id, None)  # a send_id twice in this group is queued once
                owner = owners.get((cmd.user_id, cmd.client_id))
                if row is None and owner and owner[0] != send_id and owner[1] != cmd.id_conversa:
                    # The agent's client_id is another conversation's send: this is a different
                    # request that reused it, not a retry. It is not sent; the agent hears why.
                    log.info(
                        "mail.send refused: client_id in use",
                        extra={"send_id": cmd.send_id, "client_id": cmd.client_id},
                    )
                    detail = (
                        f"client_id {cmd.client_id!r} was already used by a send to another "
                        "conversation"
                    )
                    events.append(_failed(env, cmd, detail))
                    continue
                if row is None:
                    log.info(
                        "duplicate mail.send ignored",
                        extra={"send_id": cmd.send_id, "client_id": cmd.client_id},
                    )
                    continue
                await storage.mark_used(conn, list(cmd.attachments), cmd.mailbox_id)
                events.append(storage.status_event(row, "queued", "queued"))
                queued.append(send_id)
            staged = await outbox.stage(conn, *events)
        await svc.relay.publish(staged)
        svc.delivery.hint(queued)  # no scan of the queue for them, no claim pass
        return [None] * len(items)

    # Several readers of mail.send (send_consumers) hand their commands here at once; what
    # arrives while one group is being committed goes in the next (see groupcommit.py).
    accept: GroupCommit[tuple[Envelope, MailSend], None] = GroupCommit("accept", accept_many)

    async def on_send(env: Envelope, entry_id: str) -> None:
        await accept.submit((env, env.payload_as(MailSend)))

    async def on_sends(items: list[tuple[Envelope, str]]) -> None:
        """The commands one read returned, in the same group commit; the consumer then acks
        them with one XACK (not one per command). A command that does not validate fails the
        batch before anything is stored, and the consumer handles each entry alone."""
        commands = [(env, env.payload_as(MailSend)) for env, _ in items]
        await asyncio.gather(*(accept.submit(c) for c in commands))

    return on_mailbox, on_message_added, on_send, on_sends
