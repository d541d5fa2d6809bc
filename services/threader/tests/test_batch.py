"""Set-based placement (``services.threader.placement``) against the per-message path.

The same mail goes into two mailboxes: one message per transaction through ``place_message``
(the reference), and in batches through ``received_batch``. Groupings, every conversation's
stored state, its thread keys and search vector, and the events announced must be the same.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.common import outbox
from libs.common.bus import Turns
from libs.common.events import Envelope, MailReceived
from services.threader import placement, storage
from services.threader.stream import _place_received, received_batch
from services.threader.tests import test_placement as tp
from services.threader.tests.test_conversations import Env

SUPPORT = "support@chatflow.test"
NOW = datetime.now(UTC).replace(microsecond=0)
PEOPLE = ["zoe@customer.test", "kim@customer.test", "bob@other.test", "ana@gmail.com"]
SUBJECTS = ["Question", "Printer jam", "Order 7 is late", "Refund"]


def _mail(mailbox: str, spec: dict[str, Any]) -> MailReceived:
    return MailReceived.model_validate({"mailbox_id": mailbox, "mailbox_address": SUPPORT, **spec})


async def _reference(env: Env, mailbox: str, specs: Sequence[dict[str, Any]]) -> None:
    """One message per transaction, the per-message way."""
    for spec in specs:
        mail = _mail(mailbox, spec)
        e = Envelope.of(mail, producer="ingest")
        async with env.svc.pool.acquire() as conn, conn.transaction():
            await storage.lock_mailboxes(conn, [mailbox])
            await outbox.stage(conn, *await _place_received(env.svc, conn, e, mail))


async def _batched(
    env: Env, mailbox: str, specs: Sequence[dict[str, Any]], rng: random.Random, depth: int = 1
) -> None:
    """In batches of random sizes; ``depth`` of them in flight at once, as the service's
    consumers run them (each reads ahead while the one before it is placed)."""
    on_batch = received_batch(env.svc)
    chunks = []
    i = 0
    while i < len(specs):
        size = rng.choice([1, 2, 3, 5, 8, 13, 40])
        chunks.append(
            [
                (Envelope.of(_mail(mailbox, s), producer="ingest"), "0-1")
                for s in specs[i : i + size]
            ]
        )
        i += size
    slots = asyncio.Semaphore(depth)
    if depth > 1:
        # Connections open in the pool, as in a running service: a batch's read ahead waiting
        # for a new one came after the batch before it was stored (never laid over).
        held = [await env.svc.pool.acquire() for _ in range(depth + 1)]
        for conn in held:
            await env.svc.pool.release(conn)

    async def one(chunk: list[tuple[Envelope, str]]) -> None:
        async with slots:  # taken in creation order: the batches' tickets are in stream order
            await on_batch(chunk)

    await asyncio.gather(*(one(c) for c in chunks))


def _scenario(rng: random.Random, count: int, start: int = 0) -> list[dict[str, Any]]:
    """Replies (some to several conversations: merges), new mail, mail with no link (the
    subject fallback), re-deliveries, machine replies, people in Cc and Reply-To."""
    out: list[dict[str, Any]] = []
    ids: list[str] = []
    for i in range(start, start + count):
        sender = rng.choice(PEOPLE)
        subject = rng.choice(SUBJECTS)
        refs: list[str] = []
        kind = rng.random()
        if ids and kind < 0.35:
            refs = [rng.choice(ids)]
            if rng.random() < 0.15:
                refs.append(rng.choice(ids))  # names two: may merge
            subject = f"Re: {subject}"
        elif kind < 0.55:
            subject = f"Re: {subject}"  # no link: the subject fallback
        elif ids and kind < 0.6:
            refs = [f"<ghost{rng.randrange(5)}@customer.test>"]  # a parent we never saw
        mid = f"<m{i}@{sender.rpartition('@')[2]}>"
        if ids and rng.random() < 0.05:
            mid = rng.choice(ids)  # a re-delivery
        ids.append(mid)
        at = NOW - timedelta(hours=rng.randrange(0, 200))
        out.append(
            {
                "ingest_id": uuid.uuid4().hex,
                "message_id": mid,
                "in_reply_to": refs[-1:],
                "references": refs,
                "from": {"name": sender.split("@")[0], "address": sender},
                "to": [{"address": SUPPORT}],
                "cc": [{"address": rng.choice(PEOPLE)}] if rng.random() < 0.2 else [],
                "reply_to": [{"address": "form@web.test"}] if rng.random() < 0.1 else [],
                "subject": subject,
                "date": at,
                "received_at": at + timedelta(minutes=rng.randrange(0, 30)),
                "text": f"message {i} " + " ".join(rng.sample(SUBJECTS, 2)),
                "flags": {"auto_submitted": True} if rng.random() < 0.08 else {},
            }
        )
    return out


async def _snapshot(env: Env, mailbox: str) -> dict[str, Any]:
    """The mailbox's state with conversations named by their first message (ids differ)."""
    pool = env.svc.pool
    msgs = await pool.fetch(
        "SELECT message_id, id_conversa FROM messages WHERE mailbox_id = $1 ORDER BY created_at,"
        " date, message_id",
        mailbox,
    )
    events = await pool.fetch(
        "SELECT stream_type, envelope FROM outbox WHERE envelope::jsonb -> 'payload' ->>"
        " 'mailbox_id' = $1 ORDER BY id",
        mailbox,
    )
    numbers = {
        str(r["id_conversa"]): r["number"]
        for r in await pool.fetch(
            "SELECT id_conversa, number FROM conversations WHERE mailbox_id = $1", mailbox
        )
    }
    name: dict[str, str] = {}
    announced = []
    for r in events:
        p = json.loads(r["envelope"])["payload"]
        if r["stream_type"] == "conversation.message_added":
            cid = p["conversation"]["id_conversa"]
            name.setdefault(cid, p["message"]["message_id"])
    for r in events:
        p = json.loads(r["envelope"])["payload"]
        if r["stream_type"] == "conversation.message_added":
            conv = dict(p["conversation"])
            # Numbers differ between the mailboxes; each must be its conversation's own.
            assert conv["number"] == numbers[conv["id_conversa"]], conv
            conv["id_conversa"] = name[conv.pop("id_conversa")]
            conv.pop("number")
            conv.pop("token")
            conv.pop("mailbox_id")
            msg = dict(p["message"])
            msg.pop("id")
            announced.append(("added", conv, msg))
        elif r["stream_type"] == "conversation.merged":
            announced.append(
                ("merged", name.get(p["into"]), sorted(name.get(m, m) for m in p["merged"]))
            )
    convs = await pool.fetch(
        f"""SELECT {storage._CONV_COLUMNS}, search::text AS search, last_inbound_at IS NULL AS
                   never_inbound
            FROM conversations WHERE mailbox_id = $1""",
        mailbox,
    )
    state = {}
    for c in convs:
        cid = str(c["id_conversa"])
        if cid not in name:
            continue
        state[name[cid]] = {
            "status": c["status"],
            "message_count": c["message_count"],
            "participants": c["participants"],
            "merged_into": name.get(str(c["merged_into"])) if c["merged_into"] else None,
            "linked_to": name.get(str(c["linked_to"])) if c["linked_to"] else None,
            "last_message_at": c["last_message_at"],
            "subject": c["subject"],
            "search": c["search"],
            "never_inbound": c["never_inbound"],
        }
    keys = await pool.fetch(
        "SELECT message_id, id_conversa FROM thread_keys WHERE mailbox_id = $1", mailbox
    )
    activity = await pool.fetchval(
        """SELECT count(DISTINCT a.id_conversa) FROM activity a JOIN conversations c
           USING (id_conversa) WHERE c.mailbox_id = $1""",
        mailbox,
    )
    return {
        "messages": {r["message_id"]: name[str(r["id_conversa"])] for r in msgs},
        "conversations": state,
        "keys": {r["message_id"]: name.get(str(r["id_conversa"])) for r in keys},
        "events": announced,
        "conversations_with_activity": activity,
    }


