"""Mailbox memberships as auth announces them, for services that answer for a mailbox's data.

A token lists the agent's mailboxes for its whole life (15 minutes). A service that serves a
mailbox's conversations or files keeps ``membership.changed`` in its own ``mailbox_agents``
(libs/common/migrations) and takes a removed agent's mailboxes away at once, as the notifier
does for its sockets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime

import asyncpg

from libs.common.bus import Handler
from libs.common.events import Envelope, MembershipChanged
from libs.common.tokens import Identity


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    user_id: str,
    mailbox_id: str,
    active: bool,
    changed_at: datetime,
) -> None:
    """Store one membership change; an older one than the stored is ignored (idempotent)."""
    await conn.execute(
        """INSERT INTO mailbox_agents AS a (mailbox_id, user_id, active, changed_at)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (mailbox_id, user_id) DO UPDATE SET active = EXCLUDED.active,
               changed_at = EXCLUDED.changed_at
           WHERE EXCLUDED.changed_at >= a.changed_at""",
        mailbox_id,
        user_id,
        active,
        changed_at,
    )


async def removed(
    conn: asyncpg.Connection | asyncpg.Pool, user_id: str, mailboxes: Iterable[str]
) -> set[str]:
    """Which of these mailboxes (a token's) auth has taken ``user_id`` out of since."""
    boxes = list(mailboxes)
    if not boxes:
        return set()
    rows = await conn.fetch(
        """SELECT mailbox_id FROM mailbox_agents
           WHERE user_id = $1 AND mailbox_id = ANY($2::text[]) AND NOT active""",
        user_id,
        boxes,
    )
    return {r["mailbox_id"] for r in rows}


async def effective(conn: asyncpg.Connection | asyncpg.Pool, who: Identity) -> Identity:
    """``who`` with only the mailboxes that are still theirs (the token's, less removals)."""
    gone = await removed(conn, who.sub, who.mailboxes)
    return dataclasses.replace(who, mailboxes=who.mailboxes - gone) if gone else who


def handler(pool: asyncpg.Pool) -> Handler:
    """A consumer-group handler of ``membership.changed`` that keeps ``mailbox_agents``."""

    async def on_membership(env: Envelope, entry_id: str) -> None:
        m = env.payload_as(MembershipChanged)
        await record(pool, m.user_id, m.mailbox_id, m.active, env.occurred_at)

    return on_membership
