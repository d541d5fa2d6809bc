"""The outbox against real PostgreSQL and Redis, including a relay killed mid-pass."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import asyncpg

from libs.common import outbox, testing
from libs.common.bus import Bus
from libs.common.tests.helpers import SCHEMA, sample, setup_schema


async def test_state_and_event_commit_together(bus: Bus, database_url: str) -> None:
    pool = await setup_schema(database_url)
    try:
        await pool.execute("DELETE FROM outbox")
        env = sample(10)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await outbox.add(conn, env)
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, env)
        relay = outbox.OutboxRelay(pool, bus, SCHEMA)
        assert await relay.publish_once() == 1
        [(_, fields)] = await bus.redis.xrange(bus.stream("mailbox.changed"))
        assert b'"' + env.id.encode() + b'"' in fields[b"e"]
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await pool.close()


async def test_relay_killed_before_publishing_publishes_after_restart(
    bus: Bus, database_url: str, tmp_path: Path
) -> None:
    pool = await setup_schema(database_url)
    try:
        await pool.execute("DELETE FROM outbox")
        ready = tmp_path / "ready"
        proc = testing.start_python(
            [
                "libs.common.tests.helpers",
                "outbox",
                database_url,
                testing.REDIS_URL,
                bus.prefix,
                str(ready),
                "7",
            ],
            os.environ,
            tmp_path / "proc.log",
        )
        try:
            await testing.eventually(ready.exists, timeout=15)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert await bus.redis.xlen(bus.stream("mailbox.changed")) == 0
        relay = outbox.OutboxRelay(pool, bus, SCHEMA)
        await testing.eventually(lambda: pool.fetchval("SELECT count(*) = 7 FROM outbox"))
        assert await relay.publish_once() == 7
        entries = await bus.redis.xrange(bus.stream("mailbox.changed"))
        addresses = [e[1][b"e"] for e in entries]
        assert len(addresses) == 7
        assert all(f"box{i}@".encode() in addresses[i] for i in range(7))  # in commit order
    finally:
        await pool.close()


async def test_the_relay_drains_a_backlog_in_batches_and_publishes_each_wake(
    bus: Bus, database_url: str
) -> None:
    pool = await setup_schema(database_url)
    relay = outbox.OutboxRelay(pool, bus, SCHEMA, poll_ms=60_000, batch=3)
    stream = bus.stream("mailbox.changed")
    try:
        await pool.execute("DELETE FROM outbox")
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, *(sample(i) for i in range(7)))  # more than two batches
        task = asyncio.create_task(relay.run())
        relay.wake()
        await testing.eventually(lambda: _length_is(bus, stream, 7), timeout=5)
        # Idle now (the poll is a minute away): a commit and its wake go out at once, in one
        # pass (no empty pass after it: that was a transaction per event for nothing).
        passes = 0
        publish = relay.publish_once

        async def counted(limit: int = 500) -> int:
            nonlocal passes
            passes += 1
            return await publish(limit)

        relay.publish_once = counted  # type: ignore[method-assign]
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, sample(7))
        relay.wake()
        await testing.eventually(lambda: _length_is(bus, stream, 8), timeout=5)
        await asyncio.sleep(0.2)
        assert passes == 1
        relay.stop()
        await asyncio.wait_for(task, 5)
    finally:
        await pool.close()


async def _staged_apart(pool: asyncpg.Pool, n: int) -> list[outbox.Staged]:
    """An empty outbox, then ``n`` events staged by ``n`` transactions, in commit order."""
    await pool.execute("DELETE FROM outbox")
    staged = []
    for i in range(n):
        async with pool.acquire() as conn, conn.transaction():
            staged.append(await outbox.stage(conn, sample(i)))
    return staged


async def _length_is(bus: Bus, stream: str, n: int) -> bool:
    return bool(await bus.redis.xlen(stream) == n)


async def test_staged_rows_go_out_directly_once_and_are_deleted_in_bulk(
    bus: Bus, database_url: str
) -> None:
    pool = await setup_schema(database_url)
    relay = outbox.OutboxRelay(pool, bus, SCHEMA, poll_ms=50)
    stream = bus.stream("mailbox.changed")
    task = asyncio.create_task(relay.run())
    try:
        await pool.execute("DELETE FROM outbox")
        async with pool.acquire() as conn, conn.transaction():
            staged = await outbox.stage(conn, sample(1), sample(2))
        assert len(staged.ids) == 2
        # Passes run every 50 ms meanwhile; none may take rows their writer publishes.
        await asyncio.sleep(0.3)
        assert await bus.redis.xlen(stream) == 0
        await relay.publish(staged)
        entries = await bus.redis.xrange(stream)
        assert [e[1][b"e"].decode() for e in entries] == [e for _, e in staged.entries]
        await testing.eventually(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"))
        await asyncio.sleep(0.3)
        assert await bus.redis.xlen(stream) == 2  # not again
        # Rolled back: nothing staged survives, nothing to publish.
        try:
            async with pool.acquire() as conn, conn.transaction():
                await outbox.stage(conn, sample(3))
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)
        await pool.close()


async def test_staged_rows_left_unpublished_go_out_after_the_grace(
    bus: Bus, database_url: str
) -> None:
    """The writer died after its commit, before its XADD: a pass publishes them, once they are
    older than the grace (until then they are the writer's)."""
    pool = await setup_schema(database_url)
    relay = outbox.OutboxRelay(pool, bus, SCHEMA, poll_ms=50, direct_grace_s=0.5)
    stream = bus.stream("mailbox.changed")
    task = asyncio.create_task(relay.run())
    try:
        [lost] = await _staged_apart(pool, 1)  # never published by its writer
        clock = asyncio.get_running_loop().time
        started = clock()
        await testing.eventually(lambda: _length_is(bus, stream, 1), timeout=5)
        assert clock() - started >= 0.3
        [(_, fields)] = await bus.redis.xrange(stream)
        assert fields[b"e"].decode() == lost.entries[0][1]
        await testing.eventually(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"))
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)
        await pool.close()


async def test_a_failed_publish_hands_its_rows_and_the_next_ones_to_the_relay_in_order(
    bus: Bus, database_url: str
) -> None:
    """Redis refuses one publish: its rows, and those of the publishes after it, go out through
    the relay at once and in commit order, not the later ones first (found by a trial); once a
    pass has caught up, writers publish directly again."""
    pool = await setup_schema(database_url)
    relay = outbox.OutboxRelay(pool, bus, SCHEMA, poll_ms=60_000, direct_grace_s=30)
    stream = bus.stream("mailbox.changed")
    try:
        staged = await _staged_apart(pool, 3)

        async def down(entries: object) -> list[str]:
            raise ConnectionError("redis is away")

        publish_raw = bus.publish_raw
        bus.publish_raw = down  # type: ignore[method-assign,assignment]
        await relay.publish(staged[0])  # logs, never raises: the rows are the relay's now
        bus.publish_raw = publish_raw  # type: ignore[method-assign]
        await relay.publish(staged[1])  # Redis is back, but the first one is not out yet
        assert await bus.redis.xlen(stream) == 0
        task = asyncio.create_task(relay.run())
        await testing.eventually(lambda: _length_is(bus, stream, 2), timeout=5)  # no grace
        bodies = [e[1][b"e"].decode() for e in await bus.redis.xrange(stream)]
        assert bodies == [staged[0].entries[0][1], staged[1].entries[0][1]]
        await testing.eventually(lambda: not relay._degraded, timeout=5)
        await relay.publish(staged[2])  # directly again: out before any pass (a minute away)
        assert await bus.redis.xlen(stream) == 3
        await testing.eventually(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"))
        relay.stop()
        await asyncio.wait_for(task, 5)
    finally:
        await pool.close()


async def test_a_publish_that_hangs_gives_up_after_its_timeout(bus: Bus, database_url: str) -> None:
    """ingest's writer publishes after its 250s: a Redis that does not answer holds it for
    direct_timeout_s at most, once; the publishes after it go to the relay without waiting."""
    pool = await setup_schema(database_url)
    relay = outbox.OutboxRelay(pool, bus, SCHEMA, poll_ms=60_000, direct_timeout_s=0.2)
    stream = bus.stream("mailbox.changed")
    try:
        staged = await _staged_apart(pool, 2)

        async def stuck(entries: object) -> list[str]:
            await asyncio.sleep(30)
            return []

        publish_raw = bus.publish_raw
        bus.publish_raw = stuck  # type: ignore[method-assign,assignment]
        clock = asyncio.get_running_loop().time
        started = clock()
        await relay.publish(staged[0])
        assert 0.15 < clock() - started < 1.0
        started = clock()
        await relay.publish(staged[1])
        assert clock() - started < 0.05  # handed over, no second wait
        bus.publish_raw = publish_raw  # type: ignore[method-assign]
        task = asyncio.create_task(relay.run())
        await testing.eventually(lambda: _length_is(bus, stream, 2), timeout=5)
        bodies = [e[1][b"e"].decode() for e in await bus.redis.xrange(stream)]
        assert bodies == [staged[0].entries[0][1], staged[1].entries[0][1]]
        relay.stop()
        await asyncio.wait_for(task, 5)
    finally:
        await pool.close()


async def test_a_stopping_relay_waits_for_a_publish_under_way_and_deletes_its_rows(
    bus: Bus, database_url: str
) -> None:
    """A writer's XADD still out when the service stops: the relay's last turn deletes its rows,
    so nothing goes out a second time after the grace, from this process or another."""
    pool = await setup_schema(database_url)
    relay = outbox.OutboxRelay(pool, bus, SCHEMA, poll_ms=50, direct_grace_s=0.3)
    stream = bus.stream("mailbox.changed")
    task = asyncio.create_task(relay.run())
    try:
        [staged] = await _staged_apart(pool, 1)
        publish_raw = bus.publish_raw

        async def slow(entries: list[tuple[str, str]]) -> list[str]:
            await asyncio.sleep(0.3)
            return await publish_raw(entries)

        bus.publish_raw = slow  # type: ignore[method-assign,assignment]
        publishing = asyncio.create_task(relay.publish(staged))
        await asyncio.sleep(0.05)
        relay.stop()
        await asyncio.sleep(0.1)
        assert not task.done()  # it waits for the publish under way
        await publishing
        await asyncio.wait_for(task, 5)
        bus.publish_raw = publish_raw  # type: ignore[method-assign]
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
        # A relay of the next process finds nothing to publish again.
        again = outbox.OutboxRelay(pool, bus, SCHEMA, poll_ms=50, direct_grace_s=0.0)
        assert await again.publish_once() == 0
        assert await bus.redis.xlen(stream) == 1
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)
        await pool.close()
