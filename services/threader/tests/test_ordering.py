"""Placement order and concurrency around the read ahead (ADR 0008), from a second review:
a burst to the two blocked consumers of ``mail.received`` (failed before ``bus.Ordered``),
replicas placing one mailbox at once, and a REST change beside a merging placement."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from libs.common import bus as bus_mod
from libs.common import testing
from libs.common.bus import Consumer
from libs.common.events import Envelope
from services.threader import storage
from services.threader import stream as stream_mod
from services.threader.service import ThreaderService
from services.threader.stream import received_batch
from services.threader.tests.test_batch import (
    _batch,
    _closed_long_ago,
    _conversations,
    _mail,
    _reference,
    _scenario,
    _snapshot,
    _spec,
)
from services.threader.tests.test_conversations import Env
from services.threader.tests.test_readahead import _compare, _EarlyReads


def _received_consumers(env: Env) -> list[Consumer]:
    return [c for c in env.svc.consumers if "mail.received" in list(c.types)]


async def _added_order(env: Env, box: str) -> list[str]:
    rows = await env.svc.pool.fetch(
        """SELECT envelope::jsonb -> 'payload' -> 'message' ->> 'message_id' AS mid FROM outbox
           WHERE stream_type = 'conversation.message_added'
             AND envelope::jsonb -> 'payload' ->> 'mailbox_id' = $1 ORDER BY id""",
        box,
    )
    return [r["mid"] for r in rows]


@contextlib.asynccontextmanager
async def _replica(env: Env) -> AsyncIterator[ThreaderService]:
    """A second threader on the same database and streams, both with the same rules."""
    other = ThreaderService(env.svc.settings)
    await other.connect()
    await other.on_start()
    env.svc.rules = other.rules = storage.Rules(reopen_max_age=timedelta(days=30))
    try:
        yield other
    finally:
        await other.pool.close()
        await other.redis.aclose()


def _sizes(specs: list[dict[str, Any]], rng: random.Random) -> list[list[dict[str, Any]]]:
    """The specs in batches of 2 to 13 (a last one of 1 joins the one before: it would go the
    per-message way)."""
    chunks, i = [], 0
    while i < len(specs):
        size = rng.choice([2, 3, 5, 8, 13])
        chunks.append(specs[i : i + size])
        i += size
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    return chunks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("early", [1, 2])
async def test_two_replicas_interleaving_batches_of_one_mailbox(
    env: Env, monkeypatch: pytest.MonkeyPatch, seed: int, early: int
) -> None:
    """Two ThreaderService instances on one database take turns at one mailbox's batches; each
    batch's read ahead is made ``early`` batches before its turn. Same as one at a time in
    the order the batches were placed."""
    async with _replica(env) as other:
        rng = random.Random(f"replicas-{seed}")
        specs = _scenario(rng, 120)
        ref, box = f"mb-ref-{uuid.uuid4().hex[:8]}", f"mb-bat-{uuid.uuid4().hex[:8]}"
        await _reference(env, ref, specs)
        chunks = [
            [(Envelope.of(_mail(box, s), producer="ingest"), "0-1") for s in c]
            for c in _sizes(specs, rng)
        ]
        owners = [rng.choice([env.svc, other]) for _ in chunks]
        handlers = {id(env.svc): received_batch(env.svc), id(other): received_batch(other)}
        reads = _EarlyReads(env, monkeypatch)
        for n in range(min(early, len(chunks))):
            await reads.make(chunks[n])
        for n, chunk in enumerate(chunks):
            if n + early < len(chunks):
                await reads.make(chunks[n + early])
            await handlers[id(owners[n])](chunk)
        _compare(await _snapshot(env, box), await _snapshot(env, ref))


async def _two_convs(env: Env, box: str) -> tuple[uuid.UUID, uuid.UUID]:
    await _reference(
        env, box, [_spec("<a1@c.test>", [], "Alpha"), _spec("<b1@c.test>", [], "Beta")]
    )
    a = await env.svc.pool.fetchval(
        "SELECT id_conversa FROM messages WHERE mailbox_id=$1 AND message_id='<a1@c.test>'", box
    )
    b = await env.svc.pool.fetchval(
        "SELECT id_conversa FROM messages WHERE mailbox_id=$1 AND message_id='<b1@c.test>'", box
    )
    return a, b


def _merging_batch(box: str) -> list[tuple[Envelope, str]]:
    return _batch(
        box,
        _spec("<x@c.test>", [], "Other"),
        _spec("<m@c.test>", ["<a1@c.test>", "<b1@c.test>"], "Re: Alpha"),  # merges A and B
        _spec("<y@c.test>", ["<b1@c.test>"], "Re: Beta"),
    )


@pytest.mark.parametrize("first", ["rest", "placement"])
async def test_rest_update_and_a_merging_placement_do_not_deadlock(
    env: Env, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    box = f"mb-dl-{uuid.uuid4().hex[:8]}"
    _, b = await _two_convs(env, box)
    held, release = asyncio.Event(), asyncio.Event()
    real_lock = storage.lock_mailboxes

    async def lock_then_wait(conn: Any, boxes: Any) -> Any:
        got = await real_lock(conn, boxes)
        if first == "placement":
            held.set()
            await release.wait()
        return got

    monkeypatch.setattr(stream_mod.storage, "lock_mailboxes", lock_then_wait)

    async def rest(cid: uuid.UUID) -> Any:
        async with env.svc.pool.acquire() as conn, conn.transaction():
            done = await storage.update_state(
                conn, cid, status="pending", assignee=None, set_assignee=False
            )
            if first == "rest":
                held.set()
                await release.wait()
            return done

    if first == "rest":
        t_rest = asyncio.create_task(rest(b))
        await held.wait()
        t_place = asyncio.create_task(received_batch(env.svc)(_merging_batch(box)))
    else:
        t_place = asyncio.create_task(received_batch(env.svc)(_merging_batch(box)))
        await held.wait()
        t_rest = asyncio.create_task(rest(b))
    await asyncio.sleep(0.3)
    release.set()
    await asyncio.wait_for(asyncio.gather(t_rest, t_place), 10)


@pytest.mark.parametrize("seed", range(16))
async def test_two_replicas_placing_one_mailbox_concurrently(
    env: Env, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Two ThreaderService instances, each with its batches in flight at once (reads ahead
    really concurrent with the other batches): the same as one message at a time in the order
    the batches took the lock."""
    async with _replica(env) as other:
        rng = random.Random(f"conc-{seed}")
        specs = _scenario(rng, 150)
        box = f"mb-bat-{uuid.uuid4().hex[:8]}"
        chunks = _sizes(specs, rng)
        envs = [[(Envelope.of(_mail(box, s), producer="ingest"), "0-1") for s in c] for c in chunks]
        first_id = {e[0][0].id: n for n, e in enumerate(envs)}
        order: list[int] = []
        real = stream_mod.placement.place_received

        async def recorded(conn: Any, mails: Any, **kw: Any) -> Any:
            order.append(first_id[mails[0].env.id])
            return await real(conn, mails, **kw)

        monkeypatch.setattr(stream_mod.placement, "place_received", recorded)
        stats: list[str] = []
        real_stands = stream_mod.placement._prefetch_stands

        def stands(ahead: Any, before: Any, carried: Any) -> Any:
            got = real_stands(ahead, before, carried)
            stats.append("over" if got[1] else "stands" if got[0] else "reread")
            return got

        monkeypatch.setattr(stream_mod.placement, "_prefetch_stands", stands)
        owners = [rng.choice([env.svc, other]) for _ in chunks]
        on = {id(env.svc): received_batch(env.svc), id(other): received_batch(other)}
        tasks = []
        for n, e in enumerate(envs):
            tasks.append(asyncio.create_task(on[id(owners[n])](e)))
            if rng.random() < 0.8:
                await asyncio.sleep(rng.choice([0, 0.002, 0.005, 0.01, 0.02]))
        await asyncio.gather(*tasks)
        assert sorted(order) == list(range(len(chunks)))
        ref = f"mb-ref-{uuid.uuid4().hex[:8]}"
        await _reference(env, ref, [s for n in order for s in chunks[n]])
        _compare(await _snapshot(env, box), await _snapshot(env, ref))


