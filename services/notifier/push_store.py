"""SQL of Web Push: device subscriptions and the pushes waiting to go out (one per agent and
conversation, so a burst of mail in one conversation collapses into one push)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True, slots=True)
class Subscription:
    endpoint: str
    p256dh: str
    auth: str


@dataclass(frozen=True, slots=True)
class Due:
    user_id: str
    id_conversa: str
    mailbox_id: str
    title: str
    body: str


async def subscribe(
    pool: asyncpg.Pool, user_id: str, endpoint: str, p256dh: str, auth: str, mailboxes: list[str]
) -> bool:
    """Store (or refresh) a device; True when it is new. A device another user registered before
    (a shared browser) now belongs to this one: the endpoint is the device."""
    created = await pool.fetchval(
        """INSERT INTO push_subscriptions AS s (endpoint, user_id, p256dh, auth, mailboxes)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (endpoint) DO UPDATE SET user_id = EXCLUDED.user_id,
               p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth, mailboxes = EXCLUDED.mailboxes
           RETURNING (xmax = 0)""",
        endpoint,
        user_id,
        p256dh,
        auth,
        mailboxes,
    )
    return bool(created)


async def unsubscribe(pool: asyncpg.Pool, user_id: str, endpoint: str) -> bool:
    done = await pool.fetchval(
        "DELETE FROM push_subscriptions WHERE endpoint = $1 AND user_id = $2 RETURNING 1",
        endpoint,
        user_id,
    )
    return done is not None


async def remove(pool: asyncpg.Pool, endpoint: str) -> None:
    """The push service said the subscription is gone (404/410)."""
    await pool.execute("DELETE FROM push_subscriptions WHERE endpoint = $1", endpoint)


async def delivered(pool: asyncpg.Pool, endpoint: str) -> None:
    await pool.execute(
        "UPDATE push_subscriptions SET last_ok_at = now() WHERE endpoint = $1", endpoint
    )


async def of_user(pool: asyncpg.Pool, user_id: str, mailbox_id: str) -> list[Subscription]:
    rows = await pool.fetch(
        """SELECT endpoint, p256dh, auth FROM push_subscriptions
           WHERE user_id = $1 AND mailboxes @> ARRAY[$2::text]""",
        user_id,
        mailbox_id,
    )
    return [Subscription(str(r["endpoint"]), str(r["p256dh"]), str(r["auth"])) for r in rows]


async def drop(conn: asyncpg.Connection, id_conversa: str, user_id: str | None = None) -> None:
    """Read, answered or closed: nobody (or this agent) needs the alert any more."""
    if user_id is None:
        await conn.execute("DELETE FROM push_pending WHERE id_conversa = $1", id_conversa)
    else:
        await conn.execute(
            "DELETE FROM push_pending WHERE id_conversa = $1 AND user_id = $2",
            id_conversa,
            user_id,
        )


async def claim_due(pool: asyncpg.Pool, limit: int) -> list[Due]:
    """Take due pushes off the table (replicas share them: SKIP LOCKED). Best effort: a push
    whose send fails is not retried, the badge and the next login still show the mail."""
    rows = await pool.fetch(
        """DELETE FROM push_pending WHERE (user_id, id_conversa) IN (
               SELECT user_id, id_conversa FROM push_pending WHERE due_at <= now()
               ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING user_id, id_conversa, mailbox_id, title, body""",
        limit,
    )
    return [
        Due(
            str(r["user_id"]),
            str(r["id_conversa"]),
            str(r["mailbox_id"]),
            str(r["title"]),
            str(r["body"]),
        )
        for r in rows
    ]
