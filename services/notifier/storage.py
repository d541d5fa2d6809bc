"""SQL of the notifier schema (search_path is set by the pool, so names are unqualified)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from libs.common.events import ConversationState, MailStatus
from services.notifier.domain.rules import status_rank


async def upsert_conversation(conn: asyncpg.Connection, c: ConversationState) -> bool:
    """Keep the newest state; True if the row changed.

    A late event with fewer messages does not roll the row back, and one that repeats the stored
    state changes nothing: its frame would tell the agents nothing new.
    """
    participants = [p.model_dump(mode="json") for p in c.participants]
    changed = await conn.fetchval(
        """INSERT INTO conversations AS cur
               (id_conversa, mailbox_id, channel, subject, status, message_count,
                last_message_at, participants, assignee, number)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           ON CONFLICT (id_conversa) DO UPDATE SET
               mailbox_id = EXCLUDED.mailbox_id, channel = EXCLUDED.channel,
               subject = EXCLUDED.subject, status = EXCLUDED.status,
               message_count = EXCLUDED.message_count, last_message_at = EXCLUDED.last_message_at,
               participants = EXCLUDED.participants, assignee = EXCLUDED.assignee,
               number = EXCLUDED.number, updated_at = now()
           WHERE EXCLUDED.message_count >= cur.message_count
             AND (cur.mailbox_id, cur.channel, cur.subject, cur.status, cur.message_count,
                  cur.last_message_at, cur.participants, cur.assignee, cur.number)
                 IS DISTINCT FROM
                 (EXCLUDED.mailbox_id, EXCLUDED.channel, EXCLUDED.subject, EXCLUDED.status,
                  EXCLUDED.message_count, EXCLUDED.last_message_at, EXCLUDED.participants,
                  EXCLUDED.assignee, EXCLUDED.number)
           RETURNING true""",
        c.id_conversa,
        c.mailbox_id,
        c.channel,
        c.subject,
        c.status,
        c.message_count,
        c.last_message_at,
        participants,
        c.assignee,
        c.number,
    )
    return bool(changed)


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


async def existing_send(
    conn: asyncpg.Connection, user_id: str, client_id: str
) -> asyncpg.Record | None:
    """The send this user already made with this client_id (its conversation and last status)."""
    return await conn.fetchrow(
        """SELECT send_id, id_conversa, status, detail FROM sends
           WHERE user_id = $1 AND client_id = $2""",
        user_id,
        client_id,
    )


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


# ---- access taken away before the token expires ------------------------------------------------


async def apply_access_change(
    conn: asyncpg.Connection,
    user_id: str,
    mailbox_id: str | None,
    active: bool,
    changed_at: datetime,
) -> bool:
    """Record an account (``mailbox_id`` None) or membership change; True if access changed.

    False when a newer change of the same key was applied already (the version upsert takes the
    row lock, so two replicas applying two changes of one user serialize here and the older one
    cannot land last), and when nothing was taken away or given back (a new user, a new member).
    """
    newest = await conn.fetchval(
        """INSERT INTO access_versions AS v (user_id, mailbox_id, changed_at) VALUES ($1, $2, $3)
           ON CONFLICT (user_id, mailbox_id) DO UPDATE SET changed_at = EXCLUDED.changed_at
           WHERE EXCLUDED.changed_at >= v.changed_at
           RETURNING 1""",
        user_id,
        mailbox_id or "",
        changed_at,
    )
    if newest is None:
        return False
    if mailbox_id is None:
        if active:
            changed = await conn.fetchval(
                "DELETE FROM disabled_users WHERE user_id = $1 RETURNING 1", user_id
            )
        else:
            changed = await conn.fetchval(
                """INSERT INTO disabled_users (user_id, since) VALUES ($1, $2)
                   ON CONFLICT (user_id) DO NOTHING RETURNING 1""",
                user_id,
                changed_at,
            )
    elif active:
        changed = await conn.fetchval(
            """DELETE FROM removed_memberships WHERE user_id = $1 AND mailbox_id = $2
               RETURNING 1""",
            user_id,
            mailbox_id,
        )
    else:
        changed = await conn.fetchval(
            """INSERT INTO removed_memberships (user_id, mailbox_id, since) VALUES ($1, $2, $3)
               ON CONFLICT (user_id, mailbox_id) DO NOTHING RETURNING 1""",
            user_id,
            mailbox_id,
            changed_at,
        )
    return changed is not None


@dataclass
class AccessRows:
    disabled: set[str] = field(default_factory=set)
    removed: dict[str, set[str]] = field(default_factory=dict)
    versions: dict[tuple[str, str], datetime] = field(default_factory=dict)


async def load_access(pool: asyncpg.Pool) -> AccessRows:
    """Everything taken away, read from one snapshot."""
    out = AccessRows()
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        for r in await conn.fetch("SELECT user_id FROM disabled_users"):
            out.disabled.add(str(r["user_id"]))
        for r in await conn.fetch("SELECT user_id, mailbox_id FROM removed_memberships"):
            out.removed.setdefault(str(r["user_id"]), set()).add(str(r["mailbox_id"]))
        for r in await conn.fetch("SELECT user_id, mailbox_id, changed_at FROM access_versions"):
            out.versions[(str(r["user_id"]), str(r["mailbox_id"]))] = r["changed_at"]
    return out
