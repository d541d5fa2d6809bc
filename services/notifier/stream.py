"""Consumer-group handlers: store what the notifier needs, then outbox one ``notifier.frame``.

One replica of the group handles each event; the frame it writes reaches every replica through
the broadcast stream, so each delivers to its own connections. Directory changes that take
access away go the same way, as an ``access`` entry (see ``services.notifier.access``).
"""

from __future__ import annotations

import asyncpg

from libs.common import inbox, outbox
from libs.common.events import (
    ConversationMessageAdded,
    ConversationUpdated,
    Envelope,
    MailStatus,
    MembershipChanged,
    UserChanged,
)
from libs.common.outbox import OutboxRelay
from services.notifier import frames, storage
from services.notifier.frames import AccessChange, NotifierFrame

TYPES = (
    "conversation.message_added",
    "conversation.updated",
    "mail.status",
    "user.changed",
    "membership.changed",
)
CONSUMER = "notifier"


class StreamHandlers:
    def __init__(self, pool: asyncpg.Pool, relay: OutboxRelay) -> None:
        self.pool = pool
        self.relay = relay

    async def handle(self, env: Envelope, entry_id: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, CONSUMER, env.id):
                return
            frame = await self._effects(conn, env)
            if frame is not None:
                out = Envelope.of(frame, producer=CONSUMER, correlation_id=env.correlation_id)
                await outbox.add(conn, out)
        if frame is not None:
            self.relay.wake()

    async def _effects(self, conn: asyncpg.Connection, env: Envelope) -> NotifierFrame | None:
        if env.type == "conversation.message_added":
            added = env.payload_as(ConversationMessageAdded)
            await storage.upsert_conversation(conn, added.conversation)
            return NotifierFrame(mailbox_id=added.mailbox_id, frame=frames.message_added(added))
        if env.type == "conversation.updated":
            updated = env.payload_as(ConversationUpdated)
            await storage.upsert_conversation(conn, updated)
            return NotifierFrame(
                mailbox_id=updated.mailbox_id, frame=frames.conversation_updated(updated)
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
