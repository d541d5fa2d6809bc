"""The queue's by-key statements look their rows up by key, on tables without statistics too.

A fresh database (the bench's, a new deployment's) has none until autovacuum has analyzed it, and
the planner then takes the partial indexes ``sends_due`` and ``sends_waiting`` for a few rows:
with a backlog it read thousands of their entries to update a batch of six. Each statement is
recorded as the queue runs it (a stand-in connection) and EXPLAINed on such a backlog.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from libs.common.events import Envelope, MailStatus
from services.sender import storage
from services.sender.domain.render import Rendered

PARTIAL = {"sends_due", "sends_waiting"}


class Recorder:
    """A connection that keeps each statement and its arguments and returns nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.calls.append((sql, args))
        return []

    async def execute(self, sql: str, *args: Any) -> str:
        self.calls.append((sql, args))
        return "UPDATE 0"


async def backlog(pool: asyncpg.Pool, n: int = 3000) -> list[uuid.UUID]:
    """``n`` sends as a burst leaves them: most queued, some composed, some sending, some sent
    (and the dead versions of their rows: nothing has vacuumed them)."""
    await pool.execute(
        """INSERT INTO sends (send_id, id_conversa, mailbox_id, state, command)
           SELECT gen_random_uuid(), 'c', 'mb', 'queued', '{"html": "x"}'
           FROM generate_series(1, $1)""",
        n,
    )
    await pool.execute(
        """UPDATE sends SET mime = 'm', message_id = send_id::text, next_attempt_at = now()
           WHERE send_id IN (SELECT send_id FROM sends LIMIT $1)""",
        n // 2,
    )
    await pool.execute(
        """UPDATE sends SET state = 'sending', attempts = 1
           WHERE send_id IN (SELECT send_id FROM sends WHERE mime IS NOT NULL LIMIT $1)""",
        n // 3,
    )
    await pool.execute(
        """UPDATE sends SET state = 'sent'
           WHERE send_id IN (SELECT send_id FROM sends WHERE state = 'sending' LIMIT $1)""",
        n // 3 - 20,
    )
    rows = await pool.fetch("SELECT send_id FROM sends WHERE state = 'sending' LIMIT 8")
    return [r["send_id"] for r in rows]


def plan_of(explain: Any) -> Any:
    """EXPLAIN's JSON (decoded by the pool's json codec, or text without one): the top node."""
    return (json.loads(explain) if isinstance(explain, str) else explain)[0]["Plan"]


def indexes(plan: Any) -> set[str]:
    found = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", []):
        found |= indexes(child)
    return found


async def explained(pool: asyncpg.Pool, rec: Recorder) -> set[str]:
    used: set[str] = set()
    for sql, args in rec.calls:
        used |= indexes(plan_of(await pool.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)))
    return used


def rendered() -> Rendered:
    return Rendered(b"mime", "<m@x.test>", "a@x.test", ["b@x.test"], {}, "x.test")


async def test_the_by_key_statements_use_the_primary_key(sender_pool: asyncpg.Pool) -> None:
    ids = await backlog(sender_pool)
    queued = [
        r["send_id"]
        for r in await sender_pool.fetch(
            "SELECT send_id FROM sends WHERE state = 'queued' AND mime IS NULL LIMIT 20"
        )
    ]
    event = Envelope.of(
        MailStatus(send_id=str(ids[0]), id_conversa="c", mailbox_id="mb", status="failed"), "t"
    )
    statements = {
        "lock_for_prepare": lambda c: storage.lock_for_prepare(c, queued),
        "mark_sending": lambda c: storage.mark_sending(c, [(q, rendered()) for q in queued]),
        "mark_ready": lambda c: storage.mark_ready(c, [(q, rendered()) for q in queued]),
        "mark_dots": lambda c: storage.mark_dots(c, [(i, 1) for i in ids]),
        "finish_many": lambda c: storage.finish_many(
            c,
            [(i, 1, "failed", "550", "failed", None) for i in ids],
            [event] * len(ids),
            unlock=True,
        ),
    }
    plans: dict[str, set[str]] = {}
    for name, run in statements.items():
        rec = Recorder()
        await run(rec)
        assert rec.calls, name
        plans[name] = await explained(sender_pool, rec)
    assert {n: used for n, used in plans.items() if used & PARTIAL} == {}
    assert all("sends_pkey" in used for used in plans.values()), plans


async def test_the_relay_pass_deletes_its_rows_by_key(sender_pool: asyncpg.Pool) -> None:
    """The relay's DELETE of the rows it publishes: by id, not by reading the whole table."""
    from libs.common import outbox

    await sender_pool.execute(
        """INSERT INTO outbox (stream_type, envelope, direct, created_at)
           SELECT 't', repeat('x', 200), true, $1 FROM generate_series(1, 3000)""",
        datetime.now(UTC),
    )
    raw = await sender_pool.fetchval(f"EXPLAIN (FORMAT JSON) {outbox.BATCH_SQL}", 500, 5.0)

    def scans(plan: Any) -> list[str]:
        found = [plan["Node Type"]] if plan.get("Relation Name") == "outbox" else []
        for child in plan.get("Plans", []):
            found += scans(child)
        return found

    assert "Seq Scan" not in scans(plan_of(raw))