async def _close_some(env: Env, mailbox: str, at: datetime | None = None) -> None:
    """Close a third of the conversations, half of those past the reopen age (the same ones,
    by their least Message-ID, in both mailboxes): quiet since ``at`` (default now) less 40 or
    2 days."""
    rows = await env.svc.pool.fetch(
        """SELECT id_conversa, min(message_id) AS message_id FROM messages
           WHERE mailbox_id = $1 GROUP BY id_conversa""",
        mailbox,
    )
    for r in sorted(rows, key=lambda r: r["message_id"]):
        pick = random.Random(f"{r['message_id']}").random()
        if pick < 0.33:
            age = timedelta(days=40) if pick < 0.16 else timedelta(days=2)
            await env.svc.pool.execute(
                """UPDATE conversations SET status = 'closed',
                          last_message_at = coalesce($3::timestamptz, now()) - $2::interval
                   WHERE id_conversa = $1""",
                r["id_conversa"],
                age,
                at,
            )


async def _same_as_one_at_a_time(env: Env, seed: int, depth: int) -> None:
    env.svc.rules = storage.Rules(reopen_max_age=timedelta(days=30))
    rng = random.Random(f"batch-{seed}")
    first, second = _scenario(rng, 60), _scenario(rng, 60, start=60)
    ref, box = f"mb-ref-{uuid.uuid4().hex[:8]}", f"mb-bat-{uuid.uuid4().hex[:8]}"
    await _reference(env, ref, first)
    await _batched(env, box, first, random.Random(seed), depth)
    assert await _snapshot(env, box) == await _snapshot(env, ref)
    # Then some closed, some past the reopen age: later mail reopens or starts linked ones.
    await _close_some(env, ref)
    await _close_some(env, box)
    await _reference(env, ref, second)
    await _batched(env, box, second, random.Random(seed + 100), depth)
    got, want = await _snapshot(env, box), await _snapshot(env, ref)
    assert got["messages"] == want["messages"]
    assert got["keys"] == want["keys"]
    assert got["events"] == want["events"]
    # last_message_at of the conversations _close_some aged is now() less a fixed time, taken
    # at two moments: compare the rest.
    for c in (*got["conversations"].values(), *want["conversations"].values()):
        c.pop("last_message_at")
    assert got["conversations"] == want["conversations"]


