"""SQL of collaborative drafts: a snapshot and an append-only update log per draft.

Every write to one draft first takes its ``drafts`` row lock (the upsert in ``append``, ``FOR
UPDATE`` in ``compact``, the upsert in ``clear``), so appends, compactions and clears of a draft
serialize across replicas: a compaction deletes exactly the log rows it merged, and an update
for an epoch that was cleared meanwhile is refused instead of resurrecting part of a sent draft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import asyncpg

from services.notifier.domain.drafts import DraftKey, DraftLimits, compacted, fits


@dataclass
class Loaded:
    epoch: int = 0
    updates: list[bytes] = field(default_factory=list)  # the snapshot first, when there is one


@dataclass(frozen=True)
class Appended:
    status: Literal["ok", "cleared", "too_large"]
    epoch: int
    pending: int = 0
    pending_bytes: int = 0


async def load(pool: asyncpg.Pool, key: DraftKey) -> Loaded:
    """The draft's current epoch and content, from one snapshot of the database."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(
            "SELECT epoch, snapshot FROM drafts WHERE id_conversa = $1 AND draft = $2", *key
        )
        if row is None:
            return Loaded()
        out = Loaded(epoch=int(row["epoch"]))
        if row["snapshot"]:
            out.updates.append(bytes(row["snapshot"]))
        for r in await conn.fetch(
            """SELECT data FROM draft_updates
               WHERE id_conversa = $1 AND draft = $2 AND epoch = $3 ORDER BY id""",
            *key,
            out.epoch,
        ):
            out.updates.append(bytes(r["data"]))
        return out


async def epoch(conn: asyncpg.Connection, key: DraftKey) -> int:
    value = await conn.fetchval(
        "SELECT epoch FROM drafts WHERE id_conversa = $1 AND draft = $2", *key
    )
    return int(value) if value is not None else 0


async def append(
    pool: asyncpg.Pool,
    key: DraftKey,
    epoch: int,
    data: bytes,
    user_id: str,
    limits: DraftLimits,
) -> Appended:
    """Log one update of ``epoch``; refused when the draft was cleared since or would be too big.

    One statement, one round trip (this is every keystroke batch of every editor): the upsert
    takes the row lock and counts the update only if the epoch and the size cap allow it, and
    the log row is written from what it returned.
    """
    if not fits(0, len(data), limits):
        return Appended("too_large", epoch)
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """WITH d AS (
                   INSERT INTO drafts AS d (id_conversa, draft, epoch, pending, pending_bytes)
                   VALUES ($1, $2, $3, 1, $4)
                   ON CONFLICT (id_conversa, draft) DO UPDATE SET
                       pending = d.pending + 1,
                       pending_bytes = d.pending_bytes + EXCLUDED.pending_bytes,
                       updated_at = now()
                   WHERE d.epoch = EXCLUDED.epoch
                     AND octet_length(d.snapshot) + d.pending_bytes + EXCLUDED.pending_bytes <= $6
                   RETURNING d.epoch, d.pending, d.pending_bytes
               ), logged AS (
                   INSERT INTO draft_updates (id_conversa, draft, epoch, data, user_id)
                   SELECT $1, $2, d.epoch, $5, $7 FROM d
               )
               SELECT epoch, pending, pending_bytes FROM d""",
            *key,
            epoch,
            len(data),
            data,
            limits.max_doc_bytes,
            user_id,
        )
        if row is not None:
            return Appended("ok", epoch, int(row["pending"]), int(row["pending_bytes"]))
        # Refused: say why (a rare path, so a second look is fine).
        now = await conn.fetchrow(
            """SELECT epoch, pending, pending_bytes FROM drafts
               WHERE id_conversa = $1 AND draft = $2""",
            *key,
        )
    if now is None or int(now["epoch"]) != epoch:
        return Appended("cleared", int(now["epoch"]) if now is not None else 0)
    return Appended("too_large", epoch, int(now["pending"]), int(now["pending_bytes"]))


async def compact(pool: asyncpg.Pool, key: DraftKey) -> int:
    """Merge the log into the snapshot; returns how many log rows it replaced."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """SELECT epoch, snapshot FROM drafts WHERE id_conversa = $1 AND draft = $2
               FOR UPDATE""",
            *key,
        )
        if row is None:
            return 0
        rows = await conn.fetch(
            """SELECT id, data FROM draft_updates
               WHERE id_conversa = $1 AND draft = $2 AND epoch = $3 ORDER BY id""",
            *key,
            row["epoch"],
        )
        if not rows:
            return 0
        snapshot = compacted(bytes(row["snapshot"]), [bytes(r["data"]) for r in rows])
        await conn.execute(
            """UPDATE drafts SET snapshot = $3, pending = 0, pending_bytes = 0, updated_at = now()
               WHERE id_conversa = $1 AND draft = $2""",
            *key,
            snapshot,
        )
        # Exactly the rows merged: the row lock kept others out, but say so in the statement.
        await conn.execute(
            "DELETE FROM draft_updates WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
        )
        return len(rows)


async def clear(pool: asyncpg.Pool, key: DraftKey, send_id: str) -> int | None:
    """The reply was sent from this draft: empty it under a new epoch.

    Returns the new epoch, or None when this send cleared it already (a retried send frame must
    not wipe the draft someone started after it).
    """
    async with pool.acquire() as conn, conn.transaction():
        epoch = await conn.fetchval(
            """INSERT INTO drafts AS d (id_conversa, draft, epoch, cleared_by)
               VALUES ($1, $2, 1, $3)
               ON CONFLICT (id_conversa, draft) DO UPDATE SET
                   epoch = d.epoch + 1, snapshot = '', pending = 0, pending_bytes = 0,
                   cleared_by = EXCLUDED.cleared_by, updated_at = now()
               WHERE d.cleared_by IS DISTINCT FROM EXCLUDED.cleared_by
               RETURNING d.epoch""",
            *key,
            send_id,
        )
        if epoch is None:
            return None
        await conn.execute("DELETE FROM draft_updates WHERE id_conversa = $1 AND draft = $2", *key)
        return int(epoch)
