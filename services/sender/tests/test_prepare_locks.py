"""Prepare passes run side by side (``prepare_workers``): each takes its own rows, and none
keeps a lock on a row it does not compose (such a lock held up another pass's attempt and,
through the lock session, every pass: a deadlock seen in bench.sender)."""

from __future__ import annotations

import uuid

import asyncpg

from services.sender import storage
from services.sender.tests.conftest import MAILBOX


async def queued(pool: asyncpg.Pool, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    await pool.executemany(
        """INSERT INTO sends (send_id, user_id, id_conversa, mailbox_id, state, command,
                              correlation_id, next_attempt_at)
           VALUES ($1, 'u-agent', 'conv-1', $2, 'queued', '{}', 'corr',
                   now() - make_interval(secs => $3))""",
        [(sid, MAILBOX, float(100 - i)) for i, sid in enumerate(ids)],
    )
    return ids


async def row_is_free(pool: asyncpg.Pool, send_id: uuid.UUID) -> bool:
    async with pool.acquire() as conn, conn.transaction():
        try:
            await conn.execute("SELECT 1 FROM sends WHERE send_id = $1 FOR UPDATE NOWAIT", send_id)
        except asyncpg.LockNotAvailableError:
            return False
        return True


async def test_two_passes_take_disjoint_rows(sender_pool: asyncpg.Pool) -> None:
    ids = await queued(sender_pool, 6)
    async with sender_pool.acquire() as a, sender_pool.acquire() as b:
        async with a.transaction():
            first = await storage.lock_for_prepare(a, await storage.prepare_candidates(a, 3))
            assert [r["send_id"] for r in first] == ids[:3]  # oldest first
            async with b.transaction():
                second = await storage.lock_for_prepare(b, await storage.prepare_candidates(b, 3))
                assert [r["send_id"] for r in second] == ids[3:]


async def test_a_row_that_left_the_stage_is_neither_returned_nor_kept_locked(
    sender_pool: asyncpg.Pool,
) -> None:
    ids = await queued(sender_pool, 3)
    async with sender_pool.acquire() as conn:
        candidates = await storage.prepare_candidates(conn, 3)
        assert candidates == ids
        assert await row_is_free(sender_pool, ids[0])  # the candidates' locks ended with it
        # Another pass composed and claimed one of them meanwhile.
        await sender_pool.execute(
            """UPDATE sends SET state = 'sending', attempts = 1, mime = 'x'::bytea
               WHERE send_id = $1""",
            ids[0],
        )
        async with conn.transaction():
            rows = await storage.lock_for_prepare(conn, candidates)
            assert [r["send_id"] for r in rows] == ids[1:]
            # Its attempt can record its outcome while this pass composes the others.
            assert await row_is_free(sender_pool, ids[0])
            assert not await row_is_free(sender_pool, ids[1])
