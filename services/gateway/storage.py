"""SQL of the gateway schema: the accounts whose tokens are refused before they expire."""

from __future__ import annotations

from datetime import datetime

import asyncpg


async def apply_user_change(
    conn: asyncpg.Connection, user_id: str, active: bool, changed_at: datetime
) -> bool:
    """Record one ``user.changed``; True when the user was disabled or re-enabled by it.

    False when a newer change was applied already (the version upsert takes the row lock, so two
    replicas applying two changes of one user at once serialize here and the older change can't
    land last) and when nothing changed (a new user, a profile edit).
    """
    newest = await conn.fetchval(
        """INSERT INTO user_versions AS v (user_id, changed_at) VALUES ($1, $2)
           ON CONFLICT (user_id) DO UPDATE SET changed_at = EXCLUDED.changed_at
           WHERE EXCLUDED.changed_at >= v.changed_at
           RETURNING 1""",
        user_id,
        changed_at,
    )
    if newest is None:
        return False
    if active:
        changed = await conn.fetchval(
            "DELETE FROM disabled_users WHERE user_id = $1 RETURNING 1", user_id
        )
    else:
        changed = await conn.fetchval(
            """INSERT INTO disabled_users (user_id, since) VALUES ($1, $2)
               ON CONFLICT (user_id) DO NOTHING RETURNING 1""",
            user_id,
            changed_at,
        )
    return changed is not None


async def load(
    conn: asyncpg.Pool | asyncpg.Connection,
) -> tuple[dict[str, datetime], dict[str, datetime]]:
    """The disabled users (with since) and the newest change applied per user, in one query."""
    rows = await conn.fetch(
        """SELECT v.user_id, v.changed_at, d.since
           FROM user_versions v LEFT JOIN disabled_users d USING (user_id)"""
    )
    disabled = {str(r["user_id"]): r["since"] for r in rows if r["since"] is not None}
    versions = {str(r["user_id"]): r["changed_at"] for r in rows}
    return disabled, versions
