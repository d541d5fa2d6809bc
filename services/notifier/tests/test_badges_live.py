"""Unread badges end to end: real PostgreSQL and Redis, replicas in-process, WSS clients."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime
from typing import Any

from libs.common import testing
from libs.common.events import (
    ConversationMerged,
    ConversationRead,
    ConversationUpdated,
    Envelope,
)
from services.notifier.service import NotifierService

from .conftest import Env, Starter, assert_silent, mbx, message_added, recv_json, user, ws_connect


async def badge(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The next badge frame, skipping the others."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        frame = await recv_json(ws, max(0.01, left), skip=())
        if frame["type"] == "badge":
            return frame


async def snapshot(svc: NotifierService, env: Env, sub: str, boxes: list[str]) -> dict[str, Any]:
    async with ws_connect(svc, env.token(sub, boxes)) as ws:
        frame = await badge(ws)
        assert frame["snapshot"] is True and "event_id" not in frame
        return frame


async def stop(svc: NotifierService) -> None:
    svc.stop_event.set()
    await testing.eventually(lambda: not svc.live.serving, timeout=10)
    await asyncio.sleep(0.3)


def closed(ev: Any, status: str = "closed") -> ConversationUpdated:
    return ConversationUpdated(**{**ev.conversation.model_dump(by_alias=True), "status": status})


async def test_badges_follow_messages_reads_closes_and_merges(env: Env, start: Starter) -> None:
    svc = await start()
    box, ana, bia = mbx(), user(), user()
    async with (
        ws_connect(svc, env.token(ana, [box])) as wa,
        ws_connect(svc, env.token(bia, [box])) as wb,
    ):
        for ws in (wa, wb):
            first = await badge(ws)
            assert first == {"type": "badge", "snapshot": True, "totals": {box: 0},
                             "conversations": []}  # fmt: skip
        one = message_added(box)
        await env.publish(one)
        for ws in (wa, wb):
            f = await badge(ws)
            assert (f["id_conversa"], f["unread"], f["mailbox_total"]) == (one.id_conversa, 1, 1)
            assert f["mailbox"] == box and f["event_id"]
        two = message_added(box, one.id_conversa, n=2)
        await env.publish(two)
        for ws in (wa, wb):
            assert (await badge(ws))["unread"] == 2
        # Ana reads it over the socket: her badge only.
        await wa.send(json.dumps({"type": "read", "id_conversa": one.id_conversa}))
        f = await badge(wa)
        assert (f["unread"], f["mailbox_total"]) == (0, 0)
        await assert_silent(wb, 0.5, skip=("presence",))
        # An outbound reply changes no badge.
        out = message_added(box, one.id_conversa, n=3)
        out.message.direction = "out"
        await env.publish(out)
        await assert_silent(wa, 0.5, skip=("message.added", "presence"))
        # Closing clears Bia's too; a new inbound message makes it unread again for both.
        await env.publish(closed(out))
        for ws in (wa, wb):
            f = await badge(ws)
            assert (f["unread"], f["mailbox_total"]) == (0, 0)
        again = message_added(box, one.id_conversa, n=4)
        await env.publish(again)
        for ws in (wa, wb):
            f = await badge(ws)
            assert (f["unread"], f["mailbox_total"]) == (1, 1)
        # A second conversation, read by Bia through the REST route (conversation.read).
        other = message_added(box)
        await env.publish(other)
        for ws in (wa, wb):
            assert (await badge(ws))["mailbox_total"] == 2
        read = ConversationRead(
            id_conversa=other.id_conversa, mailbox_id=box, user_id=bia, read_at=datetime.now(UTC)
        )
        await env.publish(read, producer="threader")
        f = await badge(wb)
        assert (f["id_conversa"], f["unread"], f["mailbox_total"]) == (other.id_conversa, 0, 1)
        # Merge: the survivor carries both counts, per agent.
        await env.publish(
            ConversationMerged(mailbox_id=box, into=one.id_conversa, merged=[other.id_conversa])
        )
        fa, fb = await badge(wa), await badge(wb)
        assert fa["merged"] == [other.id_conversa] and fa["id_conversa"] == one.id_conversa
        assert (fa["unread"], fa["mailbox_total"]) == (2, 2)
        assert (fb["unread"], fb["mailbox_total"]) == (1, 1)
    # A fresh connection gets the same numbers from the schema.
    snap = await snapshot(svc, env, ana, [box])
    assert snap["totals"] == {box: 2}
    assert snap["conversations"] == [{"id_conversa": one.id_conversa, "mailbox": box, "unread": 2}]


async def test_automatic_mail_raises_no_badge_and_shows_as_automatic(
    env: Env, start: Starter
) -> None:
    """An auto-reply or a bounce (``automatic``) arrives on the socket, marked, but is no unread
    mail: no badge moves, not even on a closed conversation (found by a trial)."""
    svc = await start()
    box, ana = mbx(), user()
    async with ws_connect(svc, env.token(ana, [box])) as ws:
        assert (await badge(ws))["snapshot"] is True
        one = message_added(box)
        await env.publish(one)
        assert (await badge(ws))["unread"] == 1
        await env.publish(closed(one))
        assert (await badge(ws))["unread"] == 0
        auto = message_added(box, one.id_conversa, n=2)
        auto.message.automatic = True
        auto.conversation.status = "closed"
        await env.publish(auto)
        frame = await recv_json(ws, 5.0, skip=("presence",))
        assert frame["type"] == "message.added" and frame["message"]["automatic"] is True
        await assert_silent(ws, 0.5, skip=("presence",))  # no badge frame
        # A person writing again counts as before.
        await env.publish(message_added(box, one.id_conversa, n=3))
        assert (await badge(ws))["unread"] == 1
    snap = await snapshot(svc, env, ana, [box])
    assert snap["totals"] == {box: 1}


async def test_read_frame_for_another_mailbox_is_not_found(env: Env, start: Starter) -> None:
    svc = await start()
    box, other = mbx(), mbx()
    ev = message_added(other)
    await env.publish(ev)
    async with ws_connect(svc, env.token(user(), [box])) as ws:
        await badge(ws)
        await testing.eventually(
            lambda: svc.pool.fetchval(
                "SELECT 1 FROM badge_conversations WHERE id_conversa = $1", ev.id_conversa
            )
        )
        await ws.send(json.dumps({"type": "read", "id_conversa": ev.id_conversa}))
        f = await recv_json(ws)
        assert (f["type"], f["code"]) == ("error", "not_found")


async def test_concurrent_duplicated_events_count_once_and_survive_a_restart(
    env: Env, start: Starter
) -> None:
    """Two replicas share the consumer group; every event is published twice; then both stop
    and a new replica serves the same counts."""
    a, b = await start(), await start()
    box, ana, bia = mbx(), user(), user()
    rng = random.Random(7)
    convs = [message_added(box) for _ in range(4)]
    expected = {c.id_conversa: 0 for c in convs}
    envs: list[Envelope] = []
    counts = {c.id_conversa: 0 for c in convs}
    for _ in range(60):
        c = rng.choice(convs)
        counts[c.id_conversa] += 1
        ev = message_added(box, c.id_conversa, n=counts[c.id_conversa])
        envs.append(Envelope.of(ev, producer="threader"))
        expected[c.id_conversa] += 1
    async with ws_connect(a, env.token(ana, [box])) as wa:
        assert (await badge(wa))["snapshot"]
        twice = envs + envs
        rng.shuffle(twice)
        await env.bus.publish_raw([(env.bus.stream(e.type), e.to_json()) for e in twice])
        total = len(envs)
        last: dict[str, Any] = {}
        while last.get("mailbox_total") != total:
            last = await badge(wa, 10)
            assert last["mailbox_total"] <= total
    await asyncio.sleep(0.5)  # nothing more may come: redeliveries are absorbed
    assert (
        await a.pool.fetchval(
            "SELECT sum(in_seq) FROM badge_conversations WHERE mailbox_id = $1", box
        )
        == total
    )
    # Bia reads one conversation; then every replica stops.
    read_one = convs[0].id_conversa
    async with ws_connect(b, env.token(bia, [box])) as wb:
        assert (await badge(wb))["totals"] == {box: total}
        await wb.send(json.dumps({"type": "read", "id_conversa": read_one}))
        assert (await badge(wb))["mailbox_total"] == total - expected[read_one]
    await stop(a)
    await stop(b)
    c = await start()
    snap_ana = await snapshot(c, env, ana, [box])
    snap_bia = await snapshot(c, env, bia, [box])
    assert snap_ana["totals"] == {box: total}
    assert {x["id_conversa"]: x["unread"] for x in snap_ana["conversations"]} == {
        k: v for k, v in expected.items() if v
    }
    assert snap_bia["totals"] == {box: total - expected[read_one]}
    assert read_one not in {x["id_conversa"] for x in snap_bia["conversations"]}
    # Counting goes on from the stored state after the restart.
    async with ws_connect(c, env.token(bia, [box])) as wb:
        await badge(wb)
        await env.publish(message_added(box, read_one, n=counts[read_one] + 1))
        f = await badge(wb)
        assert (f["id_conversa"], f["unread"]) == (read_one, 1)
        assert f["mailbox_total"] == total - expected[read_one] + 1


async def test_frames_committed_before_the_snapshot_are_not_counted_twice(
    env: Env, start: Starter
) -> None:
    """A connect while messages pour in: the snapshot plus the frames after it equal the truth."""
    svc = await start()
    box, sub = mbx(), user()
    ev = message_added(box)
    n = 40

    async def pour() -> None:
        for i in range(n):
            await env.publish(message_added(box, ev.id_conversa, n=i + 1))
            await asyncio.sleep(0.005)

    pouring = asyncio.create_task(pour())
    await asyncio.sleep(0.05)
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        snap = await badge(ws)
        total = snap["totals"][box]
        await pouring
        while total != n:
            f = await badge(ws, 10)
            total = f["mailbox_total"]
            assert total <= n
        await assert_silent(ws, 0.5, skip=("message.added",))


async def test_a_snapshot_counts_every_conversation_and_lists_the_newest(
    env: Env, start: Starter
) -> None:
    """Totals over every unread conversation of each mailbox, the list capped at
    ``badge_snapshot_max``, newest first; a read one is neither counted nor listed."""
    svc = await start(badge_snapshot_max=2)
    box, other, ana = mbx(), mbx(), user()
    events = [message_added(box) for _ in range(4)]
    for ev in events:
        await env.publish(ev)
        await testing.eventually(
            lambda ev=ev: svc.pool.fetchval(
                "SELECT 1 FROM badge_conversations WHERE id_conversa = $1", ev.id_conversa
            )
        )
    elsewhere = message_added(other)
    await env.publish(elsewhere)
    twice = message_added(box, events[0].id_conversa, n=2)
    await env.publish(twice)  # the oldest conversation is now the newest, with 2 unread
    read = ConversationRead(
        id_conversa=events[3].id_conversa, mailbox_id=box, user_id=ana, read_at=datetime.now(UTC)
    )
    await env.publish(read, producer="threader")
    await testing.eventually(
        lambda: svc.pool.fetchval("SELECT count(*) = 1 FROM badge_reads WHERE user_id = $1", ana)
    )
    await asyncio.sleep(0.2)
    snap = await snapshot(svc, env, ana, [box, other])
    assert snap["totals"] == {box: 4, other: 1}  # 2 + 1 + 1 (+ 0 for the read one), 1
    listed = [(c["id_conversa"], c["unread"]) for c in snap["conversations"]]
    assert listed == [(events[0].id_conversa, 2), (elsewhere.id_conversa, 1)]
