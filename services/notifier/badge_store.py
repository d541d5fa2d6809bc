"""SQL of the unread badges (rules in ``services.notifier.domain.badges``).

Every change runs in the caller's transaction (the consumer's, with its inbox row, or the read
frame's), takes the conversation's row lock first, and returns the frame fields that tell the
replicas what changed: the counters before and after, and the transaction id, which a connecting
agent's snapshot uses to skip frames it already counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from services.notifier.domain.badges import Counters, Snapshot, unread

_XID = "SELECT pg_current_xact_id()::text"


def _op(
    op: str,
    id_conversa: str,
    mailbox: str,
    xid: str,
    before: Counters,
    after: Counters,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "type": "badge",
        "op": op,
        "id_conversa": id_conversa,
        "mailbox": mailbox,
        "xid": int(xid),
        "in_seq_before": before.in_seq,
        "cleared_before": before.cleared,
        "in_seq": after.in_seq,
        "cleared": after.cleared,
        **extra,
    }


@dataclass(frozen=True, slots=True)
class Alert:
    """The Web Push text for a new message (``push_store``), queued with its badge change."""

    title: str
    body: str
    delay_s: float


async def inbound(
    conn: asyncpg.Connection,
    id_conversa: str,
    mailbox_id: str,
    message_count: int,
    at: datetime,
    alert: Alert | None = None,
) -> tuple[dict[str, Any] | None, int]:
    """One inbound message: +1 for every agent of the mailbox (closed or not), and a pending
    push for each subscribed agent who still has access (one per agent and conversation: an
    older one keeps its due time and takes the new text). One round trip for both; returns the
    frame fields and how many pushes are pending for it."""
    row = await conn.fetchrow(
        """WITH b AS (
               INSERT INTO badge_conversations AS b
                   (id_conversa, mailbox_id, in_seq, message_count, last_in_at)
               VALUES ($1, $2, 1, $3, $4)
               ON CONFLICT (id_conversa) DO UPDATE SET
                   in_seq = b.in_seq + 1,
                   message_count = greatest(b.message_count, EXCLUDED.message_count),
                   last_in_at = greatest(b.last_in_at, EXCLUDED.last_in_at),
                   updated_at = now()
               RETURNING in_seq, cleared_seq, merged_into, pg_current_xact_id()::text AS xid
           ), p AS (
               INSERT INTO push_pending (user_id, id_conversa, mailbox_id, title, body, due_at)
               SELECT DISTINCT s.user_id, $1, $2, $6, $7, now() + make_interval(secs => $8)
               FROM push_subscriptions s
               WHERE $5 AND s.mailboxes @> ARRAY[$2::text]  -- the GIN index
                 AND NOT EXISTS (SELECT 1 FROM disabled_users d WHERE d.user_id = s.user_id)
                 AND NOT EXISTS (SELECT 1 FROM removed_memberships r
                                 WHERE r.user_id = s.user_id AND r.mailbox_id = $2)
               ON CONFLICT (user_id, id_conversa) DO UPDATE SET
                   title = EXCLUDED.title, body = EXCLUDED.body
               RETURNING 1
           )
           SELECT b.*, (SELECT count(*) FROM p) AS pushes FROM b""",
        id_conversa,
        mailbox_id,
        message_count,
        at,
        alert is not None,
        alert.title if alert else "",
        alert.body if alert else "",
        alert.delay_s if alert else 0.0,
    )
    assert row is not None
    if row["merged_into"] is not None:
        return None, 0  # the threader sends new mail to the survivor; nothing shows this id
    after = Counters(row["in_seq"], row["cleared_seq"])
    before = Counters(after.in_seq - 1, after.cleared)
    return _op("in", id_conversa, mailbox_id, row["xid"], before, after), int(row["pushes"])


async def answered(
    conn: asyncpg.Connection, id_conversa: str, mailbox_id: str, message_count: int, at: datetime
) -> None:
    """A reply went out: no push for the mail before it (by date, so events handled out of
    order by two replicas still agree)."""
    await conn.execute(
        """INSERT INTO badge_conversations AS b
               (id_conversa, mailbox_id, message_count, last_out_at)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (id_conversa) DO UPDATE SET
               message_count = greatest(b.message_count, EXCLUDED.message_count),
               last_out_at = greatest(b.last_out_at, EXCLUDED.last_out_at)""",
        id_conversa,
        mailbox_id,
        message_count,
        at,
    )


async def seen_count(conn: asyncpg.Connection, id_conversa: str, message_count: int) -> None:
    await conn.execute(
        """UPDATE badge_conversations SET message_count = $2
           WHERE id_conversa = $1 AND message_count < $2""",
        id_conversa,
        message_count,
    )


async def close(
    conn: asyncpg.Connection, id_conversa: str, message_count: int
) -> dict[str, Any] | None:
    """Closed: every agent's count of it goes to 0, unless a newer message was counted already
    (the close is older than it: the event arrived late)."""
    row = await conn.fetchrow(
        """SELECT mailbox_id, in_seq, cleared_seq, message_count, merged_into
           FROM badge_conversations WHERE id_conversa = $1 FOR UPDATE""",
        id_conversa,
    )
    if row is None or row["merged_into"] is not None or message_count < row["message_count"]:
        return None
    before = Counters(row["in_seq"], row["cleared_seq"])
    await seen_count(conn, id_conversa, message_count)
    if before.cleared == before.in_seq:
        return None
    after = Counters(before.in_seq, before.in_seq)
    await conn.execute(
        "UPDATE badge_conversations SET cleared_seq = in_seq, updated_at = now() "
        "WHERE id_conversa = $1",
        id_conversa,
    )
    # Every marker is now at or below cleared_seq: none says anything any more.
    await conn.execute("DELETE FROM badge_reads WHERE id_conversa = $1", id_conversa)
    xid = await conn.fetchval(_XID)
    return _op("close", id_conversa, str(row["mailbox_id"]), xid, before, after)


async def read(conn: asyncpg.Connection, user_id: str, id_conversa: str) -> dict[str, Any] | None:
    """The agent read it: their count goes to 0; None when it was 0 already."""
    row = await conn.fetchrow(
        """SELECT mailbox_id, in_seq, cleared_seq, merged_into
           FROM badge_conversations WHERE id_conversa = $1 FOR UPDATE""",
        id_conversa,
    )
    if row is None or row["merged_into"] is not None:
        return None
    c = Counters(row["in_seq"], row["cleared_seq"])
    before = await conn.fetchval(
        "SELECT read_seq FROM badge_reads WHERE user_id = $1 AND id_conversa = $2",
        user_id,
        id_conversa,
    )
    prev = int(before or 0)
    if unread(c, prev) == 0:
        return None
    await conn.execute(
        """INSERT INTO badge_reads (user_id, id_conversa, read_seq) VALUES ($1, $2, $3)
           ON CONFLICT (user_id, id_conversa) DO UPDATE SET read_seq = EXCLUDED.read_seq""",
        user_id,
        id_conversa,
        c.in_seq,
    )
    xid = await conn.fetchval(_XID)
    return _op(
        "read", id_conversa, str(row["mailbox_id"]), xid, c, c, read=c.in_seq, read_before=prev
    )


async def merge(
    conn: asyncpg.Connection, mailbox_id: str, into: str, merged: list[str]
) -> dict[str, Any] | None:
    """Move the merged conversations' counts to the survivor (see ``domain.badges.merged_read``)."""
    ids = sorted({into, *merged})
    rows = await conn.fetch(
        """SELECT id_conversa, in_seq, cleared_seq, merged_into FROM badge_conversations
           WHERE id_conversa = ANY($1::text[]) ORDER BY id_conversa FOR UPDATE""",
        ids,
    )
    by_id = {str(r["id_conversa"]): r for r in rows}
    sources = [
        (m, Counters(by_id[m]["in_seq"], by_id[m]["cleared_seq"]))
        for m in merged
        if m != into and m in by_id and by_id[m]["merged_into"] is None
    ]
    if not sources:
        return None
    s = by_id.get(into)
    before = Counters(s["in_seq"], s["cleared_seq"]) if s is not None else Counters()
    cur = before
    for m, mc in sources:
        await conn.execute(
            """INSERT INTO badge_reads (user_id, id_conversa, read_seq)
               SELECT u.user_id, $1,
                      greatest($3::bigint, coalesce(rs.read_seq, 0))
                      + greatest($4::bigint, coalesce(rm.read_seq, 0))
               FROM (SELECT DISTINCT user_id FROM badge_reads
                     WHERE id_conversa = $1 OR id_conversa = $2) u
               LEFT JOIN badge_reads rs ON rs.user_id = u.user_id AND rs.id_conversa = $1
               LEFT JOIN badge_reads rm ON rm.user_id = u.user_id AND rm.id_conversa = $2
               ON CONFLICT (user_id, id_conversa) DO UPDATE SET read_seq = EXCLUDED.read_seq""",
            into,
            m,
            cur.cleared,
            mc.cleared,
        )
        await conn.execute("DELETE FROM badge_reads WHERE id_conversa = $1", m)
        cur = Counters(cur.in_seq + mc.in_seq, cur.cleared + mc.cleared)
    await conn.execute(
        """INSERT INTO badge_conversations AS b (id_conversa, mailbox_id, in_seq, cleared_seq)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (id_conversa) DO UPDATE SET in_seq = $3, cleared_seq = $4,
               updated_at = now()""",
        into,
        mailbox_id,
        cur.in_seq,
        cur.cleared,
    )
    await conn.execute(
        """UPDATE badge_conversations SET merged_into = $1, cleared_seq = in_seq, updated_at = now()
           WHERE id_conversa = ANY($2::text[])""",
        into,
        [m for m, _ in sources],
    )
    await conn.execute(
        "DELETE FROM badge_reads WHERE id_conversa = $1 AND read_seq <= $2", into, cur.cleared
    )
    xid = await conn.fetchval(_XID)
    return _op(
        "merge",
        into,
        mailbox_id,
        xid,
        before,
        cur,
        merged=[{"id_conversa": m, "in_seq": c.in_seq, "cleared": c.cleared} for m, c in sources],
    )


