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


async def first_times(conn: asyncpg.Connection, consumer: str, event_ids: list[str]) -> list[bool]:
    """:func:`first_time` for a batch, in one statement: per id, in order, whether it is new.

    An id twice in ``event_ids`` is new at most once (its first place), as when asked in turn.
    Ids are inserted in sorted order, so two batches with common ids wait in one order.
    """
    if not event_ids:
        return []
    rows = await conn.fetch(
        """INSERT INTO processed_events (consumer, event_id)
           SELECT $1, e FROM unnest($2::text[]) AS e ORDER BY e
           ON CONFLICT DO NOTHING RETURNING event_id""",
        consumer,
        sorted(set(event_ids)),
    )
    new = {r["event_id"] for r in rows}
    out = []
    for event_id in event_ids:
        out.append(event_id in new)
        new.discard(event_id)
    return out
