"""SQL of the notifier schema (search_path is set by the pool, so names are unqualified)."""

from __future__ import annotations

import asyncpg

from libs.common.events import ConversationState, MailStatus
from services.notifier.domain.rules import status_rank


async def upsert_conversation(conn: asyncpg.Connection, c: ConversationState) -> None:
    """Keep the newest state; a late event with fewer messages does not roll the row back."""
    participants = [p.model_dump(mode="json") for p in c.participants]
    await conn.execute(
        """INSERT INTO conversations AS cur
               (id_conversa, mailbox_id, channel, subject, status, message_count,
                last_message_at, participants)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (id_conversa) DO UPDATE SET
               mailbox_id = EXCLUDED.mailbox_id, channel = EXCLUDED.channel,
               subject = EXCLUDED.subject, status = EXCLUDED.status,
               message_count = EXCLUDED.message_count, last_message_at = EXCLUDED.last_message_at,
               participants = EXCLUDED.participants, updated_at = now()
           WHERE EXCLUDED.message_count >= cur.message_count""",
        c.id_conversa,
        c.mailbox_id,
        c.channel,
        c.subject,
        c.status,
        c.message_count,
        c.last_message_at,
        participants,
    )


async def conversation_mailbox(conn: asyncpg.Connection, id_conversa: str) -> str | None:
    value = await conn.fetchval(
        "SELECT mailbox_id FROM conversations WHERE id_conversa = $1", id_conversa
    )
    return str(value) if value is not None else None


async def insert_send(
    conn: asyncpg.Connection,
    send_id: str,
    user_id: str,
    client_id: str,
    id_conversa: str,
    mailbox_id: str,
) -> str | None:
    """The new send's id, or None when this user already sent this client_id."""
    value = await conn.fetchval(
        """INSERT INTO sends (send_id, user_id, client_id, id_conversa, mailbox_id)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (user_id, client_id) WHERE client_id <> '' DO NOTHING
           RETURNING send_id""",
        send_id,
        user_id,
        client_id,
        id_conversa,
        mailbox_id,
    )
    return str(value) if value is not None else None


async def existing_send(conn: asyncpg.Connection, user_id: str, client_id: str) -> str | None:
    value = await conn.fetchval(
        "SELECT send_id FROM sends WHERE user_id = $1 AND client_id = $2", user_id, client_id
    )
    return str(value) if value is not None else None


async def record_status(conn: asyncpg.Connection, s: MailStatus) -> bool:
    """Store a status unless a later one is already stored; True when this one is now current.

    Statuses of one send can be handled out of order by different replicas of the group.
    """
    rank = status_rank(s.status)
    updated = await conn.fetchval(
        """UPDATE sends SET status = $2, status_rank = $3, attempt = $4, detail = $5,
                            updated_at = now()
           WHERE send_id = $1 AND (status_rank, attempt) <= ($3, $4)
           RETURNING 1""",
        s.send_id,
        s.status,
        rank,
        s.attempt,
        s.detail,
    )
    if updated:
        return True
    if await conn.fetchval("SELECT 1 FROM sends WHERE send_id = $1", s.send_id):
        return False  # stale
    # A send that did not come through this notifier (REST, other systems): remember it too.
    inserted = await conn.fetchval(
        """INSERT INTO sends (send_id, user_id, client_id, id_conversa, mailbox_id,
                              status, status_rank, attempt, detail)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           ON CONFLICT DO NOTHING RETURNING 1""",
        s.send_id,
        s.user_id,
        s.client_id,
        s.id_conversa,
        s.mailbox_id,
        s.status,
        rank,
        s.attempt,
        s.detail,
    )
    return bool(inserted)
