"""The sender's SQL: its view of mailboxes and threads, the queue of sends, their attempts."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg

from libs.common import outbox
from libs.common.events import Envelope, MailSend, MailStatus, SentMessage
from services.sender.domain.render import Rendered, StoredAttachment

# Columns a delivery attempt and its status events need (not the command, which may be large).
SEND_COLUMNS = """send_id, client_id, user_id, id_conversa, mailbox_id, state, attempts,
    next_attempt_at, message_id, mail_from, recipients, sent_message, detail, created_at,
    correlation_id, attempt_started_at, smtp_dot_at"""


def status_event(
    row: Any, status: str, detail: str, *, attempt: int | None = None, **kw: Any
) -> Envelope:
    payload = MailStatus(
        send_id=str(row["send_id"]),
        client_id=row["client_id"],
        id_conversa=row["id_conversa"],
        mailbox_id=row["mailbox_id"],
        user_id=row["user_id"],
        status=status,  # type: ignore[arg-type]
        detail=detail,
        attempt=row["attempts"] if attempt is None else attempt,
        **kw,
    )
    return Envelope.of(payload, producer="sender", correlation_id=row["correlation_id"])


def sent_message(row: Any) -> SentMessage | None:
    return SentMessage.model_validate(row["sent_message"]) if row["sent_message"] else None


# ---- our view of mailboxes and conversations ---------------------------------------------------


async def upsert_mailbox(
    conn: asyncpg.Connection, mailbox_id: str, address: str, name: str, active: bool
) -> None:
    await conn.execute(
        """INSERT INTO mailboxes (id, address, name, active) VALUES ($1, $2, $3, $4)
           ON CONFLICT (id) DO UPDATE SET address = $2, name = $3, active = $4""",
        mailbox_id,
        address,
        name,
        active,
    )
    await conn.execute(
        """UPDATE sends SET next_attempt_at = now()
           WHERE mailbox_id = $1 AND state = 'queued' AND mime IS NULL""",
        mailbox_id,
    )


async def add_thread_message(conn: asyncpg.Connection, values: tuple[Any, ...]) -> None:
    await conn.execute(
        """INSERT INTO thread_messages (id_conversa, message_id, mailbox_id, number,
               conv_subject, direction, sender, to_addrs, cc_addrs, subject, date, refs, token)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)
           ON CONFLICT DO NOTHING""",
        *values,
    )
    # Sends that were waiting for this conversation go now rather than at their deadline.
    await conn.execute(
        """UPDATE sends SET next_attempt_at = now()
           WHERE id_conversa = $1 AND state = 'queued' AND mime IS NULL""",
        values[0],
    )


# ---- accepting commands ------------------------------------------------------------------------


async def insert_send(
    conn: asyncpg.Connection, send_id: uuid.UUID, cmd: MailSend, correlation_id: str
) -> asyncpg.Record | None:
    """The new queued send, or None when this send_id or (user_id, client_id) is already queued."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""INSERT INTO sends (send_id, client_id, user_id, id_conversa, mailbox_id, state,
                               command, correlation_id)
            VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7)
            ON CONFLICT DO NOTHING RETURNING {SEND_COLUMNS}""",
        send_id,
        cmd.client_id,
        cmd.user_id,
        cmd.id_conversa,
        cmd.mailbox_id,
        cmd.model_dump(mode="json"),
        correlation_id,
    )
    return row


# ---- the prepare stage -------------------------------------------------------------------------


async def due_for_prepare(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            f"""SELECT {SEND_COLUMNS}, command FROM sends
                WHERE state = 'queued' AND mime IS NULL AND next_attempt_at <= now()
                ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED""",
            limit,
        )
    )


async def views_for(
    conn: asyncpg.Connection, mailbox_ids: Iterable[str], conversations: Iterable[str]
) -> tuple[dict[str, asyncpg.Record], dict[str, list[asyncpg.Record]]]:
    boxes = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT * FROM mailboxes WHERE id = ANY($1::text[])", list(set(mailbox_ids))
        )
    }
    threads: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in await conn.fetch(
        """SELECT * FROM thread_messages WHERE id_conversa = ANY($1::text[])
           ORDER BY id_conversa, date, seen_at""",
        list(set(conversations)),
    ):
        threads[r["id_conversa"]].append(r)
    return boxes, threads


async def attachments(conn: asyncpg.Connection, ids: Iterable[str]) -> dict[str, StoredAttachment]:
    wanted = list(set(ids))
    if not wanted:
        return {}
    rows = await conn.fetch("SELECT * FROM attachments WHERE id = ANY($1::text[])", wanted)
    return {
        r["id"]: StoredAttachment(
            id=r["id"],
            mailbox_id=r["mailbox_id"],
            filename=r["filename"],
            content_type=r["content_type"],
            data=bytes(r["data"]),
            content_id=r["content_id"],
        )
        for r in rows
    }


async def mark_ready(conn: asyncpg.Connection, items: list[tuple[uuid.UUID, Rendered]]) -> None:
    await conn.executemany(
        """UPDATE sends SET mime = $2, message_id = $3, mail_from = $4, recipients = $5,
                            sent_message = $6, next_attempt_at = now(), updated_at = now()
           WHERE send_id = $1""",
        [(sid, r.mime, r.message_id, r.mail_from, r.recipients, r.sent) for sid, r in items],
    )


async def postpone(conn: asyncpg.Connection, send_id: uuid.UUID, until: datetime) -> None:
    await conn.execute("UPDATE sends SET next_attempt_at = $2 WHERE send_id = $1", send_id, until)


async def refuse(conn: asyncpg.Connection, row: Any, detail: str) -> None:
    """A command that can never be sent: failed now, with the reason, in the status event."""
    updated = await conn.fetchrow(
        f"""UPDATE sends SET state = 'failed', detail = $2, updated_at = now()
            WHERE send_id = $1 AND state = 'queued' RETURNING {SEND_COLUMNS}""",
        row["send_id"],
        detail,
    )
    if updated is not None:
        await outbox.add(conn, status_event(updated, "failed", detail))


# ---- delivery attempts -------------------------------------------------------------------------


async def claim(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Due sends, now 'sending' with attempts + 1, each under this session's advisory lock.

    Runs on the lock session (see ``delivery.Locks``). The CTEs are MATERIALIZED so the lock is
    taken for exactly the rows this statement updates, never for a row it only looked at.
    """
    return list(
        await conn.fetch(
            f"""WITH due AS MATERIALIZED (
                    SELECT send_id FROM sends
                    WHERE state IN ('queued', 'deferred') AND mime IS NOT NULL
                      AND next_attempt_at <= now()
                    ORDER BY next_attempt_at LIMIT $1
                    FOR UPDATE SKIP LOCKED),
                locked AS MATERIALIZED (
                    SELECT send_id FROM due WHERE pg_try_advisory_lock(send_lock_key(send_id)))
                UPDATE sends s
                SET state = 'sending', attempts = s.attempts + 1, attempt_started_at = now(),
                    smtp_dot_at = NULL, updated_at = now()
                FROM locked WHERE s.send_id = locked.send_id
                RETURNING {", ".join("s." + c.strip() for c in SEND_COLUMNS.split(","))}, s.mime""",
            limit,
        )
    )


