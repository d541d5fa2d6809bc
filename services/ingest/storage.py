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


# ---- many deliveries in one statement each (writer.py's group commit) ---------------------------


async def put_blobs(conn: asyncpg.Connection, blobs: dict[str, bytes]) -> None:
    """Content-addressed blobs (sha256 hex -> bytes), inserted in digest order.

    The order matters: two transactions inserting overlapping digests then wait on each other in
    the same order, never in a cycle.
    """
    if not blobs:
        return
    keys = sorted(blobs)
    await conn.execute(
        """INSERT INTO blobs (sha256, size, data)
           SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[])
           ON CONFLICT DO NOTHING""",
        keys,
        [len(blobs[k]) for k in keys],
        [blobs[k] for k in keys],
    )


@dataclass
class MessageRow:
    id: uuid.UUID
    mailbox_id: str
    envelope_from: str
    rcpt: str
    raw_sha256: str
    status: str
    reason: str | None
    message_id: str | None
    received_at: datetime
    peer: str


async def insert_messages(
    conn: asyncpg.Connection, rows: list[MessageRow]
) -> dict[tuple[str, str], tuple[uuid.UUID, bool]]:
    """Store deliveries whose blobs are in; ``(mailbox_id, raw_sha256)`` -> (id, new).

    ``rows`` must have distinct keys. As in ``insert_message``, a key already stored (a retry)
    keeps its first id and is not new; a concurrent identical delivery waits on the unique index.
    """
    rows = sorted(rows, key=lambda r: (r.mailbox_id, r.raw_sha256))
    inserted = await conn.fetch(
        """INSERT INTO messages (id, mailbox_id, envelope_from, rcpt, raw_sha256, status, reason,
                                 message_id, received_at, peer)
           SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                $6::text[], $7::text[], $8::text[], $9::timestamptz[], $10::text[])
           ON CONFLICT (mailbox_id, raw_sha256) WHERE duplicate_of IS NULL DO NOTHING
           RETURNING id, mailbox_id, raw_sha256""",
        [r.id for r in rows],
        [r.mailbox_id for r in rows],
        [r.envelope_from for r in rows],
        [r.rcpt for r in rows],
        [r.raw_sha256 for r in rows],
        [r.status for r in rows],
        [r.reason for r in rows],
        [r.message_id for r in rows],
        [r.received_at for r in rows],
        [r.peer for r in rows],
    )
    out = {(r["mailbox_id"], r["raw_sha256"]): (r["id"], True) for r in inserted}
    old = [r for r in rows if (r.mailbox_id, r.raw_sha256) not in out]
    if old:
        firsts = await conn.fetch(
            """SELECT m.id, m.mailbox_id, m.raw_sha256
               FROM messages m
               JOIN unnest($1::text[], $2::text[]) AS k (mailbox_id, raw_sha256)
                 ON m.mailbox_id = k.mailbox_id AND m.raw_sha256 = k.raw_sha256
               WHERE m.duplicate_of IS NULL""",
            [r.mailbox_id for r in old],
            [r.raw_sha256 for r in old],
        )
        for r in firsts:
            out[(r["mailbox_id"], r["raw_sha256"])] = (r["id"], False)
        if len(out) < len(rows):  # a first copy vanished between the statements: retry later
            raise RuntimeError("duplicate message disappeared while checking it")
    return out


@dataclass
class AttachmentRow:
    id: uuid.UUID
    message_id: uuid.UUID
    mailbox_id: str
    sha256: str
    filename: str
    content_type: str
    size: int
    content_id: str | None
    inline: bool


async def insert_attachments(conn: asyncpg.Connection, rows: list[AttachmentRow]) -> None:
    """Attachment rows whose blobs are in (``put_blobs``)."""
    if not rows:
        return
    await conn.execute(
        """INSERT INTO attachments (id, message_id, mailbox_id, sha256, filename, content_type,
                                    size, content_id, inline)
           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                $6::text[], $7::int[], $8::text[], $9::bool[])""",
        [r.id for r in rows],
        [r.message_id for r in rows],
        [r.mailbox_id for r in rows],
        [r.sha256 for r in rows],
        [r.filename for r in rows],
        [r.content_type for r in rows],
        [r.size for r in rows],
        [r.content_id for r in rows],
        [r.inline for r in rows],
    )


