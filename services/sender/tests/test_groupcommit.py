"""services.sender.groupcommit: writes that arrive together are flushed together, each caller
gets its own result, and a failing item fails alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.sender.groupcommit import GroupCommit


class Recorder:
    def __init__(self, fail_on: set[int] | None = None, delay: float = 0.01) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on or set()
        self.delay = delay

    async def flush(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)  # the database round trip
        if self.fail_on & set(items):
            raise RuntimeError(f"bad item in {items}")
        return [i * 10 for i in items]


async def test_the_first_write_goes_alone_and_the_rest_together() -> None:
    rec = Recorder()
    gc: GroupCommit[int, int] = GroupCommit("t", rec.flush)
    first = asyncio.create_task(gc.submit(0))
    await asyncio.sleep(0)  # the flusher starts with item 0 only
    rest = [asyncio.create_task(gc.submit(i)) for i in range(1, 6)]
    assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]
    assert (gc.batches, gc.items) == (2, 6)


async def test_batches_are_capped() -> None:
    rec = Recorder()
    gc: GroupCommit[int, int] = GroupCommit("t", rec.flush, max_batch=3)
    results = await asyncio.gather(*(gc.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert all(len(b) <= 3 for b in rec.batches) and sum(map(len, rec.batches)) == 8


async def test_a_failing_item_fails_alone() -> None:
    rec = Recorder(fail_on={3})
    gc: GroupCommit[int, int] = GroupCommit("t", rec.flush)
    tasks = [asyncio.create_task(gc.submit(i)) for i in range(5)]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[:3] == [0, 10, 20] and done[4] == 40
    assert isinstance(done[3], RuntimeError)
    # The group was retried item by item after it failed.
    assert [3] in rec.batches and [4] in rec.batches


async def test_a_write_after_a_quiet_time_starts_a_new_flusher() -> None:
    rec = Recorder(delay=0)
    gc: GroupCommit[int, int] = GroupCommit("t", rec.flush)
    assert await gc.submit(1) == 10
    await asyncio.sleep(0.01)
    assert await gc.submit(2) == 20
    assert rec.batches == [[1], [2]]
    await gc.close()


async def test_a_lone_failure_reaches_its_caller() -> None:
    gc: GroupCommit[int, int] = GroupCommit("t", Recorder(fail_on={7}).flush)
    with pytest.raises(RuntimeError):
        await gc.submit(7)


async def test_grouped_writes_touch_only_current_attempts(sender_pool: Any) -> None:
    """mark_dots and finish_many, like their one-row forms, leave an attempt that is no longer
    the row's current one alone (and publish nothing for it); finish_many's one statement gives
    back the lock of each send it finished, and of no other."""
    import json
    import uuid
    from datetime import UTC, datetime, timedelta

    from services.sender import storage

    ids = [uuid.uuid4() for _ in range(4)]
    for n, sid in enumerate(ids):
        await sender_pool.execute(
            """INSERT INTO sends (send_id, id_conversa, mailbox_id, state, attempts, command,
                                  correlation_id, mime, sent_message)
               VALUES ($1, 'c', 'mb', 'sending', $2, '{}', 'corr', 'x', $3)""",
            sid,
            n + 1,
            {
                "message_id": "<m@x.test>",
                "from": {"address": "a@x.test"},
                "date": "2026-01-01T00:00:00Z",
            }
            if n == 0
            else None,
        )
    rows = {r["send_id"]: r for r in await sender_pool.fetch("SELECT * FROM sends")}
    current = [(ids[0], 1), (ids[1], 2), (ids[3], 4)]
    stale = (ids[2], 1)  # the row is at attempt 3
    later = datetime.now(UTC) + timedelta(seconds=60)
    outcomes: list[storage.Outcome] = [
        (ids[0], 1, "sent", "250 ok", "sent", None),
        (ids[1], 2, "failed", "550 no", "failed", None),
        (ids[2], 1, "sent", "250 ok", "sent", None),
        (ids[3], 4, "deferred", "451 later", "deferred", later),
    ]
    events = [storage.outcome_event(rows[o[0]], o[2], o[3], o[5]) for o in outcomes]
    async with sender_pool.acquire() as conn:
        assert await storage.mark_dots(conn, [*current, stale]) == set(current)
        assert await conn.fetchval(
            "SELECT bool_and(pg_try_advisory_lock(send_lock_key(id))) FROM unnest($1::uuid[]) id",
            ids,
        )
        done, staged = await storage.finish_many(conn, outcomes, events, unlock=True)
        assert set(done) == set(current)
        held = await conn.fetch(
            """SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"""
        )
        assert len(held) == 1  # the stale attempt's send: not ours to finish
        await conn.execute("SELECT pg_advisory_unlock_all()")
    states = {r["send_id"]: r["state"] for r in await sender_pool.fetch("SELECT * FROM sends")}
    assert states == {ids[0]: "sent", ids[1]: "failed", ids[2]: "sending", ids[3]: "deferred"}
    attempts = await sender_pool.fetch("SELECT send_id, outcome, dot_at FROM attempts")
    assert {(r["send_id"], r["outcome"]) for r in attempts} == {
        (ids[0], "sent"),
        (ids[1], "failed"),
        (ids[3], "deferred"),
    }
    assert all(r["dot_at"] is not None for r in attempts)
    stored = await sender_pool.fetch("SELECT id, envelope, direct FROM outbox ORDER BY id")
    published = [json.loads(r["envelope"]) for r in stored]
    # Staged for the direct path (ADR 0006): the caller publishes exactly these rows after the
    # commit, each id with its own event, and no relay pass reads them back.
    assert all(r["direct"] for r in stored)
    assert staged.ids == tuple(r["id"] for r in stored)
    assert [json.loads(e) for _, e in staged.entries] == published
    assert {t for t, _ in staged.entries} == {"mail.status"}
    assert [(e["type"], e["payload"]["send_id"], e["payload"]["status"]) for e in published] == [
        ("mail.status", str(ids[0]), "sent"),
        ("mail.status", str(ids[1]), "failed"),
        ("mail.status", str(ids[3]), "deferred"),
    ]
    assert published[0]["payload"]["message"]["message_id"] == "<m@x.test>"
    assert published[0]["payload"]["attempt"] == 1
    assert published[2]["payload"]["detail"] == "451 later"
    assert datetime.fromisoformat(published[2]["payload"]["next_attempt_at"]) == later
    next_at = await sender_pool.fetchval(
        "SELECT next_attempt_at FROM sends WHERE send_id = $1", ids[3]
    )
    assert next_at == later


async def test_the_large_values_are_compressed_with_lz4(sender_pool: Any) -> None:
    rows = await sender_pool.fetch(
        """SELECT c.relname, a.attname, a.attcompression::text AS attcompression FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           WHERE c.relnamespace = 'sender'::regnamespace
             AND (c.relname, a.attname) IN (('sends', 'command'), ('sends', 'mime'),
                                            ('sends', 'sent_message'), ('outbox', 'envelope'))"""
    )
    assert len(rows) == 4 and {r["attcompression"] for r in rows} == {"l"}