@dataclass
class Loaded:
    snapshot: Snapshot
    totals: dict[str, int] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=dict)
    # (id_conversa, mailbox, unread), most recently changed first
    conversations: list[tuple[str, str, int]] = field(default_factory=list)


async def load(pool: asyncpg.Pool, user_id: str, mailboxes: list[str], limit: int) -> Loaded:
    """An agent's badges from one snapshot, and that snapshot (to skip frames it includes)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        snap = Snapshot.parse(await conn.fetchval("SELECT pg_current_snapshot()::text"))
        out = Loaded(snap, dict.fromkeys(mailboxes, 0))
        # The totals are summed here and only the newest ``limit`` conversations come back: a
        # connect read every unread conversation of its mailboxes into Python before, and a
        # reconnect of thousands of agents to mailboxes with thousands unread was that many
        # times that many rows (the 5,000-agent bench).
        rows = await conn.fetch(
            """WITH u AS (
                   SELECT c.id_conversa, c.mailbox_id, c.updated_at,
                          c.in_seq - greatest(c.cleared_seq, coalesce(r.read_seq, 0)) AS unread
                   FROM badge_conversations c
                   LEFT JOIN badge_reads r ON r.id_conversa = c.id_conversa AND r.user_id = $1
                   WHERE c.mailbox_id = ANY($2::text[]) AND c.in_seq > c.cleared_seq
                     AND c.merged_into IS NULL)
               SELECT mailbox_id, NULL::text AS id_conversa, sum(unread)::bigint AS unread,
                      NULL::timestamptz AS updated_at
               FROM u WHERE unread > 0 GROUP BY mailbox_id
               UNION ALL
               (SELECT mailbox_id, id_conversa::text, unread, updated_at FROM u WHERE unread > 0
                ORDER BY updated_at DESC LIMIT $3)
               ORDER BY updated_at DESC NULLS FIRST""",
            user_id,
            mailboxes,
            limit,
        )
        for r in rows:
            mb, n = str(r["mailbox_id"]), int(r["unread"])
            if r["id_conversa"] is None:
                out.totals[mb] = n
            else:
                out.conversations.append((str(r["id_conversa"]), mb, n))
        for r in await conn.fetch(
            """SELECT r.id_conversa, r.read_seq FROM badge_reads r
               JOIN badge_conversations c ON c.id_conversa = r.id_conversa
               WHERE r.user_id = $1 AND c.mailbox_id = ANY($2::text[])
                 AND r.read_seq > c.cleared_seq AND c.merged_into IS NULL""",
            user_id,
            mailboxes,
        ):
            out.reads[str(r["id_conversa"])] = int(r["read_seq"])
    return out


async def needs_alert(conn: asyncpg.Connection, user_id: str, id_conversa: str) -> bool:
    """Still unread for this agent and not answered since the last inbound message: the push
    sender asks right before sending."""
    value = await conn.fetchval(
        """SELECT c.in_seq > greatest(c.cleared_seq, coalesce(r.read_seq, 0))
                  AND (c.last_out_at IS NULL OR c.last_in_at > c.last_out_at)
           FROM badge_conversations c
           LEFT JOIN badge_reads r ON r.id_conversa = c.id_conversa AND r.user_id = $1
           WHERE c.id_conversa = $2 AND c.merged_into IS NULL""",
        user_id,
        id_conversa,
    )
    return bool(value)