@pytest.mark.parametrize(("batch", "parse_slice"), [(200, 16), (100, 10**9)])
async def test_a_burst_to_two_blocked_consumers_is_placed_in_stream_order(
    env: Env, monkeypatch: pytest.MonkeyPatch, batch: int, parse_slice: int
) -> None:
    """Both running consumers blocked in XREADGROUP; a burst of batch+1 entries arrives in one
    XADD script: the person's reply to the conversation closed 40 days ago is in the first
    consumer's read (batch entries), the auto-reply in the second's (1 entry). The small
    answer was read first and took the first turn: the auto-reply joined the old conversation
    (both with the parse's yield and without it)."""

    monkeypatch.setattr(bus_mod, "PARSE_SLICE", parse_slice)
    env.svc.rules = storage.Rules(reopen_max_age=timedelta(days=30))
    box = f"mb-{uuid.uuid4().hex[:12]}"
    old = await _closed_long_ago(env, box)
    fillers = [_spec(f"<f{i}@o.test>", [], f"Other {i}") for i in range(batch - 1)]
    human = _spec("<h@c.test>", ["<m1@c.test>", "<m2@c.test>"], "Re: Printer")
    auto = _spec("<auto@c.test>", ["<m1@c.test>", "<m2@c.test>"], "Out of office")
    auto["flags"] = {"auto_submitted": True}
    stream = env.svc.bus.stream("mail.received")
    await env.svc.bus.ensure_group(stream, "threader", "$")
    burst = [
        (stream, Envelope.of(_mail(box, s), producer="ingest").to_json())
        for s in [*fillers, human, auto]
    ]
    consumers = _received_consumers(env)
    for c in consumers:
        c.batch = batch
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    try:
        await asyncio.sleep(0.5)
        await env.svc.bus.publish_raw(burst)

        async def done() -> bool:
            return len(await _conversations(env, box)) == len(burst) + 2

        await testing.eventually(done, timeout=20)
    finally:
        for c in consumers:
            c.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    conv = await _conversations(env, box)
    assert conv["<h@c.test>"][1] == old  # a new conversation linked to the old one
    assert conv["<auto@c.test>"][0] == conv["<h@c.test>"][0], "auto-reply joined the old one"
