"""Threader's SQL: placing a message in its conversation, and the conversation queries."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs.common.events import Address, ConversationState, MessageSummary
from services.threader.domain.threading import candidate_ids, decide


@dataclass
class Placed:
    conversation: asyncpg.Record
    message: asyncpg.Record
    merged: list[str]


def _participants(current: list[dict[str, Any]], *addrs: Address) -> list[dict[str, Any]]:
    seen = {p["address"].lower() for p in current}
    out = list(current)
    for a in addrs:
        if a.address and a.address.lower() not in seen:
            seen.add(a.address.lower())
            out.append({"name": a.name, "address": a.address})
    return out


async def place_message(
    conn: asyncpg.Connection,
    *,
    mailbox_id: str,
    channel: str,
    message_id: str,
    in_reply_to: list[str],
    references: list[str],
    direction: str,
    sender: Address,
    to: list[Address],
    cc: list[Address],
    subject: str,
    date: datetime,
    text: str,
    html: str,
    attachments: list[dict[str, Any]],
    status: str | None,
    flags: dict[str, Any],
    id_conversa: str | None = None,
) -> Placed | None:
    """Thread one message; None when this mailbox already has this Message-ID (a retry, a Bcc copy).

    Serialized per mailbox with an advisory lock so two replicas can't split one thread.
    ``id_conversa`` forces the conversation (our own outbound messages know theirs).
    """
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('thread:' || $1))", mailbox_id)
    if await conn.fetchval(
        "SELECT 1 FROM messages WHERE mailbox_id = $1 AND message_id = $2", mailbox_id, message_id
    ):
        return None
    keys = candidate_ids(message_id, in_reply_to, references)
    rows = await conn.fetch(
        """SELECT k.message_id, c.id_conversa, c.created_at
           FROM thread_keys k JOIN conversations c USING (id_conversa)
           WHERE k.mailbox_id = $1 AND k.message_id = ANY($2::text[])""",
        mailbox_id,
        keys,
    )
    owners = {r["message_id"]: (str(r["id_conversa"]), r["created_at"]) for r in rows}
    decision = decide(message_id, in_reply_to, references, owners)
    target = id_conversa or decision.id_conversa
    # A forced conversation (our own outbound mail) absorbs whatever the links also point at.
    linked = [decision.id_conversa, *decision.merge] if id_conversa else decision.merge
    merged = [m for m in dict.fromkeys(linked) if m and m != target]
    if target is None:
        target = str(uuid.uuid4())
        await conn.execute(
            """INSERT INTO conversations (id_conversa, mailbox_id, channel, subject, created_at,
                                          last_message_at)
               VALUES ($1, $2, $3, $4, clock_timestamp(), $5)""",
            uuid.UUID(target),
            mailbox_id,
            channel,
            subject,
            date,
        )
    for old in merged:
        await _merge(conn, uuid.UUID(old), uuid.UUID(target))
    msg_uuid = uuid.uuid4()
    message = await conn.fetchrow(
        """INSERT INTO messages (id, id_conversa, mailbox_id, channel, message_id, direction, sender,
                                 to_addrs, cc_addrs, subject, date, text_body, html_body,
                                 attachments, status, in_reply_to, refs, flags)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18)
           RETURNING *""",
        msg_uuid,
        uuid.UUID(target),
        mailbox_id,
        channel,
        message_id,
        direction,
        sender.model_dump(),
        [a.model_dump() for a in to],
        [a.model_dump() for a in cc],
        subject,
        date,
        text,
        html,
        attachments,
        status,
        in_reply_to,
        references,
        flags,
    )
    await conn.executemany(
        """INSERT INTO thread_keys (mailbox_id, message_id, id_conversa) VALUES ($1, $2, $3)
           ON CONFLICT (mailbox_id, message_id) DO NOTHING""",
        [(mailbox_id, k, uuid.UUID(target)) for k in keys],
    )
    current = await conn.fetchrow(
        "SELECT participants FROM conversations WHERE id_conversa = $1", uuid.UUID(target)
    )
    participants = _participants(current["participants"], sender, *to, *cc)
    conversation = await conn.fetchrow(
        """UPDATE conversations SET
               last_message_at = GREATEST(last_message_at, $2),
               last_inbound_at = CASE WHEN $3 = 'in' THEN clock_timestamp() ELSE last_inbound_at END,
               message_count = (SELECT count(*) FROM messages WHERE id_conversa = $1),
               participants = $4,
               status = CASE WHEN $3 = 'in' AND status = 'closed' THEN 'open' ELSE status END
           WHERE id_conversa = $1 RETURNING *""",
        uuid.UUID(target),
        date,
        direction,
        participants,
    )
    return Placed(conversation, message, merged)


async def _merge(conn: asyncpg.Connection, old: uuid.UUID, into: uuid.UUID) -> None:
    await conn.execute("UPDATE messages SET id_conversa = $2 WHERE id_conversa = $1", old, into)
    await conn.execute("UPDATE thread_keys SET id_conversa = $2 WHERE id_conversa = $1", old, into)
    await conn.execute(
        "UPDATE conversations SET merged_into = $2 WHERE merged_into = $1", old, into
    )
    await conn.execute(
        "UPDATE conversations SET merged_into = $2, message_count = 0 WHERE id_conversa = $1",
        old,
        into,
    )


def state(conv: asyncpg.Record) -> ConversationState:
    return ConversationState(
        id_conversa=str(conv["id_conversa"]),
        mailbox_id=conv["mailbox_id"],
        number=conv["number"],
        channel=conv["channel"],
        subject=conv["subject"],
        status=conv["status"],
        message_count=conv["message_count"],
        last_message_at=conv["last_message_at"],
        participants=[Address(**p) for p in conv["participants"]],
    )


def snippet(text: str, size: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= size else flat[: size - 1] + "…"


def summary(msg: asyncpg.Record) -> MessageSummary:
    return MessageSummary.model_validate(
        {
            "id": str(msg["id"]),
            "message_id": msg["message_id"],
            "direction": msg["direction"],
            "from": msg["sender"],
            "to": msg["to_addrs"],
            "cc": msg["cc_addrs"],
            "subject": msg["subject"],
            "date": msg["date"],
            "snippet": snippet(msg["text_body"]),
            "in_reply_to": list(msg["in_reply_to"]),
            "references": list(msg["refs"]),
        }
    )


async def resolve(pool: asyncpg.Pool, id_conversa: uuid.UUID) -> asyncpg.Record | None:
    """The conversation, following merges: an old id answers with its survivor."""
    for _ in range(10):
        row = await pool.fetchrow("SELECT * FROM conversations WHERE id_conversa = $1", id_conversa)
        if row is None or row["merged_into"] is None:
            return row
        id_conversa = row["merged_into"]
    return None


async def list_conversations(
    pool: asyncpg.Pool,
    *,
    user_id: str,
    mailboxes: list[str],
    status: str | None,
    q: str | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    conds = ["c.merged_into IS NULL", "c.mailbox_id = ANY($1::text[])"]
    args: list[Any] = [mailboxes, user_id, limit]
    if status:
        args.append(status)
        conds.append(f"c.status = ${len(args)}")
    if q:
        args.append(f"%{q.replace('%', '').replace('_', '')}%")
        conds.append(f"c.subject ILIKE ${len(args)}")
    if after:
        args.extend(after)
        conds.append(f"(c.last_message_at, c.id_conversa) < (${len(args) - 1}, ${len(args)})")
    sql = f"""SELECT c.*, (c.last_inbound_at IS NOT NULL AND
                           (r.read_at IS NULL OR r.read_at < c.last_inbound_at)) AS unread
              FROM conversations c
              LEFT JOIN reads r ON r.id_conversa = c.id_conversa AND r.user_id = $2
              WHERE {" AND ".join(conds)}
              ORDER BY c.last_message_at DESC, c.id_conversa DESC LIMIT $3"""
    return list(await pool.fetch(sql, *args))


async def messages_of(pool: asyncpg.Pool, id_conversa: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT * FROM messages WHERE id_conversa = $1 ORDER BY date, created_at", id_conversa
        )
    )


async def is_unread(pool: asyncpg.Pool, user_id: str, id_conversa: uuid.UUID) -> bool:
    """Same rule as the list: an inbound message arrived after this agent last read it."""
    return bool(
        await pool.fetchval(
            """SELECT c.last_inbound_at IS NOT NULL
                      AND (r.read_at IS NULL OR r.read_at < c.last_inbound_at)
               FROM conversations c
               LEFT JOIN reads r ON r.id_conversa = c.id_conversa AND r.user_id = $1
               WHERE c.id_conversa = $2""",
            user_id,
            id_conversa,
        )
    )


async def mark_read(pool: asyncpg.Pool, user_id: str, id_conversa: uuid.UUID) -> None:
    await pool.execute(
        """INSERT INTO reads (user_id, id_conversa, read_at) VALUES ($1, $2, now())
           ON CONFLICT (user_id, id_conversa) DO UPDATE SET read_at = now()""",
        user_id,
        id_conversa,
    )
