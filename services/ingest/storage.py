"""Ingest's SQL: mailboxes it serves, raw messages, content-addressed blobs, attachments."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True)
class Mailbox:
    id: str
    address: str
    name: str


async def load_mailboxes(pool: asyncpg.Pool) -> dict[str, Mailbox]:
    rows = await pool.fetch("SELECT id, address, name FROM mailboxes WHERE active")
    return {r["address"]: Mailbox(r["id"], r["address"], r["name"]) for r in rows}


async def upsert_mailbox(
    conn: asyncpg.Connection, id_: str, address: str, name: str, active: bool
) -> None:
    await conn.execute(
        """INSERT INTO mailboxes (id, address, name, active) VALUES ($1, $2, $3, $4)
           ON CONFLICT (id) DO UPDATE SET address = $2, name = $3, active = $4""",
        id_,
        address.lower(),
        name,
        active,
    )


async def put_blob(conn: asyncpg.Connection, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    await conn.execute(
        "INSERT INTO blobs (sha256, size, data) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        digest,
        len(data),
        data,
    )
    return digest


async def insert_message(
    conn: asyncpg.Connection,
    *,
    mailbox_id: str,
    envelope_from: str,
    rcpt: str,
    raw: bytes,
    status: str,
    reason: str | None,
    message_id: str | None,
    received_at: datetime,
    peer: str,
) -> tuple[uuid.UUID, bool]:
    """Store one delivery; returns its id and whether it is new.

    The same raw bytes for the same mailbox are stored once (migration 0002): a retry of a message
    we already committed gets the first copy's id and ``False``, so the caller announces nothing.
    A concurrent identical delivery waits on the unique index until the first one commits.
    """
    digest = await put_blob(conn, raw)
    new_id: uuid.UUID | None = await conn.fetchval(
        """INSERT INTO messages (id, mailbox_id, envelope_from, rcpt, raw_sha256, status, reason,
                                 message_id, received_at, peer)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           ON CONFLICT (mailbox_id, raw_sha256) WHERE duplicate_of IS NULL DO NOTHING
           RETURNING id""",
        uuid.uuid4(),
        mailbox_id,
        envelope_from,
        rcpt,
        digest,
        status,
        reason,
        message_id,
        received_at,
        peer,
    )
    if new_id is not None:
        return new_id, True
    first: uuid.UUID | None = await conn.fetchval(
        """SELECT id FROM messages
           WHERE mailbox_id = $1 AND raw_sha256 = $2 AND duplicate_of IS NULL""",
        mailbox_id,
        digest,
    )
    if first is None:  # the first copy vanished between the two statements: let the client retry
        raise RuntimeError("duplicate message disappeared while checking it")
    return first, False


async def insert_attachment(
    conn: asyncpg.Connection,
    *,
    message_id: uuid.UUID,
    mailbox_id: str,
    data: bytes,
    filename: str,
    content_type: str,
    content_id: str | None,
    inline: bool,
) -> uuid.UUID:
    att_id = uuid.uuid4()
    digest = await put_blob(conn, data)
    await conn.execute(
        """INSERT INTO attachments (id, message_id, mailbox_id, sha256, filename, content_type, size,
                                    content_id, inline)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        att_id,
        message_id,
        mailbox_id,
        digest,
        filename,
        content_type,
        len(data),
        content_id,
        inline,
    )
    return att_id


async def fetch_attachment(pool: asyncpg.Pool, att_id: uuid.UUID) -> asyncpg.Record | None:
    return await pool.fetchrow(
        """SELECT a.mailbox_id, a.filename, a.content_type, a.size, b.data
           FROM attachments a JOIN blobs b ON b.sha256 = a.sha256 WHERE a.id = $1""",
        att_id,
    )
