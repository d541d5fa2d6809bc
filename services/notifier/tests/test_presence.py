"""Presence and collision detection across two replicas, with real WSS clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from libs.common import testing
from services.notifier import presence as presence_module
from services.notifier.frames import FRAME_TYPE

from .conftest import Env, Starter, assert_silent, mbx, message_added, recv_json, user, ws_connect


async def presence(
    ws: Any,
    id_conversa: str,
    viewing: list[str] | None = None,
    typing: list[str] | None = None,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """The first presence frame about ``id_conversa`` in the given state."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        f = await recv_json(ws, max(0.01, left), skip=())
        if f["type"] != "presence" or f["id_conversa"] != id_conversa:
            continue
        if (viewing is None or f["viewing"] == sorted(viewing)) and (
            typing is None or f["typing"] == sorted(typing)
        ):
            return f


async def known(env: Env, svc: Any, box: str) -> str:
    ev = message_added(box)
    await env.publish(ev)
    await testing.eventually(
        lambda: svc.pool.fetchval(
            "SELECT 1 FROM conversations WHERE id_conversa = $1", ev.id_conversa
        )
    )
    return ev.id_conversa


async def test_viewing_and_typing_reach_the_mailboxs_agents_on_every_replica(
    env: Env, start: Starter
) -> None:
    a = await start(presence_typing_ttl_s=0.6)
    b = await start(presence_typing_ttl_s=0.6)
    box, other = mbx(), mbx()
    ana, bia, carl = user(), user(), user()
    c1, c2 = await known(env, a, box), await known(env, a, box)
    foreign = await known(env, a, other)
    async with (
        ws_connect(a, env.token(ana, [box])) as wa,
        ws_connect(b, env.token(bia, [box])) as wb,
        ws_connect(b, env.token(carl, [other])) as wc,
    ):
        await testing.eventually(lambda: a.presence.online(ana))
        assert await a.presence.online(bia)  # any replica answers for any connection
        await wa.send(json.dumps({"type": "viewing", "id_conversa": c1}))
        await presence(wa, c1, [ana], [])
        f = await presence(wb, c1, [ana], [])
        assert f["event_id"]
        # Bia types: Ana sees a collision coming; typing stops on its own.
        await wb.send(json.dumps({"type": "typing", "id_conversa": c1}))
        await presence(wa, c1, [ana], [bia])
        await presence(wa, c1, [ana], [], timeout=3)
        # Ana opens another conversation: she left the first one.
        await wa.send(json.dumps({"type": "viewing", "id_conversa": c2}))
        await presence(wb, c1, [], [])
        await presence(wb, c2, [ana])
        # An agent of another mailbox neither sees nor may announce.
        await assert_silent(wc, 0.3, skip=("badge",))
        await wc.send(json.dumps({"type": "viewing", "id_conversa": c1}))
        err = await recv_json(wc)
        assert (err["type"], err["code"], err["id_conversa"]) == ("error", "not_found", c1)
        await wb.send(json.dumps({"type": "viewing", "id_conversa": foreign}))
        assert (await recv_json(wb))["code"] == "not_found"
        # Leaving explicitly.
        await wb.send(json.dumps({"type": "viewing", "id_conversa": c2}))
        await presence(wa, c2, [ana, bia])
        await wb.send(json.dumps({"type": "left", "id_conversa": c2}))
        await presence(wa, c2, [ana])
        await wa.close()
        # Disconnecting ends Ana's view, seen from the other replica.
        await presence(wb, c2, [])
        await testing.eventually(lambda: _not(a.presence.online(ana)))


async def test_typing_ends_at_disconnect_also_where_the_agent_was_not_viewing(
    env: Env, start: Starter
) -> None:
    """Typing in a conversation one is not viewing (a reply box beside the list) ended only when
    its entry expired; now the disconnect ends it (found by a trial). The TTL here is long, so
    only the disconnect can clear it within the wait."""
    svc = await start(presence_typing_ttl_s=30)
    box = mbx()
    ana, bia = user(), user()
    cid = await known(env, svc, box)
    async with ws_connect(svc, env.token(bia, [box])) as wb:
        async with ws_connect(svc, env.token(ana, [box])) as wa:
            await wa.send(json.dumps({"type": "typing", "id_conversa": cid}))
            await presence(wb, cid, [], [ana])
        await presence(wb, cid, [], [], timeout=3)


async def _not(aw: Any) -> bool:
    return not await aw


async def test_presence_is_not_replayed_on_resume(env: Env, start: Starter) -> None:
    svc = await start()
    box = mbx()
    cid = await known(env, svc, box)
    [(first, _)] = await testing.eventually(
        lambda: env.bus.redis.xrange(env.bus.stream(FRAME_TYPE), count=1)
    )
    ana = user()
    async with ws_connect(svc, env.token(ana, [box])) as wa:
        async with ws_connect(svc, env.token(user(), [box])) as wb:
            await wa.send(json.dumps({"type": "viewing", "id_conversa": cid}))
            await presence(wb, cid, [ana])
        async with ws_connect(svc, env.token(user(), [box])) as again:
            await again.send(json.dumps({"type": "resume", "after": first.decode()}))
            assert (await recv_json(again, skip=()))["snapshot"]  # badges come whole instead
            await assert_silent(again, 0.6, skip=())


async def test_opening_a_conversation_gives_the_viewer_one_presence_frame(
    env: Env, start: Starter
) -> None:
    """A change reaches the viewer with the mailbox's frame (it has an event id); when nothing
    changed for the others, the viewer still gets the state, once, as a direct answer."""
    svc = await start()
    box = mbx()
    cid = await known(env, svc, box)
    ana = user()
    async with ws_connect(svc, env.token(ana, [box])) as wa:
        await wa.send(json.dumps({"type": "viewing", "id_conversa": cid}))
        f = await presence(wa, cid, [ana], [])
        assert f["event_id"]
        await assert_silent(wa, 0.6, skip=("badge",))
        await wa.send(json.dumps({"type": "viewing", "id_conversa": cid}))  # again: no change
        f = await presence(wa, cid, [ana], [])
        assert "event_id" not in f
        await assert_silent(wa, 0.6, skip=("badge",))


async def test_the_heartbeat_keeps_connections_and_views_past_their_ttl(
    env: Env, start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online marks and views live one TTL unless refreshed: the heartbeat's script refreshes
    every connection of the replica, a chunk of keys per call (one key each here)."""
    monkeypatch.setattr(presence_module, "REFRESH_CHUNK", 1)
    svc = await start(presence_view_ttl_s=1.0, presence_heartbeat_s=0.25)
    box = mbx()
    cid = await known(env, svc, box)
    ana, bia = user(), user()
    async with (
        ws_connect(svc, env.token(ana, [box])) as wa,
        ws_connect(svc, env.token(bia, [box])) as wb,
    ):
        await wa.send(json.dumps({"type": "viewing", "id_conversa": cid}))
        await presence(wb, cid, [ana], [])
        await testing.eventually(lambda: svc.presence.online(bia))
        await asyncio.sleep(2.5)  # 2.5 TTLs
        assert await svc.presence.online(ana) and await svc.presence.online(bia)
        members = await env.bus.redis.zrange(
            f"{env.bus.prefix}notifier:presence:{cid}", 0, -1, withscores=True
        )
        assert [m for m, _ in members if m.startswith(b"v|")], members
        # No "nobody views it" was announced meanwhile.
        await assert_silent(wb, 0.3, skip=("badge",))
    # Gone: the marks expire once nobody refreshes them.
    await testing.eventually(lambda: _not(svc.presence.online(ana)), timeout=5)
