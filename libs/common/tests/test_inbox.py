"""Idempotent consumption records against real PostgreSQL: one at a time and in batches."""

from __future__ import annotations

import uuid

from libs.common import inbox
from libs.common.tests.helpers import setup_schema


async def test_a_batch_answers_as_the_same_ids_asked_in_turn(database_url: str) -> None:
    pool = await setup_schema(database_url)
    try:
        a, b, c = (str(uuid.uuid4()) for _ in range(3))
        async with pool.acquire() as conn:
            assert await inbox.first_time(conn, "batch", a)
            # a was seen; b twice in one batch is new once (its first place); c is new.
            assert await inbox.first_times(conn, "batch", [b, a, b, c]) == [
                True,
                False,
                False,
                True,
            ]
            assert await inbox.first_times(conn, "batch", [c, b]) == [False, False]
            assert await inbox.first_times(conn, "batch", []) == []
            # Another consumer has its own record of the same ids.
            assert await inbox.first_times(conn, "other", [a, c]) == [True, True]
            # Rolled back with the handler's transaction: the ids are new again.
            d = str(uuid.uuid4())
            tx = conn.transaction()
            await tx.start()
            assert await inbox.first_times(conn, "batch", [d]) == [True]
            await tx.rollback()
            assert await inbox.first_time(conn, "batch", d)
    finally:
        await pool.close()