async def fetch_attachment(pool: asyncpg.Pool, att_id: uuid.UUID) -> asyncpg.Record | None:
    return await pool.fetchrow(
        """SELECT a.mailbox_id, a.filename, a.content_type, a.size, b.data
           FROM attachments a JOIN blobs b ON b.sha256 = a.sha256 WHERE a.id = $1""",
        att_id,
    )


# ---- quarantine (admins) and bounce checks; used by quarantine.py and bounces.py ---------------

QUARANTINE_COLUMNS = """m.id, m.mailbox_id, mb.address AS mailbox_address, m.envelope_from, m.rcpt,
    m.reason, m.received_at, m.peer, b.size"""


async def list_quarantined(
    pool: asyncpg.Pool, limit: int, before: tuple[datetime, uuid.UUID] | None
) -> list[asyncpg.Record]:
    """Quarantined messages, newest first, after the ``(received_at, id)`` cursor when given."""
    return list(
        await pool.fetch(
            f"""SELECT {QUARANTINE_COLUMNS}
                FROM messages m JOIN blobs b ON b.sha256 = m.raw_sha256
                LEFT JOIN mailboxes mb ON mb.id = m.mailbox_id
                WHERE m.status = 'quarantined'
                  AND ($2::timestamptz IS NULL OR (m.received_at, m.id) < ($2, $3::uuid))
                ORDER BY m.received_at DESC, m.id DESC LIMIT $1""",
            limit,
            before[0] if before else None,
            before[1] if before else None,
        )
    )


async def quarantined(
    conn: asyncpg.Connection | asyncpg.Pool, msg_id: uuid.UUID, *, for_update: bool = False
) -> asyncpg.Record | None:
    """One quarantined message with its raw bytes (locked when ``for_update``)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {QUARANTINE_COLUMNS}, b.data AS raw
            FROM messages m JOIN blobs b ON b.sha256 = m.raw_sha256
            LEFT JOIN mailboxes mb ON mb.id = m.mailbox_id
            WHERE m.id = $1 AND m.status = 'quarantined'
            {"FOR UPDATE OF m" if for_update else ""}""",
        msg_id,
    )
    return row


async def release_quarantined(conn: asyncpg.Connection, msg_id: uuid.UUID, message_id: str) -> bool:
    """The message reads now: accepted, its Message-ID recorded, the reason cleared."""
    done = await conn.execute(
        """UPDATE messages SET status = 'accepted', reason = NULL, message_id = $2
           WHERE id = $1 AND status = 'quarantined'""",
        msg_id,
        message_id,
    )
    return bool(done == "UPDATE 1")


async def mailbox_by_id(conn: asyncpg.Connection, mailbox_id: str) -> Mailbox | None:
    row = await conn.fetchrow("SELECT id, address, name FROM mailboxes WHERE id = $1", mailbox_id)
    return Mailbox(row["id"], row["address"], row["name"]) if row else None


async def bounce_candidates(
    pool: asyncpg.Pool, window_s: float, limit: int
) -> list[asyncpg.Record]:
    """Accepted messages from a bounce sender (migration 0003's index) not yet checked."""
    return list(
        await pool.fetch(
            """SELECT m.id, m.mailbox_id, m.received_at, b.data AS raw
               FROM messages m JOIN blobs b ON b.sha256 = m.raw_sha256
               WHERE m.status = 'accepted' AND m.duplicate_of IS NULL
                 AND (m.envelope_from IN ('', '<>') OR lower(m.envelope_from) LIKE 'mailer-daemon@%'
                      OR lower(m.envelope_from) LIKE 'postmaster@%')
                 AND m.received_at > now() - make_interval(secs => $1)
                 AND NOT EXISTS (SELECT 1 FROM bounce_checks c WHERE c.message_id = m.id)
               ORDER BY m.received_at LIMIT $2""",
            window_s,
            limit,
        )
    )


async def record_bounce_check(
    conn: asyncpg.Connection, msg_id: uuid.UUID, original_message_id: str | None
) -> bool:
    """True the first time ``msg_id`` is checked (another replica may race us to it)."""
    row = await conn.fetchval(
        """INSERT INTO bounce_checks (message_id, original_message_id) VALUES ($1, $2)
           ON CONFLICT DO NOTHING RETURNING 1""",
        msg_id,
        original_message_id,
    )
    return row is not None


async def set_quarantine_reason(pool: asyncpg.Pool, msg_id: uuid.UUID, reason: str) -> None:
    await pool.execute(
        "UPDATE messages SET reason = $2 WHERE id = $1 AND status = 'quarantined'", msg_id, reason
    )