async def lock_orphans(
    conn: asyncpg.Connection, exclude: list[uuid.UUID], limit: int = 100
) -> list[uuid.UUID]:
    """Sends in 'sending' whose owner is gone: nobody holds their lock (we take it now)."""
    rows = await conn.fetch(
        """WITH cand AS MATERIALIZED (
               SELECT send_id FROM sends
               WHERE state = 'sending' AND NOT (send_id = ANY($1::uuid[])) LIMIT $2),
           locked AS MATERIALIZED (
               SELECT send_id FROM cand WHERE pg_try_advisory_lock(send_lock_key(send_id)))
           SELECT send_id FROM locked""",
        exclude,
        limit,
    )
    return [r["send_id"] for r in rows]


async def unlock(conn: asyncpg.Connection, send_ids: list[uuid.UUID]) -> None:
    await conn.execute(
        "SELECT pg_advisory_unlock(send_lock_key(id)) FROM unnest($1::uuid[]) AS id", send_ids
    )


async def mark_dot(conn: asyncpg.Connection, send_id: uuid.UUID, attempt: int) -> bool:
    """Commit "the final '.' of this attempt is being sent"; False if the attempt is not ours."""
    done = await conn.execute(
        """UPDATE sends SET smtp_dot_at = clock_timestamp()
           WHERE send_id = $1 AND state = 'sending' AND attempts = $2""",
        send_id,
        attempt,
    )
    return bool(done == "UPDATE 1")


async def finish(
    conn: asyncpg.Connection,
    send_id: uuid.UUID,
    attempt: int,
    state: str,
    detail: str,
    outcome: str,
    next_attempt_at: datetime | None,
) -> asyncpg.Record | None:
    """Record the outcome of ``attempt`` (only if it is still the current one) and its event."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE sends SET state = $3, detail = $4, updated_at = now(),
                next_attempt_at = COALESCE($5, next_attempt_at),
                sent_at = CASE WHEN $3 = 'sent' THEN now() ELSE sent_at END
            WHERE send_id = $1 AND state = 'sending' AND attempts = $2
            RETURNING {SEND_COLUMNS}""",
        send_id,
        attempt,
        state,
        detail,
        next_attempt_at,
    )
    if row is None:
        return None
    await conn.execute(
        """INSERT INTO attempts (send_id, attempt, started_at, dot_at, outcome, detail)
           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
        send_id,
        attempt,
        row["attempt_started_at"],
        row["smtp_dot_at"],
        outcome,
        detail,
    )
    extra: dict[str, Any] = {}
    if state == "deferred":
        extra["next_attempt_at"] = row["next_attempt_at"]
    if state == "sent":
        extra["message"] = sent_message(row)
    await outbox.add(conn, status_event(row, state, detail, **extra))
    return row


async def orphan(conn: asyncpg.Connection, send_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {SEND_COLUMNS} FROM sends WHERE send_id = $1 AND state = 'sending' FOR UPDATE",
        send_id,
    )
    return row
