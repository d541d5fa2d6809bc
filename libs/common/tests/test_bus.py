"""The bus against a real Redis: ack, reclaim after a kill, dead-lettering, idempotency, broadcast."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import asyncpg
import pytest

from libs.common import testing
from libs.common.bus import BroadcastReader, Bus, Consumer
from libs.common.events import Envelope
from libs.common.tests.helpers import make_handler, sample, setup_schema


@pytest.fixture(scope="module")
async def pool(database_url: str):  # type: ignore[no-untyped-def]
    p = await setup_schema(database_url)
    yield p
    await p.close()


async def effects(pool: asyncpg.Pool, event_id: str) -> list[str]:
    return [
        r["handled_by"]
        for r in await pool.fetch("SELECT handled_by FROM effects WHERE event_id=$1", event_id)
    ]


async def run_for(consumer: Consumer, until) -> None:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(consumer.run())
    try:
        await testing.eventually(until, timeout=10)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 5)


async def test_entry_is_acked_after_handler(bus: Bus, pool: asyncpg.Pool) -> None:
    env = sample(1)
    await bus.publish(env)
    c = Consumer(bus, "g", ["mailbox.changed"], make_handler(pool, "a"), block_ms=100)
    await run_for(c, lambda: effects(pool, env.id))
    pending = await bus.redis.xpending(bus.stream("mailbox.changed"), "g")
    assert pending["pending"] == 0


async def test_killed_consumer_entry_is_reclaimed_and_handled_once(
    bus: Bus, pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    env = sample(2)
    await bus.publish(env)
    hang = tmp_path / "hang"
    proc = testing.start_python(
        [
            "libs.common.tests.helpers",
            "consumer",
            database_url,
            testing.REDIS_URL,
            bus.prefix,
            str(hang),
        ],
        os.environ,
        tmp_path / "proc.log",
    )
    try:
        await testing.eventually(hang.exists, timeout=15)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert await effects(pool, env.id) == []  # its transaction died with it
    pending = await bus.redis.xpending(bus.stream("mailbox.changed"), "g")
    assert pending["pending"] == 1
    c = Consumer(
        bus,
        "g",
        ["mailbox.changed"],
        make_handler(pool, "rescuer"),
        block_ms=100,
        claim_idle_ms=200,
        claim_interval_ms=100,
    )
    await run_for(c, lambda: effects(pool, env.id))
    await asyncio.sleep(0.3)
    assert await effects(pool, env.id) == ["rescuer"]
    assert (await bus.redis.xpending(bus.stream("mailbox.changed"), "g"))["pending"] == 0


async def test_poison_entry_is_dead_lettered_after_max_deliveries(bus: Bus) -> None:
    calls = 0

    async def failing(env: Envelope, entry_id: str) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom: cannot handle")

    await bus.publish(sample(3))
    c = Consumer(
        bus,
        "g",
        ["mailbox.changed"],
        failing,
        block_ms=100,
        claim_idle_ms=50,
        claim_interval_ms=50,
        max_deliveries=3,
    )
    await run_for(c, lambda: bus.redis.xlen(bus.dead_letter))
    assert calls == 3
    [(_, fields)] = await bus.redis.xrange(bus.dead_letter)
    assert b"max_deliveries=3" in fields[b"reason"]
    assert fields[b"group"] == b"g"
    assert json.loads(fields[b"e"])["type"] == "mailbox.changed"
    assert (await bus.redis.xpending(bus.stream("mailbox.changed"), "g"))["pending"] == 0


async def test_invalid_entry_goes_to_dead_letter_at_once(bus: Bus) -> None:
    handled: list[str] = []

    async def ok(env: Envelope, entry_id: str) -> None:
        handled.append(env.id)

    stream = bus.stream("mailbox.changed")
    await bus.redis.xadd(
        stream, {"e": b'{"type": "mailbox.changed", "producer": "x", "payload": {"address": 1}}'}
    )
    await bus.redis.xadd(stream, {"junk": b"1"})
    good = sample(4)
    await bus.publish(good)
    c = Consumer(bus, "g", ["mailbox.changed"], ok, block_ms=100)
    await run_for(c, lambda: handled)
    reasons = [f[b"reason"].decode() for _, f in await bus.redis.xrange(bus.dead_letter)]
    assert len(reasons) == 2
    assert "invalid mailbox.changed v1 payload" in reasons[0]
    assert "no 'e' field" in reasons[1]
    assert handled == [good.id]


async def test_same_entry_twice_gives_one_effect(bus: Bus, pool: asyncpg.Pool) -> None:
    env = sample(5)
    await bus.publish(env)
    await bus.publish(env)  # e.g. an outbox relay that crashed after XADD, before its commit
    c = Consumer(bus, "g", ["mailbox.changed"], make_handler(pool, "a"), block_ms=100)
    await run_for(c, lambda: bus.redis.xinfo_groups(bus.stream("mailbox.changed")))
    await asyncio.sleep(0.3)
    assert await effects(pool, env.id) == ["a"]


async def test_broadcast_readers_each_see_every_entry(bus: Bus) -> None:
    seen: dict[str, list[str]] = {"r1": [], "r2": []}

    def reader(name: str) -> BroadcastReader:
        async def h(stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
            seen[name].append(entry_id)

        return BroadcastReader(bus, ["frames"], h, block_ms=100)

    r1, r2 = reader("r1"), reader("r2")
    tasks = [asyncio.create_task(r.run()) for r in (r1, r2)]
    await asyncio.sleep(0.2)
    ids = [await bus.redis.xadd(bus.stream("frames"), {"f": str(i)}) for i in range(5)]
    await testing.eventually(lambda: len(seen["r1"]) == 5 and len(seen["r2"]) == 5)
    for r in (r1, r2):
        r.stop()
    await asyncio.wait(tasks, timeout=3)
    assert seen["r1"] == seen["r2"] == [i.decode() for i in ids]


async def test_a_burst_waits_for_a_redis_connection_instead_of_failing() -> None:
    """More concurrent commands than the pool holds: they queue, none raises."""
    from libs.common import bus as bus_mod

    redis = bus_mod.connect(testing.REDIS_URL)
    try:
        pool = redis.connection_pool
        assert pool.max_connections == bus_mod.REDIS_MAX_CONNECTIONS
        # Hold the commands on the server so the pool really runs dry (BLPOP on an empty key).
        key = f"{testing.new_run_id()}:burst"
        n = bus_mod.REDIS_MAX_CONNECTIONS + 50
        results = await asyncio.gather(*(redis.blpop([key], timeout=0.2) for _ in range(n)))
        assert results == [None] * n
    finally:
        await redis.aclose()


async def test_a_restarted_redis_costs_no_request() -> None:
    """Redis restarts (empty): the pooled connection is stale, yet the next command succeeds.

    The trial's first login after such a restart answered 500 (``Connection closed by
    server``); the client retries once on a connection error instead.
    """
    from libs.common import bus as bus_mod

    server = testing.RedisServer()
    server.start()
    redis = bus_mod.connect(server.url)
    try:
        await redis.set("k", "1")
        await redis.pipeline(transaction=False).incr("n").execute()
        server.restart()
        assert await redis.get("k") is None  # the first command after the restart
        assert await redis.pipeline(transaction=False).incr("n").execute() == [1]
        server.restart()
        assert await redis.xadd("s", {"e": "x"})
    finally:
        await redis.aclose()
        server.kill()


async def test_batch_handler_takes_a_backlog_in_one_call(bus: Bus, pool: asyncpg.Pool) -> None:
    stream = bus.stream("mailbox.changed")
    await bus.ensure_group(stream, "gbatch", "$")
    envs = [sample(100 + i) for i in range(10)]
    for env in envs:
        await bus.publish(env)
    single = make_handler(pool, "batch")
    sizes: list[int] = []

    async def batch(items: list[tuple[Envelope, str]]) -> None:
        sizes.append(len(items))
        assert [e.id for e, _ in items] == [e.id for e in envs][: len(items)]  # in order
        for env, entry_id in items:
            await single(env, entry_id)

    c = Consumer(bus, "gbatch", ["mailbox.changed"], single, block_ms=100, batch_handler=batch)

    async def all_done() -> bool:
        return all([await effects(pool, e.id) == ["batch"] for e in envs])

    await run_for(c, all_done)
    assert sizes == [10]
    assert (await bus.redis.xpending(stream, "gbatch"))["pending"] == 0


async def test_a_failing_batch_falls_back_to_one_entry_at_a_time(
    bus: Bus, pool: asyncpg.Pool
) -> None:
    stream = bus.stream("mailbox.changed")
    await bus.ensure_group(stream, "gbatchfail", "$")
    envs = [sample(200 + i) for i in range(5)]
    poison = envs[2]
    for env in envs:
        await bus.publish(env)
    inner = make_handler(pool, "fallback")

    async def single(env: Envelope, entry_id: str) -> None:
        if env.id == poison.id:
            raise RuntimeError("poison")
        await inner(env, entry_id)

    async def batch(items: list[tuple[Envelope, str]]) -> None:
        for env, entry_id in items:
            # Raises at the poison; the entries before it are handled again alone, which their
            # inbox rows make a no-op (the effects below are there once).
            await single(env, entry_id)

    c = Consumer(
        bus,
        "gbatchfail",
        ["mailbox.changed"],
        single,
        block_ms=100,
        batch_handler=batch,
        claim_idle_ms=60_000,
    )
    good = [e for e in envs if e.id != poison.id]

    async def good_done() -> bool:
        return all([await effects(pool, e.id) == ["fallback"] for e in good])

    await run_for(c, good_done)
    assert await effects(pool, poison.id) == []
    pending = await bus.redis.xpending(stream, "gbatchfail")
    assert pending["pending"] == 1  # only the poison entry waits for its retries


async def test_publish_raw_adds_every_entry_in_order_to_its_stream(bus: Bus) -> None:
    """Several entries go in one script call: each lands on its stream, in order, with the ids
    returned in the order given; one entry is a plain XADD. A stream stays capped."""
    a, b = bus.stream("t.a"), bus.stream("t.b")
    entries = [(a if i % 3 else b, json.dumps({"n": i})) for i in range(10)]
    ids = await bus.publish_raw(entries)
    assert len(ids) == 10
    for stream in (a, b):
        got = await bus.redis.xrange(stream)
        sent = [(i, d) for i, (s, d) in zip(ids, entries, strict=True) if s == stream]
        assert [(i.decode(), f[b"e"].decode()) for i, f in got] == sent
    [one] = await bus.publish_raw([(a, "single")])
    assert (await bus.redis.xrange(a, min=one, max=one))[0][1] == {b"e": b"single"}
    assert await bus.publish_raw([]) == []
    small = Bus(bus.redis, bus.prefix, maxlen=10)
    for _ in range(30):
        await small.publish_raw([(bus.stream("t.c"), "x")] * 50)
    assert await bus.redis.xlen(bus.stream("t.c")) < 1500