def _overlays(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per read a segment took (under the lock or ahead of it): whether the batch before it
    was laid over it."""
    taken: list[bool] = []
    take = placement._Segment.take

    def counted(seg: Any, rows: Any, after: Any = None, *rest: Any) -> None:
        taken.append(after is not None)
        take(seg, rows, after, *rest)

    monkeypatch.setattr(placement._Segment, "take", counted)
    return taken


@pytest.mark.parametrize("seed", range(6))
async def test_batches_place_mail_as_one_message_at_a_time_does(env: Env, seed: int) -> None:
    await _same_as_one_at_a_time(env, seed, depth=1)


@pytest.mark.parametrize("seed", range(6))
async def test_batches_read_ahead_of_their_turn_place_mail_the_same(
    env: Env, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches in flight: the second's prefetch reads before the first is stored, and
    the first's effects are laid over it (or it reads again). Same result."""
    taken = _overlays(monkeypatch)
    await _same_as_one_at_a_time(env, seed, depth=2)
    assert any(taken), "no prefetch had the batch before it laid over"


def _inbound(mailbox: str, m: tp.M, by_label: dict[str, tp.M]) -> Envelope:
    payload = tp.inbound_payload(mailbox, m, by_label)
    return Envelope.of(MailReceived.model_validate(payload), producer="ingest")


async def _play_in_batches(env: Env, case: tp.Case, order: Sequence[tp.M]) -> tp.Partition:
    """The inbound mail between two outbound messages (or the ends) as one batch."""
    mailbox = f"mb-{uuid.uuid4().hex[:12]}"
    by_label = {m.label: m for m in case.messages}
    convs = await tp.precreate(env, mailbox, case.conversations)
    on_batch = received_batch(env.svc)
    run: list[Envelope] = []
    for m in [*order, None]:
        if m is not None and not m.out_in:
            run.append(_inbound(mailbox, m, by_label))
            continue
        if run:
            await on_batch([(e, "0-1") for e in run])
            run = []
        if m is not None:
            await tp.deliver(env, mailbox, m, by_label, convs)
    return await tp.grouping(env, mailbox, case)


@pytest.mark.parametrize("case", tp.CASES, ids=[c.name for c in tp.CASES])
async def test_fault_cases_grouped_the_same_when_their_mail_comes_in_one_batch(
    env: Env, case: tp.Case
) -> None:
    expected = frozenset(frozenset(g) for g in case.expected)
    for order in tp.arrival_orders(case.messages, f"batch-{case.name}", want=20):
        assert await _play_in_batches(env, case, order) == expected, [m.label for m in order]


async def test_turns_go_in_ticket_order_whoever_is_ready_first() -> None:
    turns = Turns()
    order: list[int] = []

    async def batch(ticket: int, ready_after: float, fail: bool = False) -> None:
        try:
            await asyncio.sleep(ready_after)
            if fail:
                raise RuntimeError("this batch failed before its turn")
            await turns.wait(ticket)
            order.append(ticket)
            await asyncio.sleep(0.01)
        finally:
            turns.finish(ticket)

    tickets = [turns.take() for _ in range(5)]
    results = await asyncio.gather(
        batch(tickets[0], 0.03),
        batch(tickets[1], 0.0),
        batch(tickets[2], 0.0, fail=True),
        batch(tickets[3], 0.01),
        batch(tickets[4], 0.0),
        return_exceptions=True,
    )
    assert order == [0, 1, 3, 4]
    assert isinstance(results[2], RuntimeError)
    late = turns.take()
    await asyncio.wait_for(turns.wait(late), 1)  # nobody before it is left: at once


class _FirstAcquireLate:
    """A pool whose first ``acquire`` takes 50 ms longer."""

    def __init__(self, pool: Any) -> None:
        self.pool, self.calls = pool, 0

    def acquire(self) -> Any:
        self.calls += 1
        return _Late(self.pool.acquire(), 0.05 if self.calls == 1 else 0.0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


class _Late:
    def __init__(self, cm: Any, delay: float) -> None:
        self.cm, self.delay = cm, delay

    async def __aenter__(self) -> Any:
        await asyncio.sleep(self.delay)
        return await self.cm.__aenter__()

    async def __aexit__(self, *exc: Any) -> Any:
        return await self.cm.__aexit__(*exc)


async def test_two_consumers_batches_are_placed_in_the_order_they_were_read(env: Env) -> None:
    """The later batch is ready first (the first one's connection comes late), yet is placed
    second: its events follow the first batch's, as with one consumer."""
    box = f"mb-{uuid.uuid4().hex[:12]}"
    specs = _scenario(random.Random("turns"), 61)
    on_batch = received_batch(env.svc)
    first = [(Envelope.of(_mail(box, s), producer="ingest"), "0-1") for s in specs[:60]]
    second = [(Envelope.of(_mail(box, specs[60]), producer="ingest"), "0-2")]
    pool = env.svc.pool
    env.svc.pool = _FirstAcquireLate(pool)  # type: ignore[assignment]
    try:
        await asyncio.gather(on_batch(first), on_batch(second))
    finally:
        env.svc.pool = pool
    rows = await env.svc.pool.fetch(
        """SELECT envelope::jsonb -> 'payload' -> 'message' ->> 'message_id' AS mid FROM outbox
           WHERE stream_type = 'conversation.message_added'
             AND envelope::jsonb -> 'payload' ->> 'mailbox_id' = $1 ORDER BY id""",
        box,
    )
    assert rows and rows[-1]["mid"] == specs[60]["message_id"]


ZOE = {"name": "Zoe", "address": "zoe@customer.test"}


def _spec(mid: str, refs: list[str], subject: str) -> dict[str, Any]:
    return {
        "ingest_id": uuid.uuid4().hex,
        "message_id": mid,
        "in_reply_to": refs[-1:],
        "references": refs,
        "from": ZOE,
        "to": [{"address": SUPPORT}],
        "subject": subject,
        "date": NOW,
        "received_at": NOW,
        "text": "hello",
    }


def _batch(box: str, *specs: dict[str, Any]) -> list[tuple[Envelope, str]]:
    return [(Envelope.of(_mail(box, s), producer="ingest"), "0-1") for s in specs]


async def _two_messages(env: Env, box: str) -> uuid.UUID:
    """<m1> and its reply <m2> in one conversation (one message at a time)."""
    await _reference(
        env,
        box,
        [
            _spec("<m1@c.test>", [], "Printer"),
            _spec("<m2@c.test>", ["<m1@c.test>"], "Re: Printer"),
        ],
    )
    cid: uuid.UUID = await env.svc.pool.fetchval(
        "SELECT id_conversa FROM messages WHERE mailbox_id = $1 AND message_id = '<m1@c.test>'",
        box,
    )
    return cid


async def _closed_long_ago(env: Env, box: str) -> uuid.UUID:
    """``_two_messages``, then closed and quiet for 40 days."""
    old = await _two_messages(env, box)
    await env.svc.pool.execute(
        "UPDATE conversations SET status = 'closed', last_message_at = now() - interval '40 days'"
        " WHERE id_conversa = $1",
        old,
    )
    return old


async def _conversations(env: Env, box: str) -> dict[str, tuple[uuid.UUID, uuid.UUID | None]]:
    rows = await env.svc.pool.fetch(
        "SELECT m.message_id, m.id_conversa, c.linked_to FROM messages m"
        " JOIN conversations c USING (id_conversa) WHERE m.mailbox_id = $1",
        box,
    )
    return {r["message_id"]: (r["id_conversa"], r["linked_to"]) for r in rows}


async def test_replies_in_one_batch_to_a_conversation_closed_long_ago_start_one_new(
    env: Env,
) -> None:
    """The first reply starts a new conversation that takes the old one's thread; the second,
    in the same batch, to another message of the old one, joins it; so does later mail that
    answers the first reply (its key was registered for the new conversation)."""
    env.svc.rules = storage.Rules(reopen_max_age=timedelta(days=30))
    box = f"mb-move-{uuid.uuid4().hex[:8]}"
    old = await _closed_long_ago(env, box)
    on_batch = received_batch(env.svc)
    auto = _spec("<auto@c.test>", ["<m1@c.test>"], "Out of office")
    auto["flags"] = {"auto_submitted": True}  # joins the old conversation, reopens nothing
    await on_batch(
        _batch(
            box,
            auto,
            _spec("<a@c.test>", ["<m1@c.test>"], "Re: Printer"),
            _spec("<x@o.test>", [], "Other"),
            _spec("<b@c.test>", ["<m2@c.test>"], "Re: Printer"),
            _spec("<c@c.test>", ["<ghost@c.test>", "<m1@c.test>"], "Re: Printer"),
        )
    )
    await on_batch(
        _batch(
            box,
            _spec("<d@c.test>", ["<ghost@c.test>"], "Re: Printer"),
            _spec("<e@c.test>", ["<auto@c.test>"], "Re: Out of office"),
            _spec("<y@o.test>", [], "More"),
        )
    )
    conv = await _conversations(env, box)
    new, linked = conv["<a@c.test>"]
    assert new != old and linked == old
    assert conv["<b@c.test>"][0] == conv["<c@c.test>"][0] == conv["<d@c.test>"][0] == new
    assert conv["<m1@c.test>"][0] == conv["<auto@c.test>"][0] == old
    assert conv["<e@c.test>"][0] == new  # the key the auto-reply brought moved with the thread


async def test_a_read_ahead_follows_the_thread_the_batch_before_moved(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply to a conversation closed past the reopen age starts a new one, which takes the
    old one's thread keys. The next batch read ahead before that was stored: its reply to
    another message of the old conversation must still join the new one."""
    env.svc.rules = storage.Rules(reopen_max_age=timedelta(days=30))
    box = f"mb-move-{uuid.uuid4().hex[:8]}"
    old = await _closed_long_ago(env, box)
    laid_over = _overlays(monkeypatch)
    # Connections open in the pool, as in a running service (a new one takes longer than the
    # first batch's whole placement).
    held = [await env.svc.pool.acquire() for _ in range(3)]
    for conn in held:
        await env.svc.pool.release(conn)
    on_batch = received_batch(env.svc)
    await asyncio.gather(
        on_batch(
            _batch(
                box,
                _spec("<a@c.test>", ["<m1@c.test>"], "Re: Printer"),
                _spec("<x@o.test>", [], "Other"),
            )
        ),
        on_batch(
            _batch(
                box,
                _spec("<b@c.test>", ["<m2@c.test>"], "Re: Printer"),
                _spec("<y@o.test>", [], "More"),
            )
        ),
    )
    assert laid_over == [False, True]  # the second batch's prefetch predates the first's write
    conv = await _conversations(env, box)
    new, linked = conv["<a@c.test>"]
    assert new != old and linked == old
    assert conv["<b@c.test>"][0] == new
