"""The sender's SQL: its view of mailboxes and threads, the queue of sends, their attempts."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg

from libs.common import outbox
from libs.common.events import Envelope, MailSend, MailStatus, SentMessage
from services.sender.domain.render import Rendered, StoredAttachment

log = logging.getLogger("chatflow.sender.storage")

# A state compared as ``state = {QUEUED}`` (or {SENDING}) rather than ``state = 'queued'``: the
# sub-select is a value the planner cannot see when it plans, so it cannot prove from it the
# predicate of a partial index (``sends_due``, ``sends_waiting``) and looks the rows up by their
# key. The bench's tables never have statistics (autovacuum has not run yet, or is off), and the
# planner then took those partial indexes for a few rows and scanned all of them, dead entries
# included, for every batch: ``finish_many`` read ~3,000 entries of sends_due to update 6 rows
# (1.1 ms), ``mark_sending`` ~2,700 of sends_waiting (3.8 ms), in a backlog of 4,000 sends.
QUEUED, SENDING = "(SELECT 'queued'::text)", "(SELECT 'sending'::text)"

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
) -> int:
    """Store the mailbox; returns how many sends that waited for it are due now."""
    await conn.execute(
        """INSERT INTO mailboxes (id, address, name, active) VALUES ($1, $2, $3, $4)
           ON CONFLICT (id) DO UPDATE SET address = $2, name = $3, active = $4""",
        mailbox_id,
        address,
        name,
        active,
    )
    return await _release(conn, "mailbox_id", mailbox_id)


async def add_thread_message(conn: asyncpg.Connection, values: tuple[Any, ...]) -> int:
    """Store a message of a thread; returns how many sends that waited for it are due now."""
    return await add_thread_messages(conn, [values])


async def add_thread_messages(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> int:
    """Store messages of threads (one round trip); how many sends that waited for them are due."""
    if not rows:
        return 0
    await conn.executemany(
        """INSERT INTO thread_messages (id_conversa, message_id, mailbox_id, number,
               conv_subject, direction, sender, to_addrs, cc_addrs, subject, date, refs, token,
               reply_to)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)
           ON CONFLICT DO NOTHING""",
        rows,
    )
    # Sends that were waiting for these conversations go now rather than at their deadline.
    return await _release(conn, "id_conversa", sorted({r[0] for r in rows}))


async def _release(conn: asyncpg.Connection, column: str, value: str | list[str]) -> int:
    """Sends of this conversation or mailbox (or of these) not composed yet are due now; how many.

    Every such row is updated, due or not: the row lock is what orders this with a prepare pass
    that read the views before this transaction committed (it skips the locked row, or we wait
    and then undo its postponing). Skipping rows already due lost that: a send could wait its
    whole ``unknown_conversation_wait_s`` (seen under CI load).
    """
    values = value if isinstance(value, list) else [value]
    status = await conn.execute(
        f"""UPDATE sends SET next_attempt_at = now()
            WHERE {column} = ANY($1::text[]) AND state = 'queued' AND mime IS NULL""",
        values,
    )
    return int(status.split()[-1])


# ---- accepting commands ------------------------------------------------------------------------


async def insert_sends(
    conn: asyncpg.Connection, items: list[tuple[uuid.UUID, MailSend, str]]
) -> dict[uuid.UUID, asyncpg.Record]:
    """New queued sends for ``(send_id, command, correlation_id)``, in one statement; the new
    rows by send_id (a send_id or a (user_id, client_id) already queued is left out)."""
    if not items:
        return {}
    rows = await conn.fetch(
        f"""INSERT INTO sends (send_id, client_id, user_id, id_conversa, mailbox_id, state,
                               command, correlation_id)
            SELECT v.send_id, v.client_id, v.user_id, v.id_conversa, v.mailbox_id, 'queued',
                   v.command, v.correlation_id
            FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                        $7::text[]) WITH ORDINALITY
                 AS v(send_id, client_id, user_id, id_conversa, mailbox_id, command,
                      correlation_id, n)
            ORDER BY v.n
            ON CONFLICT DO NOTHING RETURNING {SEND_COLUMNS}""",
        [i[0] for i in items],
        [i[1].client_id for i in items],
        [i[1].user_id for i in items],
        [i[1].id_conversa for i in items],
        [i[1].mailbox_id for i in items],
        [i[1].model_dump(mode="json") for i in items],
        [i[2] for i in items],
    )
    return {r["send_id"]: r for r in rows}


async def client_id_owners(
    conn: asyncpg.Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], tuple[uuid.UUID, str]]:
    """The queued send holding each ``(user_id, client_id)``: its send id and conversation."""
    rows = await conn.fetch(
        """SELECT s.user_id, s.client_id, s.send_id, s.id_conversa FROM sends s
           JOIN unnest($1::text[], $2::text[]) AS k (user_id, client_id)
             ON s.user_id = k.user_id AND s.client_id = k.client_id""",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(r["user_id"], r["client_id"]): (r["send_id"], r["id_conversa"]) for r in rows}


# ---- the prepare stage -------------------------------------------------------------------------


async def prepare_candidates(conn: asyncpg.Connection, limit: int) -> list[uuid.UUID]:
    """Sends due for composing that no prepare pass holds now; run *outside* a transaction.

    Its row locks end with the statement. A ``FOR UPDATE`` that meets a row another
    transaction updated after this statement's snapshot locks the row's newest version and only
    then finds it no longer matches: the row is not returned but stays locked. Here that newest
    version is a send another pass (of this or another replica) has just made 'sending', and a
    prepare transaction that kept such a lock while it composed would hold up that attempt's
    outcome, and with it the lock session every pass waits for (a deadlock seen with two passes
    at once). :func:`lock_for_prepare` then locks these rows by key, in the transaction.
    """
    rows = await conn.fetch(
        """SELECT send_id FROM sends
           WHERE state = 'queued' AND mime IS NULL AND next_attempt_at <= now()
           ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED""",
        limit,
    )
    return [r["send_id"] for r in rows]


async def lock_for_prepare(
    conn: asyncpg.Connection, send_ids: list[uuid.UUID]
) -> list[asyncpg.Record]:
    """The rows of :func:`prepare_candidates` still due and not taken meanwhile, locked until
    the prepare transaction ends (a row another pass took between the two is skipped)."""
    return list(
        await conn.fetch(
            f"""SELECT {SEND_COLUMNS}, command FROM sends
                WHERE send_id = ANY($1::uuid[]) AND state = {QUEUED} AND mime IS NULL
                ORDER BY next_attempt_at FOR UPDATE SKIP LOCKED""",
            send_ids,
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
    rows = await conn.fetch(
        """SELECT a.id, a.mailbox_id, a.mailboxes, a.filename, a.content_type, a.content_id,
                  COALESCE(a.data, b.data) AS data
           FROM attachments a LEFT JOIN blobs b ON b.sha256 = a.sha256
           WHERE a.id = ANY($1::text[])""",
        wanted,
    )
    return {
        r["id"]: StoredAttachment(
            id=r["id"],
            mailbox_id=r["mailbox_id"],
            filename=r["filename"],
            content_type=r["content_type"],
            data=bytes(r["data"]),
            content_id=r["content_id"],
            mailboxes=frozenset(r["mailboxes"]),
        )
        for r in rows
    }


_READY = """UPDATE sends s SET mime = v.mime, message_id = v.message_id, mail_from = v.mail_from,
                          recipients = ARRAY(SELECT jsonb_array_elements_text(v.recipients::jsonb)),
                          sent_message = v.sent, next_attempt_at = now(), updated_at = now() {}
       FROM unnest($1::uuid[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::jsonb[])
            AS v(send_id, mime, message_id, mail_from, recipients, sent)
       WHERE s.send_id = v.send_id {}"""


def _ready_args(items: list[tuple[uuid.UUID, Rendered]]) -> list[Any]:
    return [
        [sid for sid, _ in items],
        [r.mime for _, r in items],
        [r.message_id for _, r in items],
        [r.mail_from for _, r in items],
        [json.dumps(list(r.recipients)) for _, r in items],  # one text[] each: a jsonb here
        [r.sent for _, r in items],
    ]


async def mark_ready(conn: asyncpg.Connection, items: list[tuple[uuid.UUID, Rendered]]) -> None:
    """Store the composed messages, in one statement."""
    if items:
        await conn.execute(_READY.format("", ""), *_ready_args(items))


async def mark_sending(
    conn: asyncpg.Connection, items: list[tuple[uuid.UUID, Rendered]]
) -> list[asyncpg.Record]:
    """Store the composed messages and claim them at once: attempt 1 of each begins, as
    :func:`claim` would begin it (in the prepare transaction, which holds the rows; the caller
    took their advisory locks on its lock session first). The rows, without the mime and the
    sent message (the caller has both: the sent message read back was ~5 KB of lz4 and JSON to
    decode per send)."""
    if not items:
        return []
    cols = ", ".join(
        "s." + c.strip() for c in SEND_COLUMNS.split(",") if c.strip() != "sent_message"
    )
    sql = _READY.format(
        """, state = 'sending', attempts = s.attempts + 1, attempt_started_at = now(),
             smtp_dot_at = NULL""",
        # No state condition: lock_for_prepare locked these rows, queued and not composed, in
        # this transaction, so nothing else has changed them (one made the planner scan all of
        # sends_waiting for each batch; see QUEUED).
        f"RETURNING {cols}",
    )
    return list(await conn.fetch(sql, *_ready_args(items)))


async def try_locks(conn: asyncpg.Connection, send_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """This session's advisory lock of each send that nobody else holds; the ones it got."""
    rows = await conn.fetch(
        """SELECT id FROM unnest($1::uuid[]) AS id WHERE pg_try_advisory_lock(send_lock_key(id))""",
        send_ids,
    )
    return {r["id"] for r in rows}


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


# ---- agents' uploads ---------------------------------------------------------------------------


async def put_upload(
    conn: asyncpg.Connection,
    *,
    upload_id: str,
    mailboxes: list[str],
    user_id: str,
    filename: str,
    content_type: str,
    data: bytes,
) -> None:
    """Store the bytes once by their sha256, and this upload's name, type and mailboxes."""
    digest = hashlib.sha256(data).hexdigest()
    await conn.execute(
        # DO UPDATE locks an existing row, so a concurrent expiry cannot delete it under us.
        """INSERT INTO blobs (sha256, size, data) VALUES ($1, $2, $3)
           ON CONFLICT (sha256) DO UPDATE SET size = EXCLUDED.size""",
        digest,
        len(data),
        data,
    )
    await conn.execute(
        """INSERT INTO attachments (id, mailbox_id, mailboxes, user_id, filename, content_type,
                                    sha256, size)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        upload_id,
        mailboxes[0],
        mailboxes,
        user_id,
        filename,
        content_type,
        digest,
        len(data),
    )


async def upload(pool: asyncpg.Pool, upload_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(
        """SELECT a.mailbox_id, a.mailboxes, a.filename, a.content_type,
                  COALESCE(a.data, b.data) AS data
           FROM attachments a LEFT JOIN blobs b ON b.sha256 = a.sha256 WHERE a.id = $1""",
        upload_id,
    )
    return row


async def mark_used(conn: asyncpg.Connection, ids: list[str], mailbox_id: str) -> None:
    """A send of ``mailbox_id`` queued these files: no longer orphans the expiry may delete."""
    if ids:
        await conn.execute(
            """UPDATE attachments SET used_at = now()
               WHERE id = ANY($1::text[]) AND used_at IS NULL
                 AND (mailbox_id = $2 OR $2 = ANY(mailboxes))""",
            ids,
            mailbox_id,
        )


async def expire_uploads(conn: asyncpg.Connection, older_than_s: float) -> int:
    """Delete uploads no send used within ``older_than_s``, and bytes nothing refers to any more.

    A send that queues a file concurrently updates ``used_at`` first (row lock), and the DELETE
    re-checks ``used_at IS NULL`` on the row it waited for, so a used file is never deleted.
    """
    gone = await conn.fetch(
        """DELETE FROM attachments
           WHERE used_at IS NULL AND created_at < now() - make_interval(secs => $1)
           RETURNING sha256""",
        older_than_s,
    )
    digests = list({r["sha256"] for r in gone if r["sha256"]})
    if digests:
        await conn.execute(
            """DELETE FROM blobs b WHERE b.sha256 = ANY($1::text[])
                 AND NOT EXISTS (SELECT 1 FROM attachments a WHERE a.sha256 = b.sha256)""",
            digests,
        )
    return len(gone)


# ---- the same writes, for many attempts at once (services/sender/groupcommit.py) ---------------


async def mark_dots(conn: Any, attempts: list[tuple[uuid.UUID, int]]) -> set[tuple[uuid.UUID, int]]:
    """Commit "the final '.' of this attempt is being sent" for many attempts, in one statement
    (atomic on its own); the (send_id, attempt) pairs marked, leaving out attempts no longer
    current."""
    rows = await conn.fetch(
        f"""UPDATE sends s SET smtp_dot_at = clock_timestamp()
           FROM unnest($1::uuid[], $2::int[]) AS v(send_id, attempt)
           WHERE s.send_id = v.send_id AND s.state = {SENDING} AND s.attempts = v.attempt
           RETURNING s.send_id, s.attempts""",
        [a[0] for a in attempts],
        [a[1] for a in attempts],
    )
    return {(r["send_id"], r["attempts"]) for r in rows}


Outcome = tuple[uuid.UUID, int, str, str, str, datetime | None]


def outcome_event(row: Any, state: str, detail: str, next_at: datetime | None) -> Envelope:
    """The status event of an attempt's outcome, from the row its claim returned.

    What :func:`finish` reads back after its update is known before it: the claim's row has the
    send's ids, attempt and sent message, and a deferred outcome always brings ``next_at``.
    """
    extra: dict[str, Any] = {}
    if state == "deferred":
        extra["next_attempt_at"] = next_at
    if state == "sent":
        extra["message"] = sent_message(row)
    return status_event(row, state, detail, **extra)


async def finish_many(
    conn: Any, outcomes: list[Outcome], events: list[Envelope], *, unlock: bool = False
) -> tuple[dict[tuple[uuid.UUID, int], asyncpg.Record], outbox.Staged]:
    """:func:`finish` for many attempts ``(send_id, attempt, state, detail, outcome, next_at)``,
    each with its status event (:func:`outcome_event`), in one statement (atomic on its own):
    the row, its attempt and its outbox row, for the attempts still current. Returns those by
    (id, attempt), and their outbox rows staged for the direct path (ADR 0006): the caller
    publishes them once the statement committed (no relay pass reads the ~5 KB events back).

    ``unlock``: the statement also gives back this session's advisory lock of every send it
    updated, each once its row is updated (and so row-locked until the statement commits: a
    replica that takes the lock over waits for that commit in :func:`orphan` and then finds the
    row no longer 'sending'). Sends whose attempt was no longer current are not unlocked here.
    """
    unlock_sql = ", pg_advisory_unlock(send_lock_key(u.send_id)) AS unlocked" if unlock else ""
    jsons = [e.to_json() for e in events]
    rows = await conn.fetch(
        f"""WITH v AS (
                SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[],
                                     $5::timestamptz[], $6::text[], $7::text[], $8::text[])
                     WITH ORDINALITY AS v(send_id, attempt, state, detail, next_at, outcome,
                                          stream_type, envelope, n)),
            u AS (
                UPDATE sends s SET state = v.state, detail = v.detail, updated_at = now(),
                    next_attempt_at = COALESCE(v.next_at, s.next_attempt_at),
                    sent_at = CASE WHEN v.state = 'sent' THEN now() ELSE s.sent_at END
                FROM v
                WHERE s.send_id = v.send_id AND s.state = {SENDING} AND s.attempts = v.attempt
                RETURNING s.send_id, s.attempts, s.attempt_started_at, s.smtp_dot_at),
            a AS (
                INSERT INTO attempts (send_id, attempt, started_at, dot_at, outcome, detail)
                SELECT u.send_id, u.attempts, u.attempt_started_at, u.smtp_dot_at, v.outcome,
                       v.detail
                FROM u JOIN v ON v.send_id = u.send_id AND v.attempt = u.attempts
                ON CONFLICT DO NOTHING),
            o AS (
                INSERT INTO outbox (stream_type, envelope, direct)
                SELECT v.stream_type, v.envelope, true
                FROM u JOIN v ON v.send_id = u.send_id AND v.attempt = u.attempts
                ORDER BY v.n
                RETURNING id)
            SELECT u.send_id, u.attempts, (SELECT array_agg(id ORDER BY id) FROM o) AS outbox_ids
                   {unlock_sql}
            FROM u""",
        [o[0] for o in outcomes],
        [o[1] for o in outcomes],
        [o[2] for o in outcomes],
        [o[3] for o in outcomes],
        [o[5] for o in outcomes],
        [o[4] for o in outcomes],
        [e.type for e in events],
        jsons,
    )
    done = {(r["send_id"], r["attempts"]): r for r in rows}
    # The ids were drawn in the order of the INSERT's rows (ORDER BY v.n: the input order), as
    # in outbox.stage; the events of the attempts that were current, in that order, are theirs.
    ids = tuple(rows[0]["outbox_ids"] or ()) if rows else ()
    entries = tuple(
        (e.type, j) for o, e, j in zip(outcomes, events, jsons, strict=True) if (o[0], o[1]) in done
    )
    if len(ids) != len(entries):  # cannot happen; if it did, the relay publishes them (grace)
        log.error("finish_many: outbox ids do not match the events; left to the relay")
        return done, outbox.Staged()
    return done, outbox.Staged(ids, entries)
