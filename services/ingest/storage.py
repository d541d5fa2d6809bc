"""Ingest's SQL: mailboxes it serves, raw messages, content-addressed blobs, attachments."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from libs.common import outbox


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


# ---- many deliveries in one statement (writer.py's group commit) -----------------------------


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


async def write_batch(
    conn: asyncpg.Connection,
    blobs: dict[str, bytes],
    rows: list[MessageRow],
    attachments: dict[uuid.UUID, list[AttachmentRow]],
    events: dict[uuid.UUID, tuple[str, str]],
) -> tuple[dict[tuple[str, str], tuple[uuid.UUID, bool]], outbox.Staged]:
    """A group commit's rows in one statement, so in one round trip and its own transaction.

    Blobs, messages (distinct keys), and for the messages that are new, their attachments and
    their outbox row (``events``: message id -> (stream type, envelope JSON)). Returns
    ``(mailbox_id, raw_sha256)`` -> (id, new), and the outbox rows staged for the caller to
    publish once committed (``libs.common.outbox``): a key already stored (a retry) keeps its
    first id, is not new, and gets neither attachments nor an event; a concurrent identical delivery waits
    on the unique index. Why one statement: BEGIN, four statements and COMMIT were six round
    trips per batch, each a write and a read syscall, a wake of a backend and a turn of the loop
    on a two-core machine. The constraints hold as before: they are checked at the end of the
    statement, with the rows of every part of it in view. Blobs, then messages, go in key order:
    two transactions inserting common keys wait on each other in one order, never in a cycle.
    """
    keys = sorted(blobs)
    rows = sorted(rows, key=lambda r: (r.mailbox_id, r.raw_sha256))
    atts = [a for r in rows for a in attachments.get(r.id, ())]
    evs = [(r.id, *events[r.id]) for r in rows if r.id in events]
    inserted = await conn.fetch(
        """WITH b AS (
               INSERT INTO blobs (sha256, size, data)
               SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[])
               ON CONFLICT DO NOTHING
           ), m AS (
               INSERT INTO messages (id, mailbox_id, envelope_from, rcpt, raw_sha256, status,
                                     reason, message_id, received_at, peer)
               SELECT * FROM unnest($4::uuid[], $5::text[], $6::text[], $7::text[], $8::text[],
                                    $9::text[], $10::text[], $11::text[], $12::timestamptz[],
                                    $13::text[])
               ON CONFLICT (mailbox_id, raw_sha256) WHERE duplicate_of IS NULL DO NOTHING
               RETURNING id, mailbox_id, raw_sha256
           ), a AS (
               INSERT INTO attachments (id, message_id, mailbox_id, sha256, filename,
                                        content_type, size, content_id, inline)
               SELECT x.* FROM unnest($14::uuid[], $15::uuid[], $16::text[], $17::text[],
                                      $18::text[], $19::text[], $20::int[], $21::text[],
                                      $22::bool[])
                      AS x (id, message_id, mailbox_id, sha256, filename, content_type, size,
                            content_id, inline)
               WHERE x.message_id IN (SELECT id FROM m)
           ), o AS (
               INSERT INTO outbox (stream_type, envelope, direct)
               SELECT x.stream_type, x.envelope, true
               FROM unnest($23::uuid[], $24::text[], $25::text[]) WITH ORDINALITY
                    AS x (message_id, stream_type, envelope, n)
               WHERE x.message_id IN (SELECT id FROM m)
               ORDER BY x.n
               RETURNING id
           )
           SELECT id, mailbox_id, raw_sha256, NULL::bigint AS outbox_id FROM m
           UNION ALL SELECT NULL, NULL, NULL, id FROM o""",
        keys,
        [len(blobs[k]) for k in keys],
        [blobs[k] for k in keys],
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
        [a.id for a in atts],
        [a.message_id for a in atts],
        [a.mailbox_id for a in atts],
        [a.sha256 for a in atts],
        [a.filename for a in atts],
        [a.content_type for a in atts],
        [a.size for a in atts],
        [a.content_id for a in atts],
        [a.inline for a in atts],
        [e[0] for e in evs],
        [e[1] for e in evs],
        [e[2] for e in evs],
    )
    out = {(r["mailbox_id"], r["raw_sha256"]): (r["id"], True) for r in inserted if r["id"]}
    new = {v[0] for v in out.values()}
    staged = outbox.Staged(
        tuple(r["outbox_id"] for r in inserted if r["outbox_id"] is not None),
        tuple((stream_type, envelope) for mid, stream_type, envelope in evs if mid in new),
    )
    old = [r for r in rows if (r.mailbox_id, r.raw_sha256) not in out]
    if old:
        out.update(await _first_copies(conn, old))
        if len(out) < len(rows):  # a first copy vanished since: the client retries later
            raise RuntimeError("duplicate message disappeared while checking it")
    return out, staged


async def _first_copies(
    conn: asyncpg.Connection, rows: list[MessageRow]
) -> dict[tuple[str, str], tuple[uuid.UUID, bool]]:
    """The stored first copy of each of these deliveries (retries of a message we have)."""
    firsts = await conn.fetch(
        """SELECT m.id, m.mailbox_id, m.raw_sha256
           FROM messages m
           JOIN unnest($1::text[], $2::text[]) AS k (mailbox_id, raw_sha256)
             ON m.mailbox_id = k.mailbox_id AND m.raw_sha256 = k.raw_sha256
           WHERE m.duplicate_of IS NULL""",
        [r.mailbox_id for r in rows],
        [r.raw_sha256 for r in rows],
    )
    return {(r["mailbox_id"], r["raw_sha256"]): (r["id"], False) for r in firsts}


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
