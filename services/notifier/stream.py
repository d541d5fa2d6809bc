"""Consumer-group handlers: store what the notifier needs, then outbox one ``notifier.frame``.

One replica of the group handles each event; the frame it writes reaches every replica through
the broadcast stream, so each delivers to its own connections. Directory changes that take
access away go the same way, as an ``access`` entry (see ``services.notifier.access``).
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from libs.common import inbox, outbox
from libs.common.events import (
    ConversationMerged,
    ConversationMessageAdded,
    ConversationRead,
    ConversationUpdated,
    Envelope,
    MailStatus,
    MembershipChanged,
    UserChanged,
)
from libs.common.outbox import OutboxRelay
from services.notifier import badge_store, frames, push_store, storage
from services.notifier.frames import AccessChange, NotifierFrame

TYPES = (
    "conversation.message_added",
    "conversation.updated",
    "mail.status",
    "user.changed",
    "membership.changed",
    "conversation.merged",
    "conversation.read",
)
CONSUMER = "notifier"


class StreamHandlers:
    def __init__(
        self,
        pool: asyncpg.Pool,
        relay: OutboxRelay,
        push_delay_s: float = 2.0,
        on_push: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.relay = relay
        self.push_delay_s = push_delay_s
        self.on_push = on_push  # wakes the push sender when pushes were queued

    async def handle(self, env: Envelope, entry_id: str) -> None:
        await self.handle_batch([(env, entry_id)])

    async def handle_batch(self, items: list[tuple[Envelope, str]]) -> None:
        """Events in stream order, one transaction: a burst costs one commit, not one each."""
        out: list[Envelope] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for env, _ in items:
                out += await self._one(conn, env)
            staged = await outbox.stage(conn, *out)
        await self.relay.publish(staged)

    async def _one(self, conn: asyncpg.Connection, env: Envelope) -> list[Envelope]:
        if not await inbox.first_time(conn, CONSUMER, env.id):
            return []
        frame = await self._effects(conn, env)
        badge = await self._badges(conn, env)
        if badge is not None and frame is not None and frame.user_id is None:
            frame.badge, badge = badge.frame, None
        return [
            Envelope.of(f, producer=CONSUMER, correlation_id=env.correlation_id)
            for f in (frame, badge)
            if f is not None
        ]

    async def _effects(self, conn: asyncpg.Connection, env: Envelope) -> NotifierFrame | None:
        if env.type == "conversation.message_added":
            added = env.payload_as(ConversationMessageAdded)
            await storage.upsert_conversation(conn, added.conversation)
            return NotifierFrame(mailbox_id=added.mailbox_id, frame=frames.message_added(added))
        if env.type == "conversation.updated":
            updated = env.payload_as(ConversationUpdated)
            if not await storage.upsert_conversation(conn, updated):
                return None  # the state agents have already (a message.added carried it)
            return NotifierFrame(
                mailbox_id=updated.mailbox_id, frame=frames.conversation_updated(updated)
            )
        if env.type == "conversation.merged":
            merged = env.payload_as(ConversationMerged)
            return NotifierFrame(
                mailbox_id=merged.mailbox_id, frame=frames.conversation_merged(merged)
            )
        if env.type == "mail.status":
            status = env.payload_as(MailStatus)
            if not await storage.record_status(conn, status):
                return None  # a later status already went out
            return NotifierFrame(
                mailbox_id=status.mailbox_id,
                user_id=status.user_id or None,
                frame=frames.send_status(status),
            )
        if env.type == "user.changed":
            user = env.payload_as(UserChanged)
            return await self._access(conn, env, user.user_id, None, user.active)
        if env.type == "membership.changed":
            member = env.payload_as(MembershipChanged)
            return await self._access(conn, env, member.user_id, member.mailbox_id, member.active)
        return None

    async def _badges(self, conn: asyncpg.Connection, env: Envelope) -> NotifierFrame | None:
        """Unread badges and pushes of the same event, in the same transaction."""
        op = None
        if env.type == "conversation.message_added":
            added = env.payload_as(ConversationMessageAdded)
            count = added.conversation.message_count
            if added.message.direction == "in" and added.message.automatic:
                # An auto-reply or a bounce: no unread mail for anyone, no alert.
                await badge_store.seen_count(conn, added.id_conversa, count)
            elif added.message.direction == "in":
                m = added.message
                alert = badge_store.Alert(
                    m.from_.name or m.from_.address,
                    f"{m.subject}\n{m.snippet}".strip()[:240],
                    self.push_delay_s,
                )
                op, queued = await badge_store.inbound(
                    conn, added.id_conversa, added.mailbox_id, count, m.date, alert
                )
                if queued and self.on_push is not None:
                    self.on_push()
            else:
                await badge_store.answered(
                    conn, added.id_conversa, added.mailbox_id, count, added.message.date
                )
                await push_store.drop(conn, added.id_conversa)  # answered: no alert any more
        elif env.type == "conversation.updated":
            updated = env.payload_as(ConversationUpdated)
            if updated.status == "closed":
                op = await badge_store.close(conn, updated.id_conversa, updated.message_count)
                if op is not None:
                    await push_store.drop(conn, updated.id_conversa)
            # Other changes (assignee, reopening) move no badge: no statement for them.
        elif env.type == "conversation.merged":
            merged = env.payload_as(ConversationMerged)
            op = await badge_store.merge(conn, merged.mailbox_id, merged.into, merged.merged)
            for gone in merged.merged:
                await push_store.drop(conn, gone)
        elif env.type == "conversation.read" and env.producer != CONSUMER:
            # Ours (the read frame) changed the badge when it was published.
            read = env.payload_as(ConversationRead)
            op = await badge_store.read(conn, read.user_id, read.id_conversa)
            await push_store.drop(conn, read.id_conversa, read.user_id)
            if op is not None:
                return NotifierFrame(mailbox_id=op["mailbox"], user_id=read.user_id, frame=op)
            return None
        return None if op is None else NotifierFrame(mailbox_id=op["mailbox"], frame=op)

    async def _access(
        self,
        conn: asyncpg.Connection,
        env: Envelope,
        user_id: str,
        mailbox_id: str | None,
        active: bool,
    ) -> NotifierFrame | None:
        """Store the change; the replicas learn of it from the frames stream."""
        if not await storage.apply_access_change(
            conn, user_id, mailbox_id, active, env.occurred_at
        ):
            return None  # nothing taken away or given back, or a newer change won already
        change = AccessChange(
            user_id=user_id, mailbox_id=mailbox_id, active=active, changed_at=env.occurred_at
        )
        return NotifierFrame.of_access(change)
