"""Idempotent consumption: remember each handled event id in the handler's own transaction."""

from __future__ import annotations

import asyncpg


async def first_time(conn: asyncpg.Connection, consumer: str, event_id: str) -> bool:
    """True the first time ``event_id`` is seen by ``consumer``; call inside the handler's transaction.

    If the transaction rolls back, the record goes with it, so a retry runs the handler again; if
    it commits, a redelivery finds the record and changes nothing.
    """
    row = await conn.fetchval(
        """INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2)
           ON CONFLICT DO NOTHING RETURNING 1""",
        consumer,
        event_id,
    )
    return row is not None
