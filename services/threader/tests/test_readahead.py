"""The read ahead (``placement.prefetch``): a read made before the placement lock must give
what a read under the lock gives (``_reference``: one message at a time). Written by a review
of it, which found the first two cases (a REST status change the count did not see, a carried
``stale`` flag older than the read); both failed before their fixes."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.common.events import Envelope, MailReceived
from services.threader import placement, storage
from services.threader.stream import received_batch
from services.threader.tests.test_batch import (
    _close_some,
    _conversations,
    _mail,
    _overlays,
    _reference,
    _scenario,
    _snapshot,
    _spec,
    _two_messages,
)
from services.threader.tests.test_conversations import Env

Hook = Callable[[], Awaitable[None]]


def _envs(box: str, specs: Sequence[dict[str, Any]]) -> list[tuple[Envelope, str]]:
    return [(Envelope.of(_mail(box, s), producer="ingest"), "0-1") for s in specs]


def _hook_after_prefetch(monkeypatch: pytest.MonkeyPatch, hook: Hook) -> list[bool]:
    """``hook`` runs once, right after the next read ahead (before the batch's turn)."""
    real = placement.prefetch
    ran: list[bool] = []

    async def patched(pool: Any, mails: Any, rules: Any) -> placement.Prefetched:
        ahead = await real(pool, mails, rules)
        if not ran:
            ran.append(True)
            await hook()
        return ahead

    monkeypatch.setattr(placement, "prefetch", patched)
    return ran


async def _placed_after(
    env: Env,
    monkeypatch: pytest.MonkeyPatch,
    way: str,
    box: str,
    batch: Sequence[dict[str, Any]],
    change: Hook,
) -> None:
    """``batch`` placed after ``change``: one message at a time (``way`` "reference"), or as
    one batch whose read ahead was made before the change."""
    if way == "reference":
        await change()
        await _reference(env, box, batch)
        return
    ran = _hook_after_prefetch(monkeypatch, change)
    await received_batch(env.svc)(_envs(box, batch))
    assert ran


async def _rest_status(env: Env, cid: uuid.UUID, status: str) -> None:
    """What PATCH /api/conversations/{id} does (http.update_conversation)."""
    async with env.svc.pool.acquire() as conn, conn.transaction():
        done = await storage.update_state(
            conn, cid, status=status, assignee=None, set_assignee=False
        )
        assert done is not None and done[1]


@pytest.mark.parametrize(
    ("before", "after"),
    [("open", "closed"), ("closed", "open")],
    ids=["agent-closes-a-quiet-conversation", "agent-reopens-a-stale-conversation"],
)
async def test_a_status_change_before_the_lock_is_seen_by_the_read_ahead(
    env: Env, monkeypatch: pytest.MonkeyPatch, before: str, after: str
) -> None:
    """An agent's status change (REST) commits after the batch read ahead but before it takes
    the placement lock. A read under the lock sees it; the read ahead does not (update_state
    bumps no placement_seq), so the reply is placed against the old status."""
    env.svc.rules = storage.Rules(reopen_max_age=timedelta(days=30))
    results = {}
    for way in ("reference", "batched"):
        box = f"mb-{way[:3]}-{uuid.uuid4().hex[:8]}"
        old = await _two_messages(env, box)
        await env.svc.pool.execute(
            "UPDATE conversations SET status = $2, last_message_at = now() - interval '40 days'"
            " WHERE id_conversa = $1",
            old,
            before,
        )
        batch = [
            _spec("<a@c.test>", ["<m1@c.test>"], "Re: Printer"),
            _spec("<x@o.test>", [], "Other"),
        ]

        async def change(old: uuid.UUID = old) -> None:
            await _rest_status(env, old, after)

        await _placed_after(env, monkeypatch, way, box, batch, change)
        conv = await _conversations(env, box)
        results[way] = (conv["<a@c.test>"][0] == old, conv["<a@c.test>"][1] == old)
    # closed + 40 days quiet: a new conversation linked to the old one; open: joins it
    assert results["batched"] == results["reference"], results


class _EarlyReads:
    """Reads ahead made early on purpose: ``make`` reads for a batch now, and when the batch
    runs its prefetch hands that read back instead of making its own."""

    def __init__(self, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
        self.env = env
        self.real = placement.prefetch
        self.saved: dict[str, placement.Prefetched] = {}
        monkeypatch.setattr(placement, "prefetch", self._prefetch)

    async def make(self, chunk: list[tuple[Envelope, str]]) -> None:
        prepared = placement.prepare([(e, e.payload_as(MailReceived)) for e, _ in chunk])
        self.saved[chunk[0][0].id] = await self.real(
            self.env.svc.pool, prepared, self.env.svc.rules
        )

    async def _prefetch(self, pool: Any, mails: Any, rules: Any) -> placement.Prefetched:
        got = self.saved.pop(mails[0].env.id, None)
        if got is None:
            return await self.real(pool, mails, rules)
        return placement.Prefetched(mails, got.rows, got.seqs, got.clock)


async def _forced_overlay(
    env: Env,
    boxes: Sequence[str],
    specs: Sequence[tuple[int, dict[str, Any]]],
    rng: random.Random,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches one after the other, each one's read ahead made before the batch before it was
    placed (the overlay every time the batch before was clean)."""
    chunks: list[list[tuple[Envelope, str]]] = []
    i = 0
    while i < len(specs):
        size = rng.choice([2, 3, 5, 8, 13, 40])
        chunks.append(
            [
                (Envelope.of(_mail(boxes[b], s), producer="ingest"), "0-1")
                for b, s in specs[i : i + size]
            ]
        )
        i += size
    early = _EarlyReads(env, monkeypatch)
    on_batch = received_batch(env.svc)
    for n, chunk in enumerate(chunks):
        if n + 1 < len(chunks):
            await early.make(chunks[n + 1])
        await on_batch(chunk)


def _compare(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["messages"] == want["messages"]
    assert got["keys"] == want["keys"]
    diff = [
        (n, g, w)
        for n, (g, w) in enumerate(zip(got["events"], want["events"], strict=True))
        if g != w
    ]
    if diff:
        n, g, w = diff[0]
        fields = {k: (g[1].get(k), w[1].get(k)) for k in g[1] if g[1].get(k) != w[1].get(k)}
        assert not diff, (len(diff), n, g[2]["message_id"], g[1]["id_conversa"], fields)
    assert got["events"] == want["events"]
    for c in (*got["conversations"].values(), *want["conversations"].values()):
        c.pop("last_message_at")
    assert got["conversations"] == want["conversations"]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mailboxes", [1, 2])
async def test_every_batch_laid_over_the_one_before_places_mail_the_same(
    env: Env, monkeypatch: pytest.MonkeyPatch, seed: int, mailboxes: int
) -> None:
    env.svc.rules = storage.Rules(reopen_max_age=timedelta(days=30))
    rng = random.Random(f"review-{seed}")
    first, second = _scenario(rng, 80), _scenario(rng, 80, start=80)
    pick = random.Random(seed)
    which_1 = [pick.randrange(mailboxes) for _ in first]
    which_2 = [pick.randrange(mailboxes) for _ in second]
    refs = [f"mb-ref-{uuid.uuid4().hex[:8]}" for _ in range(mailboxes)]
    bats = [f"mb-bat-{uuid.uuid4().hex[:8]}" for _ in range(mailboxes)]
    for b in range(mailboxes):
        await _reference(env, refs[b], [s for s, w in zip(first, which_1, strict=True) if w == b])
    taken = _overlays(monkeypatch)
    await _forced_overlay(
        env, bats, list(zip(which_1, first, strict=True)), random.Random(seed), monkeypatch
    )
    for b in range(mailboxes):
        _compare(await _snapshot(env, bats[b]), await _snapshot(env, refs[b]))
    at = datetime.now(UTC)
    for b in range(mailboxes):
        await _close_some(env, refs[b], at)
        await _close_some(env, bats[b], at)
        await _reference(env, refs[b], [s for s, w in zip(second, which_2, strict=True) if w == b])
    await _forced_overlay(
        env, bats, list(zip(which_2, second, strict=True)), random.Random(seed + 100), monkeypatch
    )
    for b in range(mailboxes):
        _compare(await _snapshot(env, bats[b]), await _snapshot(env, refs[b]))
    assert any(taken)


async def test_events_of_automatic_mail_after_a_close_the_read_ahead_missed(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent closes a recent conversation after the batch read ahead; two auto-replies to
    it follow in the batch. Stored state is right (SQL decides the status) but the first
    one's conversation.message_added says 'open' (the read ahead's status)."""
    statuses = {}
    for way in ("reference", "batched"):
        box = f"mb-{way[:3]}-{uuid.uuid4().hex[:8]}"
        old = await _two_messages(env, box)
        auto1 = _spec("<auto1@c.test>", ["<m2@c.test>"], "Out of office")
        auto2 = _spec("<auto2@c.test>", ["<m2@c.test>"], "Out of office")
        auto1["flags"] = auto2["flags"] = {"auto_submitted": True}
        batch = [auto1, auto2]

        async def change(old: uuid.UUID = old) -> None:
            await _rest_status(env, old, "closed")

        await _placed_after(env, monkeypatch, way, box, batch, change)
        events = (await _snapshot(env, box))["events"]
        statuses[way] = [e[1]["status"] for e in events if e[0] == "added"][-2:]
    assert statuses["batched"] == statuses["reference"] == ["closed", "closed"], statuses


async def test_a_carried_conversation_keeps_a_stale_flag_older_than_the_read(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closed conversation just short of the reopen age gets auto-replies in batch after
    batch, each laid over the one before: its ``stale`` flag is the one read by the first
    batch (``stored_copy`` keeps it, ``stored`` never recomputes it, and ``take`` prefers the
    carried copy to the row read). Once past the reopen age a person's reply must start a new
    conversation linked to it, as one message at a time does; it joins (and reopens) it."""
    env.svc.rules = storage.Rules(reopen_max_age=timedelta(days=30))
    auto = [_spec(f"<auto{i}@c.test>", ["<m2@c.test>"], "Out of office") for i in range(4)]
    for a in auto:
        a["flags"] = {"auto_submitted": True}
    z, a_batch = auto[:2], auto[2:]
    b_batch = [
        _spec("<b@c.test>", ["<m1@c.test>"], "Re: Printer"),
        _spec("<x@o.test>", [], "Other"),
    ]

    async def one(way: str) -> tuple[bool, bool]:
        box = f"mb-{way[:3]}-{uuid.uuid4().hex[:8]}"
        old = await _two_messages(env, box)
        await env.svc.pool.execute(
            "UPDATE conversations SET status = 'closed',"
            " last_message_at = now() - interval '30 days' + interval '3 seconds'"
            " WHERE id_conversa = $1",
            old,
        )
        if way == "reference":
            await _reference(env, box, [*z, *a_batch])
            await asyncio.sleep(4)  # past the reopen age now
            await _reference(env, box, b_batch)
        else:
            za, aa, ba = _envs(box, z), _envs(box, a_batch), _envs(box, b_batch)
            early = _EarlyReads(env, monkeypatch)
            laid: list[bool] = []
            take = placement._Segment.take

            def counted(seg: Any, rows: Any, after: Any = None, *rest: Any) -> None:
                if after is None:
                    laid.append(False)
                else:  # the row read for the old conversation says stale; the copy does not
                    row = [r["stale"] for r in rows if r["kind"] == 1 and r["id_conversa"] == old]
                    laid.append((row[:1], after.convs[old].stale) if old in after.convs else True)
                take(seg, rows, after, *rest)

            monkeypatch.setattr(placement._Segment, "take", counted)
            on_batch = received_batch(env.svc)
            await early.make(aa)  # A reads ahead while Z is placed
            await on_batch(za)
            await asyncio.sleep(4)  # past the reopen age now
            await early.make(ba)  # B reads ahead while A is placed: its rows say stale
            await on_batch(aa)  # laid over Z
            await on_batch(ba)  # laid over A
            monkeypatch.setattr(placement._Segment, "take", take)
            # Z read under the lock; A laid over Z; B laid over A, its own row: stale
            assert laid == [False, ([False], False), ([True], False)], laid
        conv = await _conversations(env, box)
        return conv["<b@c.test>"][0] == old, conv["<b@c.test>"][1] == old

    results = {way: await one(way) for way in ("reference", "batched")}
    assert results["reference"] == (False, True)  # a new conversation linked to the old one
    assert results["batched"] == results["reference"], results


async def test_a_batch_that_fails_after_its_write_leaves_nothing_to_lay_over(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A is written, then fails (its staging raises): rolled back. B read ahead before A and
    must place as if A never was; A again afterwards. Same as one at a time in that order."""
    from services.threader import stream

    rng = random.Random("fail-after-write")
    specs = _scenario(rng, 30)
    a_specs, b_specs = specs[:15], specs[15:]
    ref, box = f"mb-ref-{uuid.uuid4().hex[:8]}", f"mb-bat-{uuid.uuid4().hex[:8]}"
    warm = _scenario(random.Random("warm"), 10, start=100)
    await _reference(env, ref, [*warm, *b_specs, *a_specs])
    on_batch = received_batch(env.svc)
    await on_batch(_envs(box, warm))
    aa, ba = _envs(box, a_specs), _envs(box, b_specs)
    await _EarlyReads(env, monkeypatch).make(ba)  # B reads ahead of A
    stage = stream.outbox.stage_entries
    calls = {"n": 0}

    async def failing(conn: Any, events: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("staging failed after the write")
        return await stage(conn, events)

    monkeypatch.setattr(stream.outbox, "stage_entries", failing)
    with pytest.raises(RuntimeError):
        await on_batch(aa)
    assert env.svc.carried is None
    await on_batch(ba)
    await on_batch(aa)
    _compare(await _snapshot(env, box), await _snapshot(env, ref))


async def test_an_outbound_placement_after_the_read_ahead_is_seen(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our reply is placed (mail.status) after the batch read ahead; the batch answers it."""
    from libs.common.events import MailStatus, SentMessage
    from services.threader.stream import handlers

    async def one(way: str) -> bool:
        box = f"mb-{way[:3]}-{uuid.uuid4().hex[:8]}"
        old = await _two_messages(env, box)
        _, on_status = handlers(env.svc)
        sent = MailStatus(
            send_id=str(uuid.uuid4()),
            id_conversa=str(old),
            mailbox_id=box,
            status="sent",
            message=SentMessage.model_validate(
                {
                    "message_id": "<out1@chatflow.test>",
                    "from": {"address": "support@chatflow.test"},
                    "to": [{"address": "zoe@customer.test"}],
                    "subject": "Re: Printer",
                    "date": datetime.now(UTC),
                    "in_reply_to": ["<m2@c.test>"],
                    "references": ["<m1@c.test>", "<m2@c.test>"],
                }
            ),
        )

        async def change() -> None:
            await on_status(Envelope.of(sent, producer="sender"), "0-1")

        batch = [
            _spec("<r@c.test>", ["<out1@chatflow.test>"], "Thanks"),
            _spec("<x@o.test>", [], "Other"),
        ]
        await _placed_after(env, monkeypatch, way, box, batch, change)
        conv = await _conversations(env, box)
        return bool(conv["<r@c.test>"][0] == old)

    results = {way: await one(way) for way in ("reference", "batched")}
    assert results["batched"] == results["reference"] is True, results
